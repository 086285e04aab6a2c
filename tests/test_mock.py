"""`fastroute mock` as a real server on loopback, driven by the official `openai` client, aiohttp and raw sockets."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time

import aiohttp
import openai
import pytest
from conftest import MockServer, fastroute_cmd, subprocess_env

pytestmark = pytest.mark.timeout(60)

MSG = [{'role': 'user', 'content': 'Summarize the quarterly report in two lines.'}]


@pytest.fixture(scope='module')
def mock(module_start_mock) -> MockServer:
    return module_start_mock(model='base-7b', adapters='acme,globex', name='mock-a', seed=7, max_output_tokens=64)


@pytest.fixture(autouse=True)
def _fresh(request):
    """Every test starts from the module mock's as-started state (counters, faults, timing)."""
    if 'mock' in request.fixturenames:
        request.getfixturevalue('mock').reset()


@pytest.fixture
def client(mock: MockServer):
    with mock.openai() as c:
        yield c


def sse_events(raw: bytes) -> list[str]:
    return [line[len('data: ') :] for line in raw.decode().split('\n\n') if line.startswith('data: ')]


async def _post_raw(url: str, body: dict, **kw) -> tuple[int, dict, bytes]:
    async with aiohttp.ClientSession() as s, s.post(url, json=body, **kw) as r:
        return r.status, dict(r.headers), await r.read()


# ----- answers -----


def test_chat_answer_names_model_and_is_deterministic(client, mock: MockServer):
    raw = client.chat.completions.with_raw_response.create(model='base-7b', messages=MSG)
    assert raw.headers['x-mock-served-by'] == 'mock-a'
    assert raw.headers['x-mock-model'] == 'base-7b'
    r = raw.parse()
    assert r.object == 'chat.completion' and r.model == 'base-7b'
    text = r.choices[0].message.content
    assert text.startswith('[mock:base-7b] ')
    assert r.choices[0].finish_reason == 'stop'
    assert 16 <= r.usage.completion_tokens <= 48
    assert r.usage.prompt_tokens >= 10 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = client.chat.completions.create(model='base-7b', messages=MSG)
    assert again.choices[0].message.content == text and again.id != r.id
    other = client.chat.completions.create(model='base-7b', messages=[{'role': 'user', 'content': 'Something else'}])
    assert other.choices[0].message.content != text


def test_adapters_by_model_and_lorax_adapter_id(client):
    r = client.chat.completions.create(model='acme', messages=MSG, max_tokens=5)
    assert r.choices[0].message.content.startswith('[mock:acme] ') and r.model == 'acme'
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == 'length'
    r = client.chat.completions.create(model='base-7b', messages=MSG, extra_body={'adapter_id': 'globex'})
    assert r.choices[0].message.content.startswith('[mock:globex] ') and r.model == 'base-7b'
    r = client.chat.completions.create(model='base-7b', messages=MSG, max_tokens=500)
    assert r.usage.completion_tokens == 64  # capped by --max-output-tokens


def test_stream_with_usage_matches_whole_answer(client):
    whole = client.chat.completions.create(model='acme', messages=MSG).choices[0].message.content
    chunks = list(
        client.chat.completions.create(model='acme', messages=MSG, stream=True, stream_options={'include_usage': True})
    )
    assert chunks[0].choices[0].delta.role == 'assistant'
    text = ''.join(c.choices[0].delta.content or '' for c in chunks if c.choices)
    assert text == whole
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == 'stop'
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(chunks) - 3
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_raw_framing_ends_with_done(mock: MockServer):
    body = {'model': 'globex', 'messages': MSG, 'stream': True, 'max_tokens': 4}
    status, headers, raw = asyncio.run(_post_raw(mock.base_url + '/chat/completions', body))
    assert status == 200 and headers['Content-Type'].startswith('text/event-stream')
    events = sse_events(raw)
    assert events[-1] == '[DONE]' and len(events) == 1 + 4 + 1 + 1  # role, tokens, finish, [DONE]
    assert 'usage' not in json.loads(events[-2])


