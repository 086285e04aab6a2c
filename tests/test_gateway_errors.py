"""Every error the gateway can answer: its status, its OpenAI shape, the exception the `openai` client raises
for it, and the worker still serving afterwards. Bad input is refused before anything goes upstream."""

from __future__ import annotations

import socket

import httpx
import openai
import pytest
from conftest import free_port
from test_gateway import chat_body, gateway_config, start_fastroute

MSGS = [{'role': 'user', 'content': 'hi'}]


@pytest.fixture(scope='module')
def env(module_start_mock, module_procs, tmp_path_factory):
    small = module_start_mock(model='phi-3-mini', api_key='upstream-small-secret', name='small-e')
    large = module_start_mock(model='llama-3-13b', adapters='acme-lora,globex-lora', name='large-e')
    dead = f'http://127.0.0.1:{free_port()}'  # nothing listens there
    extra = f"""
  dead:
    endpoints: ["{dead}"]
    upstream_model: dead-model
  sleepy:
    endpoints: ["{large.url}"]
    upstream_model: sleepy-model
    timeouts: {{connect: 1.0, first_byte: 0.5, idle: 0.5, total: 5.0}}
"""
    fr = start_fastroute(
        module_procs,
        gateway_config({'small': small.url, 'large': large.url}, extra_models=extra, max_body=4096),
        tmp_path_factory.mktemp('gwe'),
    )
    return {'fr': fr, 'small': small, 'large': large}


@pytest.fixture(autouse=True)
def _clean(env):
    yield
    env['large'].set_faults()
    env['small'].set_faults()


def assert_alive(env) -> None:
    assert env['fr'].proc.alive
    assert env['fr'].get('/healthz', tenant=None).status_code == 200


