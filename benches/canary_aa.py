"""A/A canaries through the real gateway: how often does the controller roll back a candidate that is the same?

Run: .venv/bin/python benches/canary_aa.py [--canaries K] [--requests N] [--concurrency C] [--error-rate P]

One `fastroute mock` serves `llama-3-13b` with adapters b0..b{K-1} and c0..c{K-1}, all answering alike, with
`--error-rate` of every request failing with a 500 (so the errors gate sees errors on both sides). One
`fastroute serve` runs K canaries, one per tenant, each baseline bI against candidate cI at 50 %, all five
gates at their default tolerances, alpha 0.05, and a step that never ends (so only the rollback test acts:
the longest exposure to a false rollback). Clients send N requests in total, spread over the tenants and
over distinct users, C in flight. At the end the admin API gives each canary's state: the share rolled back
is the A/A false-rollback rate of this run (bounded by alpha per canary), and the largest evidence reached
on any gate shows how far from the threshold the runs stayed.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import localprocs
from localprocs import free_port, wait_http

PY = sys.executable
TOKEN = 'bench-aa-token'


def spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    return localprocs.spawn(argv, log, {'FR_AA_ADMIN': TOKEN})


def key(i: int) -> str:
    return f'sk-aa-{i}'


def config(k: int, upstream: int, admin: int) -> str:
    adapters = ', '.join([f'b{i}' for i in range(k)] + [f'c{i}' for i in range(k)])
    tenants = '\n'.join(f'  t{i}: {{keys_sha256: ["{hashlib.sha256(key(i).encode()).hexdigest()}"]}}' for i in range(k))
    canaries = '\n'.join(
        f'  aa{i}: {{tenant: t{i}, sticky: header:x-user-id, canary: {{baseline: {{to: large, adapter: b{i}}}, '
        f'candidate: {{to: large, adapter: c{i}}}, steps: [50, 100], min_duration: 1000000, min_samples: 1000000000}}}}'
        for i in range(k)
    )
    return f"""
admin: {{listen: "127.0.0.1:{admin}", token_env: FR_AA_ADMIN}}
models:
  large: {{endpoints: ["http://127.0.0.1:{upstream}"], upstream_model: llama-3-13b, adapters: [{adapters}]}}
tenants:
{tenants}
routes: [{{name: all, to: large}}]
experiments:
{canaries}
"""


async def traffic(url: str, k: int, n: int, concurrency: int) -> dict[int, int]:
    statuses: dict[int, int] = {}
    counter = iter(range(n))

    async def one(client: httpx.AsyncClient) -> None:
        for i in counter:
            t = i % k
            body = {'model': 'large', 'messages': [{'role': 'user', 'content': f'question {i}'}], 'stream': i % 2 == 0}
            headers = {'authorization': f'Bearer {key(t)}', 'x-user-id': f'u{i}'}
            async with client.stream('POST', url, json=body, headers=headers) as r:
                await r.aread()
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=concurrency)) as client:
        await asyncio.gather(*(one(client) for _ in range(concurrency)))
    return statuses


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--canaries', type=int, default=20)
    p.add_argument('--requests', type=int, default=20000, help='in total, over all canaries (default 20000)')
    p.add_argument('--concurrency', type=int, default=16)
    p.add_argument('--error-rate', type=float, default=0.03)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix='canary-aa-'))
    upstream, listen, admin = free_port(), free_port(), free_port()
    adapters = ','.join([f'b{i}' for i in range(args.canaries)] + [f'c{i}' for i in range(args.canaries)])
    procs = []
    t0 = time.monotonic()
    try:
        mock = [PY, '-m', 'fastroute.cli', 'mock', '--host', '127.0.0.1', '--port', str(upstream)]
        mock += ['--model', 'llama-3-13b', '--adapters', adapters, '--ttft-ms', '5', '--tps', '2000']
        mock += ['--error-rate', str(args.error_rate), '--log-level', 'warning', '--seed', '7']
        procs.append(spawn(mock, tmp / 'mock.log'))
        wait_http(f'http://127.0.0.1:{upstream}/health')
        cfg = tmp / 'fastroute.yaml'
        cfg.write_text(config(args.canaries, upstream, admin))
        serve = [PY, '-m', 'fastroute.cli', 'serve', '-c', str(cfg), '--listen', f'127.0.0.1:{listen}']
        procs.append(spawn([*serve, '--log-level', 'warning'], tmp / 'fr.log'))
        wait_http(f'http://127.0.0.1:{listen}/healthz')
        statuses = asyncio.run(
            traffic(f'http://127.0.0.1:{listen}/v1/chat/completions', args.canaries, args.requests, args.concurrency)
        )
        time.sleep(1.0)  # one more look of the controller
        view = httpx.get(
            f'http://127.0.0.1:{admin}/admin/experiments', headers={'authorization': f'Bearer {TOKEN}'}
        ).json()
    finally:
        localprocs.stop_all(procs)
    exps = view['experiments']
    rolled = [e for e in exps if e['state']['status'] == 'rolled_back']
    max_evidence: dict[str, float] = {}
    for e in exps:
        gates = (e['canary'].get('last_look') or {}).get('gates') or {}
        for g, r in gates.items():
            max_evidence[g] = max(max_evidence.get(g, 0.0), r['evidence_worse'])
    threshold = next(iter(exps[0]['canary']['last_look']['gates'].values()))['rollback_at'] if exps else None
    print(
        f'\nA/A through the gateway: {len(exps)} canaries, {args.requests} requests ({statuses}), '
        f'{time.monotonic() - t0:.0f}s, load average {os.getloadavg()[0]:.1f}'
    )
    print(f'rolled back: {len(rolled)} of {len(exps)} ({", ".join(e["name"] for e in rolled) or "none"})')
    for e in rolled:
        print(f'  {e["name"]}: {e["state"]["reason"]}')
    print(f'largest evidence per gate at the end (rollback at {threshold}): {max_evidence}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
