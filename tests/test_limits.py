"""Per-tenant limits against real processes: in one process; across two fastroute replicas sharing one real
Redis, hammered concurrently (the total allowed never exceeds the limit); and with Redis gone (traffic goes on,
on each process's own counters, and the failures are counted)."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from obs_support import KEYS, PRICES, obs_config, start_observed, total, wait_for


def _endpoints(start_mock):
    small = start_mock(model='phi-3-mini', name='small-l')
    large = start_mock(model='llama-3-13b', adapters='acme-lora', name='large-l')
    return {'small': small.url, 'large': large.url}


@pytest.fixture(scope='module')
def endpoints(module_start_mock):
    return _endpoints(module_start_mock)


def _fresh_minute(margin: float = 6.0) -> None:
    """Wait until at least `margin` seconds are left in the wall-clock minute (a test's requests then share one
    requests-per-minute window)."""
    left = 60 - time.time() % 60
    if left < margin:
        time.sleep(left + 0.05)


def test_requests_per_minute_in_one_process(endpoints, procs, tmp_path):
    fr = start_observed(
        procs,
        lambda p: obs_config(endpoints, admin_port=p, limits={'globex': '{requests_per_minute: 5}'}),
        tmp_path,
    )
    _fresh_minute()
    codes = [fr.chat('small', 'globex').status_code for _ in range(5)]
    assert codes == [200] * 5
    client = openai.OpenAI(base_url=fr.url + '/v1', api_key=KEYS['globex'], max_retries=0)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model='small', messages=[{'role': 'user', 'content': 'one more'}])
    err = info.value
    assert err.status_code == 429
    assert err.body['code'] == 'requests_per_minute_exceeded'  # type: ignore[index]
    assert '5 requests per minute' in err.body['message'] and 'globex' in err.body['message']  # type: ignore[index]
    retry_after = int(err.response.headers['retry-after'])
    assert 1 <= retry_after <= 60
    # another tenant is not affected
    assert fr.chat('small', 'acme').status_code == 200
    m = wait_for(lambda: (m := fr.metrics()) and total(m, 'fastroute_limit_rejections_total') >= 1 and m)
    assert total(m, 'fastroute_limit_rejections_total', tenant='globex', limit='requests_per_minute') == 1
    assert total(m, 'fastroute_requests_total', tenant='globex', status='429') == 1


def test_spend_per_day_and_tokens_per_minute(endpoints, procs, tmp_path):
    # large costs $0.01 a request plus $1/$2 per 1k input/output tokens: about $0.07 a request here
    limits = {'acme': '{spend_per_day: 0.2}', 'free': '{tokens_per_minute: 150}'}
    fr = start_observed(procs, lambda p: obs_config(endpoints, admin_port=p, limits=limits), tmp_path)
    _fresh_minute()
    spent, costs = 0.0, []
    p = PRICES['large']
    for _ in range(10):
        r = fr.chat('large', 'acme')
        if r.status_code != 200:
            break
        u = r.json()['usage']
        costs.append(
            p['per_request']
            + u['prompt_tokens'] * p['input_per_1k'] / 1000
            + u['completion_tokens'] * p['output_per_1k'] / 1000
        )
        spent += costs[-1]
    assert r.status_code == 429, 'the daily budget never ran out'
    # refused exactly once the recorded spend reached the budget, not before
    assert spent >= 0.2 > spent - costs[-1]
    assert r.json()['error']['code'] == 'spend_per_day_exceeded'
    assert '$0.2 spend per day' in r.json()['error']['message']
    assert int(r.headers['retry-after']) >= 1
    # tokens: each answer is 16-48 tokens plus the prompt; the minute's 150 run out within a few requests
    codes = [fr.chat('small', 'free').status_code for _ in range(12)]
    assert 200 in codes and codes[-1] == 429
    r = fr.chat('small', 'free')
    assert r.json()['error']['code'] == 'tokens_per_minute_exceeded'
    s = fr.stats()
    free = next(t for t in s['tenants'] if t['tenant'] == 'free')
    assert free['limits']['tokens_per_minute'] == 150
    assert free['usage']['tokens_per_minute'] >= 100


def _replica_config(endpoints, redis_url: str, limit: int, timeout: float = 2.0):
    # A generous timeout: this machine is shared, and a Redis call that times out falls back to the process's
    # own counters (tested below), which is not what the replicas test is about.
    extra = f'redis: {{url: "{redis_url}", timeout: {timeout}}}\n'
    limits = {'acme': f'{{requests_per_minute: {limit}}}', 'globex': '{spend_per_day: 0.2}'}
    return lambda p: obs_config(endpoints, admin_port=p, limits=limits, extra=extra)


def test_two_replicas_share_the_limit_through_redis(endpoints, procs, tmp_path, redis_server):
    limit = 25
    a = start_observed(procs, _replica_config(endpoints, redis_server.url, limit), tmp_path, name='replica-a')
    b = start_observed(procs, _replica_config(endpoints, redis_server.url, limit), tmp_path, name='replica-b')
    _fresh_minute(margin=8)
    t0 = time.time()
    jobs = [a, b] * 40  # 80 requests for a limit of 25, 16 at a time, alternating replicas
    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda fr: fr.chat('small', 'acme').status_code, jobs))
    same_minute = int(t0 // 60) == int(time.time() // 60)
    assert set(codes) <= {200, 429}, codes
    allowed = codes.count(200)
    assert allowed <= limit, f'{allowed} requests allowed for a limit of {limit} across two replicas'
    if same_minute:
        assert allowed == limit
    per_replica = [sum(1 for fr, c in zip(jobs, codes, strict=True) if fr is r and c == 200) for r in (a, b)]
    assert all(n > 0 for n in per_replica), per_replica  # both replicas served part of the budget
    # both replicas report the shared count
    for fr in (a, b):
        acme = next(t for t in fr.stats()['tenants'] if t['tenant'] == 'acme')
        assert acme['usage']['requests_per_minute'] == allowed
    assert fr.stats()['limits_shared'] is True
    # spend is shared too: the budget globex spent through replica a is spent on replica b
    for _ in range(10):
        r = a.chat('large', 'globex')
        if r.status_code == 429:
            break
    assert r.status_code == 429 and r.json()['error']['code'] == 'spend_per_day_exceeded'
    time.sleep(0.3)  # finished requests' spend reaches Redis within 50 ms
    r = b.chat('large', 'globex')  # b never served globex: only the shared counter can refuse this
    assert r.status_code == 429, 'replica b did not see the spend recorded through replica a'
    assert r.json()['error']['code'] == 'spend_per_day_exceeded'


def test_redis_down_traffic_goes_on_with_local_limits(endpoints, procs, tmp_path, redis_server):
    fr = start_observed(procs, _replica_config(endpoints, redis_server.url, 1000, timeout=0.25), tmp_path)
    assert fr.chat('small', 'acme').status_code == 200
    redis_server.stop()
    t = time.monotonic()
    codes = [fr.chat('small', 'acme').status_code for _ in range(5)]
    elapsed = time.monotonic() - t
    assert codes == [200] * 5, codes
    assert elapsed < 10, 'requests waited on a Redis that is down'
    m = wait_for(lambda: (m := fr.metrics()) and total(m, 'fastroute_limits_backend_errors_total') >= 1 and m)
    assert total(m, 'fastroute_limits_backend_errors_total') >= 1
    assert re.search(r'limits: Redis \w+ failed at redis://', fr.proc.log_text())
    redis_server.start()

    def shared_again():
        fr.chat('small', 'acme')
        return int(redis_server.client().dbsize()) > 0

    assert wait_for(shared_again, timeout=10, interval=0.3), 'the limits did not go back to Redis once it was up'


def test_resp_client_pipelines_and_reloads_scripts(redis_server):
    """The limits' Redis client against the real server: concurrent calls on one connection answered in order,
    error replies raised, a script loaded again after SCRIPT FLUSH, a fresh connection after reset()."""
    import asyncio

    from fastroute.resp import RespClient, RespError, Script

    async def run() -> None:
        c = RespClient(redis_server.url, 2.0)
        assert await c.call('SET', 'k', 'v') == 'OK'
        got = await asyncio.gather(*(c.call('INCR', f'n{i % 3}') for i in range(30)))
        assert sorted(got) == sorted([j for _ in range(3) for j in range(1, 11)])
        assert await c.call('MGET', 'k', 'missing') == [b'v', None]
        with pytest.raises(RespError):
            await c.call('INCR', 'k')  # not an integer
        s = Script('return {tonumber(ARGV[1]) + 1, KEYS[1]}')
        assert await c.script(s, ['key-a'], [41]) == [42, b'key-a']
        assert await c.call('SCRIPT', 'FLUSH') == 'OK'
        assert await c.script(s, ['key-b'], [1]) == [2, b'key-b']  # NOSCRIPT: sent again in full
        c.reset()
        assert await c.call('GET', 'k') == b'v'

    asyncio.run(run())


def test_limits_and_their_use_are_metrics(endpoints, procs, tmp_path):
    fr = start_observed(
        procs,
        lambda p: obs_config(endpoints, admin_port=p, limits={'globex': '{requests_per_minute: 50, spend_per_day: 3}'}),
        tmp_path,
    )
    _fresh_minute()
    for _ in range(3):
        assert fr.chat('small', 'globex').status_code == 200
    m = fr.metrics()
    assert total(m, 'fastroute_tenant_limit', tenant='globex', limit='requests_per_minute') == 50
    assert total(m, 'fastroute_tenant_limit', tenant='globex', limit='spend_per_day') == 3
    assert total(m, 'fastroute_tenant_limit_used', tenant='globex', limit='requests_per_minute') == 3
    assert 0 < total(m, 'fastroute_tenant_limit_used', tenant='globex', limit='spend_per_day') < 3


def test_resp_client_times_out_on_a_stalled_redis(redis_server):
    """A Redis that stops answering (SIGSTOP): every waiting call fails with TimeoutError after the timeout,
    none hangs; once Redis runs again, the next call works on a fresh connection."""
    import asyncio
    import os
    import signal

    from fastroute.resp import RespClient

    async def run() -> None:
        c = RespClient(redis_server.url, 0.3)
        assert await c.call('PING') == 'PONG'
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*(c.call('INCR', 'x') for _ in range(5)), return_exceptions=True), 10
            )
            assert all(isinstance(r, TimeoutError) for r in results), results
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        assert await c.call('PING') == 'PONG'

    asyncio.run(run())


def test_check_warns_when_workers_would_each_count_a_limit(tmp_path):
    import subprocess

    from conftest import fastroute_cmd, subprocess_env

    cfg = tmp_path / 'w.yaml'
    cfg.write_text(
        'server: {workers: 2}\nmodels:\n  small: {endpoints: ["http://127.0.0.1:9"]}\n'
        f'tenants:\n  a: {{keys_sha256: ["{"a" * 64}"], limits: {{requests_per_minute: 5}}}}\n'
    )
    out = subprocess.run(fastroute_cmd('check', str(cfg)), capture_output=True, text=True, env=subprocess_env())
    assert out.returncode == 0
    assert 'tenants.a.limits: warning: with server.workers: 2 and no redis: section' in out.stdout + out.stderr
