"""The soak: bounded locust traffic (streaming and non-streaming) through fastroute for RUN_TIME while upstream
faults are switched on and off, reporting answers by cause and the RSS of the fastroute process over time.

    .venv/bin/python loadtests/soak.py                 # 10 minutes, 20 users
    .venv/bin/python loadtests/soak.py --run-time 60 --users 10

Starts four `fastroute mock` upstreams (main model on M1..M3, fallback model on B1), fastroute with
loadtests/scenarios/soak/config.yaml, and locust headless with scenarios/soak/locustfile.py. Every
`--fault-every` seconds the next fault of the cycle is set on one main endpoint (the previous one cleared):
500s, 429 with Retry-After, resets, a hang, streams cut mid-answer, a slow first token, every main endpoint
failing (the fallback takes over), and quiet periods. RSS of fastroute (VmRSS from /proc) is sampled every
`--sample-every` seconds. The report (markdown, also printed) goes to bench-results/soak-<timestamp>/.
Everything is on loopback and stops when the run ends (or on Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / 'loadtests' / 'scenarios' / 'soak'
BIN = Path(sys.executable).parent
KEY = 'sk-soak-load'

# (label, {mock: [fault rules]}, settings per mock); one step of the cycle per --fault-every seconds
CYCLE: list[tuple[str, dict[str, list[dict]], dict[str, dict]]] = [
    ('quiet', {}, {}),
    ('m1 answers 500', {'M1': [{'kind': '500'}]}, {}),
    ('m2 answers 429, Retry-After 3 s', {'M2': [{'kind': '429', 'retry_after': 3}]}, {}),
    ('m3 resets connections', {'M3': [{'kind': 'reset', 'rate': 0.5}]}, {}),
    ('quiet', {}, {}),
    ('m1 hangs', {'M1': [{'kind': 'hang'}]}, {}),
    ('m2 cuts streams mid-answer', {'M2': [{'kind': 'stream_cut', 'after_tokens': 3, 'abort': True, 'rate': 0.3}]}, {}),
    ('m3 slow first token (3 s)', {}, {'M3': {'ttft_ms': 3000}}),
    ('every main endpoint answers 503', {m: [{'kind': '503'}] for m in ('M1', 'M2', 'M3')}, {}),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: object = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={'content-type': 'application/json'})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read() or b'null')


def wait_ready(url: str, proc: subprocess.Popen, name: str) -> None:
    for _ in range(150):
        if proc.poll() is not None:
            raise SystemExit(f'{name} exited early with {proc.returncode}')
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f'{name} not ready at {url} after 30 s')


def rss_kib(pid: int) -> int:
    with open(f'/proc/{pid}/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1])
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--run-time', type=int, default=600, help='seconds of load (default 600)')
    ap.add_argument('--users', type=int, default=20)
    ap.add_argument('--fault-every', type=float, default=20.0, help='seconds per step of the fault cycle')
    ap.add_argument('--sample-every', type=float, default=10.0, help='seconds between RSS samples')
    args = ap.parse_args()

    out = ROOT / 'bench-results' / f'soak-{datetime.now():%Y%m%d-%H%M%S}'
    out.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    env = {**os.environ, 'FASTROUTE_SOAK_KEY': KEY, 'SOAK_CAUSES': str(out / 'causes.json')}

    def start(argv: list[str], name: str) -> subprocess.Popen:
        p = subprocess.Popen(argv, stdout=open(out / f'{name}.log', 'wb'), stderr=subprocess.STDOUT, env=env,
                             start_new_session=True)  # fmt: skip
        procs.append(p)
        return p

    mocks: dict[str, str] = {}
    try:
        for name, model in (('M1', 'main-up'), ('M2', 'main-up'), ('M3', 'main-up'), ('B1', 'backup-up')):
            port = free_port()
            argv = [str(BIN / 'fastroute'), 'mock', '--port', str(port), '--model', model, '--name', name]
            argv += ['--ttft-ms', '20', '--tps', '400', '--max-output-tokens', '24', '--log-level', 'warning']
            p = start(argv, f'mock-{name}')
            url = f'http://127.0.0.1:{port}'
            wait_ready(url + '/health', p, f'mock {name}')
            mocks[name] = url
            env[f'{name}_URL'] = url
        fr_port = free_port()
        argv = [str(BIN / 'fastroute'), 'serve', '-c', str(SCENARIO / 'config.yaml')]
        argv += ['--listen', f'127.0.0.1:{fr_port}', '--workers', '1', '--log-level', 'warning']
        fr = start(argv, 'fastroute')
        fr_url = f'http://127.0.0.1:{fr_port}'
        wait_ready(fr_url + '/healthz', fr, 'fastroute')
        print(f'fastroute {fr_url} (pid {fr.pid}); mocks {mocks}; {args.users} users for {args.run_time}s', flush=True)

        stop = threading.Event()
        samples: list[tuple[float, int]] = []
        steps: list[tuple[float, str]] = []
        t0 = time.monotonic()

        def sampler() -> None:
            while not stop.is_set():
                samples.append((time.monotonic() - t0, rss_kib(fr.pid)))
                stop.wait(args.sample_every)

        def faults() -> None:
            i = 0
            while not stop.is_set():
                label, rules, settings = CYCLE[i % len(CYCLE)]
                for name, url in mocks.items():
                    http('POST', url + '/_mock/faults', rules.get(name, []))
                    http('POST', url + '/_mock/config', {'ttft_ms': 20, **settings.get(name, {})})
                steps.append((time.monotonic() - t0, label))
                i += 1
                stop.wait(args.fault_every)

        threads = [threading.Thread(target=sampler, daemon=True), threading.Thread(target=faults, daemon=True)]
        for t in threads:
            t.start()
        locust = [str(BIN / 'locust'), '-f', str(SCENARIO / 'locustfile.py'), '--headless', '--host', fr_url]
        locust += ['-u', str(args.users), '-r', str(args.users), '--run-time', f'{args.run_time}s']
        locust += ['--stop-timeout', '10', '--csv', str(out / 'locust'), '--only-summary', '--loglevel', 'WARNING']
        lrc = subprocess.run(locust, env=env, cwd=SCENARIO, stdout=open(out / 'locust.log', 'wb'),
                             stderr=subprocess.STDOUT).returncode  # fmt: skip
        stop.set()
        for t in threads:
            t.join(10)
        for url in mocks.values():  # quiet again, then one last sample once in-flight work is done
            http('POST', url + '/_mock/reset', {})
        time.sleep(2)
        samples.append((time.monotonic() - t0, rss_kib(fr.pid)))
        ready = http('GET', fr_url + '/readyz')
    finally:
        for p in reversed(procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)

    causes = json.loads((out / 'causes.json').read_text()) if (out / 'causes.json').exists() else {}
    total = sum(causes.values())
    lines = [
        f'# Soak {datetime.now():%Y-%m-%d %H:%M} ({args.run_time} s, {args.users} users, fault step every '
        f'{args.fault_every:g} s; locust exit {lrc})',
        '',
        f'requests answered: {total}',
        '',
        '| cause | count | share |',
        '|---|---:|---:|',
    ]
    for cause, n in sorted(causes.items(), key=lambda kv: -kv[1]):
        lines.append(f'| {cause} | {n} | {n / total:.2%} |' if total else f'| {cause} | {n} | - |')
    rss = [kib for _, kib in samples]
    lines += [
        '',
        f'RSS of fastroute (MiB): start {rss[0] / 1024:.1f}, end {rss[-1] / 1024:.1f}, '
        f'max {max(rss) / 1024:.1f} ({len(rss)} samples)',
        '',
        'RSS over time (s: MiB): ' + ', '.join(f'{t:.0f}: {kib / 1024:.1f}' for t, kib in samples),
        '',
        'fault steps (s: what): ' + '; '.join(f'{t:.0f}: {label}' for t, label in steps),
        '',
        'endpoints at the end: '
        + '; '.join(
            f'{ep["url"]} {ep["state"]} outstanding={ep["outstanding"]} aborted_streams={ep["aborted_streams"]}'
            for group in ready['endpoints'].values()  # type: ignore[index]
            for ep in group
        ),
    ]
    report = '\n'.join(lines) + '\n'
    (out / 'report.md').write_text(report)
    print(report)
    print(f'results: {out}')
    return 0 if causes.get('truncated_done', 0) == 0 and causes.get('stream_no_end', 0) == 0 else 1


if __name__ == '__main__':
    sys.exit(main())
