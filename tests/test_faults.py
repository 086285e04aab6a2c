"""The fault-injection suite: concurrent traffic through fastroute in front of `fastroute mock` upstreams
while upstreams fail in each way the issue lists, with assertions on every single answer.

For every scenario: each request got exactly one complete HTTP answer; no 5xx reached a client while a
healthy candidate existed; no stream that was cut short ended with `[DONE]` (a stream ending with `[DONE]`
carries its `finish_reason`); and afterwards nothing is left over: no request in flight at fastroute or at
an upstream, and fastroute's asyncio tasks and open file descriptors (besides pooled keep-alive connections)
back to their level after the warm-up.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ProcessManager
from test_gateway import KEYS, _sha, start_fastroute

CONCURRENCY = 16


def _config(m: dict[str, str], *, weight: int = 1) -> str:
    return f"""
server:
  timeouts: {{connect: 0.5, first_byte: 0.6, idle: 2.0, total: 10.0}}
  retry: {{max_attempts: 4, backoff: 0.002, backoff_max: 0.02, budget_ratio: 0.5, budget_min_per_s: 50}}
  breaker: {{consecutive_failures: 5, cooldown: 0.5}}
  watch_config: false
models:
  main:
    endpoints: ["{m['m1']}", "{m['m2']}", {{url: "{m['m3']}", weight: {weight}}}]
    upstream_model: main-up
    fallback: [backup]
  backup:
    endpoints: ["{m['b1']}"]
    upstream_model: backup-up
tenants:
  acme: {{keys_sha256: ["{_sha(KEYS['acme'])}"]}}
routes:
  - {{name: by-model, requested: true}}
