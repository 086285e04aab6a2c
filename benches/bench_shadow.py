"""Shadow traffic and the primary's latency: the same requests with and without a shadow, in one run.

Run: .venv/bin/python benches/bench_shadow.py [--requests N] [--rounds R] [--concurrency C]

One `fastroute serve` (native server, 1 worker) in front of two `fastroute mock` processes: the primary
(`phi-3-mini`, time to first token 20 ms) and a slow candidate (`shadow-model`, 60 ms more per request). Two
tenants route to the same primary; requests of tenant `shadowed` are mirrored to the candidate (`--share`,
default 100 %; max_in_flight 64), those of tenant `plain` are not. Each round sends `--requests` non-streamed chat requests
per tenant at `--concurrency` in flight, the two tenants interleaved block by block, and records each primary
answer's latency as the client sees it. Reported: the medians over rounds of p50 / p95 per tenant, and the
ratio shadowed / plain (1.00 = the shadow adds nothing). The admin API's shadow stats are printed too (sent,
dropped, the shadow's own latency beside the primary's).

Latest figures (2026-11-26, 2 shared CPUs, load average 4-7 from other work): mirrored / not mirrored, client
p50 1.04-1.23 over five runs at 100 %, time in fastroute +0.1-0.5 ms; a control run with nothing mirrored gave
0.98 client p50 and 0.45 on the time in fastroute (the noise floor of this box). Full table: docs/experiments.md.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import localprocs
from localprocs import free_port, wait_http

PY = sys.executable
TOKEN = 'bench-shadow-token'
KEYS = {'plain': 'sk-bench-plain', 'shadowed': 'sk-bench-shadowed'}


def spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    return localprocs.spawn(argv, log, {'FR_BENCH_ADMIN': TOKEN})


def config(primary: int, shadow: int, admin: int, share: float) -> str:
    tenants = '\n'.join(
        f'  {t}: {{keys_sha256: ["{hashlib.sha256(k.encode()).hexdigest()}"]}}' for t, k in KEYS.items()
    )
    return f"""
admin: {{listen: "127.0.0.1:{admin}", token_env: FR_BENCH_ADMIN}}
models:
  small: {{endpoints: ["http://127.0.0.1:{primary}"], upstream_model: phi-3-mini}}
  candidate: {{endpoints: ["http://127.0.0.1:{shadow}"], upstream_model: shadow-model}}
tenants:
{tenants}
routes: [{{name: all, to: small}}]
experiments:
  mirror: {{tenant: shadowed, shadow: {{to: candidate, share: {share:g}, max_in_flight: 64}}}}
