"""Fallback, retries, circuit breakers and the retry budget.

The first part drives the pieces of fastroute.resilience directly (they are plain state, no I/O); the second
runs fastroute in front of `fastroute mock` upstreams with injected faults and checks every answer.
"""

from __future__ import annotations

import email.utils
import json
import time
from typing import Any

import httpx
import msgspec
import pytest
from conftest import ProcessManager
from fastroute.config import Breaker as BreakerCfg
from fastroute.config import Retry, loads_config
from fastroute.errors import UpstreamError
from fastroute.resilience import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    Breaker,
    Policy,
    RetryBudget,
    backoff_delay,
    exhausted,
    parse_retry_after,
    rewrite_model,
)
from test_gateway import KEYS, start_fastroute

# --- the pieces ------------------------------------------------------------------------------------


def test_breaker_opens_on_consecutive_failures_and_closes_after_a_probe():
    b = Breaker(BreakerCfg(consecutive_failures=3, cooldown=0.05, min_requests=1000))
    now = time.perf_counter()
    assert not b.failure(now)
    assert not b.failure(now)
    assert b.failure(now)  # the third in a row opens it
    assert b.state == OPEN
    assert not b.ready(now, 0)  # open: nothing goes through
    later = now + 0.06
    assert b.ready(later, 0)  # cool-down over: one probe
    assert b.state == HALF_OPEN
    assert not b.ready(later, 1)  # the probe is in flight: no second one
    assert b.success(later)
    assert b.state == CLOSED and b.consecutive == 0


def test_breaker_probe_failure_opens_it_again():
    b = Breaker(BreakerCfg(consecutive_failures=1, cooldown=0.05))
    now = time.perf_counter()
    b.failure(now)
    assert b.ready(now + 0.06, 0)
    assert b.failure(now + 0.06)
    assert b.state == OPEN and b.opened == 2
    assert not b.ready(now + 0.07, 0)


def test_breaker_opens_on_error_rate_without_consecutive_failures():
    b = Breaker(BreakerCfg(consecutive_failures=100, error_rate=0.5, min_requests=10, window=10))
    now = time.perf_counter()
    opened = False
    for i in range(20):  # alternate: never two failures in a row, half of them failed
        if i % 2:
            opened = b.failure(now) or opened
        else:
            b.success(now)
    assert opened and b.state == OPEN


def test_retry_budget_is_a_share_of_requests():
    budget = RetryBudget(ratio=0.2, min_per_s=0.0)
    spent = 0
    for _ in range(100):
        budget.request()
        if budget.try_spend():
            spent += 1
    assert 19 <= spent <= 20
    assert not budget.try_spend()


def test_backoff_is_jittered_and_capped():
    p = Policy(Retry(backoff=0.1, backoff_max=0.3), BreakerCfg(), None)
    delays = [backoff_delay(p, n) for n in range(1, 8) for _ in range(20)]
    assert all(0 <= d <= 0.3 for d in delays)
    assert len({round(d, 6) for d in delays}) > 10  # jittered, not a fixed schedule
    assert backoff_delay(Policy(Retry(backoff=0), BreakerCfg(), None), 3) == 0


def test_retry_after_parsing():
    assert parse_retry_after([('retry-after', '7')]) == 7
    assert parse_retry_after([('retry-after', '2'), ('retry-after-ms', '1500')]) == 1.5
    assert parse_retry_after([('retry-after', 'Wed, 21 Oct 2015 07:28:00 GMT')]) == 0  # a date in the past
    soon = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= parse_retry_after([('retry-after', soon)]) <= 30  # type: ignore[operator]
    assert parse_retry_after([('retry-after', 'soon')]) is None
    assert parse_retry_after([('retry-after', '')]) is None
    assert parse_retry_after([]) is None


def test_fallback_body_renames_the_model_and_drops_the_adapter_field():
    body = b'{"model":"acme-lora","adapter_id":"acme-lora","messages":[{"role":"user","content":"hi"}]}'
    out = msgspec.json.decode(rewrite_model(body, 'phi-3-mini'))
    assert out == {'model': 'phi-3-mini', 'messages': [{'role': 'user', 'content': 'hi'}]}


