"""The native HTTP/1.1 server: uvloop + the Rust head parser, serving the RSGI subset the gateway uses.

The inbound side and the upstream client run on the same event loop thread, so a request never crosses
a thread. `serve()` runs it: in-process with one worker, else one forked process per worker, all
accepting on one listening socket created before the fork.

What an app sees (the subset of RSGI that `fastroute.gateway.App` uses):
  scope.proto ('http'), .method, .path (percent-decoded), .query_string (without '?'), .http_version,
  .headers (a dict: lower-case names, the first value of each)
  await proto()              the whole request body
  async for chunk in proto   the body as it arrives
  proto.response_bytes(status, headers, body)
  proto.response_stream(status, headers) -> a transport with `await send_bytes(b)` / `send_str(s)`
  await proto.client_disconnect()   resolves when the client connection closes
The scope and the proto are one `Request` object.

Connection rules: keep-alive (HTTP/1.1 by default, HTTP/1.0 when asked for); pipelined requests are
answered in order, one at a time (reading pauses while one waits); bodies by content-length or chunked;
`Content-Length` on byte answers, `Transfer-Encoding: chunked` on streams (each send is one chunk, written
at once); write backpressure; malformed HTTP -> 400 and close; an app error -> 500 if nothing was sent,
else the connection closes; idle keep-alive and header-read timeouts. On SIGTERM/SIGINT a worker stops
accepting, lets in-flight requests finish within a grace period, then exits. SIGHUP calls the app's
`on_sighup` (the gateway reloads its config) in every worker; the parent forwards it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

from fastroute._core import ChunkedBody, HeadTooLarge, HttpError, head_bytes, parse_request_head

__all__ = ['Request', 'RSGIProtocolClosed', 'serve']

log = logging.getLogger('fastroute')
access_log = logging.getLogger('fastroute.access')

KEEPALIVE_TIMEOUT = 75.0  # an idle keep-alive connection is closed after this
HEADER_TIMEOUT = 30.0  # a request head (or a new connection's first request) must arrive within this
GRACE_PERIOD = 30.0  # on SIGTERM, in-flight requests get this long to finish
MAX_HEAD_BYTES = 64 * 1024  # request line + headers
MAX_HEADERS = 256
BODY_HIGH_WATER = 256 * 1024  # buffered request body beyond which reading pauses (for `async for` readers)
LANE_BODY_MAX = 64 * 1024  # a body that comes after its head is awaited for the app's fast lane up to this size
PROFILE_ENV = 'FASTROUTE_PROFILE'  # a file path: profile each worker into PATH.<pid> (off by default)
LINGER = 2.0  # after answering a request whose body was not read: how long to drain before closing

_STATUS_LINES = {s.value: f'HTTP/1.1 {s.value} {s.phrase}\r\n'.encode() for s in HTTPStatus}
_CONTINUE = b'HTTP/1.1 100 Continue\r\n\r\n'
_LAST_CHUNK = b'0\r\n\r\n'


class RSGIProtocolClosed(ConnectionError):
    """The client connection is gone: nothing more can be sent. (The gateway matches this class name.)"""


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    return line if line is not None else b'HTTP/1.1 %d \r\n' % status


# ---------------------------------------------------------------------------------------------
# One request: the RSGI scope and protocol in one object.
# ---------------------------------------------------------------------------------------------


class Request:
    """One request on a connection. Passed to the app as both `scope` and `proto`."""

    __slots__ = (
        'body_waiter',
        'buffered',
        'chunked',
        'chunks',
        'complete',
        'conn',
        'ended',
        'expect_continue',
        'headers',
        'http_version',
        'is_head',
        'keep_alive',
        'method',
        'path',
        'query_string',
        'started',
        'status',
        'streaming',
        'want_all',
    )

    proto = 'http'  # scope.proto
    scheme = 'http'

    def __init__(
        self, conn: HttpProtocol, method: str, path: str, query: str, headers: dict[str, str], version: str
    ) -> None:
        self.conn = conn
        self.method = method
        self.path = unquote(path) if '%' in path else path
        self.query_string = query
        self.headers = headers
        self.http_version = version
        self.keep_alive = True
        self.is_head = method == 'HEAD'
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.complete = False
        self.want_all = False
        self.body_waiter: asyncio.Future | None = None
        self.expect_continue = 'expect' in headers and headers['expect'].lower() == '100-continue'
        self.started = False
        self.streaming = False
        self.chunked = False
        self.ended = False  # send_last wrote the end of a chunked body
        self.status = 0

    # --- the request body ---------------------------------------------------------------------

    async def __call__(self) -> bytes:
        """The whole body."""
        if not self.complete:
            self.want_all = True
            while not self.complete:
                await self._wait_body()
        return self.body_now()  # type: ignore[return-value]  # complete: never None

    def body_now(self) -> bytes | None:
        """The whole body when all of it is in (taken, as `await proto()` would), else None. Beyond RSGI: the
        gateway takes a body that came with its head without a coroutine step."""
        if not self.complete:
            return None
        chunks = self.chunks
        if not chunks:
            return b''
        body = chunks[0] if len(chunks) == 1 else b''.join(chunks)
        self.chunks = []
        self.buffered = 0
        return body

    def __aiter__(self) -> Request:
        return self

    async def __anext__(self) -> bytes:
        while True:
            chunks = self.chunks
            if chunks:
                self.chunks = []
                self.buffered = 0
                self.conn.update_reading()
                return chunks[0] if len(chunks) == 1 else b''.join(chunks)
            if self.complete:
                raise StopAsyncIteration
            await self._wait_body()

    async def _wait_body(self) -> None:
        conn = self.conn
        if conn.closed:
            raise RSGIProtocolClosed('the client closed the connection before sending the whole body')
        if self.expect_continue:
            self.expect_continue = False
            if not self.started:
                conn.transport.write(_CONTINUE)
        fut = self.body_waiter = conn.loop.create_future()
        conn.update_reading()
        await fut

    def wake_body(self) -> None:
        fut = self.body_waiter
        if fut is not None:
            self.body_waiter = None
            if not fut.done():
                fut.set_result(None)

    # --- the answer -----------------------------------------------------------------------------

    def _connection_header(self) -> bytes:
        conn = self.conn
        if not self.complete or conn.closing:
            self.keep_alive = False
        if not self.keep_alive:
            return b'\r\nconnection: close'
        if self.http_version == '1.0':
            return b'\r\nconnection: keep-alive'
        return b''

    def response_bytes(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        if self.started:
            raise RuntimeError('the response was already started')
        self.started = True
        self.status = status
        conn = self.conn
        if conn.closed:
            return
        if self.keep_alive and self.complete and not conn.closing and self.http_version != '1.0':
            last = b'content-length: %d\r\n\r\n' % len(body)  # the common case, without the calls below
        else:
            last = b'content-length: %d%s\r\n\r\n' % (len(body), self._connection_header())
        # NOTE: the head and body in one Rust call (head_bytes): an f-string per header, joined and encoded,
        # then a %-format of the whole answer cost ~4k more instructions per answer (callgrind).
        line = _STATUS_LINES.get(status) or _status_line(status)
        conn.transport.write(head_bytes(line, headers, last, None if self.is_head else body))

    def response_str(self, status: int, headers: list[tuple[str, str]], body: str) -> None:
        self.response_bytes(status, headers, body.encode())

    def response_empty(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.response_bytes(status, headers, b'')

    def response_stream(self, status: int, headers: list[tuple[str, str]]) -> Request:
        if self.started:
            raise RuntimeError('the response was already started')
        self.started = True
        self.streaming = True
        self.status = status
        conn = self.conn
        extra = self._connection_header()
        if self.http_version == '1.0':
            # no chunked encoding in HTTP/1.0: the end of the body is the end of the connection
            self.keep_alive = False
            extra = b'\r\nconnection: close'
            te = b''
            extra = extra[2:]
        else:
            self.chunked = not self.is_head
            te = b'transfer-encoding: chunked'
        if not conn.closed:
            conn.transport.write(head_bytes(_status_line(status), headers, b'%s%s\r\n\r\n' % (te, extra)))
        return self

    def stream_first(self, status: int, headers: list[tuple[str, str]], data: bytes, last: bool = False) -> Request:
        """`response_stream`, then `send_bytes(data)` (and with `last`, the end of the body) in one write. Beyond
        RSGI: the gateway uses it when the server has it, for a stream whose first bytes are already in hand."""
        if self.started:
            raise RuntimeError('the response was already started')
        if self.http_version == '1.0' or self.is_head or not data:  # the rare shapes: head, then the rest
            self.response_stream(status, headers)
            conn = self.conn
            if conn.closed or self.is_head:
                return self
            if data:
                conn.transport.write(data)  # HTTP/1.0: the body as is, to the end of the connection
            if last and self.chunked:
                self.chunked = False
                self.ended = True
                conn.transport.write(_LAST_CHUNK)
            return self
        self.started = True
        self.streaming = True
        self.status = status
        if last:
            self.ended = True
        else:
            self.chunked = True
        conn = self.conn
        extra = self._connection_header()
        if not conn.closed:
            te = b'transfer-encoding: chunked%s\r\n\r\n%x\r\n' % (extra, len(data))
            end = b'\r\n0\r\n\r\n' if last else b'\r\n'
            conn.transport.write(head_bytes(_status_line(status), headers, te, data, end))
        return self

    async def send_bytes(self, data: bytes) -> None:
        conn = self.conn
        if conn.closed:
            raise RSGIProtocolClosed('the client closed the connection')
        if not data or self.is_head:
            return  # an empty chunk would end the body
        if self.chunked:
            conn.transport.write(b'%x\r\n%s\r\n' % (len(data), data))
        elif self.ended:
            raise RuntimeError('the body was already ended (send_last)')
        else:
            conn.transport.write(data)
        if conn.write_paused:
            await conn.drain()

    async def send_last(self, data: bytes) -> None:
        """`send_bytes(data)` and the end of the body in one write (beyond RSGI): nothing may be sent after it."""
        conn = self.conn
        if conn.closed:
            raise RSGIProtocolClosed('the client closed the connection')
        if not self.chunked or self.is_head:
            await self.send_bytes(data)
            return
        self.chunked = False  # the end is written here, not when the app returns
        self.ended = True
        if data:
            conn.transport.write(b'%x\r\n%s\r\n0\r\n\r\n' % (len(data), data))
        else:
            conn.transport.write(_LAST_CHUNK)
        if conn.write_paused:
            await conn.drain()

    async def send_str(self, data: str) -> None:
        await self.send_bytes(data.encode())

    def client_disconnect(self) -> asyncio.Future:
        """A future resolved when the client connection closes (each call gets its own)."""
        conn = self.conn
        fut = conn.loop.create_future()
        if conn.closed:
            fut.set_result(None)
        else:
            conn.disconnect_waiters.append(fut)
        return fut

    def close(self, *_args: object) -> None:
        self.conn.abort()


# ---------------------------------------------------------------------------------------------
# One connection.
# ---------------------------------------------------------------------------------------------


class HttpProtocol(asyncio.Protocol):
    """One client connection: parses requests, runs the app as one task per request, in order."""

    __slots__ = (
        'app',
        'body_left',
        'buf',
        'chunker',
        'closed',
        'closing',
        'current',
        'discarding',
        'disconnect_waiters',
        'drain_waiters',
        'eof',
        'fast',
        'idle_waiter',
        'in_head',
        'lane_req',
        'linger',
        'loop',
        'n_requests',
        'parsing',
        'queue',
        'reading_paused',
        'resume',
        'server',
        'since',
        'task',
        'transport',
        'write_paused',
    )

    def __init__(self, server: Server) -> None:
        self.server = server
        self.loop = server.loop
        self.app = server.handler
        self.fast = server.fast
        self.lane_req: Request | None = None  # the request the app's fast lane holds or waits a body for (`begin`)
        self.resume: Any = None  # a coroutine that goes on with the lane's request in this task (`hand_over`)
        self.transport: Any = None
        self.buf = b''  # an incomplete request head, waiting for the rest
        self.body_left = 0  # bytes of a content-length body still to come
        self.chunker: ChunkedBody | None = None  # the decoder of a chunked body being read
        self.current: Request | None = None  # the request being answered
        self.task: asyncio.Task | None = None  # the connection's task: runs the app for each request in turn
        self.idle_waiter: asyncio.Future | None = None  # the task waits on it for the next request
        self.parsing: Request | None = None  # the request whose body is being parsed
        self.queue: deque[Request] = deque()  # pipelined requests waiting their turn
        self.in_head = False
        self.closed = False
        self.closing = False  # answer the current request, then close
        self.eof = False
        self.discarding = False
        self.linger: asyncio.TimerHandle | None = None
        self.reading_paused = False
        self.write_paused = False
        self.drain_waiters: list[asyncio.Future] = []
        self.disconnect_waiters: list[asyncio.Future] = []
        self.n_requests = 0
        self.since = 0.0

    # --- transport events -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.since = self.loop.time()
        self.server.conns.add(self)
        if self.server.stopping:
            self.closing = True

    def data_received(self, data: bytes) -> None:
        # NOTE: one Rust call per request head (parse_request_head) instead of httptools' Python callbacks
        # (message begin, url, one per header, headers complete, body, message complete).
        if self.discarding:
            return
        if self.buf:
            data = self.buf + data
            self.buf = b''
        pos = 0
        end = len(data)
        while pos < end:
            req = self.parsing
            if req is not None:
                pos = self.read_body(req, data, pos)
                if pos < 0:
                    return
                continue
            try:
                head = parse_request_head(data, pos, MAX_HEAD_BYTES, MAX_HEADERS)
            except HeadTooLarge:
                self.bad_request(431)
                return
            except HttpError:
                self.bad_request(400)
                return
            if head is None:  # the head is incomplete: keep it for the next read
                if not self.in_head:
                    self.in_head = True
                    self.since = self.loop.time()
                self.buf = data[pos:] if pos else data
                return
            pos, method, path, query, version, headers, length, chunked, keep_alive, upgrade = head
            self.in_head = False
            req = Request(self, method, path, query, headers, version)
            req.keep_alive = keep_alive
            if chunked:
                self.chunker = ChunkedBody()
                self.parsing = req
            elif length > 0:
                if end - pos >= length and length <= BODY_HIGH_WATER:
                    # the whole body came with the head (the common case): no body-reading steps
                    req.chunks.append(data[pos : pos + length] if end - pos > length else data[pos:])
                    req.buffered = length
                    req.complete = True
                    pos += length
                else:
                    self.body_left = length
                    self.parsing = req
            else:
                req.complete = True
            if upgrade:
                # Upgrades (websocket, h2c) are not served: answer this request as plain HTTP, then close.
                req.keep_alive = False
            if self.current is not None:
                self.queue.append(req)
                self.pause_reading()
            elif not self.begin(req):
                return
            if upgrade and req.complete:
                self.discarding = True
                return

    def read_body(self, req: Request, data: bytes, pos: int) -> int:
        """Take the body of `req` from `data[pos:]`; return where it stopped (-1: malformed, answered)."""
        chunker = self.chunker
        if chunker is not None:
            try:
                piece, pos, ended = chunker.feed(data, pos)
            except HttpError:
                self.bad_request(400)
                return -1
            if piece:
                self.on_body(req, piece)
            if ended:
                self.chunker = None
                if not self.on_message_complete(req):
                    return -1
            return pos
        left = self.body_left
        avail = len(data) - pos
        if avail <= left:
            piece = data[pos:] if pos else data
            take = avail
        else:
            piece = data[pos : pos + left]
            take = left
        self.body_left = left - take
        self.on_body(req, piece)
        if take == left and not self.on_message_complete(req):
            return -1
        return pos + take

    def eof_received(self) -> bool | None:
        # NOTE: a client that closes and one that only half-closes look the same here; like nginx, treat
        # the EOF as the client leaving (streams stop at once), but still deliver a plain answer to a
        # whole request already being worked on.
        self.eof = True
        for fut in self.disconnect_waiters:
            if not fut.done():
                fut.set_result(None)
        cur = self.current
        if cur is not None and cur.complete and not cur.streaming and not self.discarding:
            return True  # half-closed: answer what was asked, then close
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.conns.discard(self)
        if self.linger is not None:
            self.linger.cancel()
        cur = self.current
        if cur is not None:
            cur.wake_body()
            if not cur.complete:
                # the body will never arrive: nobody is left to answer
                task = self.task
                if task is not None and not task.done():
                    task.cancel()
        self.queue.clear()
        waiter = self.idle_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)  # the connection's task ends
        for fut in self.disconnect_waiters:
            if not fut.done():
                fut.set_result(None)
        self.disconnect_waiters.clear()
        self.wake_drain()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.wake_drain()

    def wake_drain(self) -> None:
        waiters, self.drain_waiters = self.drain_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def drain(self) -> None:
        fut = self.loop.create_future()
        self.drain_waiters.append(fut)
        await fut
        if self.closed:
            raise RSGIProtocolClosed('the client closed the connection')

    # --- the body as it is parsed ----------------------------------------------------------------------

    def on_body(self, req: Request, body: bytes) -> None:
        req.chunks.append(body)
        req.buffered += len(body)
        if req.body_waiter is not None:
            req.wake_body()
        if req.buffered > BODY_HIGH_WATER and not req.want_all:
            self.pause_reading()

    def on_message_complete(self, req: Request) -> bool:
        """The body of `req` is all in. False: the connection was closed meanwhile (the fast lane answered
        and closed it), stop reading."""
        self.parsing = None
        req.complete = True
        if req.body_waiter is not None:
            req.wake_body()
        if req is self.lane_req:  # the lane waited for this body (a request it took was whole already)
            return self.lane(req)
        return True

    # --- flow ------------------------------------------------------------------------------------

    def pause_reading(self) -> None:
        if not self.reading_paused and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def update_reading(self) -> None:
        """Resume reading unless a pipelined request waits or the current one's unread body is large."""
        if not self.reading_paused or self.closed or self.queue:
            return
        cur = self.current
        if cur is not None and cur.buffered > BODY_HIGH_WATER and not cur.want_all:
            return
        self.reading_paused = False
        self.transport.resume_reading()

    def begin(self, req: Request) -> bool:
        """Answer `req` (no other request is being answered): the app's fast lane when it takes a whole
        request, else `start`. False: the connection was closed meanwhile, stop reading."""
        if self.fast is None or req.expect_continue:
            self.start(req)
            return True
        # NOTE: clients often write the head and the body apart (httpx, so the openai SDK): a small body is
        # waited for here, without a task, and the request goes to the lane when it is in
        if not req.complete and (self.chunker is not None or self.body_left > LANE_BODY_MAX):
            self.start(req)
            return True
        self.current = self.lane_req = req  # lane_req: the connection's task leaves it alone
        self.n_requests += 1
        return self.lane(req) if req.complete else True

    def lane(self, req: Request) -> bool:
        """The app's fast lane for `req` (the current request, its body in). It may answer inside this call, or
        end the request later with `done` or `hand_over`; if it does not take it, the task answers it.
        False: the connection was closed meanwhile."""
        if self.fast(req):  # type: ignore[misc]
            return not self.closed and not self.transport.is_closing()
        self.lane_req = None
        self.wake_task()
        return True

    def hand_over(self, coro: Any) -> None:
        """The fast lane's request goes on in this connection's task: it runs `coro`, then `done`."""
        self.resume = coro
        self.wake_task()

    def start(self, req: Request) -> None:
        self.current = req
        self.n_requests += 1
        self.wake_task()

    def wake_task(self) -> None:
        """The connection's task goes on with the current request (or `resume`)."""
        waiter = self.idle_waiter
        if waiter is not None:  # the connection's task waits for this request
            self.idle_waiter = None
            if not waiter.done():
                waiter.set_result(None)
        elif self.task is None:
            self.task = self.loop.create_task(self.run())
        # else: called by `done` in the connection's task, which goes on with this request

    async def run(self) -> None:
        """The connection's task: for each request in turn the app, then `done` in the same step as the app's
        last one; between requests it waits for the next."""
        # NOTE: one task per connection, not per request: a task cost ~7k instructions to create (its context,
        # its registration, its first step), a future to wait on ~1k (callgrind).
        # NOTE: not a done-callback on the app's own task: that ran one loop iteration after the answer, so a
        # client's next request often came in first and paused then resumed reading (two epoll_ctl calls)
        # and each answer cost an extra poll (strace: 2 io_uring_enter + 1 epoll_pwait fewer per request).
        try:
            while True:
                req = self.current
                coro = self.resume
                if coro is None and (req is None or req is self.lane_req):  # nothing, or the lane's own
                    if self.closed:
                        return
                    waiter = self.idle_waiter = self.loop.create_future()
                    try:
                        await waiter
                    except asyncio.CancelledError:
                        return
                    continue
                try:
                    if coro is not None:
                        self.resume = None
                        await coro
                    else:
                        await self.app(req, req)  # type: ignore[misc]
                except asyncio.CancelledError:
                    self.done(True, None)
                    return
                except Exception as exc:
                    self.done(False, exc)
                    continue
                self.done(False, None)
        finally:
            self.task = None
            self.idle_waiter = None

    def done(self, cancelled: bool, exc: BaseException | None) -> None:
        req = self.current
        self.lane_req = None
        self.disconnect_waiters.clear()  # the request's own watchers; the app cancels what it awaited
        if req is None:
            return
        failed = cancelled or exc is not None
        if exc is not None and not isinstance(exc, RSGIProtocolClosed):
            log.error('fastroute: unhandled error in the app on %s %s', req.method, req.path, exc_info=exc)
        if self.server.access_log:
            access_log.info('%s %s %d', req.method, req.path, req.status or 500)
        if self.closed or self.transport.is_closing():
            self.current = None
            return
        if not req.started:
            if cancelled and not req.complete:
                self.abort()
                return
            req.response_bytes(500, [('content-type', 'text/plain')], b'Internal Server Error')
        elif req.streaming:
            if failed:
                self.abort()  # the body is incomplete: only closing the connection says so
                return
            if req.chunked:
                self.transport.write(_LAST_CHUNK)
        self.current = None
        if not req.keep_alive or self.closing:
            if req.complete:
                self.transport.close()
            else:
                self.linger_close()
            return
        if self.queue:
            nxt = self.queue.popleft()
            if self.eof and not nxt.complete:
                self.transport.close()
                return
            self.start(nxt)
            self.update_reading()
            return
        if self.eof:
            self.transport.close()
            return
        self.since = self.loop.time()
        if self.reading_paused:
            self.update_reading()

    # --- closing -------------------------------------------------------------------------------

    def bad_request(self, status: int) -> None:
        self.discarding = True
        cur = self.current
        if cur is None:
            if not self.closed:
                self.transport.write(
                    b'%scontent-type: text/plain\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s'
                    % (_status_line(status), len(HTTPStatus(status).phrase), HTTPStatus(status).phrase.encode())
                )
                self.transport.close()
        elif not cur.complete:
            # a malformed body (e.g. broken chunk sizes) of the request being answered
            task = self.task
            if task is not None and not task.done():
                task.cancel()
            if not cur.started and not self.closed:
                cur.response_bytes(status, [('content-type', 'text/plain')], HTTPStatus(status).phrase.encode())
                self.transport.close()
            else:
                self.abort()
        else:
            self.closing = True  # garbage after a whole request: answer it, then close

    def linger_close(self) -> None:
        """Close after answering a request whose body was not read: stop writing, read and drop what the
        client still sends for a moment, then close, so the unread bytes do not turn into a reset that
        would destroy the answer before the client reads it."""
        self.discarding = True
        try:
            self.transport.write_eof()
        except (OSError, RuntimeError):
            self.transport.close()
            return
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()
        self.linger = self.loop.call_later(LINGER, self.transport.close)

    def abort(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.abort()

    def idle(self) -> bool:
        return self.current is None and not self.in_head


# ---------------------------------------------------------------------------------------------
# One worker: the listening socket, the connections, timeouts, graceful stop.
# ---------------------------------------------------------------------------------------------


class Server:
    def __init__(
        self,
        app: Any,
        loop: asyncio.AbstractEventLoop,
        *,
        access_log: bool = False,
        keepalive_timeout: float | None = None,
        header_timeout: float | None = None,
    ) -> None:
        self.app = app
        self.handler = app.__rsgi__ if hasattr(app, '__rsgi__') else app
        # `fast_lane(request) -> bool`: an app's way to take a whole request without a task (fastroute.gateway)
        self.fast = getattr(app, 'fast_lane', None)
        self.loop = loop
        self.access_log = access_log
        self.keepalive_timeout = KEEPALIVE_TIMEOUT if keepalive_timeout is None else keepalive_timeout
        self.header_timeout = HEADER_TIMEOUT if header_timeout is None else header_timeout
        self.conns: set[HttpProtocol] = set()
        self.stopping = False
        self.listener: asyncio.AbstractServer | None = None
        self.stopped = loop.create_future()
        self.sweeper: asyncio.TimerHandle | None = None

    async def start(self, sock: socket.socket, backlog: int) -> None:
        self.listener = await self.loop.create_server(lambda: HttpProtocol(self), sock=sock, backlog=backlog)
        self.sweeper = self.loop.call_later(1.0, self.sweep)

    def sweep(self) -> None:
        """Once a second: close connections idle past the keep-alive timeout or slow to send a head."""
        # NOTE: one sweep a second instead of a timer per request: a call_later/cancel pair per request
        # costs more than this loop over the open connections.
        now = self.loop.time()
        for c in list(self.conns):
            if c.current is not None or c.closed:
                continue
            if c.in_head or c.n_requests == 0:
                if now - c.since > self.header_timeout:
                    c.abort()
            elif now - c.since > self.keepalive_timeout:
                c.transport.close()
        self.sweeper = self.loop.call_later(1.0, self.sweep)

    def stop(self) -> None:
        """Stop accepting; close idle connections; the busy ones close after their current answer."""
        if self.stopping:
            return
        self.stopping = True
        if self.listener is not None:
            self.listener.close()
        on_drain = getattr(self.app, 'on_drain', None)
        if on_drain is not None:
            on_drain()
        for c in list(self.conns):
            c.closing = True
            if c.idle() and not c.closed:
                c.transport.close()
        if not self.stopped.done():
            self.stopped.set_result(None)

    async def wait_drained(self, grace: float) -> None:
        deadline = self.loop.time() + grace
        while self.conns and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for c in list(self.conns):
            c.abort()
        if self.sweeper is not None:
            self.sweeper.cancel()
        for _ in range(3):  # the aborted connections' tasks see their close and end
            await asyncio.sleep(0)


# ---------------------------------------------------------------------------------------------
# Processes.
# ---------------------------------------------------------------------------------------------


def load_app(target: Any) -> Any:
    """`module:attr` (an app, or a factory called with no arguments), or the app / factory itself."""
    if isinstance(target, str):
        module, _, attr = target.partition(':')
        obj: Any = importlib.import_module(module)
        for part in (attr or 'app').split('.'):
            obj = getattr(obj, part)
        target = obj
    if not hasattr(target, '__rsgi__') and callable(target) and not asyncio.iscoroutinefunction(target):
        target = target()
    return target


def listen_socket(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    sock = socket.create_server((host, port), family=family, backlog=backlog)
    sock.setblocking(False)
    return sock


def _profiler() -> Any:
    """With `FASTROUTE_PROFILE=PATH` set: a started cProfile of this worker, written to PATH.<pid> when it
    stops (for finding where the time goes; it slows the worker several times over, never leave it on)."""
    if not os.environ.get(PROFILE_ENV):
        return None
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    return profiler


def run_worker(
    target: Any, sock: socket.socket, backlog: int, *, access_log: bool = False, grace: float = GRACE_PERIOD
) -> int:
    """One worker: its own uvloop, the app made here, served until SIGTERM/SIGINT."""
    import uvloop

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    app = load_app(target)
    init = getattr(app, '__rsgi_init__', None)
    if init is not None:
        init(loop)
    server = Server(app, loop, access_log=access_log)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stop)
    # SIGHUP: the app reloads its config (each worker itself); ignored by an app that cannot
    on_hup = getattr(app, 'on_sighup', None)
    if on_hup is not None:
        loop.add_signal_handler(signal.SIGHUP, on_hup)
    else:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # NOTE: the objects made at startup (modules, config, compiled router) move out of the collector's reach:
    # a full collection that walks them paused the worker ~8.7 ms (median of 20 gc.collect() after importing
    # the gateway alone, 23.8k tracked objects) against ~0 once frozen. Young garbage is collected as before
    # (measured over ~24k proxied requests: one gen0 collection per ~3,400 requests, 0.15-0.26 ms). What the
    # startup snapshot holds stays frozen after a reload: freed by reference counting, never by a collection.
    # Done after the signal handlers are set, so that no signal sent at startup is lost to this pause.
    gc.collect()
    gc.freeze()

    async def main() -> None:
        await server.start(sock, backlog)
        await server.stopped
        await server.wait_drained(grace)

    profiler = _profiler()
    try:
        loop.run_until_complete(main())
    finally:
        if profiler is not None:
            profiler.disable()
            out = f'{os.environ[PROFILE_ENV]}.{os.getpid()}'
            profiler.dump_stats(out)
            log.warning('fastroute: worker %d profile written to %s', os.getpid(), out)
        fini = getattr(app, '__rsgi_del__', None)
        if fini is not None:
            fini(loop)
        with contextlib.suppress(Exception):
            loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    return 0


def serve(
    target: Any,
    host: str,
    port: int,
    workers: int = 1,
    backlog: int = 2048,
    *,
    access_log: bool = False,
    grace: float = GRACE_PERIOD,
) -> int:
    """Serve `target` (see `load_app`) on host:port. With workers > 1, fork that many processes sharing
    one listening socket; the parent forwards SIGTERM/SIGINT and waits. Returns an exit code.

    Raises:
        OSError: the address cannot be bound.
    """
    sock = listen_socket(host, port, backlog)
    if workers <= 1:
        try:
            return run_worker(target, sock, backlog, access_log=access_log, grace=grace)
        finally:
            sock.close()
    return _supervise(target, sock, backlog, workers, access_log, grace)


def _spawn(target: Any, sock: socket.socket, backlog: int, access_log: bool, grace: float) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        code = run_worker(target, sock, backlog, access_log=access_log, grace=grace)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        log.exception('fastroute: worker %d failed', os.getpid())
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _supervise(target: Any, sock: socket.socket, backlog: int, workers: int, access_log: bool, grace: float) -> int:
    """The parent: start the workers, forward stop signals, restart a worker that dies while serving."""
    stopping = False
    children: dict[int, float] = {}  # pid -> start time
    rc = 0

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            sock.close()  # this process's copy of the listening socket: the kernel stops accepting once
            # the workers have closed theirs
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def forward_hup(signum: int, _frame: object) -> None:
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        for _ in range(workers):
            children[_spawn(target, sock, backlog, access_log, grace)] = time.monotonic()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, forward)
        signal.signal(signal.SIGHUP, forward_hup)  # each worker reloads its own config
        while children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            started = children.pop(pid, None)
            if started is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if stopping:
                continue
            if time.monotonic() - started < 5.0:
                # died at start (a config or import error): the others would too
                log.error('fastroute: worker %d exited with %d at start; stopping', pid, code)
                rc = code or 1
                forward(signal.SIGTERM, None)
                continue
            log.warning('fastroute: worker %d exited with %d; starting another', pid, code)
            children[_spawn(target, sock, backlog, access_log, grace)] = time.monotonic()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        sock.close()
    return rc
