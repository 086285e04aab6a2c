"""End-to-end proxy overhead: direct vs nginx vs a minimal Python proxy vs fastroute, in one run.

Run: .venv/bin/python benches/bench_overhead.py [--quick] [--no-pin] [--rounds N] [--skip-fastroute]
     [--servers native,granian]
     (`make bench-overhead`)

Same load generators against the same upstream for every target:
  upstream  nginx (benches/nginx/upstream.conf.template): a fixed 557-byte chat completion on one port and a
            fixed 21-event SSE stream (3.8 KB) on another; `worker_processes 1`.
  (a) direct       the load generator straight to the upstream
  (b) nginx        nginx as a plain reverse proxy, keep-alive upstream pool (benches/nginx/proxy.conf.template)
  (c) minimal      benches/minimal_proxy.py, aiohttp server + client, no logic (the floor of a naive Python proxy)
  (d) fastroute    `fastroute serve --workers 1` (one per --servers entry: (d), (e), ...) with a
                   generated config: 50 routes (the matching ones last),
                   100 tenants with 10,000 keys (keys_sha256), the model rewritten to upstream_model
Measured per target, each `--rounds` times (default 3, targets interleaved), medians reported:
  max req/s       wrk -t1 -c32 (POST with a Lua script), JSON and SSE answers
  p50 @1          oha, 1 request in flight
  p50/p99 @1k     oha at a fixed 1,000 req/s (-q 1000 --latency-correction), 32 connections, in `--slices`
                  slices of 5 s per target (default 8) after the rounds above, the targets' order rotated
                  each slice; every request's latency is kept (oha's CSV output; the first 0.5 s of each
                  slice, while connections open, left out) and the percentiles are of all of them pooled
  added           target minus direct at the same percentile, and fastroute's added / nginx's added
Streaming check: an SSE upstream that sends its head at once, the first event after 100 ms and then one every
20 ms (`fastroute mock --ttft-ms 100 --tps 50`, or a built-in aiohttp server when the mock is not available);
time to first event and the gaps between events, direct and through each proxy (a raw-socket reader, so no
client buffering).
CPU sharing (default): the proxy under test on CPU 0; wrk/oha and the upstream nginx on CPU 1 (`taskset`).
`--no-pin` leaves everything to the scheduler. Output: a markdown table, printed and written to
bench-results/overhead-<timestamp>.md.

--profile: fastroute alone, same upstream and config: CPU time of the worker per request (oha -n N -c 8),
with --strace its system calls per request, with --callgrind instructions per request under callgrind (1 in
flight; independent of the machine's load). --set KEY=JSON changes the generated config.

Latest figures (2026-11-26 16:23-16:33, two full runs, pinned, load average 0.4-1.0, Debian's CPython 3.11 and the
gateway's fast lane; all figures and the runs before: benches/README.md):

  target            req/s JSON     CPU us/req JSON  req/s SSE      CPU us/req SSE  p50 @1       p50 @1k
  (a) direct        43,434/41,490  12/12            39,242/45,502  13/11           0.042/0.036  0.134/0.127
  (b) nginx proxy   33,026/28,068  28/35            29,640/28,940  31/34           0.125/0.122  0.255/0.247
  (c) minimal       3,240/2,700    308/369          2,481/2,728    400/367         0.524/0.467  0.749/0.708
  (d) fastroute     11,371/12,937  88/77            9,545/10,737   104/93          0.180/0.200  0.341/0.331
  fastroute added / nginx added: p50 @1 1.7x/1.9x, p50 @1k 1.7x/1.7x. p99 @1k was several ms for every proxy pinned
  to CPU 0 in both runs (direct, on CPU 1, 0.34-0.37 ms): CPU 0 stalled, so no p99 verdict from them; the last clean
  run (15:28, before the lane) gave p99 @1k 2.8x.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import functools
import hashlib
import io
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / 'nginx'))

import nginxctl  # noqa: E402

PY = sys.executable
VENV_BIN = Path(sys.executable).parent
FASTROUTE = shutil.which('fastroute', path=str(VENV_BIN)) or shutil.which('fastroute')
WRK = shutil.which('wrk')
STRACE = shutil.which('strace')
CALLGRIND_CONTROL = shutil.which('callgrind_control')
OHA = shutil.which('oha') or next(
    (str(p) for p in (Path.home() / '.cargo/bin/oha', Path('/tmp/oha-target/release/oha')) if p.exists()), None
)

BENCH_KEY = 'sk-bench-tenant-7-key-42'  # one of the generated tenant keys
N_TENANTS, KEYS_PER_TENANT, N_ROUTES = 100, 100, 50
CHAT_PATH = '/v1/chat/completions'
HEADERS = {'content-type': 'application/json', 'authorization': f'Bearer {BENCH_KEY}'}


# ---------------------------------------------------------------------------------------------- processes


class Procs:
    """Every process started here, stopped in reverse order at exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def add(self, proc: subprocess.Popen) -> subprocess.Popen:
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                if proc_is_group(proc):
                    os.killpg(proc.pid, signal.SIGTERM)
                else:
                    proc.terminate()
            try:
                proc.wait(8)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    if proc_is_group(proc):
                        os.killpg(proc.pid, signal.SIGKILL)
                    else:
                        proc.kill()
                proc.wait()

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)


def proc_is_group(proc: subprocess.Popen) -> bool:
    return getattr(proc, '_own_group', False)


def spawn(
    procs: Procs, cmd: list[str], cpus: str | None, log: Path, group: bool = False, env: dict | None = None
) -> subprocess.Popen:
    if cpus:
        cmd = ['taskset', '-c', cpus, *cmd]
    with open(log, 'wb') as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=group, env=env)
    proc._own_group = group  # type: ignore[attr-defined]
    return procs.add(proc)


# ---------------------------------------------------------------------------------------------- fastroute config


