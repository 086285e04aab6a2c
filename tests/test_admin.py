"""The admin listener: its own port, bearer token, redacted config, endpoint state, reload that never
replaces a good config with a bad one. Real fastroute and mock processes on loopback."""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import ProcessManager, fastroute_cmd, free_port, subprocess_env, wait_http
from test_gateway import KEYS, SMALL_UPSTREAM_KEY, gateway_config

TOKEN = 'admin-token-for-tests'
BODY = {'model': 'small', 'messages': [{'role': 'user', 'content': 'hi'}]}


def _admin_config(endpoints: dict[str, str], admin_port: int) -> str:
    return gateway_config(endpoints) + f'admin:\n  listen: 127.0.0.1:{admin_port}\n  token_env: FR_TEST_ADMIN\n'


@pytest.fixture(scope='module')
def admin_env(module_start_mock, module_procs: ProcessManager, tmp_path_factory):
    small = module_start_mock(model='phi-3-mini', api_key=SMALL_UPSTREAM_KEY, name='small-a')
    large = module_start_mock(model='llama-3-13b', adapters='acme-lora,globex-lora,shared-lora', name='large-a')
    endpoints = {'small': small.url, 'large': large.url}
    admin_port = free_port()
    path = tmp_path_factory.mktemp('admin') / 'fastroute.yaml'
    path.write_text(_admin_config(endpoints, admin_port))
    argv = fastroute_cmd('serve', '-c', str(path), '--listen', '{host}:{port}', '--log-level', 'warning')
    proc = module_procs.start(
        argv, name='fastroute', ready_path='/healthz', ready_status=200, env=subprocess_env({'FR_TEST_ADMIN': TOKEN})
    )
    admin = f'http://127.0.0.1:{admin_port}'
    wait_http(admin + '/admin/config', status=401, proc=proc)
    return {'url': proc.url, 'admin': admin, 'path': path, 'endpoints': endpoints, 'admin_port': admin_port}


def _auth(token: str = TOKEN) -> dict[str, str]:
    return {'authorization': f'Bearer {token}'}


def test_admin_needs_a_valid_bearer_token(admin_env):
    no = httpx.get(admin_env['admin'] + '/admin/config')
    assert no.status_code == 401
    assert no.json()['error']['code'] == 'missing_admin_token'
    wrong = httpx.get(admin_env['admin'] + '/admin/config', headers=_auth('nope'))
    assert wrong.status_code == 403
    # a tenant's key is not an admin token
    tenant = httpx.get(admin_env['admin'] + '/admin/config', headers=_auth(KEYS['acme']))
    assert tenant.status_code == 403


def test_admin_is_not_on_the_data_port(admin_env):
    r = httpx.get(admin_env['url'] + '/admin/config', headers=_auth())
    assert r.status_code == 404


def test_config_is_redacted(admin_env):
    r = httpx.get(admin_env['admin'] + '/admin/config', headers=_auth())
    assert r.status_code == 200
    text = r.text
    assert SMALL_UPSTREAM_KEY not in text
    cfg = r.json()['config']
    assert cfg['models']['small']['api_key'] == '<redacted>'
    assert cfg['tenants']['acme']['keys_sha256'] == '<redacted>'
    assert cfg['models']['small']['upstream_model'] == 'phi-3-mini'


def test_models_show_endpoint_state(admin_env):
    r = httpx.get(admin_env['admin'] + '/admin/models', headers=_auth())
    assert r.status_code == 200
    models = r.json()['models']
    assert set(models) == {'small', 'large'}
    urls = [ep['url'] for ep in models['small']['endpoints']]
    assert urls == [admin_env['endpoints']['small']]


def test_unknown_admin_path_and_wrong_method(admin_env):
    assert httpx.get(admin_env['admin'] + '/admin/nothing', headers=_auth()).status_code == 404
    r = httpx.get(admin_env['admin'] + '/admin/reload', headers=_auth())
    assert r.status_code == 405
    assert r.headers['allow'] == 'POST'


def test_reload_rejects_a_bad_config_and_applies_a_good_one(admin_env):
    path = admin_env['path']
    good = path.read_text()
    url = admin_env['url']
    headers = {'authorization': f'Bearer {KEYS["acme"]}'}
    try:
        path.write_text(good.replace('default: small', 'default: no-such-model'))
        r = httpx.post(admin_env['admin'] + '/admin/reload', headers=_auth())
        assert r.status_code == 422
        assert 'no-such-model' in r.json()['message']
        # still serving the old config
        ok = httpx.post(url + '/v1/classify', json=BODY, headers=headers)
        assert ok.status_code == 200
        assert ok.headers['x-fastroute-model'] == 'small'

        path.write_text(good.replace('to: small, upstream_path', 'to: large, upstream_path'))
        r = httpx.post(admin_env['admin'] + '/admin/reload', headers=_auth())
        assert r.status_code == 200, r.text
        assert r.json()['reloaded'] is True
        moved = httpx.post(url + '/v1/classify', json=BODY, headers=headers)
        assert moved.status_code == 200
        assert moved.headers['x-fastroute-model'] == 'large'
    finally:
        path.write_text(good)
        httpx.post(admin_env['admin'] + '/admin/reload', headers=_auth())


def test_serve_refuses_to_start_without_the_admin_token(tmp_path):
    path = tmp_path / 'fastroute.yaml'
    path.write_text(_admin_config({'small': 'http://127.0.0.1:9', 'large': 'http://127.0.0.1:9'}, free_port()))
    env = subprocess_env()
    env.pop('FR_TEST_ADMIN', None)
    import subprocess

    out = subprocess.run(
        fastroute_cmd('serve', '-c', str(path), '--listen', f'127.0.0.1:{free_port()}'),
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1
    assert 'admin.token_env' in out.stderr and 'FR_TEST_ADMIN' in out.stderr


def test_redis_fixture_is_a_real_server_that_can_go_down_and_come_back(redis_server):
    client = redis_server.client()
    assert client.ping() is True
    client.set('k', json.dumps({'v': 1}))
    redis_server.stop()
    import redis

    with pytest.raises(redis.ConnectionError):
        client.ping()
    redis_server.start()
    assert client.ping() is True