def test_stream_pacing_follows_ttft_and_tps(mock: MockServer, client):
    mock.configure(ttft_ms=200, tps=50)
    t0 = time.monotonic()
    stream = client.chat.completions.create(model='base-7b', messages=MSG, stream=True, max_tokens=6)
    arrivals = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - t0)
    assert len(arrivals) == 6
    assert 0.18 <= arrivals[0] < 0.6, arrivals
    assert arrivals[-1] >= 0.2 + 5 / 50 * 0.9, arrivals  # ttft, then 5 gaps at 50 tokens/s
    assert arrivals[-1] - arrivals[0] >= 0.06, arrivals


def test_completions_whole_and_streamed(client):
    r = client.completions.create(model='globex', prompt='Once upon a time', max_tokens=7)
    assert r.object == 'text_completion' and r.model == 'globex'
    assert r.choices[0].text.startswith('[mock:globex] ') and r.usage.completion_tokens == 7
    parts = list(
        client.completions.create(
            model='globex', prompt='Once upon a time', max_tokens=7, stream=True, stream_options={'include_usage': True}
        )
    )
    assert ''.join(p.choices[0].text for p in parts if p.choices) == r.choices[0].text
    assert parts[-1].usage.completion_tokens == 7


def test_embeddings_deterministic_base64_and_float(client, mock: MockServer):
    r = client.embeddings.create(model='base-7b', input=['alpha', 'beta'])  # the client asks for base64
    assert [d.index for d in r.data] == [0, 1] and len(r.data[0].embedding) == 256
    assert abs(sum(x * x for x in r.data[0].embedding) - 1.0) < 1e-3
    assert r.data[0].embedding != r.data[1].embedding and r.usage.prompt_tokens > 0
    again = client.embeddings.create(model='base-7b', input='alpha', encoding_format='float', dimensions=256)
    assert again.data[0].embedding == pytest.approx(r.data[0].embedding, abs=1e-6)
    small = client.embeddings.create(model='acme', input='alpha', dimensions=8)
    assert len(small.data[0].embedding) == 8 and small.model == 'acme'


def test_models_lists_base_and_adapters(client):
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {'base-7b', 'acme', 'globex'}
    assert models['acme'].model_extra['parent'] == 'base-7b'
    assert models['base-7b'].model_extra['parent'] is None


def test_dynamic_lora_load_and_unload(mock: MockServer, client):
    status, _, _ = mock.request('POST', '/v1/load_lora_adapter', {'lora_name': 'initech', 'lora_path': '/l/i'})
    assert status == 200
    assert (
        client.chat.completions.create(model='initech', messages=MSG)
        .choices[0]
        .message.content.startswith('[mock:initech]')
    )
    assert mock.request('POST', '/v1/unload_lora_adapter', {'lora_name': 'initech'})[0] == 200
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model='initech', messages=MSG)


def test_extra_paths_answer_like_chat(mock: MockServer, client):
    r = client.post(
        '/classify', body={'model': 'acme', 'input': 'invoice #42'}, cast_to=openai.types.chat.ChatCompletion
    )
    assert r.choices[0].message.content.startswith('[mock:acme] ')
    assert mock.stats()['by_path'] == {'/v1/classify': 1}


# ----- errors -----


def test_unknown_model_is_openai_not_found(client, mock: MockServer):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model='nope', messages=MSG)
    assert e.value.status_code == 404
    status, _, body = mock.request('POST', '/v1/chat/completions', {'model': 'nope', 'messages': MSG})
    assert status == 404
    assert json.loads(body) == {
        'error': {'message': 'The model `nope` does not exist.', 'type': 'NotFoundError', 'param': 'model', 'code': 404}
    }


