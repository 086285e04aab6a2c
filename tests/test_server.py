"""The native HTTP server (fastroute.server) on a real loopback socket, read byte for byte by a raw client.

What these check is the framing a client depends on: a stream started with its first bytes (`stream_first`) and
ended with its last (`send_last`) is a valid chunked body, ended once; HTTP/1.0 and HEAD get no chunked framing;
keep-alive and pipelined requests are answered in order, and the next request on a connection is served whether
it arrives before or after the previous answer's task finished; and the request head as the server reads it:
split across reads, chunked bodies, limits, and the heads it refuses (malformed, or framed ambiguously: the
shapes request smuggling relies on).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvloop
from fastroute.server import Server


class App:
    """Answers by path: /json, /first (stream_first, more chunks, send_last), /whole (stream_first with last),
    /plain-stream (RSGI response_stream + send_bytes), /after-end (send_bytes after send_last: refused)."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        body = await proto()
        path = scope.path
        if path.startswith('/echo'):
            seen = {
                'method': scope.method,
                'path': path,
                'query': scope.query_string,
                'version': scope.http_version,
                'body': body.decode('latin-1'),
                'headers': scope.headers,
            }
            proto.response_bytes(200, [('content-type', 'application/json')], json.dumps(seen).encode())
        elif path == '/json':
            proto.response_bytes(200, [('content-type', 'application/json')], b'{"ok":true}')
        elif path == '/first':
            t = proto.stream_first(200, [('content-type', 'text/event-stream')], b'data: 1\n\n')
            await asyncio.sleep(0.01)
            await t.send_bytes(b'data: 2\n\n')
            await asyncio.sleep(0.01)
            await t.send_last(b'data: [DONE]\n\n')
        elif path == '/whole':
            proto.stream_first(200, [('content-type', 'text/event-stream')], b'data: x\n\ndata: [DONE]\n\n', True)
        elif path == '/plain-stream':
            t = proto.response_stream(200, [('content-type', 'text/event-stream')])
            await t.send_bytes(b'data: a\n\n')
            await t.send_bytes(b'data: b\n\n')
        elif path == '/after-end':
            t = proto.stream_first(200, [('content-type', 'text/event-stream')], b'data: a\n\n')
            await t.send_last(b'')
            try:
                await t.send_bytes(b'data: late\n\n')
                self.errors.append('send_bytes after send_last was accepted')
            except RuntimeError:
                pass
        else:
            proto.response_bytes(404, [], b'')


@contextlib.contextmanager
def running_server(backlog: int = 128, **kwargs: Any) -> Iterator[tuple[int, App]]:
    """A native server with the test app on a loopback port, in a thread with its own loop; stopped on exit."""
    app = App()
    loop = uvloop.new_event_loop()
    sock = socket.create_server(('127.0.0.1', 0))
    sock.setblocking(False)
    port = sock.getsockname()[1]
    srv = Server(app, loop, **kwargs)
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(srv.start(sock, backlog))
        started.set()
        loop.run_until_complete(srv.stopped)
        loop.run_until_complete(srv.wait_drained(1.0))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert started.wait(10)
    try:
        yield port, app
    finally:
        loop.call_soon_threadsafe(srv.stop)
        t.join(10)
        sock.close()


@pytest.fixture(scope='module')
def server() -> Iterator[tuple[int, App]]:
    with running_server() as s:
        yield s


def read_answer(f: Any) -> tuple[bytes, dict[str, str], bytes]:
    """One HTTP/1.x answer from a socket file: status line, headers, body (de-chunked, or by length, or to EOF)."""
    status = f.readline().rstrip(b'\r\n')
    headers: dict[str, str] = {}
    while True:
        line = f.readline()
        if line in (b'\r\n', b''):
            break
        k, _, v = line.decode('latin-1').partition(':')
        headers[k.strip().lower()] = v.strip()
    if headers.get('transfer-encoding') == 'chunked':
        body = b''
        while True:
            size = int(f.readline().strip(), 16)
            if size == 0:
                assert f.readline() == b'\r\n'  # the end of the chunked body
                break
            body += f.read(size)
            assert f.read(2) == b'\r\n'
        return status, headers, body
    if 'content-length' in headers:
        return status, headers, f.read(int(headers['content-length']))
    return status, headers, f.read()


def request(path: str, version: str = '1.1', method: str = 'POST', body: bytes = b'{}') -> bytes:
    return f'{method} {path} HTTP/{version}\r\nhost: x\r\ncontent-length: {len(body)}\r\n\r\n'.encode() + body


