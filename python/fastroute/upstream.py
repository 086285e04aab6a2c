"""Upstream endpoints: pools, the keep-alive HTTP client, endpoint picking and reachability.

One `Pool` per logical model, one `Endpoint` per upstream URL in it. Each endpoint owns a bounded
pool of keep-alive HTTP/1.1 connections and the model's timeouts, so a slow or saturated upstream
cannot starve the others. The client runs on the worker's event loop itself: an asyncio `Protocol`
per connection, one `transport.write` per request (head and body together) and one Rust call
(`fastroute._core.parse_response_head`) for the answer's head. Nothing crosses a thread between the request coming in and going out.
The HTTP code sits behind `Endpoint.send` / `Endpoint.open_stream` and `UpstreamResponse` /
`UpstreamStream`; nothing else in fastroute touches it.

NOTE: chosen over pyreqwest (Rust/hyper on its own Tokio thread) by bench_overhead.py, same run, medians
of 3 (benches/README.md): added latency over direct 0.34 vs 0.50 ms at 1 in flight, 0.50 vs 0.93 ms p50
at 1k req/s; max req/s 5,676 vs 3,201 (JSON); CPU 171 vs 274 us/req. The thread hop is the difference.

Timeouts (seconds, `server.timeouts`, overridden per model):
- connect: TCP (and TLS) connect, or waiting for a free connection when the pool is full;
- first_byte: request sent until the response head arrives;
- idle: the longest silence between two pieces of the body (not counted while the reader is behind);
- total: the whole exchange, body included.
One timer per connection (`loop.call_at`) covers all three after connect: when it fires it checks
which deadline applies now and re-arms itself for the next one; receiving data only stores a time.
An exchange that ends leaves the timer armed, and the next exchange on the connection re-arms it only
when its own first deadline is earlier, so a busy keep-alive connection sets a timer about once per
`first_byte` period instead of once per request.

Connections: the most recently used idle one is reused first; one closed by the server while idle is
dropped before anything is written to it, and the request goes to the next idle or a fresh one. A
connection is only reused after an answer was read to its end; closing a stream early, a timeout or
a cancelled request close it (which also stops the upstream's work).

Every failure becomes `UpstreamError(stage=..., endpoint=..., retryable=...)`: stage "connect"
(could not connect or no free connection), "timeout", "read" (reset or broken body) or
"protocol" (an answer that is not HTTP).
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastroute._core import ChunkedBody, HeaderNames, HttpError, head_bytes, parse_response_head
from fastroute.config import Breaker as _BreakerCfg
from fastroute.errors import UpstreamError
from fastroute.resilience import CLOSED, HALF_OPEN, OPEN, Breaker, Policy, RetryBudget, policy_for

if TYPE_CHECKING:
    from fastroute.config import Config, Model

_DEFAULT_BREAKER = _BreakerCfg()

__all__ = [
    'Endpoint',
    'Pool',
    'Timeouts',
    'UpstreamResponse',
    'UpstreamStream',
    'answer_response',
    'build_pools',
    'check_reachable',
]


# NOTE: per-endpoint limits. Not (yet) config keys: 1024 requests in flight per endpoint is far
# above what one LLM server takes, and 256 idle keep-alive connections cover a 10k req/s burst.
MAX_IN_FLIGHT = int(os.environ.get('FASTROUTE_UPSTREAM_MAX_IN_FLIGHT', '1024'))
MAX_IDLE = int(os.environ.get('FASTROUTE_UPSTREAM_MAX_IDLE', '256'))
IDLE_KEEPALIVE_S = 90.0
# An idle connection older than this is probed (one non-blocking peek) before reuse: a close by the
# server that the loop has not yet seen is caught before the request is written. Servers keep idle
# connections for 5 s or more (uvicorn 5, nginx 75), so a busy pool never pays for the probe.
PROBE_AFTER_S = 1.0
# Stream backpressure: stop reading the upstream when this much body waits for the client.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024

# The user-agent of requests fastroute makes on its own (a shadow copy), and of proxied ones whose client names
# none: the request head carries only the caller's headers, so each caller sends exactly one.
USER_AGENT = 'fastroute'
# Response headers never relayed: hop-by-hop ones, and those the server in front sets itself.
RESPONSE_DROP = frozenset(
    {
        'connection',
        'keep-alive',
        'proxy-authenticate',
        'proxy-authorization',
        'proxy-connection',
        'te',
        'trailer',
        'transfer-encoding',
        'upgrade',
        'content-length',
        'date',
        'server',
        'x-request-id',
    }
)
_DROP = HeaderNames(sorted(RESPONSE_DROP))  # left out of an answer's headers as they are parsed
_MAX_HEAD = 64 * 1024
_MAX_HEADERS = 256


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float
    first_byte: float
    idle: float
    total: float


class UpstreamResponse:
    """A complete, non-streamed upstream answer."""

    __slots__ = ('body', 'content_type', 'headers', 'status')

    def __init__(self, status: int, headers: list[tuple[str, str]], content_type: str | None, body: object) -> None:
        self.status = status
        # Headers to relay: a success's content-type (and content-encoding); an error's every
        # end-to-end header (retry-after, rate-limit state, ...).
        self.headers = headers
        self.content_type = content_type
        self.body = body  # a bytes-like buffer


class _Fail(Exception):
    """An internal failure kind, turned into an UpstreamError by `Endpoint.error_from`.

    kind: "pool" (no free connection), "connect_timeout", "connect", "first_byte", "idle", "total",
    "reset" (closed or broken mid-answer) or "protocol" (not HTTP).
    """

    __slots__ = ('kind',)

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


# Connection states.
_IDLE, _HEAD, _BODY, _DONE = 0, 1, 2, 3

_SSL: ssl.SSLContext | None = None


def _ssl_context() -> ssl.SSLContext:
    global _SSL
    if _SSL is None:
        _SSL = ssl.create_default_context()
    return _SSL


class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to an endpoint; at most one exchange at a time."""

    __slots__ = (
        'at',
        'body_left',
        'buf',
        'chunker',
        'chunks',
        'close_delimited',
        'ctype',
        'enc',
        'ep',
        'head_at',
        'head_only',
        'headers',
        'keep_alive',
        'lost',
        'paused',
        'relay',
        'rx_at',
        'sink',
        'state',
        'status',
        'timer',
        'timer_at',
        'total_at',
        'transport',
        'waiter',
    )

    def __init__(self, ep: Endpoint) -> None:
        self.ep = ep
        self.transport: asyncio.Transport | None = None
        self.state = _IDLE
        self.lost = False
        self.paused = False
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0  # when `timer` fires
        self.waiter: asyncio.Future | None = None  # the head (stream) or the whole answer (send)
        self.relay: Any = None  # the fast lane's waiter, which may relay a whole answer itself (`relay`)
        self.sink: UpstreamStream | None = None  # the stream reading this answer's body
        self.status = 0
        self.headers: list[tuple[str, str]] | None = None  # the end-to-end headers (lower-case names): streams, errors
        self.ctype: str | None = None
        self.enc: str | None = None
        self.buf = b''  # an incomplete answer head
        self.body_left = 0  # bytes of a content-length body still to come
        self.chunker: ChunkedBody | None = None  # the decoder of a chunked body
        self.close_delimited = False  # no length, not chunked: the body runs to the end of the connection
        self.head_only = False
        self.keep_alive = False
        self.chunks: list[bytes] = []
        self.at = 0.0  # exchange start, or when the connection became idle
        self.rx_at = 0.0  # last data received
        self.head_at = 0.0  # the answer's head is due (first_byte, within total)
        self.total_at = 0.0

    # -- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info('socket')
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def data_received(self, data: bytes) -> None:
        relay = self.relay
        if relay is not None:  # the fast lane's exchange: a whole answer in this read goes out in one step
            self.relay = None
            if self.state == _HEAD and not self.buf and relay.relay(self, data):
                return
        state = self.state
        if state == _IDLE or state == _DONE:  # nothing asked: a server talking out of turn
            self.abort()
            return
        self.rx_at = self.ep.loop.time()
        pos = 0
        if state == _HEAD:
            # NOTE: one Rust call for the head instead of httptools' callbacks (one per header, then headers
            # complete, body, message complete).
            if self.buf:
                data = self.buf + data
                self.buf = b''
            # a stream relays every header, and so does an error answer (status 300 and up)
            headers_from = 0 if self.sink is not None else 300
            while True:
                try:
                    head = parse_response_head(data, pos, headers_from, _MAX_HEAD, _MAX_HEADERS, _DROP)
                except HttpError:
                    self.fail('protocol')
                    return
                if head is None:
                    self.buf = data[pos:] if pos else data
                    return
                pos = head[0]
                status = head[1]
                if status < 100 or status >= 200 or status == 101:
                    break
                # an interim answer (100 Continue, 103 Early Hints): the final one follows
            self.on_head(head)
            if pos == len(data):
                if self.state == _DONE:
                    self.finish()
                return
            if self.state == _DONE:  # bytes after a body-less answer: the connection is out of step
                self.keep_alive = False
                self.finish()
                return
        if self.chunker is None and not self.close_delimited and len(data) - pos == self.body_left:
            # exactly the rest of a content-length body (the common case): no body-reading steps
            self.body_left = 0
            self.state = _DONE
            self.on_body(data[pos:] if pos else data)
            self.finish()
            return
        self.read_body(data, pos)
        if self.state == _DONE:
            self.finish()

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost ends the exchange

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.lost = True
        timer = self.timer
        if timer is not None:
            timer.cancel()
            self.timer = None
        ep = self.ep
        ep.open -= 1
        ep.conns.discard(self)
        state = self.state
        if state == _IDLE:
            try:
                ep.idle.remove(self)
            except ValueError:
                pass
        elif state == _BODY and self.close_delimited and exc is None:
            self.keep_alive = False
            self.state = _DONE
            self.finish()
        elif state != _DONE:
            self.fail('reset')
        ep.wake()

    def pause_writing(self) -> None:  # a request body larger than the socket buffer: nothing to do
        pass

    def resume_writing(self) -> None:
        pass

    # -- the answer as it is parsed

    def on_head(self, head: tuple) -> None:
        _, status, headers, length, chunked, keep_alive, ctype, enc = head
        self.status = status
        self.headers = headers
        self.ctype = ctype
        self.enc = enc
        self.keep_alive = keep_alive
        self.state = _BODY
        if self.head_only or status < 200 or status == 204 or status == 304:  # no body
            if self.head_only or status < 200:
                self.keep_alive = False
            self.state = _DONE
            return
        waiter = self.waiter
        if self.sink is not None and waiter is not None:  # a stream: hand over the head now
            self.waiter = None
            if not waiter.done():
                waiter.set_result((status, headers, None, ctype, None))
        if chunked:
            self.chunker = ChunkedBody()
        elif length >= 0:
            self.body_left = length
            if length == 0:
                self.state = _DONE
        else:
            self.close_delimited = True

    def read_body(self, data: bytes, pos: int) -> None:
        """Take the body from `data[pos:]`; the state becomes _DONE at its end."""
        chunker = self.chunker
        if chunker is not None:
            try:
                piece, pos, ended = chunker.feed(data, pos)
            except HttpError:
                self.fail('protocol')
                return
            if piece:
                self.on_body(piece)
            if ended:
                self.chunker = None
                if pos < len(data):  # bytes beyond the answer: the connection is out of step
                    self.keep_alive = False
                self.state = _DONE
            return
        avail = len(data) - pos
        if self.close_delimited:
            if avail:
                self.on_body(data[pos:] if pos else data)
            return
        left = self.body_left
        if avail < left:
            self.body_left = left - avail
            self.on_body(data[pos:] if pos else data)
            return
        self.body_left = 0
        if left:
            self.on_body(data[pos : pos + left] if pos or avail != left else data)
        if avail > left:
            self.keep_alive = False
        self.state = _DONE

    def on_body(self, body: bytes) -> None:
        sink = self.sink
        if sink is None:
            self.chunks.append(body)
        else:
            sink.push(body)

    # -- the exchange

    def start(self, data: bytes, waiter: asyncio.Future, sink: UpstreamStream | None, head_only: bool) -> None:
        # the request goes out first: no answer can be read before this callback returns, and the state set
        # below is made while the upstream works on it
        self.transport.write(data)  # type: ignore[union-attr]
        ep = self.ep
        now = ep.loop.time()
        self.at = self.rx_at = now
        self.state = _HEAD
        self.waiter = waiter
        self.relay = None
        self.sink = sink
        self.head_only = head_only
        self.status = 0
        self.headers = None
        self.ctype = self.enc = None
        self.buf = b''
        self.body_left = 0
        self.chunker = None
        self.close_delimited = False
        self.chunks = []
        t = ep.timeouts
        total_at = self.total_at = now + t.total
        fb = now + t.first_byte
        due = self.head_at = fb if fb < total_at else total_at
        # NOTE: the timer of the previous exchange stays armed (finish() leaves it); it fires early at
        # worst and re-arms itself. Measured with callgrind on a worker, 1 request in flight: 211k -> 202.5k
        # instructions per proxied JSON request against a call_at + cancel pair per exchange.
        timer = self.timer
        if timer is None or self.timer_at > due:
            if timer is not None:
                timer.cancel()
            self.timer_at = due
            self.timer = ep.loop.call_at(due, self.on_timer)

    def on_timer(self) -> None:
        self.timer = None
        state = self.state
        if state != _HEAD and state != _BODY:  # idle between exchanges: the next one re-arms
            return
        loop = self.ep.loop
        now = loop.time()
        if now >= self.total_at:
            self.fail('total')
            return
        if state == _HEAD:
            due = self.head_at
            if now >= due:
                self.fail('first_byte')
                return
        else:
            if self.paused:  # the reader is behind, not the upstream
                self.rx_at = now
            due = min(self.rx_at + self.ep.timeouts.idle, self.total_at)
            if now >= due:
                self.fail('idle')
                return
        self.timer_at = due
        self.timer = loop.call_at(due, self.on_timer)

    def finish(self) -> None:
        """The answer is complete: return the connection to the pool (or close it), then deliver the answer.

        The connection goes back first: the gateway's fast lane handles the answer inside this call (its waiter
        is no future) and may send the next request at once. The timer stays armed (see `start`); `abort`
        cancels it when the connection is not kept."""
        waiter, self.waiter = self.waiter, None
        sink, self.sink = self.sink, None
        # the answer travels in the waiter: the connection may serve another request before it is read
        answer = (self.status, self.headers, self.chunks, self.ctype, self.enc)
        self._release()
        if sink is not None:
            sink.end()
        if waiter is not None and not waiter.done():
            waiter.set_result(answer)

    def relayed(self, keep_alive: bool) -> None:
        """The fast lane relayed the whole answer from `data_received` (its `relay`): the exchange is over."""
        self.waiter = None
        self.keep_alive = keep_alive
        self.rx_at = self.ep.loop.time()
        self.state = _DONE
        self._release()

    def _release(self) -> None:
        """The exchange is over: back to the pool's idle connections, or closed."""
        ep = self.ep
        if self.keep_alive and not self.lost and not ep.closed:
            if self.paused:
                self.paused = False
                self.transport.resume_reading()  # type: ignore[union-attr]
            self.state = _IDLE
            self.at = self.rx_at
            if len(ep.idle) < MAX_IDLE:
                ep.idle.append(self)
                ep.wake()
            else:
                self.abort()
        else:
            self.abort()

    def fail(self, kind: str) -> None:
        """End the exchange with a failure and close the connection."""
        self.state = _DONE
        timer = self.timer
        if timer is not None:
            timer.cancel()
            self.timer = None
        waiter, self.waiter = self.waiter, None
        sink, self.sink = self.sink, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(_Fail(kind))
        elif sink is not None:
            sink.broke(kind)
        self.abort()

    def abort(self) -> None:
        self.state = _DONE
        timer = self.timer
        if timer is not None:
            timer.cancel()
            self.timer = None
        transport = self.transport
        if transport is not None and not self.lost:
            transport.abort()

    def alive(self, now: float) -> bool:
        """Still usable: not closed by the server, even if the loop has not seen the close yet."""
        if self.lost or self.transport.is_closing():  # type: ignore[union-attr]
            return False
        if now - self.at < PROBE_AFTER_S:
            return True
        sock = self.transport.get_extra_info('socket')  # type: ignore[union-attr]
        if sock is None:
            return True
        probe = socket.socket(fileno=sock.fileno())
        try:
            probe.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)  # data or EOF: not usable
        except BlockingIOError:
            return True
        except OSError:
            return False
        finally:
            probe.detach()
        return False

    def pause(self) -> None:
        if not self.paused and not self.lost:
            self.paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            self.rx_at = self.ep.loop.time()
            if not self.lost:
                self.transport.resume_reading()  # type: ignore[union-attr]