def tenant_key(t: int, k: int) -> str:
    return f'sk-bench-tenant-{t}-key-{k}'


def fastroute_config(listen_port: int, chat_port: int, sse_port: int, slow_port: int | None, slow_model: str) -> str:
    """A config with real routing on: 50 routes (the ones these requests match come last), 10k tenant keys."""
    models = {
        'chat': {'endpoints': [f'http://127.0.0.1:{chat_port}'], 'upstream_model': 'llama-3-13b'},
        'chat-stream': {'endpoints': [f'http://127.0.0.1:{sse_port}'], 'upstream_model': 'llama-3-13b'},
        'small': {'endpoints': [f'http://127.0.0.1:{chat_port}'], 'upstream_model': 'phi-3-mini'},
    }
    if slow_port:
        models['slow'] = {'endpoints': [f'http://127.0.0.1:{slow_port}'], 'upstream_model': slow_model}
    tenants = {}
    for t in range(N_TENANTS):
        digests = [hashlib.sha256(tenant_key(t, k).encode()).hexdigest() for k in range(KEYS_PER_TENANT)]
        tenants[f'tenant-{t}'] = {'keys_sha256': digests}
    routes: list[dict] = []
    kinds = ('path', 'header', 'model', 'tokens', 'metadata', 'tenant')
    i = 0
    while len(routes) < N_ROUTES - 3:
        kind = kinds[i % len(kinds)]
        name = f'r{i:02d}-{kind}'
        if kind == 'path':
            match = {'path': f'/v1/tasks/task-{i}'}
        elif kind == 'header':
            match = {'headers': {'x-department': f'dept-{i}'}}
        elif kind == 'model':
            match = {'model': [f'never-{i}-*', f'legacy-{i}']}
        elif kind == 'tokens':
            match = {'input_tokens': {'gt': 100_000 + i}}
        elif kind == 'metadata':
            match = {'metadata': {'team': f'team-{i}'}}
        else:
            match = {'all': [{'tenant': f'tenant-{(i * 7) % N_TENANTS}'}, {'headers': {'x-priority': 'batch'}}]}
        routes.append({'name': name, 'match': match, 'to': 'small'})
        i += 1
    if slow_port:
        routes.append({'name': 'slow-stream', 'match': {'model': 'slow-*'}, 'to': 'slow'})
    else:
        routes.append({'name': 'slow-stream', 'match': {'model': 'slow-*'}, 'to': 'small'})
    routes.append({'name': 'streaming', 'match': {'stream': True}, 'to': 'chat-stream'})
    routes.append({'name': 'chat', 'match': {'path': CHAT_PATH}, 'to': 'chat'})
    assert len(routes) == N_ROUTES
    cfg = {
        'server': {'listen': f'127.0.0.1:{listen_port}', 'workers': 1},
        'models': models,
        'tenants': tenants,
        'routes': routes,
    }
    return json.dumps(cfg)  # JSON is YAML


# ---------------------------------------------------------------------------------------------- load generators


def wrk_script(path: Path, body: bytes) -> Path:
    lua = ['wrk.method = "POST"', f'wrk.body = {json.dumps(body.decode())}']
    lua += [f'wrk.headers["{k}"] = "{v}"' for k, v in HEADERS.items()]
    path.write_text('\n'.join(lua) + '\n')
    return path


def run_wrk(url: str, script: Path, seconds: float, conns: int, cpus: str | None) -> dict:
    cmd = [WRK, '-t1', f'-c{conns}', f'-d{seconds:g}s', '-s', str(script), url]
    if cpus:
        cmd = ['taskset', '-c', cpus, *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30).stdout
    m = re.search(r'Requests/sec:\s+([\d.]+)', out)
    bad = re.search(r'Non-2xx or 3xx responses:\s+(\d+)', out)
    errs = re.search(r'Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)', out)
    return {
        'rps': float(m.group(1)) if m else float('nan'),
        'non2xx': int(bad.group(1)) if bad else 0,
        'socket_errors': sum(int(x) for x in errs.groups()) if errs else 0,
    }


def run_oha(url: str, body_file: Path, cpus: str | None, *, rate: int | None, seconds: float, n: int, conns: int):
    cmd = [OHA, '--no-tui', '--output-format', 'json', '-m', 'POST', '-D', str(body_file)]
    for k, v in HEADERS.items():
        cmd += ['-H', f'{k}: {v}']
    if rate:
        cmd += ['-q', str(rate), '-z', f'{seconds:g}s', '-c', str(conns), '--latency-correction']
    else:
        cmd += ['-n', str(n), '-c', str(conns)]
    cmd.append(url)
    if cpus:
        cmd = ['taskset', '-c', cpus, *cmd]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if res.returncode != 0:
        raise RuntimeError(f'oha failed: {res.stderr[-500:]}')
    data = json.loads(res.stdout)
    pct = data['latencyPercentiles']
    codes = data.get('statusCodeDistribution', {})
    errors = {f'status {k}': v for k, v in codes.items() if not k.startswith('2')}
    # requests still in flight when -z ends are cut off by oha itself: not errors of the target
    errors.update({k: v for k, v in data.get('errorDistribution', {}).items() if 'deadline' not in k})
    if errors:
        print(f'#   oha errors at {url}: {errors}', file=sys.stderr)
    return {
        'p50_ms': pct['p50'] * 1e3,
        'p99_ms': pct['p99'] * 1e3,
        'rps': data['summary']['requestsPerSec'],
        'errors': sum(errors.values()),
    }