"""


async def blast(
    client: httpx.AsyncClient, url: str, tenant: str, n: int, concurrency: int, overhead: list[float] | None = None
) -> list[float]:
    body = {'model': 'small', 'messages': [{'role': 'user', 'content': 'how fast is the primary'}]}
    headers = {'authorization': f'Bearer {KEYS[tenant]}'}
    out: list[float] = []
    left = n

    async def one() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            t = time.perf_counter()
            r = await client.post(url, json=body, headers=headers)
            out.append((time.perf_counter() - t) * 1000)
            if overhead is not None:
                overhead.append(int(r.headers['x-fastroute-overhead-us']) / 1000)
            if r.status_code != 200:
                raise SystemExit(f'{tenant}: {r.status_code} {r.text[:200]}')

    await asyncio.gather(*(one() for _ in range(concurrency)))
    return out


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


async def run(args: argparse.Namespace, url: str) -> dict[str, list[tuple[float, float, float]]]:
    res: dict[str, list[tuple[float, float, float]]] = {'plain': [], 'shadowed': []}
    limits = httpx.Limits(max_connections=args.concurrency * 2)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        await blast(client, url, 'plain', 50, args.concurrency)  # warm up
        await blast(client, url, 'shadowed', 50, args.concurrency)
        for _ in range(args.rounds):
            per: dict[str, list[float]] = {'plain': [], 'shadowed': []}
            over: dict[str, list[float]] = {'plain': [], 'shadowed': []}
            block = max(1, args.requests // 4)
            for b in range(4):  # interleave the tenants in blocks, alternating who goes first, so drift hits both alike
                for tenant in ('plain', 'shadowed') if b % 2 == 0 else ('shadowed', 'plain'):
                    per[tenant] += await blast(client, url, tenant, block, args.concurrency, over[tenant])
            for tenant, xs in per.items():
                res[tenant].append((pct(xs, 0.5), pct(xs, 0.95), pct(over[tenant], 0.5)))
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--requests', type=int, default=400, help='requests per tenant per round (default 400)')
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--concurrency', type=int, default=8)
    p.add_argument('--share', type=float, default=100.0, help='percent of the shadowed tenant mirrored (default 100)')
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix='bench-shadow-'))
    primary, shadow, listen, admin = free_port(), free_port(), free_port(), free_port()
    procs = []
    try:
        mock = [PY, '-m', 'fastroute.cli', 'mock', '--host', '127.0.0.1', '--tps', '0', '--log-level', 'warning']
        procs.append(spawn([*mock, '--port', str(primary), '--model', 'phi-3-mini', '--ttft-ms', '20'], tmp / 'p.log'))
        procs.append(
            spawn(
                [*mock, '--port', str(shadow), '--model', 'shadow-model', '--ttft-ms', '20', '--latency-ms', '60'],
                tmp / 's.log',
            )
        )
        wait_http(f'http://127.0.0.1:{primary}/health')
        wait_http(f'http://127.0.0.1:{shadow}/health')
        cfg = tmp / 'fastroute.yaml'
        cfg.write_text(config(primary, shadow, admin, args.share))
        serve = [PY, '-m', 'fastroute.cli', 'serve', '-c', str(cfg), '--listen', f'127.0.0.1:{listen}']
        procs.append(spawn([*serve, '--log-level', 'warning'], tmp / 'fr.log'))
        wait_http(f'http://127.0.0.1:{listen}/healthz')
        res = asyncio.run(run(args, f'http://127.0.0.1:{listen}/v1/chat/completions'))
        stats = httpx.get(
            f'http://127.0.0.1:{admin}/admin/experiment',
            params={'name': 'mirror'},
            headers={'authorization': f'Bearer {TOKEN}'},
        ).json()['shadow']
    finally:
        localprocs.stop_all(procs)
    load = os.getloadavg()[0]
    print(
        f'\nshadow bench: {args.share:g} % mirrored, {args.rounds} rounds x {args.requests} requests per tenant, '
        f'{args.concurrency} in flight, '
        f'load average {load:.1f}'
    )
    print('| tenant | client p50 ms | client p95 ms | in fastroute p50 ms (x-fastroute-overhead-us) |')
    print('|---|---|---|---|')
    med = {}
    for tenant, rows in res.items():
        med[tenant] = tuple(statistics.median(r[i] for r in rows) for i in range(3))
        print(f'| {tenant} | {med[tenant][0]:.2f} | {med[tenant][1]:.2f} | {med[tenant][2]:.3f} |')
    print(
        f'ratio shadowed / plain: p50 {med["shadowed"][0] / med["plain"][0]:.3f}, '
        f'p95 {med["shadowed"][1] / med["plain"][1]:.3f}, time in fastroute p50 {med["shadowed"][2] / med["plain"][2]:.3f}'
    )
    print(
        f'shadow: sent {stats["sent"]}, dropped {stats["dropped"]} (shed busy {stats["shed_busy"]}), '
        f'errors {stats["errors"]}, '
        f"shadow latency p50 {stats['latency_ms']['p50']} ms beside the primary's {stats['primary_latency_ms']['p50']} ms"
    )
    return 0


if __name__ == '__main__':
    sys.exit(main())
