"""`fastroute demo`: fastroute's main job, live, on loopback.

Starts two simulated upstreams (`fastroute mock`: a small 3.8B model at $0.0001 a request and
a 13B model at $0.0008), starts the router with the document-processing policy in
`data/demo.yaml`, drives a realistic mix of requests through the real HTTP path with the
official `openai` client, and prints where each class of request went, the latency and the
blended cost against sending everything to the large model. Every process it starts is
stopped before it returns, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import msgspec

DEMO_KEY = 'sk-demo-docs-app'
# Simulated serving speed: the small model answers sooner and streams faster.
SMALL_SPEED = ('--ttft-ms', '15', '--tps', '400')
LARGE_SPEED = ('--ttft-ms', '60', '--tps', '120')

SIMPLE_ASKS = (
    'List the subjects these questions come from, one per line.',
    'Copy out the first question only.',
    'How many questions are there? Reply with a number.',
    'Translate the first question into French.',
)
COMPLEX_ASKS = (
    'Work through every question step by step: explain your reasoning, compare the alternatives, '
    'and prove why the answer you choose is correct. Why are the other options wrong?',
    'Analyze these questions and design a study plan that covers the underlying concepts; justify '
    'each step, derive any formulas involved, and evaluate the trade-offs between approaches.',
    'For each question, explain the theory behind it, compare it with the related questions, and '
    'critically assess which answer is right and why, with a derivation where one applies.',
)


@dataclass(slots=True)
class Outcome:
    kind: str
    route: str
    model: str
    latency_s: float
    cost: float
    ok: bool
    error: str = ''
    usage: dict[str, int] | None = None


@dataclass
class Processes:
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def start(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        fh = log.open('wb')
        self.logs.append(log)
        proc = subprocess.Popen(
            args, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True, stdin=subprocess.DEVNULL
        )
        fh.close()
        self.procs.append(proc)

    def stop(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 8
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports: the sockets stay bound until all are chosen (one after another, the
    kernel may hand out a port it just got back)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(('127.0.0.1', 0))
        return [int(s.getsockname()[1]) for s in socks]


def wait_until_up(url: str, procs: Processes, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc, log in zip(procs.procs, procs.logs, strict=True):
            if proc.poll() is not None:
                raise RuntimeError(f'{log.name} exited with {proc.returncode}:\n{log.read_text()[-3000:]}')
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f'{url} did not answer within {timeout:.0f}s')


def load_prompts() -> list[str]:
    text = resources.files('fastroute').joinpath('data/demo_prompts.jsonl').read_text(encoding='utf-8')
    return [json.loads(line)['prompt'] for line in text.splitlines() if line.strip()]


def build_mix(n: int, seed: int) -> list[tuple[str, str, dict[str, object]]]:
    """(class, path, body) for n requests: the traffic of a document-processing app."""
    rnd = random.Random(seed)
    prompts = load_prompts()

    def doc(k_min: int, k_max: int) -> str:
        return '\n\n'.join(rnd.sample(prompts, rnd.randint(k_min, k_max)))

    def chat(content: str, **extra: object) -> dict[str, object]:
        body: dict[str, object] = {'model': 'auto', 'messages': [{'role': 'user', 'content': content}]}
        body.update(extra)
        return body

    mix: list[tuple[str, str, dict[str, object]]] = []
    for _ in range(n):
        r = rnd.random()
        stream = rnd.random() < 0.3
        if r < 0.20:
            q = rnd.choice(prompts)
            mix.append(('classify', '/v1/classify', chat(f'Label the academic subject of this question.\n\n{q}')))
        elif r < 0.32:
            mix.append(('summarize', '/v1/summarize', chat(f'Summarize this document.\n\n{doc(12, 30)}')))
        elif r < 0.62:
            mix.append(('chat: short', '/v1/chat/completions', chat(rnd.choice(prompts), stream=stream)))
        elif r < 0.74:
            ask = rnd.choice(SIMPLE_ASKS)
            mix.append(('chat: mid, simple ask', '/v1/chat/completions', chat(f'{doc(6, 14)}\n\n{ask}', stream=stream)))
        elif r < 0.90:
            ask = rnd.choice(COMPLEX_ASKS)
            mix.append(
                ('chat: mid, complex ask', '/v1/chat/completions', chat(f'{doc(6, 14)}\n\n{ask}', stream=stream))
            )
        else:
            mix.append(('chat: long', '/v1/chat/completions', chat(f'{doc(30, 45)}\n\nAnswer each question.')))
    return mix


def price_of(model_cfg: object, usage: dict[str, int] | None) -> float:
    price = model_cfg.price  # type: ignore[attr-defined]
    cost = price.per_request
    if usage:
        cost += usage.get('prompt_tokens', 0) / 1000 * price.input_per_1k
        cost += usage.get('completion_tokens', 0) / 1000 * price.output_per_1k
    return float(cost)


async def drive(
    base_url: str, mix: list[tuple[str, str, dict[str, object]]], models: dict[str, object], concurrency: int
):
    import openai

    try:  # the Response class of the HTTP library the openai client is built on
        import httpx2 as http
    except ImportError:
        import httpx as http

    client = openai.AsyncOpenAI(base_url=f'{base_url}/v1', api_key=DEMO_KEY, max_retries=0, timeout=30)
    outcomes: list[Outcome] = []
    done = 0
    sem = asyncio.Semaphore(concurrency)
    started = time.monotonic()

    async def one(kind: str, path: str, body: dict[str, object]) -> None:
        nonlocal done
        async with sem:
            t0 = time.perf_counter()
            try:
                usage: dict[str, int] | None = None
                if path != '/v1/chat/completions':
                    resp = await client.post(path.removeprefix('/v1'), cast_to=http.Response, body=body)
                    headers = resp.headers
                    usage = resp.json().get('usage')
                elif body.get('stream'):
                    raw = await client.chat.completions.with_raw_response.create(
                        **body, stream_options={'include_usage': True}
                    )
                    headers = raw.headers
                    stream = raw.parse()
                    if inspect.isawaitable(stream):
                        stream = await stream
                    async for chunk in stream:
                        if chunk.usage is not None:
                            usage = chunk.usage.model_dump()
                else:
                    raw = await client.chat.completions.with_raw_response.create(**body)
                    headers = raw.headers
                    completion = raw.parse()
                    if inspect.isawaitable(completion):
                        completion = await completion
                    usage = completion.usage.model_dump() if completion.usage else None
                model = headers.get('x-fastroute-model', '?')
                route = headers.get('x-fastroute-route', '?')
                cost = price_of(models[model], usage) if model in models else 0.0
                outcomes.append(Outcome(kind, route, model, time.perf_counter() - t0, cost, True, usage=usage))
            except (openai.APIError, ValueError, TypeError) as exc:
                outcomes.append(Outcome(kind, '-', '-', time.perf_counter() - t0, 0.0, False, str(exc)[:200]))
            done += 1
            if sys.stderr.isatty() or done % 50 == 0 or done == len(mix):
                rate = done / max(1e-9, time.monotonic() - started)
                end = '' if sys.stderr.isatty() else '\n'
                print(f'\r  sent {done}/{len(mix)} requests ({rate:.0f} req/s)', end=end, file=sys.stderr, flush=True)

    await asyncio.gather(*(one(*item) for item in mix))
    if sys.stderr.isatty():
        print(file=sys.stderr)
    await client.close()
    return outcomes, time.monotonic() - started


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[idx]


def report(outcomes: list[Outcome], models: dict[str, object], elapsed: float) -> str:
    lines: list[str] = []
    ok = [o for o in outcomes if o.ok]
    failed = [o for o in outcomes if not o.ok]
    model_names = list(models)
    lines.append('')
    lines.append(f'{len(outcomes)} requests in {elapsed:.1f}s, {len(ok)} answered, {len(failed)} failed')
    lines.append('')
    header = f'{"request class":<26}{"count":>6}' + ''.join(f'{"→ " + m:>10}' for m in model_names)
    header += f'{"p50 ms":>9}{"p99 ms":>9}'
    lines.append(header)
    lines.append('-' * len(header))
    by_kind: dict[str, list[Outcome]] = defaultdict(list)
    for o in ok:
        by_kind[o.kind].append(o)
    for kind in sorted(by_kind):
        group = by_kind[kind]
        counts = Counter(o.model for o in group)
        lat = [o.latency_s * 1000 for o in group]
        row = f'{kind:<26}{len(group):>6}' + ''.join(f'{counts.get(m, 0):>10}' for m in model_names)
        row += f'{percentile(lat, 50):>9.0f}{percentile(lat, 99):>9.0f}'
        lines.append(row)
    lines.append('')
    lines.append(f'{"model":<10}{"share":>8}{"requests":>10}{"cost":>12}')
    total_cost = sum(o.cost for o in ok)
    for m in model_names:
        group = [o for o in ok if o.model == m]
        share = len(group) / max(1, len(ok))
        lines.append(f'{m:<10}{share:>8.0%}{len(group):>10}{"$" + format(sum(o.cost for o in group), ".4f"):>12}')
    routes = Counter(o.route for o in ok)
    lines.append('')
    lines.append('routes: ' + ', '.join(f'{r} {n}' for r, n in routes.most_common()))
    lat_all = [o.latency_s * 1000 for o in ok]
    lines.append(f'latency, all requests: p50 {percentile(lat_all, 50):.0f} ms, p99 {percentile(lat_all, 99):.0f} ms')
    if ok:
        largest = max(models, key=lambda m: price_of(models[m], None))
        per_req = total_cost / len(ok)
        # What the same answers would have cost on the large model alone (same usage, its price).
        all_large = sum(price_of(models[largest], o.usage) for o in ok) / len(ok)
        saving = 1 - per_req / all_large if all_large else 0.0
        lines.append(
            f'blended cost per request: ${per_req:.6f}   all on {largest}: ${all_large:.6f}   saving: {saving:.0%}'
        )
    if failed:
        lines.append('')
        lines.append('failures (first 5):')
        lines.extend(f'  {o.kind}: {o.error}' for o in failed[:5])
    return '\n'.join(lines)


def cli_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument('-n', '--requests', type=int, default=300, help='how many requests to send (default 300)')
    p.add_argument('--concurrency', type=int, default=16, help='requests in flight (default 16)')
    p.add_argument('--seed', type=int, default=7, help='seed of the traffic mix')
    p.add_argument('--workers', type=int, default=1, help='fastroute worker processes')


def cli_demo(args: argparse.Namespace) -> int:
    from fastroute.config import load_config

    try:
        import openai  # noqa: F401  (the demo's client; not a dependency of the router itself)
    except ImportError:
        print('fastroute demo drives traffic with the official openai client: pip install openai', file=sys.stderr)
        return 2

    exe = [sys.executable, '-m', 'fastroute.cli']
    router, small, large = free_ports(3)
    ports = {'FASTROUTE_DEMO_PORT': router, 'FASTROUTE_DEMO_SMALL_PORT': small, 'FASTROUTE_DEMO_LARGE_PORT': large}
    env = {**os.environ, **{k: str(v) for k, v in ports.items()}}
    os.environ.update({k: str(v) for k, v in ports.items()})
    procs = Processes()
    with tempfile.TemporaryDirectory(prefix='fastroute-demo-') as tmp:
        cfg_path = Path(tmp) / 'demo.yaml'
        cfg_path.write_text(resources.files('fastroute').joinpath('data/demo.yaml').read_text(encoding='utf-8'))
        cfg = load_config(cfg_path)
        models = dict(cfg.models)
        small, large = ports['FASTROUTE_DEMO_SMALL_PORT'], ports['FASTROUTE_DEMO_LARGE_PORT']
        router = ports['FASTROUTE_DEMO_PORT']
        print('fastroute demo: a document-processing app behind fastroute, two simulated model servers')
        print(f'  small  phi-3-mini  (3.8B)  $0.0001/request  http://127.0.0.1:{small}')
        print(f'  large  llama-3-13b (13B)   $0.0008/request  http://127.0.0.1:{large}')
        print(f'  router fastroute            http://127.0.0.1:{router}  policy: {cfg_path.name}')
        try:
            mock = [*exe, 'mock', '--host', '127.0.0.1']
            procs.start(
                [*mock, '--port', str(small), '--model', 'phi-3-mini', '--name', 'small', *SMALL_SPEED],
                Path(tmp) / 'mock-small.log',
            )
            procs.start(
                [*mock, '--port', str(large), '--model', 'llama-3-13b', '--name', 'large', *LARGE_SPEED],
                Path(tmp) / 'mock-large.log',
            )
            procs.start(
                [*exe, 'serve', '-c', str(cfg_path), '--workers', str(args.workers)], Path(tmp) / 'fastroute.log', env
            )
            wait_until_up(f'http://127.0.0.1:{small}/health', procs)
            wait_until_up(f'http://127.0.0.1:{large}/health', procs)
            wait_until_up(f'http://127.0.0.1:{router}/healthz', procs)
            mix = build_mix(args.requests, args.seed)
            print(f'sending {len(mix)} requests, {args.concurrency} in flight, through the openai client ...')
            outcomes, elapsed = asyncio.run(drive(f'http://127.0.0.1:{router}', mix, models, args.concurrency))
        except (RuntimeError, OSError, msgspec.MsgspecError) as exc:
            print(f'demo failed: {exc}', file=sys.stderr)
            for log in procs.logs:
                if log.exists():
                    print(f'--- {log.name} (last lines)', file=sys.stderr)
                    print(log.read_text(errors='replace')[-2000:], file=sys.stderr)
            return 1
        finally:
            procs.stop()
    print(report(outcomes, models, elapsed))
    return 0 if all(o.ok for o in outcomes) else 1
