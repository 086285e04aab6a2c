"""The gateway end to end: fastroute under granian in front of `fastroute mock` processes, driven by the
official `openai` client (and raw HTTP where the client cannot say what we need).

The helpers at the top (`gateway_config`, `start_fastroute`, `FastrouteServer`) are shared with
test_gateway_errors.py and test_gateway_stream.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import REPO, ProcessManager, fastroute_cmd, subprocess_env

KEYS = {'acme': 'sk-acme-0001', 'globex': 'sk-globex-0002', 'basic': 'sk-basic-0003'}
SMALL_UPSTREAM_KEY = 'upstream-small-secret'


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def gateway_config(endpoints: dict[str, str], *, extra_models: str = '', max_body: int = 65536) -> str:
    """The test config: two pools, three tenants, a path route and a route by requested model."""
    return f"""
server:
  max_body_bytes: {max_body}
  timeouts: {{connect: 1.0, first_byte: 5.0, idle: 5.0, total: 30.0}}
models:
  small:
    endpoints: ["{endpoints['small']}"]
    upstream_model: phi-3-mini
    api_key: {SMALL_UPSTREAM_KEY}
    aliases: [gpt-4o-mini]
  large:
    endpoints: ["{endpoints['large']}"]
    upstream_model: llama-3-13b
    adapters: [shared-lora]
{extra_models}
tenants:
  acme: {{keys_sha256: ["{_sha(KEYS['acme'])}"], base: large, adapter: acme-lora}}
  globex: {{keys_sha256: ["{_sha(KEYS['globex'])}"], base: large, adapter: globex-lora}}
  basic: {{keys_sha256: ["{_sha(KEYS['basic'])}"], allowed_models: [small]}}
routes:
  - {{name: classify, match: {{path: /v1/classify}}, to: small, upstream_path: /v1/chat/completions}}
  - {{name: by-model, requested: true}}