def test_exhausted_names_every_candidate_and_picks_the_status():
    def err(status: int, stage: str = 'status', ra: float | None = None) -> UpstreamError:
        return UpstreamError('upstream m at http://x: what', stage=stage, status=status, retry_after=ra)

    busy = exhausted([('a', 'http://a', err(429, ra=3)), ('b', 'http://b', err(503, ra=2))], [])
    assert busy.status == 503 and busy.retry_after == 2
    assert 'a at http://a' in busy.message and 'b at http://b' in busy.message
    slow = exhausted([('a', 'http://a', err(504, 'timeout')), ('b', 'http://b', err(504, 'timeout'))], [])
    assert slow.status == 504
    mixed = exhausted([('a', 'http://a', err(500)), ('b', 'http://b', err(504, 'timeout'))], [])
    assert mixed.status == 502
    shed = exhausted([], ['a at http://a: circuit open'])
    assert shed.status == 503 and shed.retry_after == 1.0 and 'circuit open' in shed.message


def test_config_checks_name_the_key():
    bad = """
models:
  m:
    endpoints: ["http://127.0.0.1:9"]
    retry: {max_attempts: 0, on_status: [400, 503]}
    breaker: {error_rate: 2}
    limits: {queue: -1}
    health: {path: health}
"""
    with pytest.raises(Exception) as info:
        loads_config(bad, 'yaml')
    text = str(info.value)
    for key in (
        'models.m.retry.max_attempts',
        'models.m.retry.on_status[0]',
        'models.m.breaker.error_rate',
        'models.m.limits.queue',
        'models.m.health.path',
    ):
        assert key in text, text
    assert 'on_status[1]' not in text


# --- through fastroute -------------------------------------------------------------------------------


def _config(m: dict[str, str]) -> str:
    return f"""
server:
  timeouts: {{connect: 0.5, first_byte: 3.0, idle: 3.0, total: 10.0}}
  retry: {{backoff: 0.001, backoff_max: 0.005, budget_ratio: 1.0, budget_min_per_s: 100}}
  watch_config: false
models:
  alpha:
    endpoints: ["{m['a1']}", "{m['a2']}"]
    upstream_model: alpha-up
    fallback: [beta]
    breaker: {{consecutive_failures: 1000, min_requests: 1000}}
  beta:
    endpoints: ["{m['b1']}"]
    upstream_model: beta-up
  solo:
    endpoints: ["{m['s1']}"]
    upstream_model: solo-up
    retry: {{retry_after_max: 1.0, backoff: 0.001}}
  brk:
    endpoints: ["{m['k1']}"]
    upstream_model: brk-up
    fallback: [beta]
    breaker: {{consecutive_failures: 3, cooldown: 2.0}}
  slow:
    endpoints: ["{m['w1']}"]
    upstream_model: slow-up
    fallback: [beta]
    first_token_timeout: 0.4
  frugal:
    endpoints: ["{m['f1']}", "{m['f2']}"]
    upstream_model: frugal-up
    retry: {{max_attempts: 2, backoff: 0, budget_ratio: 0.1, budget_min_per_s: 0}}
    breaker: {{consecutive_failures: 100000, min_requests: 100000}}
  pair:
    endpoints: ["{m['a1']}", "{m['a2']}"]
    upstream_model: alpha-up
    fallback: [beta]
    retry: {{max_attempts: 2, backoff: 0.001, budget_ratio: 1.0, budget_min_per_s: 100}}
    breaker: {{consecutive_failures: 1000, min_requests: 1000}}
  dead:
    endpoints: ["http://127.0.0.1:9", "http://127.0.0.1:7"]
    fallback: [solo]
tenants:
  acme: {{keys_sha256: ["{__import__('hashlib').sha256(KEYS['acme'].encode()).hexdigest()}"]}}
routes:
  - {{name: by-model, requested: true}}
"""


@pytest.fixture(scope='module')
def env(module_start_mock, module_procs: ProcessManager, tmp_path_factory):
    mocks = {}
    for key, model in (
        ('a1', 'alpha-up'),
        ('a2', 'alpha-up'),
        ('b1', 'beta-up'),
        ('s1', 'solo-up'),
        ('k1', 'brk-up'),
        ('w1', 'slow-up'),
        ('f1', 'frugal-up'),
        ('f2', 'frugal-up'),
    ):
        mocks[key] = module_start_mock(model=model, name=key)
    fr = start_fastroute(module_procs, _config({k: m.url for k, m in mocks.items()}), tmp_path_factory.mktemp('res'))
    return {'fr': fr, **mocks}


