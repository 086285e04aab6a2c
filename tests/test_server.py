"""The native HTTP server (fastroute.server) on a real loopback socket, read byte for byte by a raw client.

What these check is the framing a client depends on: a stream started with its first bytes (`stream_first`) and
ended with its last (`send_last`) is a valid chunked body, ended once; HTTP/1.0 and HEAD get no chunked framing;
keep-alive and pipelined requests are answered in order, and the next request on a connection is served whether
it arrives before or after the previous answer's task finished.
"""

from __future__ import annotations

import asyncio
import socket
import threading
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
        await proto()
        path = scope.path
        if path == '/json':
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


@pytest.fixture(scope='module')
def server() -> Iterator[tuple[int, App]]:
    app = App()
    loop = uvloop.new_event_loop()
    sock = socket.create_server(('127.0.0.1', 0))
    sock.setblocking(False)
    port = sock.getsockname()[1]
    srv = Server(app, loop)
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(srv.start(sock, 128))
        started.set()
        loop.run_until_complete(srv.stopped)
        loop.run_until_complete(srv.wait_drained(1.0))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert started.wait(10)
    yield port, app
    loop.call_soon_threadsafe(srv.stop)
    t.join(10)
    sock.close()


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