default: small
"""


class FastrouteServer:
    def __init__(self, proc: Any, config_path: Path) -> None:
        self.proc = proc
        self.url = proc.url
        self.base_url = proc.url + '/v1'
        self.config_path = config_path

    def openai(self, tenant: str = 'acme', **kw: Any) -> openai.OpenAI:
        kw.setdefault('max_retries', 0)
        kw.setdefault('timeout', 15.0)
        return openai.OpenAI(base_url=self.base_url, api_key=KEYS.get(tenant, tenant), **kw)

    def post(self, path: str, body: Any = None, *, tenant: str | None = 'acme', **kw: Any) -> httpx.Response:
        headers = dict(kw.pop('headers', {}) or {})
        if tenant is not None:
            headers.setdefault('authorization', f'Bearer {KEYS.get(tenant, tenant)}')
        if body is not None and 'content' not in kw:
            kw['json'] = body
        return httpx.post(self.url + path, headers=headers, timeout=15.0, **kw)

    def get(self, path: str, *, tenant: str | None = 'acme', **kw: Any) -> httpx.Response:
        headers = dict(kw.pop('headers', {}) or {})
        if tenant is not None:
            headers.setdefault('authorization', f'Bearer {KEYS.get(tenant, tenant)}')
        return httpx.get(self.url + path, headers=headers, timeout=15.0, **kw)


def start_fastroute(manager: ProcessManager, config_text: str, directory: Path, *extra: str) -> FastrouteServer:
    path = directory / 'fastroute.yaml'
    path.write_text(config_text)
    argv = fastroute_cmd('serve', '-c', str(path), '--listen', '{host}:{port}', '--log-level', 'warning', *extra)
    proc = manager.start(argv, name='fastroute', ready_path='/healthz', ready_status=200)
    return FastrouteServer(proc, path)


def chat_body(content: str = 'hello there', model: str = 'small', **extra: Any) -> dict[str, Any]:
    return {'model': model, 'messages': [{'role': 'user', 'content': content}], **extra}


@pytest.fixture(scope='module')
def env(module_start_mock, module_procs, tmp_path_factory):
    small = module_start_mock(model='phi-3-mini', api_key=SMALL_UPSTREAM_KEY, name='small-1')
    large = module_start_mock(model='llama-3-13b', adapters='acme-lora,globex-lora,shared-lora', name='large-1')
    fr = start_fastroute(
        module_procs, gateway_config({'small': small.url, 'large': large.url}), tmp_path_factory.mktemp('gw')
    )
    return {'fr': fr, 'small': small, 'large': large}


# --- the OpenAI surface ------------------------------------------------------------------------


def test_chat_non_streaming(env):
    resp = env['fr'].openai('acme').chat.completions.create(model='small', messages=[{'role': 'user', 'content': 'hi'}])
    assert resp.object == 'chat.completion'
    assert resp.choices[0].message.content.startswith('[mock:phi-3-mini]')
    assert resp.usage is not None and resp.usage.total_tokens > 0


def test_chat_streaming(env):
    client = env['fr'].openai('acme')
    msgs = [{'role': 'user', 'content': 'tell me something'}]
    whole = client.chat.completions.create(model='small', messages=msgs).choices[0].message.content
    parts = [
        c.choices[0].delta.content or ''
        for c in client.chat.completions.create(model='small', messages=msgs, stream=True)
        if c.choices
    ]
    assert len(parts) > 3
    assert ''.join(parts) == whole


def test_completions(env):
    resp = env['fr'].openai('acme').completions.create(model='small', prompt='Once upon a time', max_tokens=8)
    assert resp.object == 'text_completion'
    assert resp.choices[0].text


def test_embeddings(env):
    resp = env['fr'].openai('acme').embeddings.create(model='small', input=['one', 'two'])
    assert len(resp.data) == 2
    assert len(resp.data[0].embedding) > 0


def test_models_per_tenant(env):
    ids = {m.id for m in env['fr'].openai('acme').models.list()}
    assert {'small', 'large', 'acme-lora', 'shared-lora'} <= ids
    assert 'globex-lora' not in ids
    assert {m.id for m in env['fr'].openai('basic').models.list()} == {'small'}
    with pytest.raises(openai.AuthenticationError):
        env['fr'].openai('sk-unknown').models.list()


def test_model_retrieve(env):
    client = env['fr'].openai('acme')
    assert client.models.retrieve('acme-lora').id == 'acme-lora'
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve('globex-lora')


def test_alias_reaches_pool(env):
    resp = (
        env['fr']
        .openai('acme')
        .chat.completions.with_raw_response.create(model='gpt-4o-mini', messages=[{'role': 'user', 'content': 'hi'}])
    )
    assert resp.headers['x-fastroute-model'] == 'small'
    assert resp.parse().choices[0].message.content.startswith('[mock:phi-3-mini]')


# --- tenants and adapters ----------------------------------------------------------------------


@pytest.mark.parametrize('tenant', ['acme', 'globex'])
def test_tenant_reaches_own_adapter(env, tenant):
    resp = (
        env['fr']
        .openai(tenant)
        .chat.completions.with_raw_response.create(model='large', messages=[{'role': 'user', 'content': 'hi'}])
    )
    assert resp.headers['x-fastroute-adapter'] == f'{tenant}-lora'
    assert resp.parse().choices[0].message.content.startswith(f'[mock:{tenant}-lora]')
    seen = env['large'].recorded()[-1]
    assert seen['body']['model'] == f'{tenant}-lora'
    assert seen['headers']['x-request-id'] == resp.headers['x-request-id']


def test_other_tenants_adapter_is_403(env):
    with pytest.raises(openai.PermissionDeniedError) as info:
        env['fr'].openai('acme').chat.completions.create(
            model='globex-lora', messages=[{'role': 'user', 'content': 'hi'}]
        )
    assert info.value.status_code == 403
    assert info.value.body['type'] == 'permission_error'  # type: ignore[index]


def test_tenant_not_allowed_model_is_403(env):
    with pytest.raises(openai.PermissionDeniedError):
        env['fr'].openai('basic').chat.completions.create(model='large', messages=[{'role': 'user', 'content': 'x'}])


# --- path routes, explain ----------------------------------------------------------------------


def test_path_route_classify_goes_to_small(env):
    r = env['fr'].post('/v1/classify', chat_body('is this spam?', model='large'))
    assert r.status_code == 200, r.text
    assert r.headers['x-fastroute-route'] == 'classify'
    assert r.headers['x-fastroute-model'] == 'small'
    assert r.json()['choices'][0]['message']['content'].startswith('[mock:phi-3-mini]')
    last = env['small'].recorded()[-1]
    assert last['path'] == '/v1/chat/completions'
    assert last['body']['model'] == 'phi-3-mini'


def test_explain_endpoint_forwards_nothing(env):
    before = env['large'].stats()['requests']
    r = env['fr'].post('/v1/route/explain', chat_body(model='large'))
    assert r.status_code == 200, r.text
    d = r.json()
    assert d['route'] == 'by-model'
    assert d['pool'] == 'large'
    assert d['adapter'] == 'acme-lora'
    assert d['endpoint'] == env['large'].url
    assert d['reasons']
    r = env['fr'].post('/v1/route/explain?path=/v1/classify', chat_body(model='large'))
    assert r.json()['route'] == 'classify'
    assert env['large'].stats()['requests'] == before


def test_explain_cli(env):
    out = subprocess.run(
        [*fastroute_cmd('explain', '-c', str(env['fr'].config_path)), '-H', f'authorization: Bearer {KEYS["acme"]}'],
        input=json.dumps(chat_body(model='large')).encode(),
        capture_output=True,
        env=subprocess_env(),
        cwd=REPO,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr.decode()
    d = json.loads(out.stdout)
    assert (d['route'], d['pool'], d['adapter']) == ('by-model', 'large', 'acme-lora')
    assert d['endpoint'] == env['large'].url


# --- headers -----------------------------------------------------------------------------------


def test_response_headers(env):
    r = env['fr'].post('/v1/chat/completions', chat_body(model='large'))
    assert r.status_code == 200
    h = r.headers
    assert h['x-fastroute-route'] == 'by-model'
    assert h['x-fastroute-model'] == 'large'
    assert h['x-fastroute-adapter'] == 'acme-lora'
    assert 'x-fastroute-variant' in h
    assert int(h['x-fastroute-overhead-us']) >= 0
    assert h['x-request-id']


def test_request_id_passthrough_and_generated(env):
    r = env['fr'].post('/v1/chat/completions', chat_body(), headers={'x-request-id': 'req-abc-123'})
    assert r.headers['x-request-id'] == 'req-abc-123'
    assert env['small'].recorded()[-1]['headers']['x-request-id'] == 'req-abc-123'
    a = env['fr'].post('/v1/chat/completions', chat_body()).headers['x-request-id']
    b = env['fr'].post('/v1/chat/completions', chat_body()).headers['x-request-id']
    assert a and b and a != b
    assert env['small'].recorded()[-1]['headers']['x-request-id'] == b


def test_upstream_sees_its_own_key_and_no_hop_by_hop(env):
    trace = '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01'
    r = env['fr'].post(
        '/v1/chat/completions',
        chat_body(),
        headers={
            'traceparent': trace,
            'user-agent': 'acme-app/1.0',
            'cookie': 'session=secret',
            'x-stainless-lang': 'python',
            'connection': 'keep-alive',
            'keep-alive': 'timeout=5',
            'te': 'trailers',
        },
    )
    assert r.status_code == 200, r.text
    seen = env['small'].recorded()[-1]['headers']
    assert seen['authorization'] == f'Bearer {SMALL_UPSTREAM_KEY}'
    assert KEYS['acme'] not in json.dumps(seen)
    assert seen['traceparent'] == trace
    assert seen['content-type'] == 'application/json'
    assert seen['user-agent'] == 'acme-app/1.0'  # the client's, and no second one of ours
    for name in ('keep-alive', 'te', 'cookie', 'x-stainless-lang', 'proxy-authorization'):
        assert name not in seen
    # The large pool has no upstream key: nothing is sent, and never the client's.
    env['fr'].post('/v1/chat/completions', chat_body(model='large'), headers={'user-agent': ''})
    seen = env['large'].recorded()[-1]['headers']
    assert 'authorization' not in seen
    assert seen['user-agent'] == 'fastroute'  # the client named none


def test_healthz_and_readyz(env):
    assert env['fr'].get('/healthz', tenant=None).json() == {'status': 'ok'}
    r = env['fr'].get('/readyz', tenant=None)
    assert r.status_code == 200
    assert r.json()['models'] == {'small': True, 'large': True}


# --- load --------------------------------------------------------------------------------------


def test_thousand_concurrent_requests(env):
    import aiohttp

    url = env['fr'].base_url + '/chat/completions'
    headers = {'authorization': f'Bearer {KEYS["acme"]}'}

    async def main() -> list[tuple[int, str, str]]:
        conn = aiohttp.TCPConnector(limit=1000)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as s:

            async def one(i: int) -> tuple[int, str, str]:
                body = chat_body(f'request number {i}')
                async with s.post(url, json=body, headers={**headers, 'x-request-id': f'bulk-{i}'}) as r:
                    data = await r.json()
                    return r.status, r.headers['x-request-id'], data['choices'][0]['message']['content']

            return await asyncio.gather(*(one(i) for i in range(1000)))

    results = asyncio.run(main())
    assert len(results) == 1000
    for i, (status, rid, text) in enumerate(results):
        assert status == 200
        assert rid == f'bulk-{i}'
        assert text.startswith('[mock:phi-3-mini]')
    assert env['fr'].get('/healthz', tenant=None).status_code == 200


def test_serve_bad_config_exits_1_without_traceback(tmp_path):
    bad = tmp_path / 'bad.yaml'
    bad.write_text('models:\n  small: {endpoints: ["http://127.0.0.1:1"], bogus_key: 1}\n')
    out = subprocess.run(
        [*fastroute_cmd('serve', '-c', str(bad))], capture_output=True, env=subprocess_env(), cwd=REPO, timeout=30
    )
    err = out.stderr.decode()
    assert out.returncode == 1
    assert 'Traceback' not in err
    assert str(bad) in err and 'bogus_key' in err