@pytest.fixture(autouse=True)
def _clean(env):
    yield
    for key, m in env.items():
        if key != 'fr':
            m.reset()


_client = httpx.Client(timeout=15)


def _post(env: dict[str, Any], model: str, stream: bool = False, **kw: Any) -> httpx.Response:
    body = {'model': model, 'messages': [{'role': 'user', 'content': 'hello'}], 'stream': stream}
    headers = {'authorization': f'Bearer {KEYS["acme"]}'}
    return _client.post(env['fr'].url + '/v1/chat/completions', json=body, headers=headers, **kw)


def _served(r: httpx.Response) -> str:
    """The upstream model that wrote the answer (the mock puts it in the text)."""
    if r.headers.get('content-type', '').startswith('text/event-stream'):
        first = next(e for e in r.text.split('\n\n') if e.startswith('data: {'))
        return json.loads(first[6:])['model']
    return r.json()['model']


def _count(m: Any) -> int:
    return m.stats()['requests']


def test_a_failing_endpoint_is_retried_on_the_other(env):
    env['a1'].set_faults({'kind': '500'})
    rs = [_post(env, 'alpha') for _ in range(20)]
    assert [r.status_code for r in rs] == [200] * 20
    assert {_served(r) for r in rs} == {'alpha-up'}
    retried = [r for r in rs if r.headers.get('x-fastroute-attempts')]
    assert retried, 'p2c never chose the failing endpoint in 20 requests'
    assert all(r.headers['x-fastroute-attempts'] == '2' for r in retried)
    assert _count(env['a2']) == 20


def test_every_endpoint_failing_falls_back_to_the_next_model(env):
    env['a1'].set_faults({'kind': '503'})
    env['a2'].set_faults({'kind': 'reset'})
    for stream in (False, True):
        r = _post(env, 'alpha', stream=stream)
        assert r.status_code == 200, r.text
        assert _served(r) == 'beta-up'
        assert r.headers['x-fastroute-model'] == 'beta'
        assert r.headers['x-fastroute-decided-model'] == 'alpha'
        assert r.headers['x-fastroute-attempts'] == '3'
        if stream:
            assert r.text.rstrip().endswith('data: [DONE]')
    # the fallback got the fallback model's name, not the first one's
    assert env['b1'].recorded()[-1]['body']['model'] == 'beta-up'


def test_the_last_try_goes_to_the_fallback_model(env):
    env['a1'].set_faults({'kind': '503'})
    env['a2'].set_faults({'kind': '503'})
    r = _post(env, 'pair')  # two tries: one endpoint of pair, then beta (not the other endpoint of pair)
    assert r.status_code == 200 and _served(r) == 'beta-up'
    assert r.headers['x-fastroute-attempts'] == '2'
    assert _count(env['a1']) + _count(env['a2']) == 1


@pytest.mark.parametrize('status', [400, 413, 422])
def test_request_errors_are_never_retried(env, status):
    env['a1'].set_faults({'kind': 'error', 'status': status})
    env['a2'].set_faults({'kind': 'error', 'status': status})
    r = _post(env, 'alpha')
    assert r.status_code == status
    assert 'x-fastroute-attempts' not in r.headers
    assert _count(env['a1']) + _count(env['a2']) == 1
    assert _count(env['b1']) == 0


def test_long_retry_after_moves_on_short_one_is_waited_for(env):
    # long: the other endpoint at once, and the limited endpoint is left alone while it cools down
    env['a1'].set_faults({'kind': '429', 'retry_after': 30})
    env['a2'].set_faults({'kind': '429', 'retry_after': 30, 'count': 1})
    r = _post(env, 'alpha')
    assert r.status_code == 200
    # short, and nobody else to ask: waited for, then the same endpoint again
    env['s1'].set_faults({'kind': '429', 'retry_after': 0.3, 'count': 1})
    t = time.monotonic()
    r = _post(env, 'solo')
    assert r.status_code == 200, r.text
    assert time.monotonic() - t >= 0.3
    assert r.headers['x-fastroute-attempts'] == '2'
    # long, and nobody else: the upstream's own 429 and its Retry-After reach the client
    env['s1'].set_faults({'kind': '429', 'retry_after': 1.2, 'count': 1})
    r = _post(env, 'solo')
    assert r.status_code == 429 and r.headers['retry-after'] == '1.2'
    time.sleep(1.3)  # its cool-down is over