"""


@dataclass
class Answer:
    status: int
    stream: bool
    text: str
    served: str | None
    done: bool  # ended with [DONE]
    error_event: bool  # ended with an error event
    finished: bool  # a finish_reason was seen


def _parse(status: int, stream: bool, text: str) -> Answer:
    if not stream or status != 200:
        served = None
        if status == 200:
            served = json.loads(text)['model']
        return Answer(status, stream, text, served, False, False, status == 200)
    events = [e[6:] for e in text.split('\n\n') if e.startswith('data: ')]
    done = bool(events) and events[-1] == '[DONE]'
    error_event = bool(events) and events[-1].startswith('{"error"')
    finished = False
    served = None
    for e in events:
        if e.startswith('{"id"'):
            chunk = json.loads(e)
            served = served or chunk.get('model')
            if any(c.get('finish_reason') for c in chunk.get('choices', [])):
                finished = True
    return Answer(status, stream, text, served, done, error_event, finished)


async def _drive(url: str, n: int, model: str = 'main', during: Any = None) -> list[Answer]:
    """n requests, half streamed, CONCURRENCY at a time; `during` (a callable) runs in a thread meanwhile."""
    headers = {'authorization': f'Bearer {KEYS["acme"]}'}
    sem = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=20.0, limits=limits) as client:

        async def one(i: int) -> Answer:
            stream = i % 2 == 1
            body = {'model': model, 'messages': [{'role': 'user', 'content': f'question {i}'}], 'stream': stream}
            async with sem:
                async with client.stream('POST', '/v1/chat/completions', json=body) as r:
                    raw = await r.aread()
                    return _parse(r.status_code, stream, raw.decode())

        worker = None
        if during is not None:
            worker = threading.Thread(target=during, daemon=True)
            worker.start()
        # exceptions are results here: a request without an answer must fail the test, not vanish
        out = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
        if worker is not None:
            worker.join(30)
    lost = [a for a in out if isinstance(a, BaseException)]
    assert not lost, f'{len(lost)} requests got no answer, e.g. {lost[0]!r}'
    return out  # type: ignore[return-value]


def _check_answers(answers: list[Answer], *, all_ok: bool = True) -> Counter:
    statuses = Counter(a.status for a in answers)
    for a in answers:
        if a.stream and a.status == 200:
            assert a.done != a.error_event, a.text[-300:]  # exactly one ending
            if a.done:
                assert a.finished, f'a stream ended with [DONE] but no finish_reason: {a.text[-300:]}'
        if a.status >= 400:
            err = json.loads(a.text)['error']
            assert err['message'] and err['type'], a.text
    if all_ok:
        assert statuses == Counter({200: len(answers)}), statuses
    return statuses


_client = httpx.Client(timeout=10)


def _fds(pid: int) -> int:
    return len(os.listdir(f'/proc/{pid}/fd'))


def _other_fds(fr: Any) -> tuple[int, int, int]:
    """(descriptors that are not pooled upstream connections, pooled upstream connections, asyncio tasks)."""
    ready = _client.get(fr.url + '/readyz').json()
    pooled = sum(ep['connections'] for group in ready['endpoints'].values() for ep in group)
    return _fds(fr.proc.popen.pid) - pooled, pooled, ready['worker']['tasks']


def _settle(env: dict[str, Any]) -> None:
    """Nothing in flight anywhere; no descriptor open beyond the warm-up's, except keep-alive connections in the
    upstream pools (bounded by the concurrency)."""
    fr = env['fr']
    deadline = time.monotonic() + 5
    while True:
        eps = _client.get(fr.url + '/readyz').json()['endpoints']
        outstanding = sum(ep['outstanding'] for group in eps.values() for ep in group)
        busy = sum(m.stats()['in_flight'] for k, m in env.items() if k[0] in 'mb' and m.proc.alive)
        other, pooled, tasks = _other_fds(fr)
        if (
            outstanding == 0
            and busy == 0
            and other <= env['fds']
            and pooled <= 4 * CONCURRENCY
            and tasks <= env['tasks']
        ):
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f'left over: outstanding={outstanding} upstream in flight={busy} '
                f'descriptors besides pooled connections={other} (after warm-up: {env["fds"]}), pooled={pooled}, '
                f'tasks={tasks} (after warm-up: {env["tasks"]})'
            )
        time.sleep(0.1)


@pytest.fixture(scope='module')
def env(module_start_mock, module_procs: ProcessManager, tmp_path_factory):
    mocks = {
        'm1': module_start_mock(model='main-up', name='m1', max_output_tokens=8),
        'm2': module_start_mock(model='main-up', name='m2', max_output_tokens=8),
        'm3': module_start_mock(model='main-up', name='m3', max_output_tokens=8),
        'b1': module_start_mock(model='backup-up', name='b1', max_output_tokens=8),
    }
    urls = {k: m.url for k, m in mocks.items()}
    fr = start_fastroute(module_procs, _config(urls), tmp_path_factory.mktemp('faults'))
    env: dict[str, Any] = {'fr': fr, 'urls': urls, **mocks}
    # warm-up at full concurrency: the keep-alive connections a healthy run keeps open
    _check_answers(asyncio.run(_drive(fr.url, 4 * CONCURRENCY)))
    time.sleep(0.3)
    env['fds'], _, env['tasks'] = _other_fds(fr)
    return env


@pytest.fixture(autouse=True)
def _clear(env):
    yield
    for k in ('m1', 'm2', 'm3', 'b1'):
        if env[k].proc.alive:
            env[k].reset()
    time.sleep(0.6)  # breakers opened by the scenario are half-open again


def test_one_upstream_answering_500s(env):
    env['m1'].set_faults({'kind': '500'})
    answers = asyncio.run(_drive(env['fr'].url, 150))
    _check_answers(answers)
    assert env['m1'].stats()['faults_injected'].get('500', 0) >= 1
    _settle(env)


def test_one_upstream_answering_429_with_retry_after(env):
    env['m2'].set_faults({'kind': '429', 'retry_after': 5})
    answers = asyncio.run(_drive(env['fr'].url, 150))
    _check_answers(answers)
    # cooling down: after its first 429s, the limited endpoint is left alone for its Retry-After
    assert env['m2'].stats()['faults_injected']['429'] <= 20  # of 150; about 50 without the cool-down
    _settle(env)


def test_one_upstream_hanging(env):
    env['m1'].set_faults({'kind': 'hang'})
    answers = asyncio.run(_drive(env['fr'].url, 100))
    _check_answers(answers)
    _settle(env)


def test_one_upstream_resetting_connections(env):
    env['m2'].set_faults({'kind': 'reset'})
    answers = asyncio.run(_drive(env['fr'].url, 150))
    _check_answers(answers)
    _settle(env)


def test_one_upstream_cutting_streams_mid_answer(env):
    # tokens 10 ms apart: the first ones reach the client before the cut (a cut before any byte went out is
    # retried elsewhere, and then nothing is cut from the client's view)
    env['m3'].configure(tps=100)
    env['m3'].set_faults({'kind': 'stream_cut', 'after_tokens': 2, 'abort': True})
    answers = asyncio.run(_drive(env['fr'].url, 150))
    _check_answers(answers)  # a cut stream is still a 200: its head went out before the cut
    cut = [a for a in answers if a.error_event]
    assert cut, 'no stream was cut'
    assert all(not a.done for a in cut)
    assert len(cut) <= env['m3'].stats()['faults_injected']['stream_cut']
    for a in cut:
        event = json.loads(a.text.rstrip().rsplit('data: ', 1)[1])
        assert event['error']['type'] == 'upstream_error'
    _settle(env)


def test_every_endpoint_of_a_model_down_with_a_healthy_fallback(env):
    for k in ('m1', 'm2', 'm3'):
        env[k].set_faults({'kind': '503'})
    answers = asyncio.run(_drive(env['fr'].url, 150))
    _check_answers(answers)
    assert {a.served for a in answers} == {'backup-up'}
    _settle(env)


def test_every_endpoint_down(env):
    for k in ('m1', 'm2', 'm3'):
        env[k].set_faults({'kind': '500'})
    env['b1'].set_faults({'kind': 'reset'})
    answers = asyncio.run(_drive(env['fr'].url, 100))
    statuses = _check_answers(answers, all_ok=False)
    assert set(statuses) <= {502, 503}, statuses
    for a in answers:
        msg = json.loads(a.text)['error']['message']
        # tried: named; skipped because their circuits are open: named too
        assert 'main at ' in msg or 'backup at ' in msg, msg
    _settle(env)


def test_config_reload_every_second_under_load(env):
    path: Path = env['fr'].config_path
    stop = threading.Event()
    reloads = []

    def reload_loop() -> None:
        w = 1
        while not stop.is_set():
            w = 3 - w  # 1, 2, 1, ...: the main model changes, backup stays as it is
            path.write_text(_config(env['urls'], weight=w))
            os.kill(env['fr'].proc.popen.pid, signal.SIGHUP)
            reloads.append(time.monotonic())
            stop.wait(1.0)

    t = threading.Thread(target=reload_loop, daemon=True)
    t.start()
    answers = []
    deadline = time.monotonic() + 20  # load keeps coming until several reloads happened under it (bounded)
    try:
        while len(reloads) < 4 and time.monotonic() < deadline:
            answers += asyncio.run(_drive(env['fr'].url, 300))
    finally:
        stop.set()
        t.join(5)
    _check_answers(answers)
    assert len(reloads) >= 3
    path.write_text(_config(env['urls']))
    os.kill(env['fr'].proc.popen.pid, signal.SIGHUP)
    time.sleep(0.3)
    _settle(env)


def test_an_upstream_killed_mid_load(env):
    m3 = env['m3']
    m3.configure(tps=100)  # streams from m3 last ~80 ms: some are in flight when it dies

    def kill() -> None:
        time.sleep(0.3)
        os.killpg(m3.proc.popen.pid, signal.SIGKILL)

    answers = asyncio.run(_drive(env['fr'].url, 300, during=kill))
    _check_answers(answers)  # streams already under way when it died end with an error event, as 200s
    assert not m3.proc.alive
    after = asyncio.run(_drive(env['fr'].url, 60))
    _check_answers(after)
    assert all(not a.error_event for a in after)
    _settle(env)


def test_sigterm_under_load_finishes_in_flight_streams(module_start_mock, procs: ProcessManager, tmp_path):
    slow = module_start_mock(model='main-up', name='slow', tps=20, max_output_tokens=20)  # ~1 s streams
    cfg = f"""
server: {{grace_period: 10, watch_config: false}}
models:
  main: {{endpoints: ["{slow.url}"], upstream_model: main-up}}
tenants:
  acme: {{keys_sha256: ["{_sha(KEYS['acme'])}"]}}
routes:
  - {{name: by-model, requested: true}}
"""
    fr = start_fastroute(procs, cfg, tmp_path)
    pid = fr.proc.popen.pid

    def term() -> None:
        time.sleep(0.4)
        os.kill(pid, signal.SIGTERM)

    answers = asyncio.run(_drive(fr.url, CONCURRENCY, during=term))
    _check_answers(answers)
    assert all(a.done for a in answers if a.stream), 'a stream in flight at SIGTERM did not finish'
    assert fr.proc.popen.wait(10) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(fr.url + '/healthz', timeout=1)
