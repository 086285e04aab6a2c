"""The gateway's fast lane: a whole JSON request that finds an idle upstream connection is answered from the
connections' callbacks, without a task; wherever it would have to wait (a failed try, a stream, no idle
connection) it hands the request on to the connection's task and goes on from there.

Each test first sends one request so that the upstream connection is warm and idle: the request under test then
takes the lane (the native server runs it for a whole request with the body in hand), and its answer must be the
one the task's way gives: the failed try moved to the fallback model, the stream relayed whole, the upstream's
error relayed with its status, and every request on the connection answered in order.
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from test_gateway import KEYS, _sha, start_fastroute


def _config(main: str, backup: str) -> str:
    return f"""
server:
  timeouts: {{connect: 0.5, first_byte: 0.5, idle: 2.0, total: 5.0}}
  retry: {{max_attempts: 3, backoff: 0.001, backoff_max: 0.01}}
  watch_config: false
models:
  main: {{endpoints: ["{main}"], upstream_model: main-up, fallback: [backup]}}
  backup: {{endpoints: ["{backup}"], upstream_model: backup-up}}
tenants:
  acme: {{keys_sha256: ["{_sha(KEYS['acme'])}"]}}
routes:
  - {{name: by-model, requested: true}}
"""


@pytest.fixture(scope='module')
def lane(module_start_mock, module_procs, tmp_path_factory):
    main = module_start_mock(model='main-up', name='main')
    backup = module_start_mock(model='backup-up', name='backup')
    fr = start_fastroute(module_procs, _config(main.url, backup.url), tmp_path_factory.mktemp('lane'))
    return {'fr': fr, 'main': main, 'backup': backup}


@pytest.fixture
def client(lane):
    lane['main'].reset()
    lane['backup'].reset()
    with httpx.Client(base_url=lane['fr'].url, headers={'authorization': f'Bearer {KEYS["acme"]}'}) as c:
        yield c


def _chat(client: httpx.Client, text: str = 'hello', **extra: object) -> httpx.Response:
    body = {'model': 'main', 'messages': [{'role': 'user', 'content': text}], **extra}
    return client.post('/v1/chat/completions', json=body, timeout=10.0)


def _warm(client: httpx.Client) -> None:
    r = _chat(client, 'warm up')
    assert r.status_code == 200, r.text
    assert r.json()['model'] == 'main-up'
    assert r.headers['x-fastroute-model'] == 'main'


@pytest.mark.parametrize('fault', ['500', '503', 'reset', 'hang'])
def test_a_warm_connection_that_fails_moves_to_the_fallback(lane, client, fault):
    _warm(client)
    lane['main'].set_faults({'kind': fault})
    r = _chat(client, f'after a {fault}')
    assert r.status_code == 200, r.text
    assert r.json()['model'] == 'backup-up'
    assert r.headers['x-fastroute-model'] == 'backup'
    assert r.headers['x-fastroute-decided-model'] == 'main'
    assert int(r.headers['x-fastroute-attempts']) >= 2
    lane['main'].set_faults()
    r = _chat(client, 'healthy again')
    assert r.status_code == 200, r.text
    assert r.json()['model'] == 'main-up'


def test_an_upstream_error_that_is_not_retried_is_relayed(lane, client):
    _warm(client)
    lane['main'].set_faults({'kind': 'error', 'status': 400, 'message': 'the prompt is not allowed here'})
    r = _chat(client, 'refused upstream')
    lane['main'].set_faults()
    assert r.status_code == 400
    assert r.json()['error']['message'] == 'the prompt is not allowed here'
    assert lane['backup'].stats()['requests'] == 0


def test_a_stream_after_a_warm_up_is_relayed_whole(lane, client):
    _warm(client)
    body = {'model': 'main', 'messages': [{'role': 'user', 'content': 'stream it'}], 'stream': True}
    with client.stream('POST', '/v1/chat/completions', json=body, timeout=10.0) as r:
        assert r.status_code == 200
        assert r.headers['content-type'].startswith('text/event-stream')
        events = [line for line in r.iter_lines() if line.startswith('data: ')]
    assert events[-1] == 'data: [DONE]'
    assert len(events) >= 3
    _warm(client)  # and the connection goes on with whole answers


def test_every_request_on_a_kept_connection_is_answered_in_order(lane, client):
    _warm(client)
    ids = [f'lane-{i}' for i in range(200)]
    for rid in ids:
        r = client.post(
            '/v1/chat/completions',
            json={'model': 'main', 'messages': [{'role': 'user', 'content': rid}]},
            headers={'x-request-id': rid},
            timeout=10.0,
        )
        assert r.status_code == 200, r.text
        assert r.headers['x-request-id'] == rid
    assert lane['main'].stats()['requests'] == 201


def _raw_request(body: bytes, *, length: int | None = None) -> tuple[bytes, bytes]:
    head = (
        'POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n'
        f'authorization: Bearer {KEYS["acme"]}\r\ncontent-length: {len(body) if length is None else length}\r\n\r\n'
    ).encode()
    return head, body


def _read_answer(sock: socket.socket) -> tuple[int, bytes]:
    buf = b''
    while b'\r\n\r\n' not in buf:
        chunk = sock.recv(65536)
        assert chunk, 'closed before an answer'
        buf += chunk
    head, _, rest = buf.partition(b'\r\n\r\n')
    length = int(
        next(v for k, _, v in (ln.partition(b':') for ln in head.split(b'\r\n')) if k.lower() == b'content-length')
    )
    while len(rest) < length:
        rest += sock.recv(65536)
    return int(head.split(b' ', 2)[1]), rest[:length]


def test_a_body_written_after_its_head_is_waited_for_and_answered(lane, client):
    _warm(client)
    url = httpx.URL(lane['fr'].url)
    body = json.dumps({'model': 'main', 'messages': [{'role': 'user', 'content': 'late body'}]}).encode()
    with socket.create_connection((url.host, url.port), timeout=10) as s:
        for _ in range(3):  # the head, a pause, the body in two pieces; three times on one connection
            head, _ = _raw_request(body)
            s.sendall(head)
            time.sleep(0.05)
            s.sendall(body[:10])
            time.sleep(0.02)
            s.sendall(body[10:])
            status, answer = _read_answer(s)
            assert status == 200, answer
            assert json.loads(answer)['model'] == 'main-up'


def test_a_client_that_leaves_before_its_body_ends_leaves_nothing_behind(lane, client):
    _warm(client)
    url = httpx.URL(lane['fr'].url)
    body = json.dumps({'model': 'main', 'messages': [{'role': 'user', 'content': 'never finished'}]}).encode()
    for _ in range(5):
        with socket.create_connection((url.host, url.port), timeout=10) as s:
            head, _ = _raw_request(body)
            s.sendall(head + body[:-5])
            time.sleep(0.02)
    assert lane['main'].stats()['requests'] == 1  # only the warm-up reached the upstream
    _warm(client)  # the worker goes on serving


def test_a_whole_answer_comes_back_as_the_upstream_sent_it(lane, client):
    """A whole 200 in one read is made into the client's answer in one step (`_core.relay_answer`); one longer
    than a read goes the general way. Both must hand back the upstream's body byte for byte, with the same
    headers."""
    _warm(client)
    small = {'model': 'main', 'input': 'one short text'}
    large = {'model': 'main', 'input': [f'text number {i}' for i in range(300)], 'dimensions': 512}
    answers = {}
    for name, body in (('small', small), ('large', large)):
        r = client.post('/v1/embeddings', json=body, timeout=10.0)
        assert r.status_code == 200, r.text
        direct = httpx.post(f'{lane["main"].url}/v1/embeddings', json={**body, 'model': 'main-up'}, timeout=10.0)
        assert direct.status_code == 200
        assert r.json()['data'] == direct.json()['data']
        assert r.headers['content-type'] == direct.headers['content-type']
        assert int(r.headers['content-length']) == len(r.content)
        answers[name] = r
    assert len(answers['large'].content) > 1024 * 1024  # many reads
    assert len(answers['small'].content) < 16 * 1024  # one read
    for r in answers.values():
        assert r.headers['x-fastroute-route'] == 'by-model'
        assert r.headers['x-fastroute-model'] == 'main'
        assert int(r.headers['x-fastroute-overhead-us']) >= 0
        assert r.headers['x-request-id']
    assert set(answers['small'].headers) == set(answers['large'].headers)