def test_when_every_candidate_fails_the_error_names_each(env):
    env['s1'].set_faults({'kind': '500'})
    r = _post(env, 'dead')
    assert r.status_code == 502
    err = r.json()['error']
    assert err['type'] == 'upstream_error'
    msg = err['message']
    assert 'dead at http://127.0.0.1:9' in msg and 'dead at http://127.0.0.1:7' in msg
    assert 'solo at ' + env['s1'].url in msg and 'answered 500' in msg
    # all busy: 503 and the shortest Retry-After an upstream gave
    env['a1'].set_faults({'kind': '429', 'retry_after': 20})
    env['a2'].set_faults({'kind': '429', 'retry_after': 12})
    env['b1'].set_faults({'kind': '503'})
    r = _post(env, 'alpha')
    assert r.status_code == 503, r.text
    assert int(r.headers['retry-after']) >= 1
    assert 'alpha at ' in r.json()['error']['message'] and 'beta at ' in r.json()['error']['message']


def test_a_circuit_opens_and_closes_as_configured(env):
    k1 = env['k1']
    k1.set_faults({'kind': '500'})
    for _ in range(3):
        r = _post(env, 'brk')
        assert r.status_code == 200 and _served(r) == 'beta-up'  # each one fell back
    assert _count(k1) == 3
    state = _endpoint_state(env, 'brk')
    assert state['state'] == 'open' and state['consecutive_failures'] == 3
    for _ in range(5):  # open: straight to the fallback, the broken endpoint is not asked
        r = _post(env, 'brk')
        assert r.status_code == 200 and _served(r) == 'beta-up'
        assert r.headers['x-fastroute-model'] == 'beta' and r.headers['x-fastroute-attempts'] == '1'
    assert _count(k1) == 3
    k1.set_faults()
    time.sleep(2.1)  # cool-down: the next request is the probe, and it succeeds
    r = _post(env, 'brk')
    assert r.status_code == 200 and _served(r) == 'brk-up'
    assert _endpoint_state(env, 'brk')['state'] == 'closed'


def test_the_retry_budget_holds(env):
    env['f1'].set_faults({'kind': '500'})
    env['f2'].set_faults({'kind': '500'})
    n = 60
    codes = [_post(env, 'frugal').status_code for _ in range(n)]
    assert set(codes) <= {500, 502}
    upstream = _count(env['f1']) + _count(env['f2'])
    retries = upstream - n
    assert retries >= 1  # the budget allows some
    assert retries <= 0.1 * n + 1, f'{retries} retries for {n} requests: budget of 10% not held'


def test_first_token_deadline_falls_back_for_streams(env):
    env['w1'].configure(ttft_ms=3000)
    t = time.monotonic()
    r = _post(env, 'slow', stream=True)
    assert r.status_code == 200
    assert _served(r) == 'beta-up'
    assert r.text.rstrip().endswith('data: [DONE]')
    assert time.monotonic() - t < 2.5
    assert r.headers['x-fastroute-attempts'] == '2'


def test_a_stream_cut_mid_answer_is_an_error_event_and_counted(env):
    before = _endpoint_state(env, 'solo')['aborted_streams']
    env['s1'].configure(tps=200)
    env['s1'].set_faults({'kind': 'stream_cut', 'after_tokens': 3, 'abort': True, 'count': 1})
    r = _post(env, 'solo', stream=True)
    assert r.status_code == 200
    events = [e for e in r.text.split('\n\n') if e.strip()]
    assert events[-1].startswith('data: {"error":')
    assert '[DONE]' not in r.text
    assert _endpoint_state(env, 'solo')['aborted_streams'] == before + 1


def _endpoint_state(env: dict[str, Any], model: str) -> dict[str, Any]:
    r = _client.get(env['fr'].url + '/readyz')
    return r.json()['endpoints'][model][0]
