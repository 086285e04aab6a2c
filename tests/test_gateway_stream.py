"""Streaming through the gateway: bytes relayed as they arrive, a client that leaves cancels the upstream,
an upstream that breaks mid-answer ends the stream with an SSE error event and no [DONE]."""

from __future__ import annotations

import time

import httpx
import pytest
from test_gateway import KEYS, chat_body, gateway_config, start_fastroute


@pytest.fixture(scope='module')
def env(module_start_mock, module_procs, tmp_path_factory):
    # The small model streams slowly: ~40 tokens at 25 tokens/s, so a stream lasts well over a second.
    small = module_start_mock(model='phi-3-mini', api_key='upstream-small-secret', name='small-s', ttft_ms=50, tps=25)
    large = module_start_mock(model='llama-3-13b', adapters='acme-lora,globex-lora', name='large-s')
    fr = start_fastroute(
        module_procs, gateway_config({'small': small.url, 'large': large.url}), tmp_path_factory.mktemp('gws')
    )
    return {'fr': fr, 'small': small, 'large': large}


@pytest.fixture(autouse=True)
def _clean(env):
    yield
    env['large'].set_faults()
    env['small'].set_faults()


def _stream(env, body, **kw):
    headers = {'authorization': f'Bearer {KEYS["acme"]}'}
    return httpx.stream('POST', env['fr'].base_url + '/chat/completions', json=body, headers=headers, timeout=15, **kw)


def _wait_for(pred, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def test_stream_is_relayed_unchanged_with_headers(env):
    body = chat_body('stream me', model='large', stream=True)
    direct = httpx.post(env['large'].base_url + '/chat/completions', json={**body, 'model': 'acme-lora'}, timeout=10)
    with _stream(env, body) as r:
        assert r.status_code == 200
        assert r.headers['content-type'].startswith('text/event-stream')
        assert r.headers['x-fastroute-model'] == 'large'
        assert r.headers['x-fastroute-adapter'] == 'acme-lora'
        assert int(r.headers['x-fastroute-overhead-us']) >= 0
        data = r.read()
    strip = lambda b: [line for line in b.split(b'\n') if b'"id"' not in line]  # noqa: E731 - ids differ per call
    assert data.endswith(b'data: [DONE]\n\n')
    assert len(strip(data)) == len(strip(direct.content))


def test_first_bytes_leave_before_upstream_finishes(env):
    """No buffering: the first event reaches the client while the upstream is still generating."""
    with _stream(env, chat_body('slowly please', stream=True)) as r:
        it = r.iter_raw()
        first = next(it)
        assert first.startswith(b'data: ')
        assert env['small'].stats()['in_flight'] == 1, 'the upstream answer is still being generated'
        rest = b''.join(it)
    assert rest.endswith(b'data: [DONE]\n\n')


def test_include_usage_passes_through(env):
    body = chat_body('count me', model='large', stream=True, stream_options={'include_usage': True})
    with _stream(env, body) as r:
        data = r.read()
    assert b'"usage"' in data.split(b'data: [DONE]')[0].rsplit(b'data: ', 1)[-1]


def test_client_disconnect_cancels_upstream(env):
    small = env['small']
    before = small.stats()['disconnects']
    with _stream(env, chat_body('a long answer', stream=True)) as r:
        next(r.iter_raw())
        assert small.stats()['in_flight'] == 1
    # Leaving the block closed our connection mid-stream; the upstream must see it go at once.
    assert _wait_for(lambda: small.stats()['in_flight'] == 0, timeout=2.0), small.stats()
    assert small.stats()['disconnects'] > before
    assert env['fr'].get('/healthz', tenant=None).status_code == 200


def test_many_disconnects_leave_nothing_in_flight(env):
    small = env['small']
    for _ in range(5):
        with _stream(env, chat_body('again', stream=True)) as r:
            next(r.iter_raw())
    assert _wait_for(lambda: small.stats()['in_flight'] == 0, timeout=3.0), small.stats()


def test_upstream_cut_mid_stream_ends_with_error_event(env):
    # The small upstream streams slowly, so its headers and first events are out before the reset.
    env['small'].set_faults({'kind': 'stream_cut', 'after_tokens': 3, 'abort': True, 'count': 1})
    with _stream(env, chat_body('cut me', stream=True)) as r:
        assert r.status_code == 200
        data = r.read()
    events = [e for e in data.split(b'\n\n') if e]
    assert events[0].startswith(b'data: {')
    assert events[-1].startswith(b'data: {"error":')
    assert b'[DONE]' not in data
    assert env['fr'].get('/healthz', tenant=None).status_code == 200


def test_openai_client_sees_the_broken_stream(env):
    import openai

    env['large'].set_faults({'kind': 'stream_cut', 'after_tokens': 3, 'abort': True, 'count': 1})
    client = env['fr'].openai('acme')
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(
            model='large', messages=[{'role': 'user', 'content': 'x'}], stream=True
        ):
            pass
