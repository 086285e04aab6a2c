"""`fastroute simulate`: replay a traffic file through the compiled router of a config, offline.

Every line goes through `Router.decide` of the config as `fastroute serve` compiles it (the same code as live),
and the report gives the share of requests per route, model and adapter; the projected cost against sending
everything to the most expensive model; with `weak_correct`/`strong_correct` labels, the routing quality; and,
given a second config, the decision diff (from -> to counts with examples), with `--fail-if-moved` for CI.

Input lines (JSONL), any mix of:
- a request body object (`{"messages": [...]}`, `{"prompt": ...}`, `{"input": ...}`);
- `{"body" | "request": {...}, "path", "method", "headers", "tenant", "weak_correct", "strong_correct"}`;
- fastroute's access log (`ts, request_id, method, path, tenant, route, model, ..., output_tokens`, and `request`
  only when prompt logging is on): lines without `request` cannot be replayed and are counted as such;
- the training-file shape (`{"prompt": "text", "weak_correct", "strong_correct"}`): a one-message chat.

A line's `tenant` (a tenant name) is replayed by giving each tenant of the config one extra, simulation-only key
and sending it in the key header: the router resolves the tenant exactly as it would from a real key.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from fastroute.classifier import DataError, chat_body, quality
from fastroute.config import Config, compile_config, load_config
from fastroute.errors import ConfigError, RequestError

DEFAULT_PATH = '/v1/chat/completions'
DEFAULT_OUTPUT_TOKENS = 256
_LABEL_KEYS = frozenset({'weak_correct', 'strong_correct', 'subject'})


@dataclass(slots=True)
class Line:
    """One replayable request."""

    lineno: int
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    output_tokens: int | None
    weak: bool | None
    strong: bool | None


@dataclass
class Traffic:
    lines: list[Line]
    unreplayable: int  # lines without a request body (e.g. an access log with prompt logging off)
    total: int


def _sim_key(tenant: str) -> str:
    return 'fastroute-simulate-' + hashlib.sha256(tenant.encode()).hexdigest()[:24]


def _bool(v: Any) -> bool | None:
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    return None


def read_traffic(path: str, key_header: str) -> Traffic:
    """Parse a traffic file.

    Raises:
        DataError: unreadable file, or a line that is not a JSON object (names the file and line).
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f'cannot read: {e.strerror or e}', file=path) from None
    dec = msgspec.json.Decoder()
    enc = msgspec.json.Encoder()
    lines: list[Line] = []
    unreplayable = total = 0
    bearer = key_header == 'authorization'
    for i, raw in enumerate(data.split(b'\n'), 1):
        if not raw.strip():
            continue
        total += 1
        try:
            obj = dec.decode(raw)
        except msgspec.DecodeError as e:
            raise DataError(f'not JSON: {e}', file=path, line=i) from None
        if not isinstance(obj, dict):
            raise DataError('expected a JSON object (a request body, or an object with `request`)', file=path, line=i)
        body_obj = obj.get('request', obj.get('body'))
        if isinstance(body_obj, dict):
            body = enc.encode(body_obj)
        elif isinstance(body_obj, str):
            body = body_obj.encode()
        elif isinstance(obj.get('prompt'), str) and 'messages' not in obj and 'model' not in obj:
            body = chat_body(obj['prompt'])  # the training-file shape
        elif 'messages' in obj or 'prompt' in obj or 'input' in obj:
            body = enc.encode({k: v for k, v in obj.items() if k not in _LABEL_KEYS})
        else:
            unreplayable += 1
            continue
        headers_in = obj.get('headers') if 'request' in obj or 'body' in obj else None
        headers = {str(k).lower(): str(v) for k, v in headers_in.items()} if isinstance(headers_in, dict) else {}
        tenant = obj.get('tenant') if ('request' in obj or 'body' in obj or 'request_id' in obj) else None
        if isinstance(tenant, str) and tenant and key_header not in headers:
            key = _sim_key(tenant)
            headers[key_header] = f'Bearer {key}' if bearer else key
        out_tokens = obj.get('output_tokens')
        lines.append(
            Line(
                i,
                str(obj.get('method') or 'POST').upper() if 'request_id' in obj or 'method' in obj else 'POST',
                str(obj.get('path') or DEFAULT_PATH) if ('request' in obj or 'body' in obj) else DEFAULT_PATH,
                headers,
                body,
                out_tokens if isinstance(out_tokens, int) and out_tokens >= 0 else None,
                _bool(obj.get('weak_correct')),
                _bool(obj.get('strong_correct')),
            )
        )
    return Traffic(lines, unreplayable, total)


