"""Compare Python HTTP clients as fastroute's upstream client, on this machine, against nginx on loopback.

Run: .venv/bin/python benches/clients/compare.py [--seconds 3] [--rounds 3] [--clients pyreqwest,aiohttp,...]
     [--no-pin]

Each (client, mode, round) runs in a fresh uvloop process holding N=64 requests in flight against nginx
(benches/nginx/upstream.conf.template) serving a fixed 557-byte chat completion (mode `json`, POST) or a fixed
21-event SSE stream of 3.8 KB (mode `sse`, POST, body read chunk by chunk as the proxy would). Rounds are
interleaved across clients so drift on the shared machine hits every client alike; the table shows medians.
Reported: req/s at 64 in flight, CPU µs per request (time.process_time() delta over requests done: all threads
of the process, so a Rust client's runtime thread is included), and at 1 request in flight the p50 latency (json)
or p50 time to first chunk / to the last byte (sse).

Pinning (default): the client process on CPU 0, nginx on CPU 1; --no-pin leaves both to the scheduler.
The figures of the latest run are in benches/clients/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / 'nginx'))

import nginxctl  # noqa: E402

CLIENTS = ('pyreqwest', 'rnet', 'aiohttp', 'niquests', 'httpx')
IN_FLIGHT = 64
HEADERS = {'content-type': 'application/json', 'authorization': 'Bearer sk-upstream-key'}


# ---------------------------------------------------------------- one client, one mode: what a proxy does per request


async def _pyreqwest():
    from datetime import timedelta

    from pyreqwest.client import ClientBuilder

    client = (
        ClientBuilder()
        .max_connections(IN_FLIGHT)
        .pool_max_idle_per_host(IN_FLIGHT)
        .connect_timeout(timedelta(seconds=5))
        .read_timeout(timedelta(seconds=30))
        .timeout(timedelta(seconds=60))
        .follow_redirects(False)
        .gzip(False)
        .brotli(False)
        .zstd(False)
        .deflate(False)
        .build()
    )

    async def req_json(url: str, body: bytes) -> bytes:
        resp = await client.post(url).headers(HEADERS).body_bytes(body).build().send()
        return await resp.bytes()

    async def req_sse(url: str, body: bytes, on_first) -> int:
        n = 0
        # streamed_read_buffer_limit(0): hand over each chunk as it arrives (the default buffers 64 KiB)
        req = client.post(url).headers(HEADERS).body_bytes(body).streamed_read_buffer_limit(0).build_streamed()
        async with req as resp:
            reader = resp.body_reader
            while (chunk := await reader.read_chunk()) is not None:
                if n == 0:
                    on_first()
                n += len(chunk)
        return n

    return req_json, req_sse, client.close


async def _rnet():
    import rnet

    client = rnet.Client(
        pool_max_size=IN_FLIGHT,
        pool_max_idle_per_host=IN_FLIGHT,
        connect_timeout=5,
        read_timeout=30,
        timeout=60,
        allow_redirects=False,
        gzip=False,
        brotli=False,
        deflate=False,
        zstd=False,
    )

    async def req_json(url: str, body: bytes) -> bytes:
        resp = await client.post(url, body=body, headers=HEADERS)
        return await resp.bytes()

    async def req_sse(url: str, body: bytes, on_first) -> int:
        n = 0
        resp = await client.post(url, body=body, headers=HEADERS)
        async with resp.stream() as streamer:
            async for chunk in streamer:
                if n == 0:
                    on_first()
                n += len(chunk)
        return n

    async def close() -> None:
        return None

    return req_json, req_sse, close


async def _aiohttp():
    import aiohttp

    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=IN_FLIGHT, limit_per_host=IN_FLIGHT, keepalive_timeout=90),
        timeout=aiohttp.ClientTimeout(total=60, connect=5, sock_read=30),
        auto_decompress=False,
        skip_auto_headers=('User-Agent',),
    )

    async def req_json(url: str, body: bytes) -> bytes:
        async with session.post(url, data=body, headers=HEADERS) as resp:
            return await resp.read()

    async def req_sse(url: str, body: bytes, on_first) -> int:
        n = 0
        async with session.post(url, data=body, headers=HEADERS) as resp:
            async for chunk in resp.content.iter_any():
                if n == 0:
                    on_first()
                n += len(chunk)
        return n

    return req_json, req_sse, session.close


async def _httpx():
    import httpx

    client = httpx.AsyncClient(
        limits=httpx.Limits(max_connections=IN_FLIGHT, max_keepalive_connections=IN_FLIGHT),
        timeout=httpx.Timeout(60, connect=5, read=30),
    )

    async def req_json(url: str, body: bytes) -> bytes:
        resp = await client.post(url, content=body, headers=HEADERS)
        return resp.content

    async def req_sse(url: str, body: bytes, on_first) -> int:
        n = 0
        async with client.stream('POST', url, content=body, headers=HEADERS) as resp:
            async for chunk in resp.aiter_raw():
                if n == 0:
                    on_first()
                n += len(chunk)
        return n

    return req_json, req_sse, client.aclose


async def _niquests():
    import niquests

    session = niquests.AsyncSession(pool_connections=1, pool_maxsize=IN_FLIGHT, disable_http2=True)

    async def req_json(url: str, body: bytes) -> bytes:
        resp = await session.post(url, data=body, headers=HEADERS, timeout=30)
        return resp.content

    async def req_sse(url: str, body: bytes, on_first) -> int:
        n = 0
        resp = await session.post(url, data=body, headers=HEADERS, timeout=30, stream=True)
        async for chunk in await resp.iter_raw():
            if n == 0:
                on_first()
            n += len(chunk)
        await resp.close()
        return n

    return req_json, req_sse, session.close


FACTORIES = {'pyreqwest': _pyreqwest, 'rnet': _rnet, 'aiohttp': _aiohttp, 'httpx': _httpx, 'niquests': _niquests}


async def make_client(name: str):
    """Return (request_json, request_sse, close) coroutine functions for the named client."""
    if name not in FACTORIES:
        raise SystemExit(f'unknown client {name!r}')
    return await FACTORIES[name]()


async def run_worker(name: str, mode: str, url: str, seconds: float) -> dict:
    req_json, req_sse, close = await make_client(name)
    body = nginxctl.STREAM_REQUEST_BODY if mode == 'sse' else nginxctl.REQUEST_BODY
    expect = len(nginxctl.SSE_BODY) if mode == 'sse' else len(nginxctl.CHAT_BODY)

    def noop() -> None:
        return None

    async def one() -> None:
        if mode == 'sse':
            got = await req_sse(url, body, noop)
        else:
            got = len(await req_json(url, body))
        if got != expect:
            raise RuntimeError(f'{name}: got {got} bytes, expected {expect}')

    # 1 in flight: latency (and time to first chunk for sse)
    lat, ttfc = [], []
    for i in range(400):
        t0 = time.perf_counter()
        first = [0.0]
        if mode == 'sse':

            def mark(first=first) -> None:
                first[0] = time.perf_counter()

            await req_sse(url, body, mark)
        else:
            await req_json(url, body)
        t1 = time.perf_counter()
        if i >= 50:
            lat.append(t1 - t0)
            if mode == 'sse':
                ttfc.append(first[0] - t0)

    # 64 in flight: throughput and CPU per request
    stop = False
    done = 0

    async def loop() -> None:
        nonlocal done
        while not stop:
            await one()
            done += 1

    tasks = [asyncio.create_task(loop()) for _ in range(IN_FLIGHT)]
    await asyncio.sleep(min(1.0, seconds / 3))  # warm-up: pool filled
    d0, w0, c0 = done, time.perf_counter(), time.process_time()
    await asyncio.sleep(seconds)
    d1, w1, c1 = done, time.perf_counter(), time.process_time()
    stop = True
    await asyncio.gather(*tasks)
    await close()
    n = d1 - d0
    out = {
        'client': name,
        'mode': mode,
        'rps': n / (w1 - w0),
        'cpu_us': (c1 - c0) / n * 1e6 if n else float('nan'),
        'p50_ms': statistics.median(lat) * 1e3,
    }
    if mode == 'sse':
        out['ttfc_ms'] = statistics.median(ttfc) * 1e3
    return out


def worker_main(args: argparse.Namespace) -> None:
    import uvloop

    res = uvloop.run(run_worker(args.worker, args.mode, args.url, args.seconds))
    print(json.dumps(res))


# ---------------------------------------------------------------- orchestration


def available(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--clients', default=','.join(CLIENTS))
    ap.add_argument('--modes', default='json,sse')
    ap.add_argument('--seconds', type=float, default=3.0)
    ap.add_argument('--rounds', type=int, default=3)
    ap.add_argument('--no-pin', action='store_true')
    ap.add_argument('--worker', help=argparse.SUPPRESS)
    ap.add_argument('--mode', help=argparse.SUPPRESS)
    ap.add_argument('--url', help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker_main(args)
        return

    pin = not args.no_pin and nginxctl.cpu_count() >= 2
    clients = [c for c in args.clients.split(',') if c]
    missing = [c for c in clients if not available(c)]
    for c in missing:
        print(f'# skipping {c}: not installed', file=sys.stderr)
    clients = [c for c in clients if c not in missing]
    modes = args.modes.split(',')

    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix='fr-clients-') as tmp:
        proc, port, sse_port = nginxctl.start_upstream(Path(tmp), cpus='1' if pin else None)
        try:
            for rnd in range(args.rounds):
                for mode in modes:
                    url = f'http://127.0.0.1:{sse_port if mode == "sse" else port}/v1/chat/completions'
                    for name in clients:
                        seconds = args.seconds if name not in ('httpx', 'niquests') else min(args.seconds, 2.0)
                        cmd = [sys.executable, __file__, '--worker', name, '--mode', mode, '--url', url]
                        cmd += ['--seconds', str(seconds)]
                        if pin:
                            cmd = ['taskset', '-c', '0', *cmd]
                        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
                        if out.returncode != 0:
                            print(f'# {name}/{mode} failed:\n{out.stderr[-2000:]}', file=sys.stderr)
                            continue
                        r = json.loads(out.stdout.strip().splitlines()[-1])
                        results.setdefault((name, mode), []).append(r)
                        extra = f' ttfc {r["ttfc_ms"]:.3f} ms' if 'ttfc_ms' in r else ''
                        print(
                            f'# round {rnd + 1} {mode:4} {name:9} {r["rps"]:9.0f} req/s {r["cpu_us"]:8.1f} µs/req '
                            f'p50@1 {r["p50_ms"]:.3f} ms{extra}',
                            file=sys.stderr,
                        )
        finally:
            nginxctl.stop(proc)

    print(render(results, clients, modes, pin, args))


def render(results, clients, modes, pin, args) -> str:
    def med(rs, key):
        return statistics.median(r[key] for r in rs)

    lines = [
        f'Clients against nginx on loopback, one uvloop process, {IN_FLIGHT} in flight; medians of {args.rounds} '
        f'rounds ({"client on CPU 0, nginx on CPU 1" if pin else "not pinned"}).',
        '',
    ]
    if 'json' in modes:
        lines += [
            'POST, 557-byte JSON answer:',
            '',
            '| client | req/s @64 | CPU µs/req @64 | p50 @1 in flight (ms) |',
            '|---|---:|---:|---:|',
        ]
        for c in clients:
            rs = results.get((c, 'json'))
            if rs:
                lines.append(f'| {c} | {med(rs, "rps"):,.0f} | {med(rs, "cpu_us"):.0f} | {med(rs, "p50_ms"):.3f} |')
        lines.append('')
    if 'sse' in modes:
        lines += [
            'POST, streamed 21-event SSE answer (3.8 KB), body read chunk by chunk:',
            '',
            '| client | req/s @64 | CPU µs/req @64 | first chunk p50 @1 (ms) | last byte p50 @1 (ms) |',
            '|---|---:|---:|---:|---:|',
        ]
        for c in clients:
            rs = results.get((c, 'sse'))
            if rs:
                lines.append(
                    f'| {c} | {med(rs, "rps"):,.0f} | {med(rs, "cpu_us"):.0f} | {med(rs, "ttfc_ms"):.3f} | '
                    f'{med(rs, "p50_ms"):.3f} |'
                )
    return '\n'.join(lines)


if __name__ == '__main__':
    main()