def assert_openai_error(r: httpx.Response, status: int, type_: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers['content-type'].startswith('application/json')
    body = r.json()
    assert set(body) == {'error'}
    err = body['error']
    assert {'message', 'type', 'param', 'code'} <= set(err)
    assert err['message']
    if type_ is not None:
        assert err['type'] == type_
    assert r.headers['x-request-id']
    return err


# --- bad input: a clear 4xx, nothing forwarded, worker alive -----------------------------------


@pytest.mark.parametrize(
    ('name', 'kwargs', 'status'),
    [
        ('empty body', {'content': b''}, 400),
        ('invalid JSON', {'content': b'{"model": "small", "messages": [}'}, 400),
        ('not an object', {'content': b'[1, 2, 3]'}, 400),
        (
            'invalid UTF-8',
            {'content': b'{"model": "small", "messages": [{"role": "user", "content": "\xff\xfe"}]}'},
            400,
        ),
        ('wrong content-type', {'content': b'model=small', 'headers': {'content-type': 'text/plain'}}, 400),
        ('huge body', {'content': b'{"model": "small", "pad": "' + b'x' * 10000 + b'"}'}, 413),
        ('wrong type for a known field', {'json': {'model': 'small', 'messages': MSGS, 'stream': 'yes'}}, 400),
    ],
)
def test_bad_input_is_refused(env, name, kwargs, status):
    before = env['small'].stats()['requests']
    headers = {'content-type': 'application/json', **kwargs.pop('headers', {})}
    r = env['fr'].post('/v1/chat/completions', headers=headers, **kwargs)
    assert_openai_error(r, status)
    assert env['small'].stats()['requests'] == before, 'nothing may go upstream'
    assert_alive(env)


def test_chunked_huge_body_is_413(env):
    def gen():
        yield b'{"model": "small", "pad": "'
        for _ in range(20):
            yield b'y' * 1000
        yield b'"}'

    r = env['fr'].post('/v1/chat/completions', content=gen(), headers={'content-type': 'application/json'})
    assert_openai_error(r, 413)


def test_missing_fields_are_4xx(env):
    r = env['fr'].post('/v1/chat/completions', {'model': 'small'})
    err = assert_openai_error(r, 400)
    assert err['param'] == 'messages'
    r = env['fr'].post('/v1/embeddings', {'model': 'small'})
    assert_openai_error(r, 400)


def test_unknown_model_is_404(env):
    with pytest.raises(openai.NotFoundError) as info:
        env['fr'].openai('acme').chat.completions.create(model='gpt-17-ultra', messages=MSGS)
    assert info.value.status_code == 404


def test_unknown_path_is_404_and_wrong_method_405(env):
    assert_openai_error(env['fr'].post('/v1/nothing-here', chat_body()), 404)
    r = env['fr'].get('/v1/chat/completions')
    assert_openai_error(r, 405)
    assert 'POST' in r.headers['allow']
    assert_openai_error(env['fr'].post('/v1/models', {}), 405)


def test_missing_or_unknown_key_is_401(env):
    assert_openai_error(env['fr'].post('/v1/chat/completions', chat_body(), tenant=None), 401, 'authentication_error')
    with pytest.raises(openai.AuthenticationError):
        env['fr'].openai('sk-who-knows').chat.completions.create(model='small', messages=MSGS)


# --- the official client maps every status to its exception ------------------------------------


def test_400_from_gateway_is_bad_request(env):
    with pytest.raises(openai.BadRequestError) as info:
        env['fr'].openai('acme').chat.completions.create(model='small', messages=MSGS, extra_body={'max_tokens': 'x'})
    assert info.value.status_code == 400


def test_403_is_permission_denied(env):
    with pytest.raises(openai.PermissionDeniedError):
        env['fr'].openai('acme').chat.completions.create(model='globex-lora', messages=MSGS)


def test_413_is_api_status_error(env):
    with pytest.raises(openai.APIStatusError) as info:
        env['fr'].openai('acme').chat.completions.create(
            model='small', messages=[{'role': 'user', 'content': 'z' * 8000}]
        )
    assert info.value.status_code == 413


@pytest.mark.parametrize(
    ('fault', 'exc', 'status'),
    [
        ({'kind': 'error', 'status': 422}, openai.UnprocessableEntityError, 422),
        ({'kind': '429', 'retry_after': 7}, openai.RateLimitError, 429),
        ({'kind': '500'}, openai.InternalServerError, 500),
        ({'kind': '503'}, openai.InternalServerError, 503),
    ],
)
def test_upstream_errors_are_relayed(env, fault, exc, status):
    env['large'].set_faults({**fault, 'count': 1})
    with pytest.raises(exc) as info:
        env['fr'].openai('acme').chat.completions.create(model='large', messages=MSGS)
    assert info.value.status_code == status
    if status == 429:
        assert info.value.response.headers['retry-after'] == '7'
    assert info.value.response.headers['x-fastroute-model'] == 'large'


def test_dead_upstream_is_502(env):
    with pytest.raises(openai.InternalServerError) as info:
        env['fr'].openai('acme').chat.completions.create(model='dead', messages=MSGS)
    assert info.value.status_code == 502
    assert info.value.response.headers['x-fastroute-model'] == 'dead'
    assert info.value.body['type'] == 'upstream_error'  # type: ignore[index]


def test_upstream_reset_is_502(env):
    env['large'].set_faults({'kind': 'reset', 'count': 1})
    with pytest.raises(openai.InternalServerError) as info:
        env['fr'].openai('acme').chat.completions.create(model='large', messages=MSGS)
    assert info.value.status_code == 502


def test_upstream_hang_is_504(env):
    env['large'].set_faults({'kind': 'hang', 'model': 'sleepy-model', 'count': 1})
    with pytest.raises(openai.InternalServerError) as info:
        env['fr'].openai('acme').chat.completions.create(model='sleepy', messages=MSGS)
    assert info.value.status_code == 504
    assert info.value.body['code'] == 'upstream_timeout'  # type: ignore[index]


def test_streaming_request_to_dead_upstream_is_502_before_any_byte(env):
    with pytest.raises(openai.InternalServerError) as info:
        list(env['fr'].openai('acme').chat.completions.create(model='dead', messages=MSGS, stream=True))
    assert info.value.status_code == 502


def test_garbage_on_the_wire_does_not_kill_the_worker(env):
    host, port = env['fr'].url.removeprefix('http://').split(':')
    replies = []
    for junk in (b'NOT HTTP AT ALL\r\n\r\n', b'POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 99\r\n\r\n{'):
        with socket.create_connection((host, int(port)), timeout=2) as s:
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            try:
                replies.append(s.recv(4096))
            except OSError:
                replies.append(b'')
    # Not HTTP: a plain 400, never a hang. A truncated body: no answer can be right, only a close.
    assert replies[0].startswith(b'HTTP/1.1 400'), replies[0][:80]
    assert not replies[1].startswith(b'HTTP/1.1 2'), replies[1][:80]
    r = env['fr'].openai('acme').chat.completions.create(model='small', messages=MSGS)
    assert r.choices[0].message.content
    assert_alive(env)