def test_bad_requests_are_400(mock: MockServer, client):
    for body in (b'{"model": "base-7b", "messages": [', b'', b'[1, 2]', b'\xff\xfe'):
        status, _, data = mock.request('POST', '/v1/chat/completions', body)
        assert status == 400 and json.loads(data)['error']['code'] == 400, body
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model='base-7b', messages=[])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model='base-7b', messages=MSG, max_tokens=0)
    assert client.chat.completions.create(model='base-7b', messages=MSG).choices  # still serving


# ----- faults -----


def test_fault_429_with_retry_after(mock: MockServer, client):
    mock.set_faults({'kind': '429', 'retry_after': 3})
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model='base-7b', messages=MSG)
    assert e.value.response.headers['retry-after'] == '3'
    assert e.value.body['code'] == 429


@pytest.mark.parametrize(('kind', 'exc'), [('500', openai.InternalServerError), ('503', openai.InternalServerError)])
def test_fault_5xx(mock: MockServer, client, kind, exc):
    mock.set_faults({'kind': kind})
    with pytest.raises(exc) as e:
        client.chat.completions.create(model='base-7b', messages=MSG)
    assert e.value.status_code == int(kind)
    assert mock.stats()['faults_injected'] == {kind: 1}


def test_fault_hang_times_out_and_frees_request(mock: MockServer, client):
    mock.set_faults({'kind': 'hang'})
    t0 = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.4).chat.completions.create(model='base-7b', messages=MSG)
    assert time.monotonic() - t0 < 2
    deadline = time.monotonic() + 3
    while (st := mock.stats())['in_flight'] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert st['in_flight'] == 0 and st['disconnects'] == 1


def test_fault_reset_is_connection_error(mock: MockServer, client):
    mock.set_faults({'kind': 'reset'})
    with pytest.raises(openai.APIConnectionError) as e:
        client.chat.completions.create(model='base-7b', messages=MSG)
    assert not isinstance(e.value, openai.APITimeoutError)
    # the same at the socket level: the connection ends and no HTTP status line ever comes
    with socket.create_connection(('127.0.0.1', mock.port), timeout=3) as s:
        body = json.dumps({'model': 'base-7b', 'messages': MSG}).encode()
        s.sendall(b'POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n')
        s.sendall(b'content-length: %d\r\n\r\n%s' % (len(body), body))
        try:
            assert s.recv(1024) == b''
        except ConnectionResetError:
            pass


def test_fault_stream_cut_ends_without_done(mock: MockServer, client):
    mock.set_faults({'kind': 'stream_cut', 'after_tokens': 3})
    body = {'model': 'acme', 'messages': MSG, 'stream': True}
    status, _, raw = asyncio.run(_post_raw(mock.base_url + '/chat/completions', body))
    events = sse_events(raw)
    assert status == 200 and '[DONE]' not in events and len(events) == 1 + 3
    assert all(json.loads(e)['choices'][0]['finish_reason'] is None for e in events)
    # the client sees a stream that simply stops early
    chunks = list(client.chat.completions.create(model='acme', messages=MSG, stream=True))
    assert not any(c.choices[0].finish_reason for c in chunks)
    # non-streaming requests are not affected by a stream cut
    assert client.chat.completions.create(model='acme', messages=MSG).choices[0].finish_reason == 'stop'


def test_fault_stream_cut_with_abort_breaks_the_client(mock: MockServer, client):
    mock.set_faults({'kind': 'stream_cut', 'after_tokens': 2, 'abort': True})
    with pytest.raises(openai.APIConnectionError):
        list(client.chat.completions.create(model='acme', messages=MSG, stream=True))


def test_fault_slow_first_byte(mock: MockServer, client):
    mock.set_faults({'kind': 'slow_first_byte', 'delay_ms': 300})
    t0 = time.monotonic()
    assert client.chat.completions.create(model='base-7b', messages=MSG).choices
    assert time.monotonic() - t0 >= 0.3
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.1).chat.completions.create(model='base-7b', messages=MSG)