class UpstreamStream:
    """An upstream answer whose body is read chunk by chunk. Always `aclose()` it."""

    __slots__ = (
        '_buf',
        '_conn',
        '_endpoint',
        '_eof',
        '_error',
        '_size',
        '_waiter',
        'content_type',
        'headers',
        'status',
    )

    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint
        self._conn: _Conn | None = None
        self._buf: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._eof = False
        self._error: str | None = None
        self._waiter: asyncio.Future | None = None
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.content_type: str | None = None

    # -- fed by the connection

    def push(self, data: bytes) -> None:
        self._buf.append(data)
        self._size += len(data)
        if self._size > HIGH_WATER and self._conn is not None:
            self._conn.pause()
        self._wake()

    def end(self) -> None:
        self._eof = True
        self._conn = None  # back in the pool: this stream no longer owns it
        self._wake()

    def broke(self, kind: str) -> None:
        self._error = kind
        self._conn = None
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -- the reader

    def ended(self) -> bool:
        """The body is complete and all of it was read: `read_chunk` would return None."""
        return self._eof and not self._buf and self._error is None

    def take(self) -> bytes | None:
        """What arrived and was not read yet, without waiting (None: nothing; see `ended` for the end). The
        reader of a short answer that came in one piece reads it here, with no `read_chunk` step."""
        buf = self._buf
        if not buf:
            return None
        chunk = buf.popleft() if len(buf) == 1 else b''.join([buf.popleft() for _ in range(len(buf))])
        self._size -= len(chunk)
        conn = self._conn
        if conn is not None and conn.paused and self._size < LOW_WATER:
            conn.resume()
        return chunk

    async def read_chunk(self) -> bytes | None:
        """What arrived since the last call (a bytes-like buffer), or None at the end.

        Raises:
            UpstreamError: the body broke or went silent for longer than `idle` (not retryable:
                the caller has started answering).
        """
        while True:
            if self._buf:
                return self.take()
            if self._error is not None:
                raise self._endpoint.error_from(_Fail(self._error), started=True)
            if self._eof:
                return None
            self._waiter = w = self._endpoint.loop.create_future()
            try:
                await w
            finally:
                self._waiter = None

    async def aclose(self) -> None:
        """Release the upstream connection. An unfinished body closes it, which cancels the upstream work."""
        self.close()

    def close(self) -> None:
        """`aclose` without the await (it never waits)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.sink = None
            conn.abort()
        self._buf.clear()


# How each kind of client failure is reported: (stage, status, code, message template).
_FAILURES: dict[str, tuple[str, int, str, str]] = {
    'pool': ('connect', 503, 'upstream_overloaded', 'no free connection (pool of {pool} busy)'),
    'connect_timeout': ('connect', 504, 'upstream_timeout', 'connect timed out after {connect:g}s'),
    'connect': ('connect', 502, 'upstream_connect_error', 'connection failed'),
    'first_byte': ('timeout', 504, 'upstream_timeout', 'no answer within {first_byte:g}s'),
    'idle': ('timeout', 504, 'upstream_timeout', 'no data for {idle:g}s'),
    'total': ('timeout', 504, 'upstream_timeout', 'no complete answer within {total:g}s'),
    'reset': ('read', 502, 'upstream_reset', 'connection broken'),
    'protocol': ('protocol', 502, 'upstream_bad_response', 'bad response'),
}


class Endpoint:
    """One upstream base URL inside a pool, with its own bounded pool of keep-alive connections."""

    __slots__ = (
        '_head',
        '_host',
        '_path',
        '_port',
        '_ssl',
        'aborted',
        'adapters',
        'base',
        'breaker',
        'cap',
        'closed',
        'connects',
        'conns',
        'cool_until',
        'current',
        'down',
        'failures',
        'health_streak',
        'healthy',
        'idle',
        'last_error',
        'load',
        'loop',
        'model',
        'open',
        'outstanding',
        'pool_waiters',
        'timeouts',
        'waiters',
        'weight',
        'win',
    )

    def __init__(self, model: str, base: str, weight: float, timeouts: Timeouts) -> None:
        self.model = model
        self.base = base.rstrip('/')
        self.weight = weight
        self.timeouts = timeouts
        self.outstanding = 0  # requests in flight through this worker
        self.failures = 0  # consecutive failures (the resilience layer reads and resets these)
        self.last_error: UpstreamError | None = None
        scheme, _, rest = self.base.partition('://')
        hostport, slash, prefix = rest.partition('/')
        self._host, self._port = _host_port(self.base)
        self._ssl = scheme == 'https'
        self._path = f'/{prefix}' if slash and prefix else ''  # a base path, prepended to every request
        self._head = f' HTTP/1.1\r\nhost: {hostport.rsplit("@", 1)[-1]}\r\n'  # the caller's headers follow
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # the worker's, on first use
        self.idle: list[_Conn] = []  # most recently used last
        self.conns: set[_Conn] = set()
        self.open = 0  # connections open or opening
        self.connects = 0  # connections opened so far
        self.waiters: collections.deque[asyncio.Future] = collections.deque()
        self.closed = False
        # -- health (fastroute.resilience, fastroute.health); `down` is the one flag the happy path reads
        self.breaker = Breaker(_DEFAULT_BREAKER)
        self.win = self.breaker.window  # counts every outcome (hot path: `ep.win.n += 1` on success)
        self.down = False  # breaker not closed, failing health checks, or cooling down after a 429
        self.healthy = True  # active health checks (always true without them)
        self.health_streak = 0  # consecutive health-check results against the current `healthy`
        self.cool_until = 0.0  # a 429's Retry-After: not picked before this (time.perf_counter)
        self.cap = 0  # most requests in flight (0: no cap)
        self.pool_waiters: collections.deque[asyncio.Future] | None = None  # the pool's queue, when limited
        self.current = 0.0  # smooth weighted round-robin
        self.aborted = 0  # streams that broke after bytes went to the client
        self.adapters: frozenset[str] | None = None  # loaded LoRA adapters (None: not polled)
        self.load = (0, 0)  # (running, waiting) requests at the upstream, when polled

    def __repr__(self) -> str:
        return f'Endpoint({self.model}: {self.base}, outstanding={self.outstanding})'

    # -- health

    def usable(self, now: float, soft: bool = False) -> bool:
        """May a request go here now (health, breaker, 429 cool-down, concurrency cap)? `soft`: a 429's
        cool-down does not count (nobody else is left to ask)."""
        if self.cap and self.outstanding >= self.cap:
            return False
        if not self.down:
            return True
        if not self.healthy or (now < self.cool_until and not soft):
            return False
        return self.breaker.ready(now, self.outstanding)

    def release(self) -> None:
        """A request to this endpoint is over: free its slot and wake one queued request."""
        self.outstanding -= 1
        w = self.pool_waiters
        if w:
            _wake_one(w)

    def release_wake(self) -> None:
        """Wake one request queued for the pool (after `outstanding` went down)."""
        w = self.pool_waiters
        if w:
            _wake_one(w)

    def ok(self) -> None:
        """The endpoint answered (any status not counted as its failure). The gateway inlines this on the happy
        path: `ep.win.n += 1`, then `ep.recovered()` only if `ep.failures or ep.down`."""
        self.win.n += 1
        if self.failures or self.down:
            self.recovered()

    def recovered(self) -> None:
        """A success after failures: reset the count, close the breaker."""
        self.failures = 0
        b = self.breaker
        b.consecutive = 0
        if self.down:
            b.state = CLOSED
            self._update_down()

    def failed(self, err: UpstreamError) -> bool:
        """The endpoint failed a request (connect, timeout, reset, retryable 5xx). True when its breaker opened."""
        self.failures += 1
        self.last_error = err
        opened = self.breaker.failure(time.perf_counter())
        if opened:
            self.down = True
        return opened

    def cool_down(self, seconds: float) -> None:
        """A 429 with a Retry-After: pick others until it is over."""
        self.cool_until = time.perf_counter() + seconds
        self.down = True

    def _update_down(self) -> None:
        self.down = not self.healthy or self.breaker.state != CLOSED or self.cool_until > time.perf_counter()

    def set_healthy(self, healthy: bool) -> None:
        if healthy != self.healthy:
            self.healthy = healthy
            self._update_down()

    def state(self) -> dict[str, object]:
        """For operators (`/admin/models`, `/readyz`): url, breaker state, load, failures, last error, adapters."""
        now = time.perf_counter()
        b = self.breaker
        state = b.state
        if state == OPEN and now >= b.until:
            state = HALF_OPEN
        out: dict[str, object] = {
            'url': self.base,
            'state': state,
            'healthy': self.healthy,
            'outstanding': self.outstanding,
            'connections': self.open,
            'connections_opened': self.connects,
            'consecutive_failures': b.consecutive,
            'error_rate': b.error_rate(now),
            'opened': b.opened,
            'aborted_streams': self.aborted,
            'last_error': self.last_error.message if self.last_error is not None else None,
        }
        if state == OPEN:
            out['retry_in'] = round(b.until - now, 2)
        if self.cool_until > now:
            out['cooling_down_for'] = round(self.cool_until - now, 2)
        if self.adapters is not None:
            out['adapters'] = sorted(self.adapters)
            out['running'], out['waiting'] = self.load
        return out

    # -- the pool

    def wake(self) -> None:
        """A connection came back or a slot freed: let the first waiter try again."""
        waiters = self.waiters
        while waiters:
            w = waiters.popleft()
            if not w.done():
                w.set_result(None)
                return

    def _take_idle(self) -> _Conn | None:
        idle = self.idle
        now = self.loop.time()
        while idle:
            conn = idle.pop()
            if conn.alive(now):
                if now - conn.at < IDLE_KEEPALIVE_S:
                    return conn
            conn.abort()  # closed by the server (nothing written yet) or kept too long: try the next
        return None

    async def _acquire(self) -> _Conn:
        """An idle connection, a new one, or the next one freed (within the connect timeout)."""
        deadline = None
        while True:
            conn = self._take_idle()
            if conn is not None:
                return conn
            if self.open < MAX_IN_FLIGHT:
                return await self._connect()
            if deadline is None:
                deadline = self.loop.time() + self.timeouts.connect
            w = self.loop.create_future()
            self.waiters.append(w)
            try:
                async with asyncio.timeout_at(deadline):
                    await w
            except TimeoutError:
                raise _Fail('pool') from None
            finally:
                if not w.done():
                    w.cancel()

    async def _connect(self) -> _Conn:
        self.open += 1
        self.connects += 1
        loop = self.loop
        ok = False
        try:
            async with asyncio.timeout(self.timeouts.connect):
                if self._ssl:
                    _, conn = await loop.create_connection(
                        lambda: _Conn(self), self._host, self._port, ssl=_ssl_context(), server_hostname=self._host
                    )
                else:
                    _, conn = await loop.create_connection(lambda: _Conn(self), self._host, self._port)
            ok = True
        except TimeoutError:
            raise _Fail('connect_timeout') from None
        except (OSError, ssl.SSLError):
            raise _Fail('connect') from None
        finally:
            if not ok:
                self.open -= 1
                self.wake()
        self.conns.add(conn)
        return conn

    def _request(self, method: str, path: str, headers: Sequence[tuple[str, str]], body: bytes) -> bytes:
        first = f'{method} {self._path}{path}{self._head}'.encode()
        return head_bytes(first, headers, b'content-length: %d\r\n\r\n' % len(body), body, None, True)

    # -- the requests

    async def send(self, method: str, path: str, headers: Sequence[tuple[str, str]], body: bytes) -> UpstreamResponse:
        """Send one request and read the whole answer.

        Raises:
            UpstreamError: connect, timeout, reset or protocol failure (retryable: nothing was relayed yet).
        """
        loop = self.loop
        if loop is None:
            loop = self.loop = asyncio.get_running_loop()
        conn = None
        try:
            conn = self._take_idle() if self.idle else None
            if conn is None:
                conn = await self._acquire()
            waiter = loop.create_future()
            conn.start(self._request(method, path, headers, body), waiter, None, method == 'HEAD')
            answer = await waiter
        except _Fail as exc:
            raise self.error_from(exc, started=False) from None
        except BaseException:  # cancelled: closing the connection stops the upstream's work
            if conn is not None:
                conn.abort()
            raise
        return answer_response(answer)

    def start_now(self, method: str, path: str, headers: Sequence[tuple[str, str]], body: bytes, waiter: Any) -> bool:
        """`send` without waiting, for the gateway's fast lane: the request goes out at once on an idle
        connection, and the connection hands the answer to `waiter` (`set_result` with the tuple that
        `answer_response` reads, or `set_exception`). False: no idle connection (nothing was done)."""
        if not self.idle or self.loop is None:
            return False
        conn = self._take_idle()
        if conn is None:
            return False
        conn.start(self._request(method, path, headers, body), waiter, None, method == 'HEAD')
        conn.relay = waiter
        return True

    async def open_stream(
        self, method: str, path: str, headers: Sequence[tuple[str, str]], body: bytes
    ) -> UpstreamStream:
        """Send one request and return once the response head is in; the body is read by the caller.

        Raises:
            UpstreamError: as `send` (retryable).
        """
        loop = self.loop
        if loop is None:
            loop = self.loop = asyncio.get_running_loop()
        stream = UpstreamStream(self)
        conn = None
        try:
            conn = self._take_idle() if self.idle else None
            if conn is None:
                conn = await self._acquire()
            waiter = loop.create_future()
            stream._conn = conn
            conn.start(self._request(method, path, headers, body), waiter, stream, method == 'HEAD')
            status, raw, _, ctype, _ = await waiter
        except _Fail as exc:
            stream._conn = None
            raise self.error_from(exc, started=False) from None
        except BaseException:
            stream._conn = None
            if conn is not None:
                conn.abort()
            raise
        stream.status = status
        stream.headers = raw or []
        stream.content_type = ctype
        return stream

    def error_from(self, exc: BaseException, *, started: bool) -> UpstreamError:
        """Classify a client failure, once, where it happened. `started`: the answer had begun."""
        kind = exc.kind if isinstance(exc, _Fail) else 'protocol'
        err = self._error(kind, started)
        self.last_error = err
        return err

    def _error(self, kind: str, started: bool) -> UpstreamError:
        stage, status, code, what = _FAILURES.get(kind, _FAILURES['protocol'])
        t = self.timeouts
        what = what.format(
            pool=MAX_IN_FLIGHT, connect=t.connect, idle=t.idle, total=t.total, first_byte=min(t.first_byte, t.total)
        )
        return UpstreamError(
            f'upstream {self.model} at {self.base}: {what}',
            endpoint=self.base,
            stage=stage,
            retryable=not started,
            status=status,
            code=code,
        )

    async def close(self) -> None:
        self.closed = True
        for conn in list(self.conns):
            conn.abort()
        self.idle.clear()
        for w in self.waiters:
            if not w.done():
                w.cancel()
        self.waiters.clear()


_bits = random.getrandbits


def _wake_one(waiters: collections.deque[asyncio.Future]) -> None:
    while waiters:
        w = waiters.popleft()
        if not w.done():
            w.set_result(None)
            return


class Pool:
    """The endpoints of one logical model, how to choose among them, and the constant parts of every request.

    Balancing (`models.<name>.balance`): "p2c" (default: two random endpoints, the one with fewer requests in
    flight per unit of weight), "least_outstanding", "round_robin" or "weighted" (smooth weighted round-robin).
    Endpoints that are down (breaker open, failing health checks, cooling down after a 429) or at their
    concurrency cap are skipped. With `adapter_affinity`, endpoints that have the request's adapter loaded and
    few requests waiting are preferred.
    """

    __slots__ = (
        '_pick',
        '_rr',
        'affinity',
        'api_key',
        'auth_headers',
        'balance',
        'budget',
        'bw',
        'endpoints',
        'fallback',
        'fast',
        'key',
        'limits',
        'max_in_flight',
        'name',
        'policy',
        'tasks',
        'timeouts',
        'uniform',
        'upstream_model',
        'waiters',
    )

    def __init__(
        self,
        name: str,
        endpoints: list[Endpoint],
        api_key: str | None,
        upstream_model: str | None,
        *,
        model: Model | None = None,
        policy: Policy | None = None,
    ) -> None:
        from fastroute.config import Model as ModelCfg
        from fastroute.config import Retry

        self.name = name
        self.endpoints = tuple(endpoints)
        self.api_key = api_key
        self.upstream_model = upstream_model
        # Prepended to every upstream request: the model's own key, never the client's.
        self.auth_headers: tuple[tuple[str, str], ...] = (('authorization', f'Bearer {api_key}'),) if api_key else ()
        self.timeouts = endpoints[0].timeouts if endpoints else None
        self._rr = 0
        m = model or ModelCfg(endpoints=[])
        self.policy = policy or Policy(Retry(), _DEFAULT_BREAKER, None)
        self.budget = RetryBudget(self.policy.budget_ratio, self.policy.budget_min_per_s)
        self.bw = self.budget.window  # hot path: `pool.bw.n += 1` per request
        self.balance = m.balance
        self.limits = m.limits
        self.max_in_flight = m.limits.max_in_flight
        self.affinity = m.adapter_affinity
        self.fallback = tuple(m.fallback)
        self.key: object = None  # what the pool was built from: an equal key on reload keeps the pool
        self.tasks: list[asyncio.Task] = []  # health checks and adapter polls (fastroute.health)
        limited = bool(m.limits.max_in_flight or m.limits.max_in_flight_per_endpoint)
        self.waiters: collections.deque[asyncio.Future] | None = collections.deque() if limited else None
        for ep in self.endpoints:
            ep.breaker = Breaker(self.policy.breaker)
            ep.win = ep.breaker.window
            ep.cap = m.limits.max_in_flight_per_endpoint
            ep.pool_waiters = self.waiters
        self.uniform = len({ep.weight for ep in self.endpoints}) <= 1  # equal weights: compare counts only
        # the one endpoint of an unlimited pool: picking is a flag check
        self.fast = self.endpoints[0] if len(self.endpoints) == 1 and not limited else None
        self._pick = {
            'p2c': self._p2c,
            'round_robin': self._round_robin,
            'weighted': self._weighted,
            'least_outstanding': self._least,
        }[m.balance]

    # -- choosing an endpoint

    def pick(self, adapter: str | None = None) -> Endpoint | None:
        """An endpoint for a new request, or None when none can take one now."""
        ep = self.fast
        if ep is not None:
            if not ep.down:
                return ep
            return ep if ep.usable(time.perf_counter()) else None
        eps = self.endpoints
        if self.max_in_flight and self.in_flight() >= self.max_in_flight:
            return None
        if len(eps) == 1:
            ep = eps[0]
            return ep if ep.usable(time.perf_counter()) else None
        if adapter is not None and self.affinity is not None:
            ep = self._pick_adapter(adapter)
            if ep is not None:
                return ep
        return self._pick()

    def pick_other(self, tried: set[Endpoint], soft: bool = False) -> Endpoint | None:
        """The least busy usable endpoint not tried yet (a retry). `soft`: see `Endpoint.usable`."""
        if self.max_in_flight and self.in_flight() >= self.max_in_flight:
            return None
        now = time.perf_counter()
        best = None
        low = 0.0
        for ep in self.endpoints:
            if ep in tried or not ep.usable(now, soft):
                continue
            score = ep.outstanding / ep.weight
            if best is None or score < low:
                best, low = ep, score
        return best

    def in_flight(self) -> int:
        return sum(ep.outstanding for ep in self.endpoints)

    def _p2c(self) -> Endpoint | None:
        eps = self.endpoints
        n = len(eps)
        # NOTE: one call for both draws; int(random() * n) twice costs ~4x more (CPU time, timeit)
        r = _bits(32)
        i = r % n
        j = i + 1 + (r >> 16) % (n - 1)  # another one, uniformly
        if j >= n:
            j -= n
        a, b = eps[i], eps[j]
        if a.down or b.down or a.cap or b.cap:
            now = time.perf_counter()
            ua, ub = a.usable(now), b.usable(now)
            if not (ua and ub):
                if ua:
                    return a
                if ub:
                    return b
                return self._least()
        if self.uniform:
            return a if a.outstanding <= b.outstanding else b
        return a if a.outstanding * b.weight <= b.outstanding * a.weight else b  # per unit of weight

    def _least(self) -> Endpoint | None:
        """Least outstanding requests (per unit of weight) among usable endpoints; ties go round-robin."""
        eps = self.endpoints
        n = len(eps)
        start = self._rr = (self._rr + 1) % n
        now = time.perf_counter()
        best = None
        low = 0.0
        for i in range(n):
            ep = eps[(start + i) % n]
            if (ep.down or ep.cap) and not ep.usable(now):
                continue
            score = ep.outstanding / ep.weight
            if best is None or score < low:
                best, low = ep, score
        return best

    def _round_robin(self) -> Endpoint | None:
        eps = self.endpoints
        n = len(eps)
        now = time.perf_counter()
        for _ in range(n):
            self._rr = (self._rr + 1) % n
            ep = eps[self._rr]
            if not (ep.down or ep.cap) or ep.usable(now):
                return ep
        return None

    def _weighted(self) -> Endpoint | None:
        """Smooth weighted round-robin over the usable endpoints: exact shares, evenly interleaved."""
        now = time.perf_counter()
        total = 0.0
        best = None
        for ep in self.endpoints:
            if (ep.down or ep.cap) and not ep.usable(now):
                continue
            ep.current += ep.weight
            total += ep.weight
            if best is None or ep.current > best.current:
                best = ep
        if best is not None:
            best.current -= total
        return best

    def _pick_adapter(self, adapter: str) -> Endpoint | None:
        """Least busy usable endpoint that has `adapter` loaded and not too many requests waiting."""
        assert self.affinity is not None
        max_waiting = self.affinity.max_waiting
        now = time.perf_counter()
        best = None
        low = 0.0
        for ep in self.endpoints:
            loaded = ep.adapters
            if loaded is None or adapter not in loaded or ep.load[1] > max_waiting or not ep.usable(now):
                continue
            score = ep.outstanding / ep.weight
            if best is None or score < low:
                best, low = ep, score
        return best

    def saturated(self) -> bool:
        """At a concurrency limit (rather than out of endpoints that work): worth queueing for."""
        if self.max_in_flight and self.in_flight() >= self.max_in_flight:
            return True
        return any(ep.cap and ep.outstanding >= ep.cap and not ep.down for ep in self.endpoints)

    async def wait_slot(self, adapter: str | None) -> Endpoint | None:
        """Queue for an endpoint within `limits.queue` and `limits.queue_timeout`; None: shed the request."""
        waiters = self.waiters
        if waiters is None or len(waiters) >= self.limits.queue or not self.saturated():
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.queue_timeout
        while True:
            fut = loop.create_future()
            waiters.append(fut)
            try:
                async with asyncio.timeout_at(deadline):
                    await fut
            except TimeoutError:
                return None
            finally:
                if not fut.done():
                    fut.cancel()
                    try:
                        waiters.remove(fut)
                    except ValueError:
                        pass
            ep = self.pick(adapter)
            if ep is not None:
                if waiters:  # more than one slot may have freed
                    _wake_one(waiters)
                return ep

    def unavailable(self) -> list[str]:
        """Why each endpoint cannot take a request now (for the error message)."""
        now = time.perf_counter()
        out = []
        for ep in self.endpoints:
            if not ep.healthy:
                why = 'failing health checks'
            elif ep.cool_until > now:
                why = f'rate limited for {ep.cool_until - now:.1f}s more'
            elif ep.breaker.state == OPEN and now < ep.breaker.until:
                why = f'circuit open, next probe in {ep.breaker.until - now:.1f}s'
            elif ep.breaker.state != CLOSED:
                why = 'circuit half-open, probe in flight'
            elif ep.cap and ep.outstanding >= ep.cap:
                why = f'at its limit of {ep.cap} requests in flight'
            else:
                continue
            out.append(f'{self.name} at {ep.base}: {why}')
        if not out and self.max_in_flight:
            out.append(f'{self.name}: at its limit of {self.max_in_flight} requests in flight')
        return out

    def retry_in(self) -> float | None:
        """Seconds until an endpoint that is down may take requests again (shortest), when known."""
        now = time.perf_counter()
        waits = []
        for ep in self.endpoints:
            if ep.cool_until > now:
                waits.append(ep.cool_until - now)
            elif ep.breaker.state == OPEN and ep.breaker.until > now:
                waits.append(ep.breaker.until - now)
        return min(waits) if waits else None

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        self.tasks.clear()
        for ep in self.endpoints:
            await ep.close()


def _timeouts(cfg: Config, model: Model) -> Timeouts:
    t = model.timeouts or cfg.server.timeouts
    return Timeouts(connect=t.connect, first_byte=t.first_byte, idle=t.idle, total=t.total)


def _api_key(model: Model) -> str | None:
    if model.api_key:
        return model.api_key
    if model.api_key_env:
        return os.environ.get(model.api_key_env) or None
    return None


def pool_key(cfg: Config, model: Model) -> object:
    """Everything a model's pool is built from: a reload keeps the pool (and its connections) when equal."""
    return (model, _timeouts(cfg, model), cfg.server.retry, cfg.server.breaker, _api_key(model))


