"""Load balancing within a pool, concurrency limits with a bounded queue, adapter affinity and active health
checks: fastroute in front of real `fastroute mock` upstreams."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import httpx
import pytest
from conftest import ProcessManager, http_request
from fastroute.health import parse_vllm_metrics
from test_gateway import KEYS, _sha, start_fastroute


def _config(m: dict[str, str]) -> str:
    return f"""
server:
  timeouts: {{connect: 0.5, first_byte: 5.0, idle: 5.0, total: 10.0}}
  watch_config: false
models:
  rr:
    upstream_model: m
    endpoints: ["{m['e1']}", "{m['e2']}", "{m['e3']}"]
    balance: round_robin
  wrr:
    upstream_model: m
    endpoints: [{{url: "{m['e1']}", weight: 1}}, {{url: "{m['e2']}", weight: 2}}, {{url: "{m['e3']}", weight: 3}}]
    balance: weighted
  p2c:
    upstream_model: m
    endpoints: ["{m['e1']}", "{m['e2']}", "{m['slow']}"]
  capped:
    upstream_model: m
    endpoints: ["{m['slow']}"]
    limits: {{max_in_flight: 2, queue: 2, queue_timeout: 3.0}}
  lora:
    upstream_model: m
    endpoints: ["{m['e1']}", "{m['e2']}", "{m['ad']}"]
    adapters: [x-lora]
    adapter_affinity: {{source: models, interval: 0.2}}
  checked:
    upstream_model: m
    endpoints: ["{m['e1']}", "{m['e2']}"]
    health: {{path: /health, interval: 0.2, timeout: 0.3, unhealthy_after: 2, healthy_after: 1}}
tenants:
  acme: {{keys_sha256: ["{_sha(KEYS['acme'])}"]}}
  lora-tenant: {{keys_sha256: ["{_sha('sk-lora-tenant')}"], base: lora, adapter: x-lora}}
routes:
  - {{name: by-model, requested: true}}