def test_stream_first_and_send_last_make_one_valid_chunked_body(server: tuple[int, App]) -> None:
    port, app = server
    with socket.create_connection(('127.0.0.1', port), timeout=5) as s:
        f = s.makefile('rb')
        for path, want in (
            ('/first', b'data: 1\n\ndata: 2\n\ndata: [DONE]\n\n'),
            ('/whole', b'data: x\n\ndata: [DONE]\n\n'),
            ('/plain-stream', b'data: a\n\ndata: b\n\n'),
            ('/after-end', b'data: a\n\n'),
            ('/json', b'{"ok":true}'),  # the connection is still in step after every kind of stream
        ):
            s.sendall(request(path))
            status, headers, body = read_answer(f)
            assert status == b'HTTP/1.1 200 OK', path
            assert body == want, path
            assert 'connection' not in headers, path  # kept alive
    assert app.errors == []


def test_pipelined_requests_are_answered_in_order(server: tuple[int, App]) -> None:
    port, _ = server
    with socket.create_connection(('127.0.0.1', port), timeout=5) as s:
        f = s.makefile('rb')
        s.sendall(request('/whole') + request('/json') + request('/first') + request('/json'))
        bodies = [read_answer(f)[2] for _ in range(4)]
    assert bodies == [
        b'data: x\n\ndata: [DONE]\n\n',
        b'{"ok":true}',
        b'data: 1\n\ndata: 2\n\ndata: [DONE]\n\n',
        b'{"ok":true}',
    ]


@pytest.mark.parametrize('path', ['/first', '/whole'])
def test_http10_stream_is_unframed_and_closes(server: tuple[int, App], path: str) -> None:
    port, _ = server
    with socket.create_connection(('127.0.0.1', port), timeout=5) as s:
        s.sendall(request(path, version='1.0'))
        status, headers, body = read_answer(s.makefile('rb'))  # no chunked framing: the body runs to EOF
    assert status == b'HTTP/1.1 200 OK'
    assert 'transfer-encoding' not in headers
    assert headers.get('connection') == 'close'
    assert body.endswith(b'data: [DONE]\n\n')
    assert body.startswith(b'data: 1\n\n' if path == '/first' else b'data: x\n\n')


def test_head_stream_has_no_body(server: tuple[int, App]) -> None:
    port, _ = server
    with socket.create_connection(('127.0.0.1', port), timeout=5) as s:
        f = s.makefile('rb')
        s.sendall(request('/whole', method='HEAD', body=b'') + request('/json'))
        status = f.readline()
        assert status.startswith(b'HTTP/1.1 200')
        while f.readline() not in (b'\r\n', b''):
            pass
        # the next answer follows the head at once: no body, no chunk terminator in between
        status, _, body = read_answer(f)
    assert status == b'HTTP/1.1 200 OK'
    assert body == b'{"ok":true}'


# ---------------------------------------------------------------------------------------------- request heads


def exchange(port: int, raw: bytes | list[bytes], n: int = 1, pause: float = 0.0) -> list[tuple[bytes, dict, bytes]]:
    """Send `raw` (a list: one send each, `pause` apart), read `n` answers."""
    with socket.create_connection(('127.0.0.1', port), timeout=5) as s:
        f = s.makefile('rb')
        for part in [raw] if isinstance(raw, bytes) else raw:
            s.sendall(part)
            if pause:
                time.sleep(pause)
        return [read_answer(f) for _ in range(n)]


def echo(answer: tuple[bytes, dict, bytes]) -> dict:
    status, _, body = answer
    assert status == b'HTTP/1.1 200 OK', (status, body)
    return json.loads(body)


def test_head_fields_as_the_app_sees_them(server: tuple[int, App]) -> None:
    port, _ = server
    raw = (
        b'PATCH /echo/a%20b%2Fc?x=1&y=%20 HTTP/1.1\r\nHost: x\r\nX-Tier: gold\r\nx-tier: second\r\n'
        b'X-Latin: caf\xe9\r\nContent-Length: 5\r\n\r\nhello'
    )
    seen = echo(exchange(port, raw)[0])
    assert seen['method'] == 'PATCH'
    assert seen['path'] == '/echo/a b/c'  # percent-decoded
    assert seen['query'] == 'x=1&y=%20'  # as sent
    assert seen['version'] == '1.1'
    assert seen['body'] == 'hello'
    assert seen['headers']['x-tier'] == 'gold'  # lower-case names, the first value of each
    assert seen['headers']['x-latin'] == 'caf\xe9'
    assert seen['headers']['content-length'] == '5'


def test_a_head_and_body_split_at_every_byte(server: tuple[int, App]) -> None:
    port, _ = server
    raw = b'POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\n\r\nabcd' + request('/json')
    for cut in (1, 5, 20, 33, 36, len(raw) - 3):
        answers = exchange(port, [raw[:cut], raw[cut:]], n=2, pause=0.02)
        assert echo(answers[0])['body'] == 'abcd', cut
        assert answers[1][2] == b'{"ok":true}', cut
    bytewise = exchange(port, [raw[i : i + 1] for i in range(len(raw))], n=2)
    assert echo(bytewise[0])['body'] == 'abcd'


