"""Check the behaviours fastroute needs from pyreqwest, against a scripted HTTP/1.1 server on loopback.

Run: .venv/bin/python benches/clients/verify_pyreqwest.py

Checks: keep-alive reuse; the pool's size limit (max_connections) and idle limit (pool_max_idle_per_host,
pool_idle_timeout); pool wait timeout; connect, first-byte, idle-between-chunks and total timeouts, each with
the exception it raises; streamed chunks arrive as the server sends them; cancelling a streaming request (task
cancel, leaving `async with` early, an asyncio timeout around the send) closes the upstream connection; the
client keeps working afterwards. Prints one line per check and exits non-zero if any fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import time
from datetime import timedelta

import uvloop
from pyreqwest.client import ClientBuilder
from pyreqwest.exceptions import ConnectTimeoutError, PoolTimeoutError, ReadTimeoutError, RequestTimeoutError


class Server:
    """Minimal HTTP/1.1 server: the path picks the behaviour; records connection opens and closes."""

    def __init__(self) -> None:
        self.opened = 0
        self.open_now = 0
        self.active = 0
        self.max_active = 0
        self.closed_at: list[float] = []
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.handle, '127.0.0.1', 0)
        self.port = self.server.sockets[0].getsockname()[1]

    def url(self, path: str) -> str:
        return f'http://127.0.0.1:{self.port}{path}'

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.opened += 1
        self.open_now += 1
        try:
            while True:
                head = await reader.readuntil(b'\r\n\r\n')
                lines = head.decode().split('\r\n')
                path = lines[0].split()[1]
                length = 0
                for line in lines[1:]:
                    if line.lower().startswith('content-length:'):
                        length = int(line.split(':', 1)[1])
                if length:
                    await reader.readexactly(length)
                self.active += 1
                self.max_active = max(self.max_active, self.active)
                try:
                    await self.respond(path, reader, writer)
                finally:
                    self.active -= 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open_now -= 1
            self.closed_at.append(time.monotonic())
            writer.close()

    async def respond(self, path: str, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        name, _, arg = path.partition('?')
        if name == '/fast':
            w.write(b'HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok')
        elif name == '/slow':
            await asyncio.sleep(int(arg) / 1000)
            w.write(b'HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok')
        elif name == '/hang':
            await r.read(1)  # returns on EOF: the client closed the connection
            raise ConnectionResetError
        elif name in ('/drip', '/stall', '/forever'):
            w.write(b'HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n')
            n = 5 if name == '/drip' else (1 if name == '/stall' else 10**9)
            for i in range(n):
                data = f'data: {i}\n\n'.encode()
                w.write(f'{len(data):x}\r\n'.encode() + data + b'\r\n')
                await w.drain()
                await asyncio.sleep(0.1 if name == '/drip' else 0.05)
            if name == '/stall':
                await r.read(1)
                raise ConnectionResetError
            w.write(b'0\r\n\r\n')
        await w.drain()


def client(**kw):
    b = ClientBuilder().follow_redirects(False)
    b = b.max_connections(kw.get('max_conn', 64)).pool_max_idle_per_host(kw.get('max_idle', 64))
    b = b.connect_timeout(timedelta(seconds=kw.get('connect', 5)))
    b = b.read_timeout(timedelta(seconds=kw.get('read', 30)))
    b = b.timeout(timedelta(seconds=kw.get('total', 60)))
    if 'pool_timeout' in kw:
        b = b.pool_timeout(timedelta(seconds=kw['pool_timeout']))
    if 'idle' in kw:
        b = b.pool_idle_timeout(timedelta(seconds=kw['idle']))
    return b.build()


RESULTS: list[tuple[bool, str]] = []


def check(ok: bool, what: str) -> None:
    RESULTS.append((ok, what))
    print(f'{"PASS" if ok else "FAIL"}  {what}')


async def expect_raise(coro, exc_type, lo: float, hi: float, what: str) -> None:
    t0 = time.monotonic()
    try:
        await coro
    except exc_type as e:
        dt = time.monotonic() - t0
        check(lo <= dt <= hi, f'{what}: {type(e).__name__} after {dt * 1000:.0f} ms')
        return
    except Exception as e:
        check(False, f'{what}: unexpected {type(e).__name__}: {e}')
        return
    check(False, f'{what}: no exception')


async def wait_closed(srv: Server, n_before: int, within: float) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        if len(srv.closed_at) > n_before:
            return srv.closed_at[n_before] - t0
        await asyncio.sleep(0.005)
    return None


async def main() -> None:
    srv = Server()
    await srv.start()

    # keep-alive reuse
    c = client()
    for _ in range(100):
        r = await c.get(srv.url('/fast')).build().send()
        assert await r.bytes() == b'ok'
    check(srv.opened == 1, f'keep-alive: 100 sequential requests used {srv.opened} connection(s)')

    # pool size limit: 40 concurrent slow requests with max_connections(8)
    c = client(max_conn=8, max_idle=8, idle=1)
    srv.opened, srv.max_active = 0, 0
    t0 = time.monotonic()

    async def slow() -> None:
        r = await c.get(srv.url('/slow?50')).build().send()
        await r.bytes()

    await asyncio.gather(*(slow() for _ in range(40)))
    dt = time.monotonic() - t0
    check(
        srv.max_active == 8 and srv.opened == 8,
        f'pool limit: 40 concurrent with max_connections(8) -> {srv.opened} connections opened, '
        f'{srv.max_active} in flight at most, {dt * 1000:.0f} ms (5 waves of 50 ms)',
    )
    await asyncio.sleep(2.5)
    check(srv.open_now <= 1, f'pool_idle_timeout(1s): {srv.open_now} of the 8 idle connections open after 2.5 s')
    await c.close()

    # idle limit below the size limit: connections beyond it are closed after each use (churn)
    c = client(max_conn=8, max_idle=2)
    srv.opened = 0
    await asyncio.gather(*(slow() for _ in range(40)))
    await asyncio.sleep(0.2)
    check(
        srv.opened > 8,
        f'pool_max_idle_per_host(2) under max_connections(8): {srv.opened} connections opened for 40 requests '
        '(keep max_idle = max_connections to avoid churn)',
    )
    await c.close()

    # pool wait timeout: 1 connection busy, second request waits at most pool_timeout
    c = client(max_conn=1, pool_timeout=0.2)
    busy = asyncio.create_task(c.get(srv.url('/slow?1000')).build().send())
    await asyncio.sleep(0.05)
    await expect_raise(c.get(srv.url('/fast')).build().send(), PoolTimeoutError, 0.15, 0.5, 'pool wait timeout 200 ms')
    busy.cancel()
    with contextlib.suppress(BaseException):
        await busy
    await c.close()

    # connect timeout: a listener that never accepts, its backlog full, drops further SYNs
    lsock = socket.socket()
    lsock.bind(('127.0.0.1', 0))
    lsock.listen(0)
    lport = lsock.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(('127.0.0.1', lport))
        fillers.append(s)
    await asyncio.sleep(0.1)
    c = client(connect=0.3)
    await expect_raise(
        c.get(f'http://127.0.0.1:{lport}/').build().send(), ConnectTimeoutError, 0.25, 1.5, 'connect timeout 300 ms'
    )
    for s in fillers:
        s.close()
    lsock.close()

    # first-byte timeout: read_timeout also covers the wait for the response head; pyreqwest reports it as
    # ConnectTimeoutError ("error sending request ... operation timed out"), a RequestTimeoutError
    c = client(read=0.3)
    await expect_raise(
        c.get(srv.url('/hang')).build().send(), RequestTimeoutError, 0.25, 0.8, 'first-byte timeout 300 ms'
    )

    # idle between chunks (read_timeout resets after each read)
    async def stall() -> None:
        req = c.get(srv.url('/stall')).streamed_read_buffer_limit(0).build_streamed()
        async with req as resp:
            while await resp.body_reader.read_chunk() is not None:
                pass

    await expect_raise(stall(), ReadTimeoutError, 0.3, 0.9, 'idle-between-chunks timeout 300 ms (after 1 chunk)')

    # total timeout (per request), applies while the body is still streaming
    async def forever(cl, total=None) -> None:
        b = cl.get(srv.url('/forever')).streamed_read_buffer_limit(0)
        if total:
            b = b.timeout(timedelta(seconds=total))
        async with b.build_streamed() as resp:
            while await resp.body_reader.read_chunk() is not None:
                pass

    await expect_raise(forever(c, 0.5), RequestTimeoutError, 0.45, 1.0, 'total timeout 500 ms on a live stream')

    # streaming: chunks arrive as sent (server sends one every 100 ms)
    c = client()

    async def drip(limit: int | None) -> list[int]:
        b = c.get(srv.url('/drip'))
        if limit is not None:
            b = b.streamed_read_buffer_limit(limit)
        t0 = time.monotonic()
        arrivals = []
        async with b.build_streamed() as resp:
            arrivals.append(round((time.monotonic() - t0) * 1000))
            while await resp.body_reader.read_chunk() is not None:
                arrivals.append(round((time.monotonic() - t0) * 1000))
        return arrivals

    arr = await drip(None)
    check(arr[0] >= 400, f'default streamed_read_buffer_limit (64 KiB) BUFFERS: head+chunks at ms {arr} (known)')
    arr = await drip(0)
    gaps = [b - a for a, b in zip(arr[1:], arr[2:], strict=False)]
    check(
        arr[0] < 50 and len(arr) >= 6 and all(70 <= g <= 170 for g in gaps[:4]),
        f'streamed_read_buffer_limit(0) unbuffered: head then chunks at ms {arr}',
    )

    # cancel a streaming request after the head: task cancel closes the upstream connection
    n0 = len(srv.closed_at)

    async def read_some_then_wait() -> None:
        async with c.get(srv.url('/forever')).streamed_read_buffer_limit(0).build_streamed() as resp:
            await resp.body_reader.read_chunk()
            await resp.body_reader.read_chunk()
            await asyncio.sleep(3600)

    task = asyncio.create_task(read_some_then_wait())
    await asyncio.sleep(0.2)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    closed = await wait_closed(srv, n0, 2.0)
    check(closed is not None, f'task cancel mid-stream: upstream connection closed after {fmt(closed)}')

    # leaving `async with` early (the client went away, the proxy stops reading)
    n0 = len(srv.closed_at)
    async with c.get(srv.url('/forever')).streamed_read_buffer_limit(0).build_streamed() as resp:
        await resp.body_reader.read_chunk()
    closed = await wait_closed(srv, n0, 2.0)
    check(closed is not None, f'leaving async-with mid-stream: upstream connection closed after {fmt(closed)}')

    # cancelling while the send awaits the response head does NOT abort the request in pyreqwest 0.15:
    # the request runs on inside the client's runtime until read_timeout / timeout ends it
    c2 = client(read=0.8)
    for label, make in (
        ('send()', lambda: c2.get(srv.url('/hang')).build().send()),
        ('async with build_streamed()', lambda: enter_and_leave(c2.get(srv.url('/hang')))),
    ):
        n0 = len(srv.closed_at)
        task = asyncio.create_task(make())
        await asyncio.sleep(0.2)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        closed = await wait_closed(srv, n0, 2.0)
        check(
            closed is not None and closed > 0.4,
            f'cancel while awaiting the head ({label}): upstream connection closed after {fmt(closed)}, '
            'i.e. only when read_timeout (800 ms from the send) fired (known limitation)',
        )
    await c2.close()

    # the client still works afterwards
    r = await c.get(srv.url('/fast')).build().send()
    check(await r.bytes() == b'ok', 'client healthy after cancellations')
    await c.close()

    failed = [w for ok, w in RESULTS if not ok]
    print(f'\n{len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed')
    sys.exit(1 if failed else 0)


async def enter_and_leave(builder) -> None:
    async with builder.streamed_read_buffer_limit(0).build_streamed():
        pass


def fmt(x: float | None) -> str:
    return 'never (2 s)' if x is None else f'{x * 1000:.0f} ms'


if __name__ == '__main__':
    uvloop.run(main())