def run_oha_latencies(
    url: str, body_file: Path, cpus: str | None, *, rate: int, seconds: float, conns: int, skip_s: float
) -> tuple[list[float], int]:
    """Every request's latency (ms, corrected for coordinated omission) at a fixed rate, from oha's CSV output;
    requests that started in the first `skip_s` seconds (connection set-up) are left out. Returns (latencies,
    errors)."""
    cmd = [OHA, '--no-tui', '--output-format', 'csv', '-m', 'POST', '-D', str(body_file)]
    for k, v in HEADERS.items():
        cmd += ['-H', f'{k}: {v}']
    cmd += ['-q', str(rate), '-z', f'{seconds:g}s', '-c', str(conns), '--latency-correction', url]
    if cpus:
        cmd = ['taskset', '-c', cpus, *cmd]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if res.returncode != 0:
        raise RuntimeError(f'oha failed: {res.stderr[-500:]}')
    lat, errors = [], 0
    for row in csv.DictReader(io.StringIO(res.stdout)):
        if not row['status'].startswith('2'):
            errors += 1
        elif float(row['request-start']) >= skip_s:
            lat.append(float(row['request-duration']) * 1e3)
    return lat, errors


def percentile(xs: list[float], q: float) -> float:
    """The q-quantile (0..1) of xs by the nearest-rank method; nan for no samples."""
    if not xs:
        return float('nan')
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


# ---------------------------------------------------------------------------------------------- streaming check


async def read_stream(port: int, body: bytes) -> tuple[float, float, list[float]]:
    """POST over a raw socket; (time to response head, time to first event, event arrival times) in ms."""
    reader, writer = await asyncio.open_connection('127.0.0.1', port)
    head = (
        f'POST {CHAT_PATH} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n'
        f'authorization: Bearer {BENCH_KEY}\r\ncontent-length: {len(body)}\r\n\r\n'
    ).encode()
    t0 = time.perf_counter()
    writer.write(head + body)
    await writer.drain()
    buf = await reader.readuntil(b'\r\n\r\n')
    t_head = (time.perf_counter() - t0) * 1e3
    if not buf.startswith(b'HTTP/1.1 200'):
        writer.close()
        status_line = buf.split(b'\r\n')[0]
        raise RuntimeError(f'status line {status_line!r}')
    events: list[float] = []
    seen = 0
    data = b''
    while True:
        chunk = await asyncio.wait_for(reader.read(65536), 10)
        if not chunk:
            break
        now = (time.perf_counter() - t0) * 1e3
        data += chunk
        n = data.count(b'data: ')
        events += [now] * (n - seen)
        seen = n
        if b'[DONE]' in data:
            break
    writer.close()
    return t_head, events[0] if events else float('nan'), events


async def sse_server(port: int, ttft_ms: float, gap_ms: float, n: int) -> None:
    """Built-in slow SSE upstream (used when `fastroute mock` is not available)."""
    from aiohttp import web

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={'content-type': 'text/event-stream'})
        await resp.prepare(request)
        await asyncio.sleep(ttft_ms / 1e3)
        for i in range(n):
            if i:
                await asyncio.sleep(gap_ms / 1e3)
            await resp.write(nginxctl.SSE_CHUNKS[i % (len(nginxctl.SSE_CHUNKS) - 1)])
        await resp.write(b'data: [DONE]\n\n')
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_route('*', '/{tail:.*}', handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, '127.0.0.1', port).start()
    await asyncio.Event().wait()


# ---------------------------------------------------------------------------------------------- the run


class Target:
    def __init__(self, key: str, label: str, port: int, sse_port: int, slow_port: int | None) -> None:
        self.key, self.label, self.port, self.sse_port, self.slow_port = key, label, port, sse_port, slow_port
        self.rows: list[dict] = []
        self.stream: dict | None = None
        self.latencies: list[float] = []  # every request at the fixed rate, ms, all slices
        self.slice_p99: list[float] = []
        self.pids: dict[int, int] = {}  # port -> root pid of the process tree serving it (for CPU accounting)


CLK_TCK = os.sysconf('SC_CLK_TCK')
SLICE_SKIP_S = 0.5  # each latency slice's first requests wait for the connections to open: left out


def tree_cpu_seconds(root: int | None) -> float:
    """utime + stime of a process and all its descendants, from /proc."""
    if root is None:
        return float('nan')
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.scandir('/proc'):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, 'stat').read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(')') + 2 :].split()
        stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK)
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][1]
        todo += children.get(pid, [])
    return total


def wrk_with_cpu(t: Target, port: int, script: Path, seconds: float, cpus: str | None) -> dict:
    root = t.pids.get(port)
    c0 = tree_cpu_seconds(root)
    res = run_wrk(f'http://127.0.0.1:{port}{CHAT_PATH}', script, seconds, 32, cpus)
    c1 = tree_cpu_seconds(root)
    n = res['rps'] * seconds
    res['cpu_us'] = (c1 - c0) / n * 1e6 if n else float('nan')
    return res


