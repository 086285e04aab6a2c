"""Control state shared through a real Redis: two fastroute replicas with two workers each, one redis-server.

A user gets the same variant from every replica; an operator's rollback taken on one replica holds on every
worker of both within a second or two; the canary decides on the samples of all workers and replicas; Redis
stopped mid-run: traffic keeps flowing on the last known state, actions answer 503, and once Redis is back
the state is written again and actions reach everyone.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from typing import Any

import httpx
import pytest
from conftest import ProcessManager, fastroute_cmd, free_port, subprocess_env, wait_http

TOKEN = 'shared-state-admin-token'
KEYS = {'acme': 'sk-acme-shared', 'globex': 'sk-globex-shared'}


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def shared_config(small: str, large: str, redis_url: str, admin_port: int) -> str:
    return f"""
server:
  workers: 2
  timeouts: {{connect: 1.0, first_byte: 5.0, idle: 5.0, total: 30.0}}
admin: {{listen: "127.0.0.1:{admin_port}", token_env: FR_SHARED_ADMIN}}
redis: {{url: "{redis_url}", key_prefix: "frtest:", timeout: 0.2}}
models:
  small: {{endpoints: ["{small}"], upstream_model: phi-3-mini}}
  # The canary test makes adapter v4 fail on purpose; that must not open the endpoint's breaker for the
  # tests after it (breakers are tested in test_resilience.py), so this one never opens.
  large:
    endpoints: ["{large}"]
    upstream_model: llama-3-13b
    adapters: [v3, v4]
    breaker: {{consecutive_failures: 1000000, error_rate: 1.0, min_requests: 1000000}}
tenants:
  acme: {{keys_sha256: ["{_sha(KEYS['acme'])}"]}}
  globex: {{keys_sha256: ["{_sha(KEYS['globex'])}"]}}
routes:
  - {{name: all, requested: true}}
experiments:
  ab:
    tenant: acme
    sticky: header:x-user-id
    variants: [{{name: a, to: small, weight: 50}}, {{name: b, to: large, weight: 50}}]
  can:
    tenant: globex
    sticky: header:x-user-id
    canary: {{baseline: {{to: large, adapter: v3}}, candidate: {{to: large, adapter: v4}},
             steps: [50, 100], min_duration: 600, min_samples: 40, gates: {{errors: 0.05}}}}