"""


@pytest.fixture(scope='module')
def env(module_start_mock, module_procs: ProcessManager, tmp_path_factory):
    mocks = {
        'e1': module_start_mock(model='m', name='e1'),
        'e2': module_start_mock(model='m', name='e2'),
        'e3': module_start_mock(model='m', name='e3'),
        'slow': module_start_mock(model='m', name='slow', latency_ms=400),
        'ad': module_start_mock(model='m', name='ad', adapters='x-lora'),
    }
    fr = start_fastroute(module_procs, _config({k: v.url for k, v in mocks.items()}), tmp_path_factory.mktemp('bal'))
    return {'fr': fr, **mocks}


@pytest.fixture(autouse=True)
def _reset(env):
    for k, m in env.items():
        if k != 'fr':
            m.reset()
    yield


_client = httpx.Client(timeout=10)


def _post(env: dict[str, Any], model: str, key: str = KEYS['acme']) -> httpx.Response:
    body = {'model': model, 'messages': [{'role': 'user', 'content': 'hi'}]}
    return _client.post(env['fr'].url + '/v1/chat/completions', json=body, headers={'authorization': f'Bearer {key}'})


def _counts(env: dict[str, Any], *names: str) -> list[int]:
    return [env[n].stats()['requests'] for n in names]


def test_round_robin_spreads_evenly(env):
    assert all(_post(env, 'rr').status_code == 200 for _ in range(30))
    assert _counts(env, 'e1', 'e2', 'e3') == [10, 10, 10]


def test_weighted_follows_the_weights_exactly(env):
    assert all(_post(env, 'wrr').status_code == 200 for _ in range(60))
    assert _counts(env, 'e1', 'e2', 'e3') == [10, 20, 30]


def test_p2c_sends_less_to_a_slow_endpoint(env):
    async def run() -> list[int]:
        async with httpx.AsyncClient(headers={'authorization': f'Bearer {KEYS["acme"]}'}, timeout=10) as c:
            body = {'model': 'p2c', 'messages': [{'role': 'user', 'content': 'hi'}]}
            sem = asyncio.Semaphore(12)

            async def one() -> int:
                async with sem:
                    return (await c.post(env['fr'].url + '/v1/chat/completions', json=body)).status_code

            return await asyncio.gather(*(one() for _ in range(150)))

    assert set(asyncio.run(run())) == {200}
    fast1, fast2, slow = _counts(env, 'e1', 'e2', 'slow')
    assert fast1 + fast2 + slow == 150
    assert slow < fast1 and slow < fast2, (fast1, fast2, slow)


def test_past_the_limit_and_the_queue_requests_are_shed_with_503(env):
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(headers={'authorization': f'Bearer {KEYS["acme"]}'}, timeout=10) as c:
            body = {'model': 'capped', 'messages': [{'role': 'user', 'content': 'hi'}]}
            return await asyncio.gather(*(c.post(env['fr'].url + '/v1/chat/completions', json=body) for _ in range(8)))

    t = time.monotonic()
    rs = asyncio.run(run())
    codes = sorted(r.status_code for r in rs)
    assert codes == [200] * 4 + [503] * 4, codes  # 2 in flight + 2 queued; the rest shed at once
    shed = [r for r in rs if r.status_code == 503]
    for r in shed:
        assert int(r.headers['retry-after']) >= 1
        assert 'limit of 2 requests in flight' in r.json()['error']['message']
    assert time.monotonic() - t >= 0.8  # the queued two waited for a slot (two rounds of 0.4 s)
    assert env['slow'].stats()['requests'] == 4


def test_adapter_affinity_prefers_the_endpoint_with_the_adapter_loaded(env):
    time.sleep(0.5)  # a poll or two of /v1/models
    state = _client.get(env['fr'].url + '/readyz').json()['endpoints']['lora']
    loaded = {ep['url']: ep.get('adapters') for ep in state}
    assert loaded[env['ad'].url] == ['x-lora'] and loaded[env['e1'].url] == []
    for _ in range(20):
        assert _post(env, 'lora', key='sk-lora-tenant').status_code == 200
    assert _counts(env, 'e1', 'e2', 'ad') == [0, 0, 20]
    # requests without the adapter are balanced over all three
    for _ in range(30):
        assert _post(env, 'lora').status_code == 200
    assert min(_counts(env, 'e1', 'e2')) > 0


def test_vllm_metrics_are_read(env):
    _, _, body = http_request('GET', env['ad'].url + '/metrics')
    running, waiting, adapters = parse_vllm_metrics(body.decode())
    assert (running, waiting, adapters) == (0, 0, set())
    text = (
        'vllm:num_requests_running{model_name="m"} 3.0\nvllm:num_requests_waiting{model_name="m"} 2.0\n'
        'vllm:lora_requests_info{max_lora="4",model_name="m",running_lora_adapters="a,b",'
        'waiting_lora_adapters="c"} 1.7e9\n'
    )
    assert parse_vllm_metrics(text) == (3, 2, {'a', 'b', 'c'})


def test_health_checks_take_an_endpoint_out_and_bring_it_back(env):
    e2 = env['e2']
    pid = e2.proc.popen.pid
    os.killpg(pid, signal.SIGSTOP)  # hung: accepts connections, never answers
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            eps = _client.get(env['fr'].url + '/readyz').json()['endpoints']['checked']
            if not eps[1]['healthy']:
                break
            time.sleep(0.1)
        assert not eps[1]['healthy'], eps
        t = time.monotonic()
        assert all(_post(env, 'checked').status_code == 200 for _ in range(20))
        assert time.monotonic() - t < 4  # none of them waited on the hung endpoint
    finally:
        os.killpg(pid, signal.SIGCONT)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if _client.get(env['fr'].url + '/readyz').json()['endpoints']['checked'][1]['healthy']:
            break
        time.sleep(0.1)
    assert e2.stats()['requests'] == 0  # nothing was sent to it while it was out
    assert all(_post(env, 'checked').status_code == 200 for _ in range(20))
    assert e2.stats()['requests'] > 0


def test_adapter_affinity_skips_an_overloaded_endpoint_and_falls_back_to_any():
    from fastroute.config import loads_config
    from fastroute.upstream import build_pools

    cfg = loads_config("""
models:
  m:
    endpoints: ["http://127.0.0.1:9", "http://127.0.0.1:8", "http://127.0.0.1:7"]
    adapter_affinity: {max_waiting: 4}
""")
    pool = build_pools(cfg)['m']
    a, b, c = pool.endpoints
    a.adapters, b.adapters, c.adapters = frozenset({'x'}), frozenset({'x'}), frozenset()
    a.load, b.load = (8, 0), (8, 0)
    a.outstanding, b.outstanding = 3, 1
    assert {pool.pick('x') for _ in range(20)} == {b}  # both have it: the less busy one
    b.load = (8, 9)  # too many waiting there
    assert {pool.pick('x') for _ in range(20)} == {a}
    a.load = (8, 9)  # nobody with the adapter can take it: any endpoint, by the pool's balancing
    assert len({pool.pick('x') for _ in range(50)}) > 1
    a.down = True  # and never one that is out
    a.breaker.state, a.breaker.until = 'open', 1e18
    assert a not in {pool.pick('x') for _ in range(50)}