def test_chunked_request_bodies_pipelined(server: tuple[int, App]) -> None:
    port, _ = server
    chunked = b'POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\nA\r\n0123456789\r\n0\r\n'
    raw = chunked + b'x-trailer: 1\r\n\r\n' + chunked + b'\r\n' + request('/json')
    answers = exchange(port, raw, n=3)
    assert echo(answers[0])['body'] == 'abc0123456789'
    assert echo(answers[1])['body'] == 'abc0123456789'
    assert answers[2][2] == b'{"ok":true}'
    split = exchange(port, [raw[: len(chunked) - 7], raw[len(chunked) - 7 :]], n=3, pause=0.02)
    assert echo(split[0])['body'] == 'abc0123456789'


def test_http10_and_connection_close(server: tuple[int, App]) -> None:
    port, _ = server
    ((status, headers, _),) = exchange(port, b'GET /echo HTTP/1.0\r\n\r\n')
    assert headers.get('connection') == 'close'
    (answer,) = exchange(port, b'GET /echo HTTP/1.0\r\nConnection: keep-alive\r\n\r\n')
    assert echo(answer)['version'] == '1.0'
    assert answer[1].get('connection') == 'keep-alive'
    ((_, headers, _),) = exchange(port, b'GET /echo HTTP/1.1\r\nConnection: close\r\n\r\n')
    assert headers.get('connection') == 'close'


def test_expect_100_continue(server: tuple[int, App]) -> None:
    port, _ = server
    with socket.create_connection(('127.0.0.1', port), timeout=5) as s:
        f = s.makefile('rb')
        s.sendall(b'POST /echo HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\n')
        assert f.readline() == b'HTTP/1.1 100 Continue\r\n'
        assert f.readline() == b'\r\n'
        s.sendall(b'ok')
        assert echo(read_answer(f))['body'] == 'ok'


@pytest.mark.parametrize(
    ('raw', 'status'),
    [
        (b'GARBAGE\r\n\r\n', b'HTTP/1.1 400 Bad Request'),
        (b'GET / HTTP/2.0\r\n\r\n', b'HTTP/1.1 400 Bad Request'),
        (b'GET / HTTP/1.1\r\nbad header\r\n\r\n', b'HTTP/1.1 400 Bad Request'),
        (b'GET / HTTP/1.1\r\nx: a\x00b\r\n\r\n', b'HTTP/1.1 400 Bad Request'),
        # the shapes request smuggling relies on: a proxy and a server reading the length differently
        (
            b'POST / HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n',
            b'HTTP/1.1 400 Bad Request',
        ),
        (b'POST / HTTP/1.1\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd', b'HTTP/1.1 400 Bad Request'),
        (b'POST / HTTP/1.1\r\ncontent-length: +3\r\n\r\nabc', b'HTTP/1.1 400 Bad Request'),
        (b'POST / HTTP/1.1\r\ntransfer-encoding: chunked, identity\r\n\r\n', b'HTTP/1.1 400 Bad Request'),
        (b'POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n', b'HTTP/1.1 400 Bad Request'),
        (b'POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabcXX', b'HTTP/1.1 400 Bad Request'),
        (b'GET /' + b'a' * (65 * 1024) + b' HTTP/1.1\r\n\r\n', b'HTTP/1.1 431 Request Header Fields Too Large'),
        (
            b'GET / HTTP/1.1\r\n' + b''.join(b'h%d: v\r\n' % i for i in range(300)) + b'\r\n',
            b'HTTP/1.1 431 Request Header Fields Too Large',
        ),
    ],
)
def test_malformed_heads_are_refused_and_closed(server: tuple[int, App], raw: bytes, status: bytes) -> None:
    port, _ = server
    with socket.create_connection(('127.0.0.1', port), timeout=5) as s:
        s.sendall(raw)
        f = s.makefile('rb')
        got, headers, body = read_answer(f)
        assert got == status
        assert headers.get('connection') == 'close'
        assert body == status.split(b' ', 2)[2]
        assert f.read() == b''  # closed


def test_a_long_head_under_the_limit_is_served(server: tuple[int, App]) -> None:
    port, _ = server
    many = b''.join(b'h%d: %s\r\n' % (i, b'v' * 100) for i in range(250))
    (answer,) = exchange(port, [b'GET /echo HTTP/1.1\r\n' + many[:9000], many[9000:] + b'\r\n'], pause=0.02)
    assert echo(answer)['headers']['h249'] == 'v' * 100


def test_a_slow_head_times_out() -> None:
    with running_server(16, header_timeout=0.3) as (port, _):
        with socket.create_connection(('127.0.0.1', port), timeout=5) as s:
            s.sendall(b'GET /json HTTP/1.1\r\nhost: x\r\n')  # never finished
            t0 = time.monotonic()
            assert s.recv(100) == b''  # closed by the sweep
            assert time.monotonic() - t0 < 3.0