def med(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float('nan')


def check_answer(port: int, body: bytes, expect: bytes) -> str | None:
    import urllib.request

    req = urllib.request.Request(f'http://127.0.0.1:{port}{CHAT_PATH}', data=body, headers=HEADERS, method='POST')
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            got = resp.read()
    except Exception as e:
        return f'{type(e).__name__}: {e}'
    return None if got == expect else f'unexpected answer ({len(got)} bytes): {got[:200]!r}'


def start_fastroute(procs: Procs, tmp: Path, cpus: str | None, cfg_text: str, port: int, label: str, server: str):
    cfg = tmp / f'fastroute-{label}.yaml'
    cfg.write_text(cfg_text)
    cmd = [FASTROUTE, 'serve', '-c', str(cfg), '--listen', f'127.0.0.1:{port}', '--workers', '1']
    cmd += ['--log-level', 'warning', '--server', server]
    env = {**os.environ, 'FASTROUTE_SERVER': server}
    proc = spawn(procs, cmd, cpus, tmp / f'fastroute-{label}.log', group=True, env=env)
    nginxctl.wait_port(port, timeout=30, proc=proc)
    return proc, port


def start_slow_upstream(procs: Procs, tmp: Path, cpus: str | None, use_mock: bool) -> tuple[int, str, str]:
    """The delayed SSE upstream: `fastroute mock` if it runs, else the built-in server. (port, model, kind)."""
    port = nginxctl.free_port()
    if use_mock and FASTROUTE:
        cmd = [FASTROUTE, 'mock', '--port', str(port), '--model', 'slow-m', '--ttft-ms', '100', '--tps', '50']
        cmd += ['--max-output-tokens', '20']
        proc = spawn(procs, cmd, cpus, tmp / 'mock.log', group=True)
        try:
            nginxctl.wait_port(port, timeout=20, proc=proc)
            return port, 'slow-m', 'fastroute mock --ttft-ms 100 --tps 50'
        except (RuntimeError, TimeoutError):
            procs.stop(proc)
            port = nginxctl.free_port()
    cmd = [PY, __file__, '--sse-upstream', str(port)]
    proc = spawn(procs, cmd, cpus, tmp / 'sse-upstream.log')
    nginxctl.wait_port(port, timeout=20, proc=proc)
    return port, 'slow-m', 'built-in aiohttp SSE server (head at once, first event at 100 ms, then every 20 ms)'


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), from /proc."""
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of one process (all its threads), from /proc."""
    raw = Path(f'/proc/{pid}/stat').read_text()
    fields = raw[raw.rindex(')') + 2 :].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def strace_counts(pid: int, run) -> dict[str, int]:
    """System calls of `pid` (all its threads) while `run()` runs: {name: calls}."""
    out = tempfile.NamedTemporaryFile(suffix='.strace', delete=False)
    out.close()
    tracer = subprocess.Popen(
        [STRACE, '-c', '-f', '-o', out.name, '-p', str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    time.sleep(0.5)
    try:
        run()
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(10)
    calls: dict[str, int] = {}
    for line in Path(out.name).read_text().splitlines():
        f = line.split()
        if len(f) >= 5 and f[0][0].isdigit() and not line.lstrip().startswith('-'):
            with contextlib.suppress(ValueError):
                calls[f[-1]] = int(f[3])
    os.unlink(out.name)
    return calls


def callgrind_total(pid: int, out_glob: Path) -> float:
    """Dump `pid`'s callgrind counters now and return the instructions counted since the last zeroing."""
    before = set(out_glob.parent.glob(out_glob.name))
    subprocess.run([CALLGRIND_CONTROL, '-d', str(pid)], capture_output=True, timeout=120, check=True)
    new = sorted(set(out_glob.parent.glob(out_glob.name)) - before, key=lambda p: p.stat().st_mtime)
    if not new:
        raise RuntimeError('callgrind wrote no dump')
    for line in new[-1].read_text(errors='replace').splitlines():
        if line.startswith(('summary:', 'totals:')):
            return float(line.split()[1])
    raise RuntimeError(f'no totals in {new[-1]}')


def callgrind_profile(args: argparse.Namespace, tmp: Path, cfg: dict, up_cpus: str | None) -> list[dict]:
    """fastroute under callgrind: instructions per request, N requests minus an idle stretch of the same length.
    Instruction counts do not depend on the load of the machine."""
    port = cfg['server']['listen'].rsplit(':', 1)[1]
    cfg_path = tmp / 'fastroute-callgrind.yaml'
    cfg_path.write_text(json.dumps(cfg))
    out = tmp / 'cg.out.%p'
    cmd = ['valgrind', '--tool=callgrind', f'--callgrind-out-file={out}', FASTROUTE, 'serve', '-c', str(cfg_path)]
    cmd += ['--workers', '1', '--log-level', 'warning', '--server', args.servers.split(',')[0]]
    with open(tmp / 'callgrind.log', 'wb') as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    rows = []
    try:
        nginxctl.wait_port(int(port), timeout=300, proc=proc)
        url = f'http://127.0.0.1:{port}{CHAT_PATH}'
        pattern = tmp / f'cg.out.{proc.pid}*'
        n = args.requests
        for kind, body in (('JSON', nginxctl.REQUEST_BODY), ('SSE', nginxctl.STREAM_REQUEST_BODY)):
            body_file = tmp / f'cg-{kind}.json'
            body_file.write_bytes(body)
            run_oha(url, body_file, up_cpus, rate=None, seconds=600, n=200, conns=1)  # warm-up
            for rnd in range(args.rounds or 3):
                subprocess.run([CALLGRIND_CONTROL, '-z', str(proc.pid)], capture_output=True, timeout=120, check=True)
                t0 = time.monotonic()
                res = run_oha(url, body_file, up_cpus, rate=None, seconds=1200, n=n, conns=1)
                busy_s = time.monotonic() - t0
                total = callgrind_total(proc.pid, pattern)
                subprocess.run([CALLGRIND_CONTROL, '-z', str(proc.pid)], capture_output=True, timeout=120, check=True)
                time.sleep(min(busy_s, 10.0))
                idle = callgrind_total(proc.pid, pattern) * busy_s / min(busy_s, 10.0)
                row = {'kind': kind, 'instr': (total - idle) / n, 'idle': idle / n, 'errors': res['errors']}
                rows.append(row)
                print(
                    f'# callgrind {kind} round {rnd + 1}: {row["instr"]:,.0f} instructions/req '
                    f'(idle {row["idle"]:,.0f}/req subtracted), {row["errors"]} errors',
                    file=sys.stderr,
                )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return rows


def profile(args: argparse.Namespace) -> int:
    """`--profile`: fastroute alone, same upstream and config as the full run, one answer kind at a time (JSON,
    SSE). CPU time of the worker per request over a fixed number of requests (oha -n N -c 8); with `--strace`,
    its system calls per request; with `--callgrind`, instructions per request under callgrind (1 in flight;
    N requests minus an idle stretch as long), which do not move with the load of the machine, so they compare
    one change with another where time cannot."""
    tools = (('nginx', nginxctl.NGINX), ('oha', OHA), ('fastroute', FASTROUTE))
    missing = [n for n, p in tools if not p]
    if args.strace and not STRACE:
        missing.append('strace')
    if args.callgrind and not CALLGRIND_CONTROL:
        missing.append('valgrind')
    if missing:
        print(f'missing: {", ".join(missing)}', file=sys.stderr)
        return 2
    pin = not args.no_pin and nginxctl.cpu_count() >= 2
    cpu_proxy, cpu_load = ('0', '1') if pin else (None, None)
    n = args.requests
    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix='fr-profile-'))
    rows: list[dict] = []
    cg_rows: list[dict] = []
    syscalls: dict[str, str] = {}
    try:
        up, up_port, up_sse = nginxctl.start_upstream(mkdir(tmp / 'upstream'), cpus=cpu_load)
        procs.add(up)
        port = nginxctl.free_port()
        cfg = json.loads(fastroute_config(port, up_port, up_sse, None, 'slow-m'))
        for extra in args.config_set or []:
            key, _, value = extra.partition('=')
            node = cfg
            *path, last = key.split('.')
            for k in path:
                node = node.setdefault(k, {})
            node[last] = json.loads(value)
        if args.callgrind:
            cfg['server']['listen'] = f'127.0.0.1:{port}'
            cg_rows = callgrind_profile(args, tmp, cfg, cpu_load)
        else:
            server = args.servers.split(',')[0]
            proc, port = start_fastroute(procs, tmp, cpu_proxy, json.dumps(cfg), port, 'profile', server)
            problem = check_answer(port, nginxctl.REQUEST_BODY, nginxctl.CHAT_BODY)
            if problem:
                raise SystemExit(f'fastroute: {problem}')
            worker = proc.pid
            url = f'http://127.0.0.1:{port}{CHAT_PATH}'
            for kind, body in (('JSON', nginxctl.REQUEST_BODY), ('SSE', nginxctl.STREAM_REQUEST_BODY)):
                body_file = tmp / f'{kind}.json'
                body_file.write_bytes(body)
                run_oha(url, body_file, cpu_load, rate=None, seconds=60, n=2000, conns=8)  # warm-up
                for rnd in range(args.rounds or 3):
                    u0, s0 = cpu_split(worker)
                    res = run_oha(url, body_file, cpu_load, rate=None, seconds=120, n=n, conns=8)
                    u1, s1 = cpu_split(worker)
                    row = {
                        'kind': kind,
                        'cpu_us': (u1 - u0 + s1 - s0) * 1e6 / n,
                        'user_us': (u1 - u0) * 1e6 / n,
                        'sys_us': (s1 - s0) * 1e6 / n,
                        'rps': res['rps'],
                    }
                    rows.append(row)
                    print(
                        f'# {kind} round {rnd + 1}: {row["cpu_us"]:.1f} CPU µs/req (user {row["user_us"]:.1f}, '
                        f'system {row["sys_us"]:.1f}), {row["rps"]:,.0f} req/s, {res["errors"]} errors',
                        file=sys.stderr,
                    )
                if args.strace:
                    m = max(n // 4, 1)
                    load = functools.partial(run_oha, url, body_file, cpu_load, rate=None, seconds=120, n=m, conns=8)
                    calls = strace_counts(worker, load)
                    top = sorted(calls.items(), key=lambda kv: -kv[1])
                    syscalls[kind] = ', '.join(f'{k} {v / m:.2f}' for k, v in top if k != 'total' and v / m >= 0.01)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f'fastroute worker per request, {args.rounds or 3} round(s), medians (load average {os.getloadavg()[0]:.1f}):'
    )
    print()
    print(
        f'| answer | CPU µs/req (oha -c 8, n={n:,}) | of it user / system | req/s '
        '| instructions/req (callgrind, 1 in flight) |'
    )
    print('|---|---:|---:|---:|---:|')
    for kind in ('JSON', 'SSE'):
        rs = [r for r in rows if r['kind'] == kind]
        cg = [r['instr'] for r in cg_rows if r['kind'] == kind]
        print(
            f'| {kind} | {med([r["cpu_us"] for r in rs]):.1f} | {med([r["user_us"] for r in rs]):.1f} / '
            f'{med([r["sys_us"] for r in rs]):.1f} | {med([r["rps"] for r in rs]):,.0f} | {med(cg):,.0f} |'
        )
    for kind, text in syscalls.items():
        print(f'\n{kind} system calls per request: {text}')
    return 0


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true', help='1 round, shorter runs (a smoke test, not figures)')
    ap.add_argument('--rounds', type=int, default=None)
    ap.add_argument('--no-pin', action='store_true', help='do not pin (default: proxy CPU 0, load + upstream CPU 1)')
    ap.add_argument('--skip-fastroute', action='store_true')
    ap.add_argument(
        '--awake',
        action='store_true',
        help='keep both CPUs from halting between requests (a SCHED_IDLE busy loop pinned to each)',
    )
    ap.add_argument(
        '--floor',
        action='store_true',
        help='add (p): a byte pump on uvloop (benches/pump_proxy.py), the floor of any Python proxy hop',
    )
    ap.add_argument(
        '--servers',
        default=os.environ.get('FASTROUTE_SERVER', 'native'),
        help='HTTP server(s) of fastroute, comma-separated: native, granian; one target each (d), (e), ...',
    )
    ap.add_argument('--no-mock', action='store_true', help='use the built-in slow SSE upstream, not fastroute mock')
    ap.add_argument('--rate', type=int, default=1000, help='fixed rate for the latency runs (req/s)')
    ap.add_argument('--slices', type=int, default=None, help='latency slices per target (default 8, 5 s each)')
    ap.add_argument('--out', default=str(ROOT / 'bench-results'))
    ap.add_argument('--sse-upstream', type=int, help=argparse.SUPPRESS)
    ap.add_argument(
        '--profile',
        action='store_true',
        help='fastroute alone: CPU (and with --callgrind instructions) per request of the worker, JSON and SSE',
    )
    ap.add_argument('--requests', type=int, default=20000, help='--profile: requests per measurement')
    ap.add_argument('--strace', action='store_true', help='--profile: also count system calls per request')
    ap.add_argument('--callgrind', action='store_true', help='--profile: instructions per request under callgrind')
    ap.add_argument(
        '--set',
        dest='config_set',
        action='append',
        metavar='KEY=JSON',
        help='--profile: change the generated config, e.g. metrics.enabled=false (repeatable)',
    )
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    if args.profile:
        return profile(args)
    if args.sse_upstream:
        import uvloop

        uvloop.run(sse_server(args.sse_upstream, 100, 20, 20))
        return 0
    return run_all(args)