def test_fault_rules_filter_count_and_rate(mock: MockServer, client):
    mock.set_faults(
        {'kind': '503', 'model': 'acme', 'count': 2}, {'kind': '500', 'rate': 0.5, 'path': '/v1/completions'}
    )
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model='acme', messages=MSG)
    assert client.chat.completions.create(model='acme', messages=MSG).choices  # count exhausted
    assert client.chat.completions.create(model='globex', messages=MSG).choices  # other model untouched
    failures = 0
    for _ in range(60):
        try:
            client.completions.create(model='base-7b', prompt='x', max_tokens=1)
        except openai.InternalServerError:
            failures += 1
    assert 12 <= failures <= 48
    assert mock.stats()['faults_injected'] == {'503': 2, '500': failures}


def test_runtime_fault_switching_and_reset(mock: MockServer, client):
    assert client.chat.completions.create(model='base-7b', messages=MSG).choices
    assert mock.set_faults({'kind': '500'})[0]['kind'] == '500'
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model='base-7b', messages=MSG)
    assert mock.set_faults() == []
    assert client.chat.completions.create(model='base-7b', messages=MSG).choices
    assert mock.request('POST', '/_mock/faults', {'kind': 'explode'})[0] == 400
    mock.set_faults({'kind': '429'})
    st = mock.reset()
    assert st['requests'] == 0 and st['faults'] == []
    assert client.chat.completions.create(model='base-7b', messages=MSG).choices


def test_stats_and_recorded_requests(mock: MockServer, client):
    client.chat.completions.create(model='acme', messages=MSG, extra_headers={'x-request-id': 'rid-1'})
    client.chat.completions.create(model='base-7b', messages=MSG)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model='nope', messages=MSG)
    st = mock.stats()
    assert st['requests'] == 3 and st['in_flight'] == 0
    assert st['by_model'] == {'acme': 1, 'base-7b': 1}
    assert st['by_status'] == {'200': 2, '404': 1}
    rec = mock.recorded()
    assert [r['body']['model'] for r in rec] == ['acme', 'base-7b', 'nope']
    assert rec[0]['headers']['x-request-id'] == 'rid-1' and rec[0]['headers']['authorization'] == 'Bearer test-key'


# ----- metrics, concurrency, disconnects -----


