"""The floor of any proxy hop written in Python: a byte pump on uvloop's raw protocols. A baseline only.

Each client connection gets its own upstream connection and the bytes are copied both ways as they come:
no HTTP parsing, no pooling, no headers, no routing. Whatever a Python proxy does per request costs at
least this (two reads, two writes, two wake-ups of the event loop); the gap between it and fastroute is
fastroute's own work. `benches/bench_overhead.py --floor` runs it as target (p).
Run: .venv/bin/python benches/pump_proxy.py --listen 127.0.0.1:8100 --upstream 127.0.0.1:8001
"""

from __future__ import annotations

import argparse
import asyncio

import uvloop


class Upstream(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:  # (asyncio sets TCP_NODELAY on every TCP transport)
        self.client.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()


class Client(asyncio.Protocol):
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream_addr = upstream
        self.up: asyncio.Transport | None = None
        self.early: list[bytes] = []  # bytes that came before the upstream connection was open

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        asyncio.get_running_loop().create_task(self.connect())

    async def connect(self) -> None:
        try:
            up, _ = await asyncio.get_running_loop().create_connection(lambda: Upstream(self), *self.upstream_addr)
        except OSError:
            self.transport.close()
            return
        if self.transport.is_closing():  # the client left while the upstream connection was being made
            up.close()
            return
        self.up = up  # type: ignore[assignment]
        for data in self.early:
            up.write(data)
        self.early.clear()

    def data_received(self, data: bytes) -> None:
        if self.up is None:
            self.early.append(data)
        else:
            self.up.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.up is not None:
            self.up.close()


async def serve(listen: tuple[str, int], upstream: tuple[str, int]) -> None:
    server = await asyncio.get_running_loop().create_server(lambda: Client(upstream), *listen, backlog=1024)
    await server.serve_forever()


def _addr(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(':')
    return host, int(port)


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--listen', required=True, help='HOST:PORT')
    ap.add_argument('--upstream', required=True, help='HOST:PORT')
    a = ap.parse_args()
    uvloop.run(serve(_addr(a.listen), _addr(a.upstream)))