def latency_slices(
    targets: list[Target], body_file: Path, cpus: str | None, rate: int, slices: int, slice_s: float
) -> None:
    """Latency at a fixed rate: short slices, the targets' order rotated each slice, every request kept (pooled
    percentiles are steadier than a median of a few runs' percentiles on a shared machine)."""
    for sl in range(slices):
        order = targets[sl % len(targets) :] + targets[: sl % len(targets)]
        for t in order:
            url = f'http://127.0.0.1:{t.port}{CHAT_PATH}'
            lat, errors = run_oha_latencies(
                url, body_file, cpus, rate=rate, seconds=slice_s, conns=32, skip_s=SLICE_SKIP_S
            )
            t.latencies += lat
            t.slice_p99.append(percentile(lat, 0.99))
            t.rows[-1]['errors'] += errors
            print(
                f'# slice {sl + 1} {t.key} @{rate}: p50 {percentile(lat, 0.5):.3f} '
                f'p99 {percentile(lat, 0.99):.3f} ms ({len(lat)} requests, {errors} errors)',
                file=sys.stderr,
            )


_PY_PROXIES = {'c': ('minimal_proxy.py', 'http://'), 'p': ('pump_proxy.py', '')}


def python_proxy(procs: Procs, tmp: Path, key: str, label: str, upstreams: tuple, cpus: str | None) -> Target:
    """A baseline proxy of benches/ (one process per upstream) as target `key`."""
    script, scheme = _PY_PROXIES[key]
    ports, pids = [], {}
    for upstream in upstreams:
        port = nginxctl.free_port()
        cmd = [PY, str(HERE / script), '--listen', f'127.0.0.1:{port}', '--upstream', f'{scheme}127.0.0.1:{upstream}']
        proc = spawn(procs, cmd, cpus, tmp / f'{script}-{upstream}.log')
        nginxctl.wait_port(port, timeout=20, proc=proc)
        ports.append(port)
        pids[port] = proc.pid
    t = Target(key, label, *ports)
    t.pids = pids
    return t