def _metric_lines(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith('#'):
            name, value = line.rsplit(' ', 1)
            out[name] = float(value)
    return out


def test_metrics_running_waiting_and_lora_info(mock: MockServer):
    mock.configure(ttft_ms=600, tps=0, max_concurrency=1)

    async def scenario() -> tuple[str, list[int]]:
        async with aiohttp.ClientSession() as s:

            async def call(model: str) -> int:
                async with s.post(mock.base_url + '/chat/completions', json={'model': model, 'messages': MSG}) as r:
                    await r.read()
                    return r.status

            tasks = [asyncio.create_task(call('acme')), asyncio.create_task(call('globex'))]
            await asyncio.sleep(0.3)
            async with s.get(mock.url + '/metrics') as r:
                assert r.headers['Content-Type'].startswith('text/plain')
                text = await r.text()
            return text, await asyncio.gather(*tasks)

    text, statuses = asyncio.run(scenario())
    assert statuses == [200, 200]
    m = _metric_lines(text)
    assert m['vllm:num_requests_running{model_name="base-7b"}'] == 1.0
    assert m['vllm:num_requests_waiting{model_name="base-7b"}'] == 1.0
    lora = [k for k in m if k.startswith('vllm:lora_requests_info{')]
    assert lora == [
        'vllm:lora_requests_info{max_lora="2",model_name="base-7b",running_lora_adapters="acme",'
        'waiting_lora_adapters="globex"}'
    ]
    assert '# TYPE vllm:num_requests_running gauge' in text
    after = _metric_lines(mock.request('GET', '/metrics')[2].decode())
    assert after['vllm:num_requests_running{model_name="base-7b"}'] == 0.0
    assert after['vllm:request_success_total{finished_reason="stop",model_name="base-7b"}'] == 2.0


def test_client_disconnect_mid_stream_is_seen(mock: MockServer):
    mock.configure(ttft_ms=0, tps=20)

    async def scenario() -> None:
        async with aiohttp.ClientSession() as s:
            body = {'model': 'acme', 'messages': MSG, 'stream': True, 'max_tokens': 40}
            async with s.post(mock.base_url + '/chat/completions', json=body) as r:
                await r.content.readline()
            # leaving the block without reading closes the connection

    asyncio.run(scenario())
    deadline = time.monotonic() + 3
    while (st := mock.stats())['in_flight'] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert st['in_flight'] == 0 and st['disconnects'] == 1 and st['completion_tokens'] < 40


def test_many_concurrent_requests(mock: MockServer):
    async def scenario() -> list[str]:
        conn = aiohttp.TCPConnector(limit=100)
        async with aiohttp.ClientSession(connector=conn) as s:

            async def call(i: int) -> str:
                body = {'model': ('acme', 'globex', 'base-7b')[i % 3], 'messages': MSG, 'max_tokens': 3}
                async with s.post(mock.base_url + '/chat/completions', json=body) as r:
                    return (await r.json())['choices'][0]['message']['content']

            return await asyncio.gather(*(call(i) for i in range(300)))

    texts = asyncio.run(scenario())
    assert all(t.startswith(f'[mock:{("acme", "globex", "base-7b")[i % 3]}]') for i, t in enumerate(texts))


# ----- several mocks, auth, workers, CLI -----


def test_two_mocks_on_two_ports_with_api_key(mock: MockServer, start_mock):
    other = start_mock(model='llama-13b', name='mock-b', api_key='sekret')
    assert other.port != mock.port
    with other.openai(api_key='sekret') as c:
        raw = c.chat.completions.with_raw_response.create(model='llama-13b', messages=MSG)
        assert raw.headers['x-mock-served-by'] == 'mock-b'
        assert raw.parse().choices[0].message.content.startswith('[mock:llama-13b] ')
    with other.openai(api_key='wrong') as c, pytest.raises(openai.AuthenticationError):
        c.chat.completions.create(model='llama-13b', messages=MSG)
    with mock.openai() as c, pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model='llama-13b', messages=MSG)
    assert other.request('GET', '/health')[0] == 200  # health needs no key


def test_workers_share_faults_and_stats(start_mock):
    m = start_mock(model='w', workers=2)
    m.set_faults({'kind': '503'})

    async def burst(n: int) -> list[int]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32, force_close=True)) as s:

            async def call() -> int:
                async with s.post(m.base_url + '/chat/completions', json={'model': 'w', 'messages': MSG}) as r:
                    await r.read()
                    return r.status

            return await asyncio.gather(*(call() for _ in range(n)))

    assert set(asyncio.run(burst(64))) == {503}
    m.set_faults()
    assert set(asyncio.run(burst(64))) == {200}
    time.sleep(0.5)  # each worker publishes its counters every 0.2 s
    st = m.stats()
    assert st['requests'] == 128 and st['faults_injected'] == {'503': 64}


def test_cli_rejects_bad_options(tmp_path):
    bad = tmp_path / 'mock.json'
    bad.write_text(json.dumps({'model': 'x', 'faults': [{'kind': 'meteor'}]}))
    r = subprocess.run(
        fastroute_cmd('mock', '--config', str(bad)), env=subprocess_env(), capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 2 and 'meteor' in r.stderr


def test_cli_config_file_and_startup_fault(start_mock, tmp_path):
    cfg = tmp_path / 'mock.yaml'
    cfg.write_text('model: phi-3-mini\nadapters: [support-v1]\nfaults:\n  - {kind: "429", retry_after: 2, count: 1}\n')
    m = start_mock(model='phi-3-mini', config=str(cfg))
    with m.openai() as c:
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model='support-v1', messages=MSG)
        assert e.value.response.headers['retry-after'] == '2'
        assert (
            c.chat.completions.create(model='support-v1', messages=MSG)
            .choices[0]
            .message.content.startswith('[mock:support-v1]')
        )