"""


@pytest.fixture(scope='module')
def cluster(module_start_mock, module_procs: ProcessManager, module_redis_server, tmp_path_factory):
    small = module_start_mock(model='phi-3-mini', name='small')
    large = module_start_mock(model='llama-3-13b', adapters='v3,v4', name='large')
    replicas = []
    for name in ('a', 'b'):
        admin_port = free_port()
        path = tmp_path_factory.mktemp(f'replica-{name}') / 'fastroute.yaml'
        path.write_text(shared_config(small.url, large.url, module_redis_server.url, admin_port))
        argv = fastroute_cmd('serve', '-c', str(path), '--listen', '{host}:{port}', '--log-level', 'info')
        proc = module_procs.start(
            argv,
            name=f'fastroute-{name}',
            ready_path='/healthz',
            ready_status=200,
            env=subprocess_env({'FR_SHARED_ADMIN': TOKEN}),
        )
        admin = f'http://127.0.0.1:{admin_port}'
        wait_http(admin + '/admin/experiments', status=401, proc=proc)
        replicas.append({'url': proc.url, 'admin': admin, 'proc': proc})
    return {'replicas': replicas, 'redis': module_redis_server, 'large': large}


def _auth() -> dict[str, str]:
    return {'authorization': f'Bearer {TOKEN}'}


# one client (building one costs ~50 ms); `connection: close` so that requests spread over the workers
_client = httpx.Client(timeout=10)


def chat(url: str, tenant: str, user: str) -> httpx.Response:
    body = {'model': 'large', 'messages': [{'role': 'user', 'content': f'hi from {user}'}]}
    headers = {'authorization': f'Bearer {KEYS[tenant]}', 'x-user-id': user, 'connection': 'close'}
    return _client.post(url + '/v1/chat/completions', json=body, headers=headers)


def act(admin: str, action: str, **body: Any) -> httpx.Response:
    return _client.post(admin + f'/admin/experiments/{action}', json=body, headers=_auth())


def show(admin: str, name: str) -> dict[str, Any]:
    r = _client.get(admin + '/admin/experiment', params={'name': name}, headers={**_auth(), 'connection': 'close'})
    assert r.status_code == 200, r.text
    return r.json()


def variants(url: str, tenant: str, users: list[str]) -> dict[str, str]:
    out = {}
    for u in users:
        r = chat(url, tenant, u)
        assert r.status_code == 200, r.text
        out[u] = r.headers['x-fastroute-variant']
    return out


def test_replicas_agree_on_every_users_variant(cluster):
    a, b = cluster['replicas']
    users = [f'user-{i}' for i in range(80)]
    on_a, on_b = variants(a['url'], 'acme', users), variants(b['url'], 'acme', users)
    assert on_a == on_b
    assert set(Counter(on_a.values())) == {'a', 'b'}


def test_a_rollback_on_one_replica_holds_on_every_worker_of_both(cluster):
    a, b = cluster['replicas']
    users = [f'g-{i}' for i in range(200)]
    before = variants(b['url'], 'globex', users)
    cand_users = [u for u, v in before.items() if v == 'candidate'][:20]
    assert len(cand_users) >= 10
    r = act(a['admin'], 'rollback', name='can', reason='operator test')
    assert r.status_code == 200, r.text
    t0 = time.monotonic()
    deadline = t0 + 10
    while True:
        now_a = variants(a['url'], 'globex', cand_users)
        now_b = variants(b['url'], 'globex', cand_users)
        if set(now_a.values()) == set(now_b.values()) == {'baseline'}:
            break
        assert time.monotonic() < deadline, (now_a, now_b)
        time.sleep(0.05)
    took = time.monotonic() - t0
    print(f'\nrollback on replica a honoured by every worker of both replicas after {took:.2f}s')
    # and it holds: every request, every worker, both replicas
    for rep in (a, b):
        assert set(variants(rep['url'], 'globex', cand_users).values()) == {'baseline'}
        assert show(rep['admin'], 'can')['state']['status'] == 'rolled_back'
    r = act(b['admin'], 'resume', name='can')
    assert r.status_code == 200 and r.json()['state']['status'] == 'running'


def test_the_canary_decides_on_the_samples_of_every_replica(cluster):
    a, b = cluster['replicas']
    large = cluster['large']
    settle = time.monotonic() + 5
    while {show(rep['admin'], 'can')['state']['status'] for rep in (a, b) for _ in range(4)} != {'running'}:
        assert time.monotonic() < settle
        time.sleep(0.05)
    large.set_faults({'kind': '500', 'rate': 0.6, 'model': 'v4'})
    started = time.monotonic()
    try:
        deadline = time.monotonic() + 60
        i = 0
        while show(a['admin'], 'can')['state']['status'] != 'rolled_back':
            assert time.monotonic() < deadline, show(a['admin'], 'can')
            for rep in (a, b):
                for _ in range(10):
                    i += 1
                    chat(rep['url'], 'globex', f'h-{i}')
    finally:
        large.set_faults()
    deadline = time.monotonic() + 5
    while (view := show(b['admin'], 'can'))['state']['status'] != 'rolled_back':
        assert time.monotonic() < deadline, view
        time.sleep(0.05)
    print(f'\ncanary rolled back on the samples of both replicas {time.monotonic() - started:.2f}s after the fault')
    assert view['state']['history'][-1]['by'] == 'controller'
    assert 'errors' in view['state']['reason']
    assert act(a['admin'], 'resume', name='can').status_code == 200


def test_redis_down_traffic_flows_then_state_catches_up(cluster):
    a, b = cluster['replicas']
    redis = cluster['redis']
    users = [f'r-{i}' for i in range(40)]
    expected = variants(a['url'], 'acme', users)
    redis.stop()
    try:
        time.sleep(0.6)  # every worker has tried and failed to sync at least once
        for rep in (a, b):
            got = variants(rep['url'], 'acme', users)  # every request answered, same variants
            assert got == expected
        refused = act(a['admin'], 'set-weight', name='ab', weights={'a': 1, 'b': 0})
        assert refused.status_code == 503
        assert 'redis' in refused.json()['error']['message']
        assert show(a['admin'], 'ab')['state_sharing']['redis_up'] is False
    finally:
        redis.start()
    # Redis came back empty: the replicas write their state again and actions reach everyone once more
    deadline = time.monotonic() + 15
    while act(b['admin'], 'set-weight', name='ab', weights={'a': 1, 'b': 0}).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    deadline = time.monotonic() + 10
    while True:
        if set(variants(a['url'], 'acme', users).values()) == {'a'}:
            break
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert show(a['admin'], 'ab')['state_sharing']['redis_up'] is True


def test_a_password_in_the_redis_url_never_shows():
    from fastroute.sharedstate import safe_url

    assert safe_url('redis://:hunter2@10.0.0.5:6379/0') == 'redis://:<redacted>@10.0.0.5:6379/0'
    assert safe_url('rediss://app:hunter2@cache:6380/1') == 'rediss://app:<redacted>@cache:6380/1'
    assert safe_url('redis://127.0.0.1:6379/0') == 'redis://127.0.0.1:6379/0'


def test_admin_config_shows_the_redis_section(cluster):
    a = cluster['replicas'][0]
    cfg = _client.get(a['admin'] + '/admin/config', headers=_auth()).json()['config']
    assert cfg['redis']['url'] == cluster['redis'].url
    assert cfg['experiments']['can']['canary']['steps'] == [50.0, 100.0]


def test_workers_without_redis_share_through_a_directory(procs, start_mock, tmp_path):
    import os

    small = start_mock(model='phi-3-mini', name='small-local')
    large = start_mock(model='llama-3-13b', adapters='v3,v4', name='large-local')
    admin_port = free_port()
    text = shared_config(small.url, large.url, 'redis://unused', admin_port)
    text = '\n'.join(line for line in text.splitlines() if not line.startswith('redis:'))
    path = tmp_path / 'fastroute.yaml'
    path.write_text(text)
    argv = fastroute_cmd('serve', '-c', str(path), '--listen', '{host}:{port}', '--log-level', 'info')
    proc = procs.start(
        argv,
        name='fastroute-local',
        ready_path='/healthz',
        ready_status=200,
        env=subprocess_env({'FR_SHARED_ADMIN': TOKEN}),
    )
    admin = f'http://127.0.0.1:{admin_port}'
    wait_http(admin + '/admin/experiments', status=401, proc=proc)
    sharing = show(admin, 'can')['state_sharing']
    assert sharing['shared'] is True and sharing['through'].startswith('file://')
    directory = sharing['through'][len('file://') :]
    users = [f'l-{i}' for i in range(120)]
    cand_users = [u for u, v in variants(proc.url, 'globex', users).items() if v == 'candidate'][:15]
    assert act(admin, 'rollback', name='can').status_code == 200
    deadline = time.monotonic() + 10
    while set(variants(proc.url, 'globex', cand_users).values()) != {'baseline'}:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # every worker answers the admin API with the same state
    assert {show(admin, 'can')['state']['status'] for _ in range(12)} == {'rolled_back'}
    proc.stop()
    assert not os.path.exists(directory)  # removed with the server