def run_all(args: argparse.Namespace) -> int:
    missing = [n for n, p in (('nginx', nginxctl.NGINX), ('wrk', WRK), ('oha', OHA)) if not p or not Path(p).exists()]
    if missing:
        print(
            f'missing: {", ".join(missing)} (apt-get install nginx-light wrk; cargo install oha --locked)',
            file=sys.stderr,
        )
        return 2
    rounds = args.rounds or (1 if args.quick else 3)
    wrk_s = 3 if args.quick else 5
    slices = args.slices or (2 if args.quick else 8)
    slice_s = 3 if args.quick else 5
    n_seq = 500 if args.quick else 2000
    pin = not args.no_pin and nginxctl.cpu_count() >= 2
    cpu_proxy, cpu_load = ('0', '1') if pin else (None, None)

    procs = Procs()
    notes: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix='fr-overhead-'))
    load_before = os.getloadavg()[0]
    try:
        if args.awake and pin:
            notes.append(keep_awake(procs, (cpu_proxy, cpu_load)))
        up, up_port, up_sse = nginxctl.start_upstream(mkdir(tmp / 'upstream'), cpus=cpu_load)
        procs.add(up)
        slow_port, slow_model, slow_kind = start_slow_upstream(procs, tmp, cpu_load, not args.no_mock)
        targets = [Target('a', 'direct (nginx upstream)', up_port, up_sse, slow_port)]
        targets[0].pids = {up_port: up.pid, up_sse: up.pid}

        # (b) nginx reverse proxy: one instance per upstream
        ports, pids = [], {}
        for upstream in (up_port, up_sse, slow_port):
            proc, port = nginxctl.start_proxy(mkdir(tmp / f'nginx-{upstream}'), upstream, cpus=cpu_proxy)
            procs.add(proc)
            ports.append(port)
            pids[port] = proc.pid
        targets.append(Target('b', 'nginx reverse proxy', *ports))
        targets[-1].pids = pids

        # (c) minimal aiohttp pass-through: one instance per upstream
        upstreams = (up_port, up_sse, slow_port)
        targets.append(python_proxy(procs, tmp, 'c', 'minimal aiohttp pass-through', upstreams, cpu_proxy))

        # (p) the byte pump: the floor of any Python proxy hop (opt-in)
        if args.floor:
            targets.append(
                python_proxy(procs, tmp, 'p', 'Python byte pump (uvloop raw protocols)', upstreams, cpu_proxy)
            )

        # (d) fastroute: one process, the route picks the upstream
        if args.skip_fastroute:
            notes.append('(d) fastroute skipped (--skip-fastroute).')
        elif not FASTROUTE:
            notes.append('(d) fastroute skipped: no `fastroute` console script in the venv (pip install -e .).')
        else:
            for key, server in zip('defghij', args.servers.split(','), strict=False):
                fr_port = nginxctl.free_port()
                cfg = fastroute_config(fr_port, up_port, up_sse, slow_port, slow_model)
                label = f'fastroute ({server} server; 50 routes, 10k keys, rewrite)'
                name = server
                try:
                    fr_proc, fr_port = start_fastroute(procs, tmp, cpu_proxy, cfg, fr_port, name, server)
                    problem = check_answer(fr_port, nginxctl.REQUEST_BODY, nginxctl.CHAT_BODY)
                    if problem:
                        raise RuntimeError(problem)
                    targets.append(Target(key, label, fr_port, fr_port, fr_port))
                    targets[-1].pids = {fr_port: fr_proc.pid}
                except (RuntimeError, TimeoutError, OSError) as e:
                    log = (tmp / f'fastroute-{name}.log').read_text(errors='replace')[-1500:]
                    notes.append(f'({key}) fastroute skipped: `fastroute serve` did not work yet ({e}).')
                    print(f'# fastroute serve failed: {e}\n{log}', file=sys.stderr)

        for t in targets:
            for port, body, expect in ((t.port, nginxctl.REQUEST_BODY, nginxctl.CHAT_BODY),):
                problem = check_answer(port, body, expect)
                if problem:
                    raise SystemExit(f'{t.label}: {problem}')

        body_file = tmp / 'body.json'
        body_file.write_bytes(nginxctl.REQUEST_BODY)
        lua_json = wrk_script(tmp / 'post.lua', nginxctl.REQUEST_BODY)
        lua_sse = wrk_script(tmp / 'post-stream.lua', nginxctl.STREAM_REQUEST_BODY)

        # warm-up: fill pools, JIT-free but caches warm
        for t in targets:
            run_wrk(f'http://127.0.0.1:{t.port}{CHAT_PATH}', lua_json, 1, 32, cpu_load)

        for rnd in range(rounds):
            for t in targets:
                url = f'http://127.0.0.1:{t.port}{CHAT_PATH}'
                w = wrk_with_cpu(t, t.port, lua_json, wrk_s, cpu_load)
                ws = wrk_with_cpu(t, t.sse_port, lua_sse, wrk_s, cpu_load)
                one = run_oha(url, body_file, cpu_load, rate=None, seconds=30, n=n_seq, conns=1)
                row = {
                    'rps': w['rps'],
                    'sse_rps': ws['rps'],
                    'cpu_us': w['cpu_us'],
                    'sse_cpu_us': ws['cpu_us'],
                    'p50_1': one['p50_ms'],
                    'errors': w['non2xx'] + w['socket_errors'] + ws['non2xx'] + one['errors'],
                }
                t.rows.append(row)
                print(
                    f'# round {rnd + 1} {t.key} {t.label:42} {row["rps"]:7.0f} req/s {row["cpu_us"]:5.0f} µs/req  '
                    f'sse {row["sse_rps"]:7.0f} {row["sse_cpu_us"]:5.0f} µs/req  '
                    f'p50@1 {row["p50_1"]:.3f}  ({row["errors"]} errors)',
                    file=sys.stderr,
                )

        before = cpu_times()
        latency_slices(targets, body_file, cpu_load, args.rate, slices, slice_s)
        notes.append(steal_note(before, cpu_times()))

        # streaming check
        slow_body = json.dumps({**nginxctl.REQUEST, 'model': slow_model, 'stream': True}).encode()
        for t in targets:
            try:
                runs = [asyncio.run(read_stream(t.slow_port, slow_body)) for _ in range(3)]
            except (OSError, RuntimeError, TimeoutError) as e:
                notes.append(f'streaming check through ({t.key}) failed: {e}')
                continue
            gaps = [b - a for r in runs for a, b in zip(r[2], r[2][1:], strict=False)]
            t.stream = {
                'head_ms': med([r[0] for r in runs]),
                'first_ms': med([r[1] for r in runs]),
                'events': med([len(r[2]) for r in runs]),
                'gap_ms': med(gaps),
                'gap_max_ms': max(gaps) if gaps else float('nan'),
            }
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)

    notes.append(
        f'load average (1 min) {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on '
        f'{os.cpu_count()} CPUs: above ~1 other work shared the machine and the absolute figures are inflated.'
    )
    report = render(targets, args, rounds, slice_s, pin, slow_kind, notes)
    print(report)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f'overhead-{datetime.now().strftime("%Y%m%d-%H%M%S")}.md'
    out.write_text(report + '\n')
    print(f'\nwritten to {out}', file=sys.stderr)
    return 0