def with_sim_keys(cfg: Config) -> Config:
    """The config with one simulation-only key per tenant (see the module doc); routing is otherwise unchanged."""
    tenants = {
        name: msgspec.structs.replace(
            t, keys_sha256=[*t.keys_sha256, hashlib.sha256(_sim_key(name).encode()).hexdigest()]
        )
        for name, t in cfg.tenants.items()
    }
    return msgspec.structs.replace(cfg, tenants=tenants)


@dataclass
class Outcome:
    """Where one request went."""

    status: int
    route: str | None
    model: str | None
    adapter: str | None
    tokens: int
    score: float | None

    def where(self) -> str:
        if self.status != 200:
            return f'({self.status})'
        return f'{self.route or "(default)"} -> {self.model}' + (f' [{self.adapter}]' if self.adapter else '')


@dataclass
class Replay:
    config: str
    cfg: Config
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0  # wall clock of the decide loop
    cpu_seconds: float = 0.0  # CPU time of the decide loop (the fair figure on a shared machine)


def replay(config_path: str, traffic: Traffic) -> Replay:
    """Decide every line with the config's compiled router.

    Raises:
        ConfigError: the config does not load.
    """
    cfg = load_config(config_path)
    router = compile_config(with_sim_keys(cfg), file=config_path)
    out: list[Outcome] = []
    append = out.append
    decide = router.decide
    t0 = time.perf_counter()
    c0 = time.process_time()
    for ln in traffic.lines:
        try:
            d = decide(ln.method, ln.path, ln.headers, ln.body)
        except RequestError:
            append(Outcome(400, None, None, None, 0, None))
            continue
        append(Outcome(d.status, d.route, d.pool, d.adapter, d.est_input_tokens, d.score))
    seconds = time.perf_counter() - t0
    return Replay(config_path, cfg, out, seconds, time.process_time() - c0)


def _cost(cfg: Config, model: str | None, tokens_in: int, tokens_out: int) -> float:
    m = cfg.models.get(model) if model else None
    if m is None:
        return 0.0
    p = m.price
    return p.input_per_1k * tokens_in / 1000 + p.output_per_1k * tokens_out / 1000 + p.per_request


def _baseline_model(cfg: Config, name: str | None) -> str | None:
    if name:
        return name
    priced = [(m.price.input_per_1k + m.price.output_per_1k, m.price.per_request, n) for n, m in cfg.models.items()]
    return max(priced)[2] if priced else None


def _shares(title: str, counts: Counter[str], n: int) -> list[str]:
    out = [f'{title:<44} {"requests":>9} {"share":>7}']
    for k, c in counts.most_common():
        out.append(f'  {k:<42} {c:>9} {c / max(n, 1):>7.1%}')
    return out


def report(r: Replay, traffic: Traffic, *, output_tokens: int, baseline: str | None) -> tuple[list[str], float]:
    """The report lines for one replay, and its projected saving (share of the baseline's cost)."""
    n = len(r.outcomes)
    lines = [f'config {r.config}: {n} requests replayed']
    ok = [o for o in r.outcomes if o.status == 200]
    lines += _shares('by route', Counter(o.route or '(default)' for o in ok), n)
    lines += _shares('by model', Counter(o.model or '-' for o in ok), n)
    adapters = Counter(o.adapter for o in ok if o.adapter)
    if adapters:
        lines += _shares('by adapter', Counter({k or '': v for k, v in adapters.items()}), n)
    refused = Counter(o.status for o in r.outcomes if o.status != 200)
    if refused:
        lines.append('not routed: ' + ', '.join(f'{c} x {s}' for s, c in sorted(refused.items())))
    base = _baseline_model(r.cfg, baseline)
    cost = base_cost = 0.0
    for o, ln in zip(r.outcomes, traffic.lines, strict=True):
        if o.status != 200:
            continue
        out_t = ln.output_tokens if ln.output_tokens is not None else output_tokens
        cost += _cost(r.cfg, o.model, o.tokens, out_t)
        base_cost += _cost(r.cfg, base, o.tokens, out_t)
    saving = 1 - cost / base_cost if base_cost > 0 else 0.0
    lines.append(
        f'projected cost ${cost:,.4f} vs ${base_cost:,.4f} all on {base} (saving {saving:.1%}); input tokens from '
        f"the router's estimate, output tokens from the log or {output_tokens} per request"
    )
    labelled = [
        (o, ln)
        for o, ln in zip(r.outcomes, traffic.lines, strict=True)
        if ln.weak is not None and ln.strong is not None
    ]
    if labelled and base is not None:
        weak = [bool(ln.weak) for _, ln in labelled]
        strong = [bool(ln.strong) for _, ln in labelled]
        go = [o.model == base for o, _ in labelled]
        acc = sum(s if g else w for g, w, s in zip(go, weak, strong, strict=True)) / len(labelled)
        wa, sa = sum(weak) / len(weak), sum(strong) / len(strong)
        pgr = (acc - wa) / (sa - wa) if sa != wa else 0.0
        lines.append(
            f'quality on {len(labelled)} labelled requests: {sum(go) / len(go):.1%} to {base}, accuracy {acc:.1%} '
            f'(weak-only {wa:.1%}, strong-only {sa:.1%}): PGR {pgr:.3f}'
        )
        scores = [o.score for o, _ in labelled]
        if all(s is not None for s in scores) and len(labelled) >= 10:
            q = quality([float(s) for s in scores if s is not None], weak, strong)
            lines.append(
                f'classifier scores on them: APGR {q.apgr:.4f}, CPT(50%) {q.cpt50:.1%}, CPT(80%) {q.cpt80:.1%}'
            )
    return lines, saving