def answer_response(answer: tuple) -> UpstreamResponse:
    """A connection's whole answer (status, headers, body chunks, content-type, content-encoding) as relayed."""
    status, raw, chunks, ctype, enc = answer
    data = chunks[0] if len(chunks) == 1 else b''.join(chunks)
    if status < 300:
        # NOTE: a success relays its content-type (and content-encoding) only: walking every
        # upstream header costs ~6% of a proxied request (callgrind, 11k of 199k instructions).
        if ctype is None:
            return UpstreamResponse(status, [], None, data)
        hdrs = [('content-type', ctype)]
        if enc is not None:
            hdrs.append(('content-encoding', enc))
        return UpstreamResponse(status, hdrs, ctype, data)
    # errors keep every end-to-end header: retry-after, rate-limit state, ...
    return UpstreamResponse(status, raw or [], ctype, data)


def build_pools(cfg: Config, keep: dict[str, Pool] | None = None) -> dict[str, Pool]:
    """One Pool per configured model. Clients are created lazily, inside the worker's event loop.

    `keep`: the pools serving now (a reload); a model whose settings did not change keeps its pool, with its
    connections, breakers and balancing state."""
    pools = {}
    for name, model in cfg.models.items():
        key = pool_key(cfg, model)
        old = keep.get(name) if keep else None
        if old is not None and old.key == key:
            pools[name] = old
            continue
        timeouts = _timeouts(cfg, model)
        eps = []
        for ep in model.endpoints:
            if isinstance(ep, str):
                eps.append(Endpoint(name, ep, 1.0, timeouts))
            else:
                eps.append(Endpoint(name, ep.url, ep.weight, timeouts))
        pool = Pool(name, eps, _api_key(model), model.upstream_model, model=model, policy=policy_for(cfg, model))
        pool.key = key
        pools[name] = pool
    return pools


