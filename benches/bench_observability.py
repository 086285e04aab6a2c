"""What metrics, cost accounting, the access log and tenant limits cost per request, in one run.

Run: .venv/bin/python benches/bench_observability.py [--rounds N] [--seconds S] [--no-pin] [--no-redis]

Same nginx upstream (a fixed chat completion with usage, benches/nginx) and the same generated config as
bench_overhead.py (50 routes, 10k tenant keys, body rewrite), one fastroute worker per variant:
  (a) off        `metrics: {enabled: false}`, no access log: the baseline
  (b) metrics    Prometheus metrics, prices and `spend.reference` (cost, saving), usage read from each answer
  (c) + log      (b) and the JSONL access log to a file
  (d) + limits   (c) and a per-tenant limit (requests per minute, never reached) on the caller, in process
  (e) + redis    (d) with the limits on a real local redis-server (one Lua call per request)
Each variant: wrk -t1 -c32 for S seconds (max req/s) and the CPU time of the fastroute process per request,
variants interleaved, `--rounds` times; medians. "Added" is a variant's CPU µs/request minus (a)'s in the same
run: the price of the feature per request. Also, in process: the admit and record steps alone for (a)-(d), CPU
time per request (precise where the end-to-end figures carry the noise of a shared machine).
CPU sharing (default): fastroute on CPU 0; wrk, nginx and redis on CPU 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / 'nginx'))

import nginxctl  # noqa: E402
from bench_overhead import (  # noqa: E402
    BENCH_KEY,
    CHAT_PATH,
    Procs,
    check_answer,
    fastroute_config,
    med,
    mkdir,
    run_wrk,
    spawn,
    start_fastroute,
    tree_cpu_seconds,
    wrk_script,
)

VARIANTS = [
    ('a', 'off (no metrics, no log)'),
    ('b', 'metrics + cost'),
    ('c', 'metrics + cost + access log'),
    ('d', '+ tenant limit (in process)'),
    ('e', '+ tenant limit (Redis)'),
]


def variant_config(key: str, port: int, up_port: int, up_sse: int, tmp: Path, redis_url: str | None) -> str:
    cfg = json.loads(fastroute_config(port, up_port, up_sse, None, 'slow-m'))
    for m in cfg['models'].values():
        m['price'] = {'input_per_1k': 0.0005, 'output_per_1k': 0.0015}
    if key == 'a':
        cfg['metrics'] = {'enabled': False}
        return json.dumps(cfg)
    cfg['spend'] = {'reference': 'chat'}
    if key in 'cde':
        cfg['access_log'] = {'path': str(tmp / f'access-{key}.jsonl')}
    if key in 'de':
        cfg['tenants']['tenant-7']['limits'] = {'requests_per_minute': 10**9, 'tokens_per_minute': 10**12}
    if key == 'e':
        cfg['redis'] = {'url': redis_url, 'timeout': 1.0}
    return json.dumps(cfg)


def inprocess_breakdown(n: int = 20000) -> dict[str, float]:
    """CPU µs per request of the observability steps alone, in process (no network, no server): a decided
    request is admitted (when limited) and recorded as a finished non-streamed answer, `n` times; best of 3.
    The same loop with everything off is the baseline subtracted."""
    import asyncio
    from types import SimpleNamespace

    from fastroute.gateway import Ctx, load_snapshot
    from fastroute.observe import admit

    tmp = Path(tempfile.mkdtemp(prefix='fr-obs-micro-'))
    headers = {'authorization': f'Bearer {BENCH_KEY}', 'content-type': 'application/json'}
    scope = SimpleNamespace(path=CHAT_PATH, method='POST', headers=headers)

    def snap_for(key: str):  # the same configs as the servers, minus Redis
        cfg = tmp / f'{key}.yaml'
        cfg.write_text(variant_config(key, 1, 2, 3, tmp, None))
        return load_snapshot(str(cfg))

    async def run(snap) -> float:
        d = snap.router.decide('POST', CHAT_PATH, headers, nginxctl.REQUEST_BODY)
        pool = snap.pools[d.pool]
        best = float('inf')
        for _ in range(3):
            t = time.process_time()
            for _ in range(n):
                ctx = Ctx(snap, scope, None, time.perf_counter_ns(), 'fr-x-1', CHAT_PATH)
                ctx.decision, ctx.pool = d, pool
                if d.tenant in snap.obs.limits and not await admit(ctx, d):
                    raise SystemExit('refused by a limit that should never be reached')
                ctx.endpoint, ctx.status, ctx.attempts = pool.endpoints[0], 200, 1
                ctx.resp_body = nginxctl.CHAT_BODY
                snap.obs.record(ctx)
            best = min(best, (time.process_time() - t) / n * 1e6)  # CPU of every thread (the log writer too)
            await asyncio.sleep(1.2)  # the log writer and the metrics flush run in between
        return best

    async def all_variants() -> dict[str, float]:
        return {key: await run(snap_for(key)) for key in 'abcd'}

    import uvloop

    out = uvloop.run(all_variants())
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--rounds', type=int, default=3)
    ap.add_argument('--seconds', type=float, default=5.0)
    ap.add_argument('--no-pin', action='store_true')
    ap.add_argument('--no-redis', action='store_true')
    args = ap.parse_args()
    pin = not args.no_pin and nginxctl.cpu_count() >= 2
    cpu_proxy, cpu_load = ('0', '1') if pin else (None, None)
    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix='fr-obs-bench-'))
    load_before = os.getloadavg()[0]
    try:
        up, up_port, up_sse = nginxctl.start_upstream(mkdir(tmp / 'upstream'), cpus=cpu_load)
        procs.add(up)
        redis_url = None
        redis_exe = shutil.which('redis-server')
        variants = VARIANTS if (redis_exe and not args.no_redis) else VARIANTS[:-1]
        if len(variants) == len(VARIANTS):
            rport = nginxctl.free_port()
            cmd = [redis_exe, '--port', str(rport), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no']
            spawn(procs, cmd, cpu_load, tmp / 'redis.log')
            nginxctl.wait_port(rport, timeout=10)
            redis_url = f'redis://127.0.0.1:{rport}/0'
        ports: dict[str, tuple[int, int]] = {}
        for key, _label in variants:
            port = nginxctl.free_port()
            cfg = variant_config(key, port, up_port, up_sse, tmp, redis_url)
            proc, port = start_fastroute(procs, tmp, cpu_proxy, cfg, port, key, 'native')
            problem = check_answer(port, nginxctl.REQUEST_BODY, nginxctl.CHAT_BODY)
            if problem:
                raise SystemExit(f'({key}): {problem}')
            ports[key] = (port, proc.pid)
        script = wrk_script(tmp / 'post.lua', nginxctl.REQUEST_BODY)
        for port, _ in ports.values():  # warm up
            run_wrk(f'http://127.0.0.1:{port}{CHAT_PATH}', script, 1, 32, cpu_load)
        rows: dict[str, list[tuple[float, float]]] = {k: [] for k, _ in variants}
        for r in range(args.rounds):
            for key, _label in variants:
                port, pid = ports[key]
                c0 = tree_cpu_seconds(pid)
                res = run_wrk(f'http://127.0.0.1:{port}{CHAT_PATH}', script, args.seconds, 32, cpu_load)
                c1 = tree_cpu_seconds(pid)
                n = res['rps'] * args.seconds
                rows[key].append((res['rps'], (c1 - c0) / n * 1e6 if n else float('nan')))
                print(
                    f'# round {r + 1} ({key}) {res["rps"]:,.0f} req/s, {rows[key][-1][1]:.1f} CPU us/req',
                    file=sys.stderr,
                )
        micro = inprocess_breakdown()
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    base_cpu = med([c for _, c in rows['a']])
    base_rps = med([r for r, _ in rows['a']])
    lines = [
        f'bench_observability: {args.rounds} rounds x {args.seconds:g} s, wrk -t1 -c32, one native worker'
        f'{", pinned (fastroute CPU 0; wrk, nginx, redis CPU 1)" if pin else ", not pinned"};'
        f' load average before {load_before:.1f}',
        '',
        '| variant | max req/s | CPU µs/request | added CPU µs/request | req/s vs off |',
        '|---|---:|---:|---:|---:|',
    ]
    for key, label in variants:
        rps = med([r for r, _ in rows[key]])
        cpu = med([c for _, c in rows[key]])
        added = '–' if key == 'a' else f'{cpu - base_cpu:+.1f}'
        lines.append(f'| ({key}) {label} | {rps:,.0f} | {cpu:.1f} | {added} | {rps / base_rps:.2f}x |')
    lines += [
        '',
        'In process, the observability steps alone (admit + record of a finished request; CPU µs/request):',
        '',
    ]
    lines += ['| variant | CPU µs/request | added |', '|---|---:|---:|']
    for key, label in variants[:4]:
        added = '–' if key == 'a' else f'{micro[key] - micro["a"]:+.2f}'
        lines.append(f'| ({key}) {label} | {micro[key]:.2f} | {added} |')
    print('\n'.join(lines))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