_SPINNER = 'import os\nos.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\nwhile True:\n    pass\n'


def keep_awake(procs: Procs, cpus: tuple[str | None, ...]) -> str:
    """`--awake`: a SCHED_IDLE busy loop pinned to each CPU, so that no CPU halts between requests."""
    for cpu in cpus:
        spawn(procs, [PY, '-c', _SPINNER], cpu, Path(os.devnull))
    return (
        '--awake: a SCHED_IDLE busy loop on each CPU kept it from halting between requests (it yields at once '
        'to any other task): no wake-up of a halted vCPU, which on a busy host can wait for the hypervisor '
        'for milliseconds, and caches kept warm, as on a busy machine; it adds 2 to the load average below.'
    )


def cpu_times() -> dict[str, list[int]]:
    """Per CPU, the jiffies of /proc/stat: user nice system idle iowait irq softirq steal ..."""
    with open('/proc/stat') as f:
        return {ln.split()[0]: [int(x) for x in ln.split()[1:]] for ln in f if ln[:3] == 'cpu' and ln[3].isdigit()}


def steal_note(before: dict[str, list[int]], after: dict[str, list[int]]) -> str:
    """How much of each CPU the hypervisor took (steal) during the fixed-rate slices. On a shared host a vCPU
    that waits for its physical one stalls every process on it: p99s of every proxy on the proxy's CPU rise
    together (nginx's too) while direct, on the other CPU, stays flat."""
    parts = []
    for cpu, b in sorted(before.items()):
        a = after.get(cpu, b)
        d = [y - x for x, y in zip(b, a, strict=False)]
        total = sum(d[:8]) or 1
        parts.append(f'{cpu} {100 * d[7] / total:.1f} % stolen, {100 * d[3] / total:.0f} % idle')
    return 'during the fixed-rate slices (/proc/stat): ' + '; '.join(parts) + '.'


def mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def render(
    targets: list[Target], args, rounds: int, slice_s: float, pin: bool, slow_kind: str, notes: list[str]
) -> str:
    def m(t: Target, key: str) -> float:
        if key == 'p50_rate':
            return percentile(t.latencies, 0.5)
        if key == 'p99_rate':
            return percentile(t.latencies, 0.99)
        return med([r[key] for r in t.rows])

    direct = targets[0]
    by_key = {t.key: t for t in targets}
    nginx = by_key.get('b')
    sharing = (
        'proxy under test pinned to CPU 0; wrk/oha and the nginx upstream pinned to CPU 1'
        if pin
        else 'not pinned (all processes share both cores)'
    )
    lines = [
        f'## Proxy overhead, {datetime.now().strftime("%Y-%m-%d %H:%M")}'
        f'{" (--quick: a smoke test, not figures)" if args.quick else ""}',
        '',
        f'Upstream: nginx, fixed 557-byte chat completion / 21-event SSE (3.8 KB). CPU: {sharing}. '
        f'Medians of {rounds} round(s), targets interleaved. Load: wrk -t1 -c32 (max req/s); '
        f'oha 1 in flight; oha -q {args.rate} --latency-correction -c32 in {len(direct.slice_p99)} slices of '
        f'{slice_s:g} s per target (order rotated each slice; the first {SLICE_SKIP_S:g} s of each left out), '
        f'percentiles of all their requests pooled ({len(direct.latencies):,} for direct).',
        '',
        f'| target | max req/s (JSON) | CPU µs/req (JSON) | max req/s (SSE) | CPU µs/req (SSE) | p50 @1 (ms) | '
        f'p50 @{args.rate}/s (ms) | p99 @{args.rate}/s (ms) | added p50 @1 | added p50 @{args.rate}/s | '
        f'added p99 @{args.rate}/s | errors |',
        '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
    ]
    for t in targets:
        if t is direct:
            added = ['–', '–', '–']
        else:
            added = [f'{m(t, k) - m(direct, k):.3f}' for k in ('p50_1', 'p50_rate', 'p99_rate')]
        lines.append(
            f'| ({t.key}) {t.label} | {m(t, "rps"):,.0f} | {m(t, "cpu_us"):.0f} | {m(t, "sse_rps"):,.0f} | '
            f'{m(t, "sse_cpu_us"):.0f} | {m(t, "p50_1"):.3f} | '
            f'{m(t, "p50_rate"):.3f} | {m(t, "p99_rate"):.3f} | {" | ".join(added)} | '
            f'{sum(r["errors"] for r in t.rows)} |'
        )
    lines.append('')
    lines.append(
        f'p99 @{args.rate}/s of each slice alone (ms), min / median / max: '
        + '; '.join(
            f'({t.key}) {min(t.slice_p99):.3f} / {med(t.slice_p99):.3f} / {max(t.slice_p99):.3f}'
            for t in targets
            if t.slice_p99
        )
    )
    lines.append('')
    if nginx:
        ratios = []
        for t in targets:
            if t.key not in ('a', 'b'):
                parts = []
                for k, name in (
                    ('p50_1', 'p50 @1'),
                    ('p50_rate', f'p50 @{args.rate}'),
                    ('p99_rate', f'p99 @{args.rate}'),
                ):
                    ng = m(nginx, k) - m(direct, k)
                    parts.append(f'{name} {(m(t, k) - m(direct, k)) / ng:.1f}×' if ng > 0 else f'{name} n/a')
                ratios.append(f"- ({t.key}) added latency / nginx's added: " + ', '.join(parts))
        c = by_key.get('c')
        for d in targets:
            if c is None or d.key in ('a', 'b', 'c'):
                continue
            k = d.key
            ratios.append(
                f'- ({k}) / (c) max req/s: JSON {m(d, "rps") / m(c, "rps"):.1f}×, '
                f'SSE {m(d, "sse_rps") / m(c, "sse_rps"):.1f}×;'
                f' (c) / ({k}) CPU per request (the same ratio without the noise of what else ran): '
                f'JSON {m(c, "cpu_us") / m(d, "cpu_us"):.1f}×, SSE {m(c, "sse_cpu_us") / m(d, "sse_cpu_us"):.1f}×'
            )
        lines += ratios + ['']
    lines += [
        f'Streaming check ({slow_kind}; "direct" reads that upstream itself); raw-socket reader, medians of 3 streams:',
        '',
        '| target | response head (ms) | first event (ms) | events | median gap (ms) | max gap (ms) |',
        '|---|---:|---:|---:|---:|---:|',
    ]
    nan = float('nan')
    for t in targets:
        s = t.stream or {}
        lines.append(
            f'| ({t.key}) {t.label} | {s.get("head_ms", nan):.1f} | {s.get("first_ms", nan):.1f} | '
            f'{s.get("events", 0):.0f} | {s.get("gap_ms", nan):.1f} | {s.get("gap_max_ms", nan):.1f} |'
        )
    if notes:
        lines += [''] + [f'Note: {n}' for n in notes]
    return '\n'.join(lines)


if __name__ == '__main__':
    sys.exit(main())
