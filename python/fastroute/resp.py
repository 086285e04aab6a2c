"""A small Redis client for the hot path: one pipelined connection per process on the event loop (RESP2).

The limits step makes one Redis call per request; a general-purpose client costs far more CPU per call than the
rest of fastroute's work on a request. This one does only what the limits need: commands as arrays of bulk
strings, replies parsed in `data_received`, answered in order (Redis answers a connection's commands in the
order they were sent, so concurrent calls share the connection without waiting for each other).

Every call is bounded by the client's timeout without a timer per call: replies come in order, so only the
oldest unanswered call's deadline matters, and one timer watches it. When it passes, every waiting call fails
with `TimeoutError` and the connection is dropped (its late replies must not answer newer calls); the next call
connects again.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = ['RespClient', 'RespError']


class RespError(Exception):
    """An error reply from Redis (`-ERR ...`)."""


class _Incomplete(Exception):
    pass


def _encode(args: tuple[Any, ...]) -> bytes:
    out = [b'*%d\r\n' % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b'$%d\r\n%s\r\n' % (len(b), b))
    return b''.join(out)


def _parse(buf: bytearray, pos: int) -> tuple[Any, int]:
    """One reply at `pos`: (value, position after it). Raises `_Incomplete` when the buffer ends first."""
    end = buf.find(b'\r\n', pos)
    if end < 0:
        raise _Incomplete
    kind = buf[pos]
    line = bytes(buf[pos + 1 : end])
    nxt = end + 2
    if kind == 43:  # +
        return line.decode(), nxt
    if kind == 45:  # -
        return RespError(line.decode(errors='replace')), nxt
    if kind == 58:  # :
        return int(line), nxt
    if kind == 36:  # $
        n = int(line)
        if n < 0:
            return None, nxt
        if len(buf) < nxt + n + 2:
            raise _Incomplete
        return bytes(buf[nxt : nxt + n]), nxt + n + 2
    if kind == 42:  # *
        n = int(line)
        if n < 0:
            return None, nxt
        items = []
        for _ in range(n):
            v, nxt = _parse(buf, nxt)
            items.append(v)
        return items, nxt
    raise RespError(f'unexpected reply type {chr(kind)!r} from Redis')


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiters: deque[asyncio.Future] = deque()
        self.deadlines: deque[float] = deque()  # loop time by which each waiter must be answered
        self.timer: asyncio.TimerHandle | None = None
        self.buf = bytearray()
        self.lost: BaseException | None = None

    def watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Arm the one timer at the oldest waiter's deadline (no-op when it is armed)."""
        if self.timer is None and self.deadlines:
            self.timer = loop.call_at(self.deadlines[0], self.expire, loop)

    def expire(self, loop: asyncio.AbstractEventLoop) -> None:
        self.timer = None
        if not self.deadlines:
            return
        if self.deadlines[0] <= loop.time():
            self._fail(TimeoutError('Redis did not answer in time'))
            if self.transport is not None:
                self.transport.close()
            self.lost = self.lost or TimeoutError('Redis did not answer in time')
            return
        self.watch(loop)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        while self.waiters:
            try:
                value, pos2 = _parse(buf, pos)
            except _Incomplete:
                break
            except (ValueError, RespError) as exc:  # a broken stream: nothing after this can be trusted
                self._fail(ConnectionError(f'bad reply from Redis: {exc}'))
                if self.transport is not None:
                    self.transport.close()
                return
            pos = pos2
            self.deadlines.popleft()
            fut = self.waiters.popleft()
            if not fut.done():
                if isinstance(value, RespError):
                    fut.set_exception(value)
                else:
                    fut.set_result(value)
        if pos:
            del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionError('Redis closed the connection')
        self._fail(self.lost)

    def _fail(self, exc: BaseException) -> None:
        self.deadlines.clear()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                kind = type(exc) if isinstance(exc, (ConnectionError, TimeoutError)) else ConnectionError
                fut.set_exception(kind(str(exc)))  # one instance per waiter: no shared traceback


class RespClient:
    """`await client.call('GET', key)`; `await client.script(sha_and_text, keys, args)` (EVALSHA, loading once)."""

    def __init__(self, url: str, timeout: float) -> None:
        self.timeout = timeout
        u = urlsplit(url)
        self.scheme = u.scheme
        self.host = u.hostname or '127.0.0.1'
        self.port = u.port or 6379
        self.path = u.path if u.scheme == 'unix' else ''
        self.db = int(u.path.strip('/') or 0) if u.scheme != 'unix' else 0
        self.username = unquote(u.username) if u.username else None
        self.password = unquote(u.password) if u.password else None
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Future | None = None

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        if self.scheme == 'unix':
            _, proto = await loop.create_unix_connection(_Protocol, self.path)
        else:
            ctx = ssl.create_default_context() if self.scheme == 'rediss' else None
            _, proto = await loop.create_connection(_Protocol, self.host, self.port, ssl=ctx)
        hello: list[tuple[Any, ...]] = []
        if self.password is not None:
            hello.append(('AUTH', self.username, self.password) if self.username else ('AUTH', self.password))
        if self.db:
            hello.append(('SELECT', self.db))
        for cmd in hello:
            fut = loop.create_future()
            proto.waiters.append(fut)
            proto.deadlines.append(loop.time() + self.timeout)
            proto.transport.write(_encode(cmd))  # type: ignore[union-attr]
            await fut
        return proto

    async def _conn(self) -> _Protocol:
        p = self._proto
        if p is not None and p.lost is None:
            return p
        if self._connecting is None:  # one connect for all the calls that arrive meanwhile
            self._connecting = asyncio.ensure_future(self._connect())
        fut = self._connecting
        try:
            p = await asyncio.shield(fut)
        finally:
            if self._connecting is fut and fut.done():
                self._connecting = None
        self._proto = p
        return p

    async def call(self, *args: Any) -> Any:
        p = self._proto
        if p is None or p.lost is not None:
            async with asyncio.timeout(self.timeout):
                p = await self._conn()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        p.waiters.append(fut)
        p.deadlines.append(loop.time() + self.timeout)
        p.transport.write(_encode(args))  # type: ignore[union-attr]
        if p.timer is None:
            p.watch(loop)
        return await fut

    async def script(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self.call('EVALSHA', script.sha, len(keys), *keys, *args)
        except RespError as exc:
            if not str(exc).startswith('NOSCRIPT'):
                raise
            return await self.call('EVAL', script.text, len(keys), *keys, *args)

    def reset(self) -> None:
        """Drop the connection (after a failure: late replies must not answer newer calls)."""
        p, self._proto = self._proto, None
        if p is not None:
            p._fail(ConnectionError('connection reset after a failure'))
            if p.transport is not None:
                p.transport.close()


class Script:
    __slots__ = ('sha', 'text')

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()