def diff(a: Replay, b: Replay, traffic: Traffic, *, examples: int) -> tuple[list[str], int]:
    """The decision diff of two replays: a from -> to matrix of moved requests with examples; and the count moved."""
    moved: Counter[tuple[str, str]] = Counter()
    samples: dict[tuple[str, str], list[int]] = {}
    for oa, ob, ln in zip(a.outcomes, b.outcomes, traffic.lines, strict=True):
        wa, wb = oa.where(), ob.where()
        if wa != wb:
            moved[(wa, wb)] += 1
            s = samples.setdefault((wa, wb), [])
            if len(s) < examples:
                s.append(ln.lineno)
    n = len(a.outcomes)
    total = sum(moved.values())
    out = [f'decision diff {a.config} -> {b.config}: {total} of {n} requests move ({total / max(n, 1):.1%})']
    for (wa, wb), c in moved.most_common():
        out.append(f'  {c:>7}  {wa}  =>  {wb}   (lines {", ".join(map(str, samples[(wa, wb)]))})')
        for lineno in samples[(wa, wb)]:
            ln = next(x for x in traffic.lines if x.lineno == lineno)
            text = ln.body.decode('utf-8', 'replace').replace('\n', ' ')
            out.append(f'           line {lineno}: {text[:100]}{"…" if len(text) > 100 else ""}')
    return out, total


def cli_simulate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument('config', nargs='+', help='config file; give two to print the decision diff between them')
    p.add_argument('-t', '--traffic', required=True, help='JSONL of requests (bodies, wrapped requests, access log)')
    p.add_argument(
        '--output-tokens',
        type=int,
        default=DEFAULT_OUTPUT_TOKENS,
        help='output tokens assumed per request when the line has no output_tokens (default %(default)s)',
    )
    p.add_argument(
        '--baseline', default=None, help='model the all-one-model cost compares with (default: the priciest)'
    )
    p.add_argument('--examples', type=int, default=3, help='example lines per diff cell (default 3)')
    p.add_argument(
        '--fail-if-moved',
        type=float,
        default=None,
        metavar='PCT',
        help='with two configs: exit 3 when more than PCT %% of requests change route or model',
    )


def cli_simulate(args: argparse.Namespace) -> int:
    if len(args.config) > 2:
        print('fastroute simulate: give one config, or two to compare', file=sys.stderr)
        return 2
    try:
        first = load_config(args.config[0])
    except ConfigError as e:
        print(f'fastroute simulate: config error: {e}', file=sys.stderr)
        return 1
    try:
        traffic = read_traffic(args.traffic, first.server.key_header)
    except DataError as e:
        print(f'fastroute simulate: {e}', file=sys.stderr)
        return 1
    replays = []
    for path in args.config:
        try:
            replays.append(replay(path, traffic))
        except ConfigError as e:
            print(f'fastroute simulate: config error: {e}', file=sys.stderr)
            return 1
    print(f'traffic {args.traffic}: {traffic.total} lines, {len(traffic.lines)} replayable', end='')
    print(f', {traffic.unreplayable} without a request body (not replayed)' if traffic.unreplayable else '')
    for r in replays:
        lines, _ = report(r, traffic, output_tokens=args.output_tokens, baseline=args.baseline)
        print('\n'.join(lines))
        rate = len(r.outcomes) / r.seconds if r.seconds > 0 else float('inf')
        cpu = len(r.outcomes) / r.cpu_seconds if r.cpu_seconds > 0 else float('inf')
        print(
            f'replay: {len(r.outcomes)} decisions in {r.seconds * 1000:.1f} ms ({rate:,.0f} requests/s wall clock, '
            f'{cpu:,.0f} per CPU second, one core)'
        )
        print()
    if len(replays) == 2:
        lines, moved = diff(replays[0], replays[1], traffic, examples=args.examples)
        print('\n'.join(lines))
        if args.fail_if_moved is not None:
            pct = 100.0 * moved / max(len(traffic.lines), 1)
            if pct > args.fail_if_moved:
                print(f'FAIL: {pct:.2f} % of requests move, more than --fail-if-moved {args.fail_if_moved:g} %')
                return 3
    return 0