def _host_port(base: str) -> tuple[str, int]:
    scheme, _, rest = base.partition('://')
    hostport = rest.split('/', 1)[0].rsplit('@', 1)[-1]
    if hostport.startswith('['):
        host, _, port = hostport[1:].partition(']')
        port = port.lstrip(':')
    else:
        host, _, port = hostport.partition(':')
    return host, int(port) if port else (443 if scheme == 'https' else 80)


async def check_reachable(base: str, timeout: float = 0.5) -> bool:
    """True when a TCP connection to the endpoint opens within `timeout` seconds."""
    host, port = _host_port(base)
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return True


class Readiness:
    """`/readyz`: at least one reachable endpoint per model, probed at most every `ttl` seconds."""

    __slots__ = ('_at', '_lock', '_result', 'pools', 'ttl')

    def __init__(self, pools: dict[str, Pool], ttl: float = 2.0) -> None:
        self.pools = pools
        self.ttl = ttl
        self._at = -1e9
        self._result: dict[str, bool] = {}
        self._lock = asyncio.Lock()

    async def check(self) -> dict[str, bool]:
        """Model name -> reachable, cached for `ttl` seconds."""
        if time.perf_counter() - self._at < self.ttl:
            return self._result
        async with self._lock:
            if time.perf_counter() - self._at < self.ttl:
                return self._result
            bases = sorted({ep.base for p in self.pools.values() for ep in p.endpoints})
            up = dict(zip(bases, await asyncio.gather(*(check_reachable(b) for b in bases)), strict=True))
            self._result = {name: any(up[ep.base] for ep in p.endpoints) for name, p in self.pools.items()}
            self._at = time.perf_counter()
            return self._result
