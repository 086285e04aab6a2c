"""The RSGI app: one request's life, as named phases over a per-request `Ctx`.

    read_body -> decide -> pick_endpoint -> send -> on_upstream_error (loops to pick_endpoint | fail)
              -> stream_back -> record

Each phase returns a value, or None when it has already answered and the request stops there.
Every accepted request gets exactly one answer: the upstream's, or an OpenAI-shaped error.
The app holds a `Snapshot` (compiled Router, pools, tables); a request reads `app.snapshot` once,
so a reload is one reference swap.

Hot-path rules: no dict of all headers, one `decide` call, the body is never parsed in Python (the
Decision says what we need), constant header lists are built once per pool.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import logging
import os
import sys
import time
from dataclasses import dataclass
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import msgspec

from fastroute._core import head_bytes, relay_answer
from fastroute.errors import (
    AuthError,
    ConfigError,
    FastrouteError,
    NoRouteError,
    PermissionError_,
    RequestError,
    UpstreamError,
    error_body,
)
from fastroute.experiments import LIVE as EXPERIMENTS
from fastroute.observe import Observer, StreamUsage, admit
from fastroute.resilience import Walk, status_error
from fastroute.upstream import (
    USER_AGENT,
    Endpoint,
    Pool,
    Readiness,
    UpstreamResponse,
    UpstreamStream,
    answer_response,
    build_pools,
)

if TYPE_CHECKING:
    from fastroute._core import Decision, Router
    from fastroute.config import Config, Match

__all__ = ['App', 'Ctx', 'Snapshot', 'app', 'cli_explain', 'cli_explain_args', 'cli_serve', 'cli_serve_args']

log = logging.getLogger('fastroute')

CONFIG_ENV = 'FASTROUTE_CONFIG'
SERVER_ENV = 'FASTROUTE_SERVER'
SERVERS = ('native', 'granian')
LOG_LEVEL_ENV = 'FASTROUTE_LOG_LEVEL'
STANDARD_PATHS = ('/v1/chat/completions', '/v1/completions', '/v1/embeddings')
EXPLAIN_PATH = '/v1/route/explain'
DEFAULT_EXPLAIN_PATH = '/v1/chat/completions'

# What a path leads to.
PROXY, MODELS, HEALTH, READY, EXPLAIN = range(5)

# Client headers forwarded upstream, besides content-type and x-request-id (always set) and the
# model's own key. An allowlist, so hop-by-hop headers, the client's credentials (authorization,
# the key header, cookies) and client telemetry (x-stainless-*) never leave.
# NOTE: an allowlist of gets, not a walk over every header: the openai client sends ~13 headers and
# the HTTP client validates each one it is given (~1.5k instructions a header, callgrind).
FORWARD_HEADERS = ('accept', 'traceparent', 'tracestate', 'baggage')  # and user-agent (`upstream_headers`)

JSON_CT = ('content-type', 'application/json')
_encode = msgspec.json.Encoder().encode


# ---------------------------------------------------------------------------------------------
# Snapshot: everything compiled from one config, swapped as a whole.
# ---------------------------------------------------------------------------------------------


class Snapshot:
    """The compiled config a worker serves from. Immutable once built."""

    __slots__ = (
        'cfg',
        'key_header',
        'max_body',
        'methods',
        'models_cache',
        'obs',
        'path',
        'paths',
        'pools',
        'prefixes',
        'readiness',
        'router',
        'semantic',
        'slow',
        'tenant_by_key',
    )

    def __init__(
        self, cfg: Config, router: Router, path: str | None = None, keep: dict[str, Pool] | None = None
    ) -> None:
        self.cfg = cfg
        self.router = router
        self.path = path
        self.pools: dict[str, Pool] = build_pools(cfg, keep)  # `keep`: a reload keeps unchanged models' pools
        self.max_body = _size(cfg.server.max_body_bytes)
        self.key_header = cfg.server.key_header.lower()
        self.paths: dict[str, int] = {
            '/v1/models': MODELS,
            '/healthz': HEALTH,
            '/readyz': READY,
            EXPLAIN_PATH: EXPLAIN,
        }
        self.methods: dict[str, frozenset[str]] = {}
        for p in STANDARD_PATHS:
            self.paths[p] = PROXY
            self.methods[p] = frozenset({'POST'})
        prefixes = []
        for route in cfg.routes:
            exact, prefix, methods = _route_paths(route.match)
            for p in exact:
                if self.paths.get(p, PROXY) == PROXY:
                    self.paths[p] = PROXY
                    self.methods[p] = self.methods.get(p, frozenset()) | (methods or {'POST'})
            prefixes.extend(prefix)
        self.prefixes = tuple(prefixes)
        self.tenant_by_key = _tenant_keys(cfg)
        self.models_cache: dict[str | None, tuple[bytes, dict[str, bytes]]] = {}
        self.readiness = Readiness(self.pools)
        self.obs = Observer(cfg)  # metrics, cost, limits, access log (fastroute.observe)
        self.semantic: dict[str, Any] = {}  # route name -> fastroute.semantic.SemanticRoute
        if any(r.semantic is not None for r in cfg.routes):
            from fastroute import semantic

            self.semantic = semantic.routes_of(cfg)
            semantic.WORKER.warm(self.semantic.values())
        if cfg.experiments or EXPERIMENTS.live:
            EXPERIMENTS.configure(cfg)
        # a step that waits (semantic classifier, limits) or traces: every request takes the task's way
        self.slow = bool(self.semantic) or bool(self.obs.limits) or self.obs.tracer is not None

    async def close(self, keep: dict[str, Pool] | None = None) -> None:
        """Close the pools, except those in `keep` (carried into the config that replaced this one)."""
        self.obs.close()
        kept = {id(p) for p in keep.values()} if keep else set()
        for pool in self.pools.values():
            if id(pool) not in kept:
                await pool.close()


def _size(v: int | str) -> int:
    if isinstance(v, int):
        return v
    try:
        from fastroute.config import parse_size

        return int(parse_size(v))
    except ImportError:
        s = v.strip().lower().replace(' ', '')
        for suffix, mult in (('kib', 1 << 10), ('mib', 1 << 20), ('gib', 1 << 30), ('kb', 1000), ('mb', 10**6)):
            if s.endswith(suffix):
                return int(float(s[: -len(suffix)]) * mult)
        return int(s.rstrip('b'))


def _route_paths(m: Match | None) -> tuple[list[str], list[str], set[str] | None]:
    """Exact paths, path prefixes and methods a route's match names (walking all/any, not `not`)."""
    exact: list[str] = []
    prefix: list[str] = []
    methods: set[str] | None = None
    if m is None:
        return exact, prefix, methods
    if isinstance(m.path, str):
        exact.append(m.path)
    elif m.path is not None:
        if m.path.exact:
            exact.append(m.path.exact)
        if m.path.prefix:
            prefix.append(m.path.prefix)
    if m.method is not None:
        methods = {m.method.upper()} if isinstance(m.method, str) else {x.upper() for x in m.method}
    for sub in (m.all or []) + (m.any or []):
        e, p, ms = _route_paths(sub)
        exact += e
        prefix += p
        if ms:
            methods = (methods or set()) | ms
    return exact, prefix, methods


def _tenant_keys(cfg: Config) -> dict[str, str]:
    """sha256(key) hex -> tenant name, for the endpoints that need the caller but not a routing decision."""
    out: dict[str, str] = {}
    for name, t in cfg.tenants.items():
        for h in t.keys_sha256:
            out[h.lower()] = name
        for env in t.keys_env:
            v = os.environ.get(env)
            if v:
                out[hashlib.sha256(v.encode()).hexdigest()] = name
        if t.keys_file:
            try:
                with open(t.keys_file, encoding='utf-8') as f:
                    for line in f:
                        line = line.split('#', 1)[0].strip()
                        if line:
                            out[hashlib.sha256(line.encode()).hexdigest()] = name
            except OSError:
                pass
    return out


def load_snapshot(path: str, keep: dict[str, Pool] | None = None) -> Snapshot:
    """Load, validate and compile a config file. `keep`: pools of the serving config that may be reused.

    Raises:
        ConfigError: naming the file and the path inside it.
    """
    cfg, router = load_compiled(path)
    return Snapshot(cfg, router, path, keep)


def load_compiled(path: str) -> tuple[Config, Router]:
    """The validated, resolved config of a file (key hashes, sizes, env keys) and its compiled router.
    Touches no serving state, so it may run in a thread.

    Raises:
        ConfigError: naming the file and the path inside it.
    """
    from fastroute.config import compile_config, load_config

    cfg = load_config(path)
    return cfg, compile_config(cfg, file=path)


# ---------------------------------------------------------------------------------------------
# The per-request context and the phases.
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Ctx:
    """One request's state, passed through the phases."""

    snap: Snapshot
    scope: Any
    proto: Any
    t0: int  # perf_counter_ns at arrival
    rid: str  # x-request-id: the client's, or generated
    path: str
    body: bytes = b''
    ctype: str | None = None
    decision: Decision | None = None
    pool: Pool | None = None
    endpoint: Endpoint | None = None
    attempts: int = 0
    upstream_ns: int = 0  # time spent waiting on the upstream
    status: int = 0  # the status answered (0: nothing yet)
    error: FastrouteError | None = None
    ttft_ns: int = 0  # perf_counter_ns when the first body byte went to the client
    fallbacks: list | None = None  # one (model, endpoint_url, cause) per failed attempt
    aborted: bool = False  # an upstream stream broke after bytes went out
    walk: Walk | None = None  # the fallback walk, once a try failed (fastroute.resilience)
    experiment: Any = None  # experiments.Ticket when an experiment took this request
    overhead_ns: int = 0  # time in fastroute up to the answer's headers, upstream excluded
    usage: tuple[int, int] | None = None  # (input, output) tokens from the upstream's usage
    resp_body: bytes | None = None  # a non-streamed answer's body (its usage is read after it was sent)
    stream_chunks: int = 0  # chunks relayed (the output estimate when a stream has no usage)
    span: Any = None  # the OpenTelemetry span, when tracing is on
    classifier: str | None = None  # on a semantic route: `semantic` or `fast`, the classifier that decided


_rid_prefix = f'fr-{os.urandom(4).hex()}-'
_rid_counter = itertools.count(1)


def new_request_id() -> str:
    """Unique per worker and across workers (random prefix per process), cheap: no uuid."""
    return _rid_prefix + str(next(_rid_counter))


def _reseed_request_ids() -> None:
    """A fresh prefix in each worker: forked workers would otherwise share the parent's."""
    global _rid_prefix, _rid_counter
    _rid_prefix = f'fr-{os.urandom(4).hex()}-'
    _rid_counter = itertools.count(1)


def decision_headers(ctx: Ctx) -> list[tuple[str, str]]:
    """The headers every answer carries: the decision (when one was made), request id, overhead."""
    d = ctx.decision
    # the answer's first byte goes out right after this: that time is also `ttft_ns` (a stream sets its own)
    now = ctx.ttft_ns = perf_counter_ns()
    ctx.overhead_ns = ns = now - ctx.t0 - ctx.upstream_ns
    us = str(ns // 1000)
    if d is None:
        return [('x-request-id', ctx.rid), ('x-fastroute-overhead-us', us)]
    if ctx.walk is not None or ctx.classifier is not None:
        return _fallback_headers(ctx, d, us)
    out = decided_headers(d, ctx.rid)
    out.append(('x-fastroute-overhead-us', us))
    return out


def decided_headers(d: Decision, rid: str) -> list[tuple[str, str]]:
    """The decision's headers and the request id, as an answer carries them when the decided model answered
    at the first try (the fast lane renders them ahead, `_fast`)."""
    return [
        ('x-fastroute-route', d.route or ''),
        ('x-fastroute-model', d.pool or ''),
        ('x-fastroute-adapter', d.adapter or ''),
        ('x-fastroute-variant', d.variant or ''),
        ('x-request-id', rid),
    ]


def _fallback_headers(ctx: Ctx, d: Decision, us: str) -> list[tuple[str, str]]:
    """After a failed try, or when the decided model was out: the model that answered, the one decided, and the
    number of tries; on a semantic route, the classifier that decided. Cold path."""
    if ctx.walk is None:
        out = decided_headers(d, ctx.rid)
        out += [('x-fastroute-classifier', ctx.classifier or ''), ('x-fastroute-overhead-us', us)]
        return out
    served = ctx.pool.name if ctx.pool is not None else d.pool
    extra = [('x-fastroute-classifier', ctx.classifier)] if ctx.classifier is not None else []
    return extra + [
        ('x-fastroute-route', d.route or ''),
        ('x-fastroute-model', served or ''),
        ('x-fastroute-adapter', (d.adapter or '') if served == d.pool else ''),
        ('x-fastroute-variant', d.variant or ''),
        ('x-fastroute-decided-model', d.pool or ''),
        ('x-fastroute-attempts', str(ctx.attempts)),
        ('x-request-id', ctx.rid),
        ('x-fastroute-overhead-us', us),
    ]


def answer_error(ctx: Ctx, exc: FastrouteError, extra: list[tuple[str, str]] | None = None) -> None:
    """Answer with an OpenAI-shaped error. Cold path."""
    headers = decision_headers(ctx)
    headers.append(JSON_CT)
    retry_after = getattr(exc, 'retry_after', None)
    if retry_after is not None:
        headers.append(('retry-after', str(max(0, int(retry_after + 0.999)))))
    if extra:
        headers.extend(extra)
    ctx.status = exc.status
    ctx.error = exc.with_traceback(None)  # keep no frames alive (they hold ctx: a cycle)
    ctx.proto.response_bytes(exc.status, headers, error_body(exc))


def answer_json(ctx: Ctx, status: int, obj: object) -> None:
    headers = decision_headers(ctx)
    headers.append(JSON_CT)
    ctx.status = status
    ctx.proto.response_bytes(status, headers, obj if isinstance(obj, bytes) else _encode(obj))


_LATER = object()  # `take_body`: the body is not all in yet


def take_body(ctx: Ctx) -> Any:
    """Phase 1 without waiting: check the content-type and the length (413 beyond `server.max_body_bytes`), and
    take the body when the server holds all of it already (the native server's `body_now`). Returns the body,
    None when the request was answered (refused), or `_LATER`: `read_body` waits for the rest."""
    headers = ctx.scope.headers
    ctype = headers.get('content-type')
    if ctype is not None:
        ctx.ctype = ctype
        if ctype != 'application/json' and not _is_json(ctype):
            answer_error(
                ctx, RequestError(f'Content-Type must be application/json, not {ctype!r}', code='invalid_content_type')
            )
            return None
    cl = headers.get('content-length')
    if cl is None:
        return _LATER
    limit = ctx.snap.max_body
    try:
        n = int(cl)
    except ValueError:
        answer_error(ctx, RequestError('invalid Content-Length', code='invalid_request'))
        return None
    if n > limit:
        answer_error(ctx, _too_large(limit))
        return None
    # NOTE: the body that came with the head is taken here: two coroutines fewer per request than awaiting it
    now = getattr(ctx.proto, 'body_now', None)
    body = now() if now is not None else None
    return _LATER if body is None else _checked_body(ctx, body, limit)


async def read_body(ctx: Ctx) -> bytes | None:
    """Phase 1: `take_body`, waiting for the body when it is not all in yet."""
    body = take_body(ctx)
    return body if body is not _LATER else await _read_rest(ctx)


async def _read_rest(ctx: Ctx) -> bytes | None:
    """The body `take_body` could not take at once."""
    limit = ctx.snap.max_body
    if ctx.scope.headers.get('content-length') is not None:
        body = await ctx.proto()
    else:
        # No length given (chunked): read piecewise so a huge body is refused without holding it.
        buf = bytearray()
        async for chunk in ctx.proto:
            buf += chunk
            if len(buf) > limit:
                answer_error(ctx, _too_large(limit))
                return None
        body = bytes(buf)
    return _checked_body(ctx, body, limit)


def _checked_body(ctx: Ctx, body: bytes, limit: int) -> bytes | None:
    if len(body) > limit:
        answer_error(ctx, _too_large(limit))
        return None
    if not body:
        answer_error(ctx, RequestError('the request body is empty; expected a JSON object', code='invalid_json'))
        return None
    ctx.body = body
    return body


def _is_json(ctype: str) -> bool:
    mt = ctype.split(';', 1)[0].strip().lower()
    return mt == 'application/json' or (mt.startswith('application/') and mt.endswith('+json'))


def _too_large(limit: int) -> RequestError:
    return RequestError(
        f'the request body is larger than the limit of {limit} bytes', status=413, code='request_too_large'
    )


_STATUS_ERRORS: dict[int, type[FastrouteError]] = {401: AuthError, 403: PermissionError_, 404: NoRouteError}


def decide(ctx: Ctx, method: str) -> Decision | None:
    """Phase 2: the one routing decision (Rust). Refusals (401/403/404) are answered here."""
    try:
        d = ctx.snap.router.decide(method, ctx.path, ctx.scope.headers, ctx.body)
    except RequestError as exc:
        answer_error(ctx, exc)
        return None
    except ValueError as exc:  # e.g. a body that is not UTF-8, raised before the core's own checks
        answer_error(ctx, RequestError(f'malformed request: {exc}', code='invalid_json'))
        return None
    ctx.decision = d
    if d.status != 200 or d.pool is None:
        cls = _STATUS_ERRORS.get(d.status, NoRouteError)
        answer_error(ctx, cls(d.error or 'no route for this request'))
        return None
    return d


async def semantic_decide(ctx: Ctx, method: str, d: Decision) -> Decision:
    """Phase 2b, a route with `semantic:`: the semantic classifier's score, computed off the event loop within
    the route's budget, decides simple vs complex (the core decides again with it, so the model, the rewrite
    and the trace follow). Over budget, busy or failed: the fast classifier's decision `d` stands."""
    return (await _semantic(ctx, method, d))[0]


async def _semantic(ctx: Ctx, method: str, d: Decision) -> tuple[Decision, dict[str, Any]]:
    """`semantic_decide`, and what happened (for explain)."""
    from fastroute import semantic

    sr = ctx.snap.semantic[d.route]
    t = perf_counter_ns()
    outcome, score, err = await semantic.WORKER.score(sr, ctx.body)
    ms = (perf_counter_ns() - t) / 1e6
    ctx.snap.obs.semantic_outcome(d.route, outcome)
    info = {
        'outcome': outcome,
        'score': score,
        'threshold': sr.threshold,
        'budget_ms': sr.budget_s * 1000,
        'waited_ms': round(ms, 3),
        'fast_score': d.score,
        'fast_threshold': d.threshold,
        'fast_model': d.pool,
    }
    if score is None:
        if err is not None:
            info['error'] = err
            log.warning('semantic classifier failed on route %s (the fast decision stands): %s', d.route, err)
        ctx.classifier = 'fast'
        return d, info
    ctx.classifier = 'semantic'
    try:
        d2 = ctx.snap.router.decide_scored(method, ctx.path, ctx.scope.headers, ctx.body, score, sr.threshold)
    except (RequestError, ValueError):  # not expected: the same inputs were just decided
        ctx.classifier = 'fast'
        return d, info
    ctx.decision = d2
    return d2, info


def pick_endpoint(ctx: Ctx) -> Endpoint | None:
    """Phase 3: an endpoint of the decided pool (the pool's balancing; endpoints that are down skipped).

    None: nothing usable right now; `proxy` then queues, falls back or sheds (`no_endpoint`)."""
    pool = ctx.pool
    if pool is None:
        pool = ctx.pool = ctx.snap.pools.get(ctx.decision.pool)  # type: ignore[union-attr]
        if pool is None or not pool.endpoints:
            answer_error(ctx, NoRouteError(f'model {ctx.decision.pool!r} has no endpoints'))  # type: ignore[union-attr]
            return None
    pool.bw.n += 1  # the retry budget's count of requests
    ep = ctx.endpoint = pool.pick(ctx.decision.adapter)  # type: ignore[union-attr]
    return ep


async def no_endpoint(ctx: Ctx) -> Endpoint | None:
    """Phase 3b (cold): no endpoint of the decided model can take the request now. Wait in the model's
    bounded queue, else a fallback model, else an endpoint only cooling down after a 429; else shed with
    503 + Retry-After."""
    pool = ctx.pool
    assert pool is not None
    if pool.waiters is not None:
        ep = await pool.wait_slot(ctx.decision.adapter)  # type: ignore[union-attr]
        if ep is not None:
            ctx.endpoint = ep
            return ep
    walk = ctx.walk = Walk(ctx.snap, pool)
    walk.skipped.extend(pool.unavailable())
    ep = walk.next_endpoint(ctx)
    if ep is None:
        ep = pool.pick_other(set(), soft=True)  # only cooling down after a 429: ask it anyway
        if ep is not None:
            walk.skipped.clear()
    if ep is None:
        answer_error(ctx, walk.shed(pool))
        return None
    ctx.endpoint = ep
    return ep


def upstream_headers(ctx: Ctx) -> list[tuple[str, str]]:
    """The model's own key, content-type, the request id, the client's user-agent (else ours) and the
    allowlisted client headers."""
    get = ctx.scope.headers.get
    out = list(ctx.pool.auth_headers)  # type: ignore[union-attr]
    out.append(('content-type', ctx.ctype or 'application/json'))
    out.append(('x-request-id', ctx.rid))
    out.append(('user-agent', get('user-agent') or USER_AGENT))
    for name in FORWARD_HEADERS:
        v = get(name)
        if v is not None:
            out.append((name, v))
    return out


async def on_upstream_error(ctx: Ctx, err: UpstreamError, resp: UpstreamResponse | None = None) -> Endpoint | None:
    """Phase 4b: a try failed before any byte reached the client. Returns the next candidate (`ctx.pool` and
    `ctx.endpoint` set to it), or None once the request has been answered: the upstream's own answer when
    only one try was made, else a 502/503/504 naming every candidate tried (fastroute.resilience.Walk)."""
    walk = ctx.walk
    if walk is None:
        walk = ctx.walk = Walk(ctx.snap, ctx.pool)  # type: ignore[arg-type]
    ep = await walk.next_after(ctx, err)
    if ep is not None:
        return ep
    final = walk.final(err)
    if final is err and resp is not None:
        relay(ctx, resp)
    else:
        answer_error(ctx, final)
    return None


def relay(ctx: Ctx, resp: UpstreamResponse) -> None:
    """Answer with the upstream's whole answer: status, relayed headers, body."""
    out = resp.headers
    out += decision_headers(ctx)
    ctx.status = resp.status
    ctx.proto.response_bytes(resp.status, out, resp.body)


async def proxy(ctx: Ctx, method: str) -> None:
    """The proxied request: read_body -> decide -> pick_endpoint -> send / stream_back."""
    body = take_body(ctx)
    if body is _LATER:
        body = await _read_rest(ctx)
    if body is None:
        return
    d = decide(ctx, method)
    if d is None:
        return
    snap = ctx.snap
    if snap.semantic and d.route in snap.semantic:
        d = await semantic_decide(ctx, method, d)
    obs = snap.obs
    if d.tenant in obs.limits and not await admit(ctx, d):  # per-tenant limits: 429
        return
    if EXPERIMENTS.active:
        d = EXPERIMENTS.assign(ctx, d)
    ep = pick_endpoint(ctx)
    if ep is None:
        if ctx.status or await no_endpoint(ctx) is None:
            return
    await forward(ctx, method, d, body)


def forward(ctx: Ctx, method: str, d: Decision, body: bytes) -> Any:
    """Phases 4-5 for the picked endpoint: the coroutine that sends (or streams) the request. A plain function,
    so that awaiting what it returns adds no coroutine of its own."""
    upath, headers, send_body = upstream_request(ctx, d, body)
    return (stream_back if d.stream else send)(ctx, method, upath, headers, send_body)


def upstream_request(ctx: Ctx, d: Decision, body: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
    """Phase 4's request for the picked endpoint: its path, headers and body (the decision's rewrite)."""
    qs = ctx.scope.query_string
    upath = d.upstream_path or ctx.path
    if qs:
        upath = f'{upath}?{qs}'
    send_body = d.body or body
    if ctx.walk is not None and ctx.pool.name != d.pool:  # type: ignore[union-attr]
        send_body = ctx.walk.body_for(ctx.pool, send_body)  # type: ignore[arg-type]
    headers = upstream_headers(ctx)
    tracer = ctx.snap.obs.tracer
    if tracer is not None:  # a span for this request; its context goes upstream
        tracer.start(ctx, headers)
    return upath, headers, send_body


def _moved_pool(ctx: Ctx, body: bytes) -> tuple[Pool, list[tuple[str, str]], bytes]:
    """The walk moved on to another model: its pool, and the headers and body rebuilt for it. Cold path."""
    pool = ctx.pool
    return pool, upstream_headers(ctx), ctx.walk.body_for(pool, body)  # type: ignore[union-attr,arg-type,return-value]


async def send(
    ctx: Ctx, method: str, upath: str, headers: list[tuple[str, str]], body: bytes, reserved: bool = False
) -> None:
    """Phase 4 (non-streaming): send, read the whole answer, relay status, headers and body. A failure, or a
    status in the model's `retry.on_status`, goes to `on_upstream_error` for the next candidate."""
    ep = ctx.endpoint
    pool = ctx.pool
    while True:
        if reserved:  # the fast lane counted this first try when it picked the endpoint
            reserved = False
        else:
            ctx.attempts += 1
            ep.outstanding += 1  # type: ignore[union-attr]
        t = perf_counter_ns()
        try:
            resp = await ep.send(method, upath, headers, body)  # type: ignore[union-attr]
        except UpstreamError as err:
            ctx.upstream_ns += perf_counter_ns() - t
            ep.release()  # type: ignore[union-attr]
            ep = await on_upstream_error(ctx, err)
            if ep is None:
                return
            if ctx.pool is not pool:
                pool, headers, body = _moved_pool(ctx, body)
            continue
        ctx.upstream_ns += perf_counter_ns() - t
        ep.outstanding -= 1  # type: ignore[union-attr]
        if ep.pool_waiters:  # type: ignore[union-attr]
            ep.release_wake()  # type: ignore[union-attr]
        status = resp.status
        if status >= 400 and status in (ctx.walk or pool).policy.retry_on:  # type: ignore[union-attr]
            ep = await on_upstream_error(ctx, status_error(ep, resp), resp)  # type: ignore[arg-type]
            if ep is None:
                return
            if ctx.pool is not pool:
                pool, headers, body = _moved_pool(ctx, body)
            continue
        break
    answered(ctx, ep, resp)  # type: ignore[arg-type]


def answered(ctx: Ctx, ep: Endpoint, resp: UpstreamResponse) -> None:
    """A non-streamed try succeeded (or ends the walk with its answer): the endpoint's health, then the answer."""
    succeeded(ctx, ep, resp.status, resp.body)
    out = resp.headers
    out += decision_headers(ctx)
    ctx.proto.response_bytes(resp.status, out, resp.body)


def succeeded(ctx: Ctx, ep: Endpoint, status: int, body: bytes) -> None:
    """A try's whole answer is the request's: the endpoint's health, and what `record` reads."""
    ep.win.n += 1  # ep.ok(), inlined
    if ep.failures or ep.down:
        ep.recovered()
    ctx.status = status
    ctx.resp_body = body
    if ctx.experiment is not None:
        ctx.experiment.seen_body(body)


class _ErrorAnswer(Exception):
    """A streamed request answered with an error status (read whole): retry it or relay it."""

    def __init__(self, resp: UpstreamResponse) -> None:
        super().__init__(resp.status)
        self.resp = resp


async def _open_stream(
    ep: Endpoint, method: str, upath: str, headers: list[tuple[str, str]], body: bytes, first_token: float | None
) -> tuple[UpstreamStream, Any]:
    """One streamed try up to its first body bytes, which are read before anything goes to the client, so a
    failure until then can still move to another candidate.

    Raises:
        UpstreamError: connect, timeout, reset, or no first byte within `first_token` seconds.
        _ErrorAnswer: the upstream answered with an error status (its whole body read)."""
    up = await ep.open_stream(method, upath, headers, body)
    try:
        if up.status >= 400:
            parts = []
            while True:
                c = await up.read_chunk()
                if c is None:
                    break
                parts.append(bytes(c))
            raise _ErrorAnswer(UpstreamResponse(up.status, up.headers, up.content_type, b''.join(parts)))
        first = up.take()  # the first bytes came with the head (the common case): no read step
        if first is not None or first_token is None:
            return up, first if first is not None else await up.read_chunk()
        try:
            async with asyncio.timeout(first_token):
                return up, await up.read_chunk()
        except TimeoutError:
            raise UpstreamError(
                f'upstream {ep.model} at {ep.base}: no token within the first-token deadline of {first_token:g}s',
                endpoint=ep.base,
                stage='timeout',
                status=504,
                code='upstream_first_token_timeout',
            ) from None
    except BaseException:
        up.close()
        raise


async def stream_back(
    ctx: Ctx, method: str, upath: str, headers: list[tuple[str, str]], body: bytes, reserved: bool = False
) -> None:
    """Phase 5 (streaming): relay bytes as they arrive, unchanged; stop the upstream at once if the client goes.

    Until the first body bytes are in, a failure goes to `on_upstream_error` like a non-streamed one. After
    that, a break ends the stream with an OpenAI-shaped error event and no `[DONE]` (counted, `ctx.aborted`)."""
    ep = ctx.endpoint
    pool = ctx.pool
    policy = pool.policy  # type: ignore[union-attr]
    # Overhead of a stream: everything up to the moment the upstream request goes out.
    ctx.upstream_ns = 0
    overhead_at = perf_counter_ns()
    while True:
        if reserved:  # the fast lane counted this first try when it picked the endpoint
            reserved = False
        else:
            ctx.attempts += 1
            ep.outstanding += 1  # type: ignore[union-attr]
        try:
            up, first = await _open_stream(ep, method, upath, headers, body, policy.first_token_timeout)  # type: ignore[arg-type]
        except (UpstreamError, _ErrorAnswer) as exc:
            ep.release()  # type: ignore[union-attr]
            if isinstance(exc, _ErrorAnswer):
                resp = exc.resp
                if resp.status not in policy.retry_on:
                    ep.ok()  # type: ignore[union-attr]
                    ctx.upstream_ns = perf_counter_ns() - overhead_at
                    relay(ctx, resp)
                    return
                ep = await on_upstream_error(ctx, status_error(ep, resp), resp)  # type: ignore[arg-type]
            else:
                ctx.upstream_ns = perf_counter_ns() - overhead_at
                ep = await on_upstream_error(ctx, exc)
            if ep is None:
                return
            if ctx.pool is not pool:
                pool, headers, body = _moved_pool(ctx, body)
            continue
        break
    ctx.upstream_ns = perf_counter_ns() - overhead_at
    su = StreamUsage(ctx.decision.usage_injected)  # type: ignore[union-attr]
    start = getattr(ctx.proto, 'stream_first', None)
    if start is not None and first is not None and up.ended():
        _relay_whole(ctx, ep, up, first, su, start)  # type: ignore[arg-type]
        return
    task = asyncio.current_task(ep.loop)  # type: ignore[union-attr]  # (with the loop: no getpid call)
    watch = ctx.proto.client_disconnect()
    if not isinstance(watch, asyncio.Future):  # granian's is an awaitable, the native server's a future
        watch = asyncio.ensure_future(watch)

    def on_disconnect(_f: object) -> None:
        task.cancel()  # type: ignore[union-attr]

    watch.add_done_callback(on_disconnect)
    transport = None
    try:
        out = up.headers
        out += decision_headers(ctx)
        ctx.status = up.status
        ep.ok()  # type: ignore[union-attr]
        if start is None or first is None:
            transport = ctx.proto.response_stream(up.status, out)
            await _relay_stream(ctx, ep, up, first, transport, su, False)  # type: ignore[arg-type]
        else:
            transport, sent = _start_with_first(ctx, up, first, out, su, start)
            if not up.ended():
                await _relay_stream(ctx, ep, up, None, transport, su, sent)  # type: ignore[arg-type]
    except asyncio.CancelledError:
        if not (watch.done() and not watch.cancelled()):
            raise
        task.uncancel()  # type: ignore[union-attr]
        ctx.error = _client_gone()
    except Exception as exc:
        if not _closed(exc):
            raise
        ctx.error = _client_gone()
    finally:
        watch.remove_done_callback(on_disconnect)
        if not watch.done():
            watch.cancel()
        ep.release()  # type: ignore[union-attr]
        # granian ends the response when the transport is released: never let a traceback keep it.
        transport = None
        ctx.usage = su.usage
        up.close()


def _relay_whole(ctx: Ctx, ep: Endpoint, up: UpstreamStream, first: bytes, su: StreamUsage, start: Any) -> None:
    """A stream whose whole body is in hand (a short answer read at once): out in one write (`stream_first`)."""
    # NOTE: nothing is awaited here, so there is no client to watch: a disconnect watch, its callback and the task
    # lookup cost ~4% of a streamed request's samples (py-spy), ~5% of its instructions (callgrind)
    try:
        out = up.headers
        out += decision_headers(ctx)
        ctx.status = up.status
        ep.win.n += 1  # ep.ok(), inlined
        if ep.failures or ep.down:
            ep.recovered()
        _start_with_first(ctx, up, first, out, su, start)
    except Exception as exc:
        if not _closed(exc):
            raise
        ctx.error = _client_gone()
    finally:
        ep.release()
        ctx.usage = su.usage
        up.close()


def _closed(exc: Exception) -> bool:
    """The client went away while we wrote (both servers' RSGIProtocolClosed / RSGIProtocolError)."""
    return type(exc).__name__ in ('RSGIProtocolClosed', 'RSGIProtocolError')


def _client_gone() -> RequestError:
    return RequestError('client disconnected', status=499, code='client_disconnected')


def _start_with_first(
    ctx: Ctx, up: UpstreamStream, first: bytes, out: list[tuple[str, str]], su: StreamUsage, start: Any
) -> tuple[Any, bool]:
    """Start the answer with the first bytes of the body (the native server's `stream_first`), and when the
    upstream's body is already complete (a short answer), end it there too. Returns (the transport, whether body
    bytes went out)."""
    # NOTE: one write instead of three for a short stream, and one less for a long one (strace: 2 fewer write
    # calls per streamed request against the nginx upstream).
    data = _take(ctx, su, first)
    end = up.ended()
    if end:
        rest = su.flush()
        if rest:
            data += rest
    transport = start(up.status, out, data, end)
    if data:
        ctx.ttft_ns = perf_counter_ns()
    return transport, bool(data)


def _take(ctx: Ctx, su: StreamUsage, chunk: bytes) -> bytes:
    """A piece of a stream as read from the upstream: counted, shown to the experiment, and what of it goes on
    to the client (the usage fastroute asked for is read, and taken out when the client did not ask for it)."""
    ctx.stream_chunks += 1
    if ctx.experiment is not None:
        ctx.experiment.seen_chunk(chunk)
    if su.wants(chunk):
        return su.feed(chunk)
    return chunk


async def _relay_stream(
    ctx: Ctx, ep: Endpoint, up: UpstreamStream, chunk: Any, transport: Any, su: StreamUsage, sent: bool
) -> None:
    """The body of a stream as it arrives, from `chunk` (first bytes read but not sent yet; None: they were
    sent already, read on). `sent`: body bytes went out already. A break once bytes went out cannot change the
    status: it is said in the stream (an error event) and the stream ends without [DONE]."""
    last = getattr(transport, 'send_last', None)  # the native server: the last bytes and the end in one write
    try:
        if chunk is None:
            chunk = await up.read_chunk()
        while chunk is not None:
            chunk = _take(ctx, su, chunk)
            if last is not None and up.ended():
                rest = su.flush()
                if rest:
                    chunk += rest
                await last(chunk)
                if chunk and not sent:
                    ctx.ttft_ns = perf_counter_ns()
                return
            if chunk:
                await transport.send_bytes(chunk)
                if not sent:  # time to first token: the first body bytes sent (the head went out before)
                    sent = True
                    ctx.ttft_ns = perf_counter_ns()
            chunk = await up.read_chunk()
        rest = su.flush()
        if rest:
            await transport.send_bytes(rest)
    except UpstreamError as err:
        ctx.error = err.with_traceback(None)  # no frame -> ctx -> error cycle
        ctx.aborted = True
        ep.aborted += 1
        ep.failed(ctx.error)
        await transport.send_bytes(b'data: ' + error_body(err) + b'\n\n')


def record(ctx: Ctx) -> None:
    """Phase 6: after the answer: experiment outcomes, then metrics, cost, limits accounting and the access log
    (fastroute.observe). Accounting must never break serving."""
    try:
        if ctx.experiment is not None:
            ctx.experiment.done(ctx)
        ctx.snap.obs.record(ctx)
    except Exception:
        log.exception('record: accounting of %s %s failed', ctx.scope.method, ctx.path)


# ---------------------------------------------------------------------------------------------
# The small non-proxied endpoints (off the hot path).
# ---------------------------------------------------------------------------------------------


def caller_tenant(snap: Snapshot, headers: Any) -> tuple[bool, str | None]:
    """(known, tenant) for the caller's key: (False, None) for a missing/unknown key that must be refused."""
    raw = headers.get(snap.key_header)
    if raw is not None and snap.key_header == 'authorization':
        scheme, _, token = raw.strip().partition(' ')
        raw = token.strip() if scheme.lower() == 'bearer' else None
    if not raw:
        return snap.cfg.server.allow_anonymous, None
    tenant = snap.tenant_by_key.get(hashlib.sha256(raw.encode()).hexdigest())
    return tenant is not None, tenant


def models_for(snap: Snapshot, tenant: str | None) -> tuple[bytes, dict[str, bytes]]:
    """`GET /v1/models`: the logical models this caller may use and their adapters (OpenAI list shape),
    and each entry alone for `GET /v1/models/{id}`. Built once per tenant and snapshot."""
    cached = snap.models_cache.get(tenant)
    if cached is not None:
        return cached
    cfg = snap.cfg
    t = cfg.tenants.get(tenant) if tenant else None
    owned = {o.adapter: name for name, o in cfg.tenants.items() if o.adapter}
    allowed = set(t.allowed_models) if t is not None and t.allowed_models is not None else None
    data: list[dict[str, object]] = []
    for name, model in cfg.models.items():
        if allowed is not None and name not in allowed:
            continue
        data.append({'id': name, 'object': 'model', 'created': 0, 'owned_by': 'fastroute'})
        adapters = [a for a in model.adapters if owned.get(a, tenant) == tenant]
        if t is not None and t.adapter and t.base == name and t.adapter not in adapters:
            adapters.append(t.adapter)
        owner = tenant or 'fastroute'
        for a in adapters:
            data.append({'id': a, 'object': 'model', 'created': 0, 'owned_by': owner, 'parent': name})
    out = (_encode({'object': 'list', 'data': data}), {str(m['id']): _encode(m) for m in data})
    snap.models_cache[tenant] = out
    return out


async def models(ctx: Ctx) -> None:
    """`GET /v1/models` and `GET /v1/models/{id}`, for the caller's tenant (from its key)."""
    known, tenant = caller_tenant(ctx.snap, ctx.scope.headers)
    if not known:
        answer_error(ctx, AuthError('invalid or missing API key'))
        return
    listing, by_id = models_for(ctx.snap, tenant)
    if ctx.path == '/v1/models':
        answer_json(ctx, 200, listing)
        return
    one = by_id.get(ctx.path[len('/v1/models/') :])
    if one is None:
        answer_error(ctx, NoRouteError(f'the model {ctx.path[len("/v1/models/") :]!r} does not exist'))
    else:
        answer_json(ctx, 200, one)


async def explain(ctx: Ctx) -> None:
    """`POST /v1/route/explain`: this request's decision and the endpoint that would serve it. Forwards nothing."""
    body = await read_body(ctx)
    if body is None:
        return
    qs = ctx.scope.query_string
    path = parse_qs(qs).get('path', [DEFAULT_EXPLAIN_PATH])[0] if qs else DEFAULT_EXPLAIN_PATH
    ctx.path = path
    try:
        d = ctx.snap.router.decide('POST', path, ctx.scope.headers, body)
    except RequestError as exc:
        answer_error(ctx, exc)
        return
    ctx.decision = d
    if d.status == 401:
        answer_error(ctx, AuthError(d.error or 'invalid API key'))
        return
    sem = None
    if d.status == 200 and ctx.snap.semantic and d.route in ctx.snap.semantic:
        d, sem = await _semantic(ctx, 'POST', d)
    out = d.to_dict()
    out['path'] = path
    if sem is not None:
        out['semantic'] = sem
        out['classifier'] = ctx.classifier
        if ctx.classifier == 'fast':
            why = {'over_budget': f'over its budget of {sem["budget_ms"]:g} ms', 'busy': 'its worker was busy'}
            out['reasons'] = [
                *out.get('reasons', ()),
                f'semantic classifier: {why.get(sem["outcome"], "failed")}; the fast classifier decided',
            ]
    pool = ctx.snap.pools.get(d.pool) if d.pool else None
    ep = pool.pick() if pool is not None and pool.endpoints else None
    out['endpoint'] = ep.base if ep is not None else None
    if EXPERIMENTS.active and d.status == 200:
        out['experiment'] = EXPERIMENTS.explain(ctx, d)
    answer_json(ctx, 200, out)


# ---------------------------------------------------------------------------------------------
# The app.
# ---------------------------------------------------------------------------------------------


class App:
    """The RSGI application. Loads its config (path from `FASTROUTE_CONFIG`) in each worker.

    Reload (each worker reloads itself): `POST /admin/reload`, SIGHUP (the native server forwards it to its
    workers), and a change of the config file (checked once a second unless `server.watch_config: false`).
    A reload validates and compiles the new config, then swaps it in whole; in-flight requests finish on the
    old one; models whose settings did not change keep their pools (connections, breakers, health); an
    invalid config is logged and the old one keeps serving."""

    def __init__(self, config_path: str | None = None, snapshot: Snapshot | None = None) -> None:
        self.config_path = config_path
        self.snapshot: Snapshot | None = snapshot
        self._admin: asyncio.Task | None = None
        self._watch: asyncio.Task | None = None
        self._seen: tuple[int, int] | None = None  # (mtime_ns, size) of the config file last loaded or tried
        self._reloading: asyncio.Lock | None = None
        self._preloaded: tuple[str, tuple[int, int] | None, Config, Router] | None = None

    def preload(self, path: str, stamp: tuple[int, int] | None, cfg: Config, router: Router) -> None:
        """The config as the serving process read and compiled it (`stamp`: the file's (mtime_ns, size) taken
        before the read): forked workers start from it instead of reading the file again, so every worker
        serves the same config even when the file changes while they start (the file watch then reloads
        them all alike)."""
        self._preloaded = (path, stamp, cfg, router)

    def load(self) -> Snapshot:
        path = self.config_path or os.environ.get(CONFIG_ENV)
        if not path:
            raise ConfigError(f'no config: set {CONFIG_ENV} or pass config_path')
        pre, self._preloaded = self._preloaded, None
        if pre is not None and pre[0] == path:
            self._seen = pre[1]
            self.snapshot = Snapshot(pre[2], pre[3], path, None)
            return self.snapshot
        self._seen = _file_stamp(path)
        self.snapshot = load_snapshot(path)
        return self.snapshot

    def swap(self, snapshot: Snapshot) -> Snapshot | None:
        """Serve from `snapshot` from now on; in-flight requests finish on the old one. Returns the old one."""
        old, self.snapshot = self.snapshot, snapshot
        return old

    async def reload(self) -> tuple[bool, str]:
        """Load, validate and compile the config file again; swap it in only if all of that succeeded.
        Returns (reloaded, message). A bad config is logged and the current one keeps serving."""
        if self._reloading is None:
            self._reloading = asyncio.Lock()
        async with self._reloading:  # one at a time: a SIGHUP and a file change may come together
            return await self._reload()

    async def _reload(self) -> tuple[bool, str]:
        path = (self.snapshot.path if self.snapshot else None) or self.config_path or os.environ.get(CONFIG_ENV)
        if not path:
            return False, f'no config file to reload: set {CONFIG_ENV}'
        self._seen = _file_stamp(path)
        loop = asyncio.get_running_loop()
        try:
            # NOTE: parse, validate and compile off the event loop: a big config (10k tenant keys) takes
            # ~0.4 s; in a thread the loop still gets the GIL every switch interval and keeps serving.
            cfg, router = await loop.run_in_executor(None, load_compiled, path)
            current = self.snapshot
            snap = Snapshot(cfg, router, path, current.pools if current is not None else None)
        except ConfigError as exc:
            log.error('fastroute: reload rejected, still serving the previous config: %s', exc)
            return False, f'config rejected, previous config still serving: {exc}'
        except OSError as exc:
            log.error('fastroute: reload failed, cannot read %s: %s', path, exc.strerror or exc)
            return False, f'cannot read {path}: {exc.strerror or exc}'
        old = self.swap(snap)
        from fastroute.health import start_upkeep

        start_upkeep(snap, loop)
        kept = [name for name, p in snap.pools.items() if old is not None and old.pools.get(name) is p]
        if old is not None:
            # in-flight requests hold `old`; the pools it does not pass on close once they are idle
            loop.create_task(_retire(old, snap.pools))
        log.info('fastroute: config %s reloaded (pools kept: %s)', path, ', '.join(kept) or 'none')
        return True, f'config {path} reloaded'

    def on_sighup(self) -> None:
        """SIGHUP: reload the config file (the native server calls this in each worker)."""
        log.info('fastroute: SIGHUP: reloading the config')
        asyncio.ensure_future(self.reload())

    def on_drain(self) -> None:
        """SIGTERM: the server stops accepting; `/readyz` answers 503 from now on, the file watch stops."""
        global _draining
        _draining = True
        if self._watch is not None:
            self._watch.cancel()

    async def _watch_config(self) -> None:
        """Reload when the config file's mtime or size changes (checked once a second)."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            snap = self.snapshot
            path = snap.path if snap is not None else None
            if not path:
                continue
            stamp = _file_stamp(path)
            if stamp is not None and stamp != self._seen:
                log.info('fastroute: config file %s changed: reloading', path)
                await self.reload()

    def __rsgi_init__(self, loop: asyncio.AbstractEventLoop) -> None:
        _setup_logging(os.environ.get(LOG_LEVEL_ENV, 'info'))
        _reseed_request_ids()
        if self.snapshot is None:
            try:
                self.load()
            except ConfigError as exc:
                log.error('fastroute: %s', exc)
                raise SystemExit(1) from None
        snap = self.snapshot
        if snap is not None:
            from fastroute.health import start_upkeep

            start_upkeep(snap, loop)
            if snap.path and snap.cfg.server.watch_config:
                if self._seen is None:
                    self._seen = _file_stamp(snap.path)
                self._watch = loop.create_task(self._watch_config())
        if self.snapshot is not None and self.snapshot.cfg.admin is not None:
            self._admin = loop.create_task(self._start_admin(loop))
        if EXPERIMENTS.active:
            loop.call_soon(EXPERIMENTS.ensure_started)  # read the shared state before the first request

    async def _start_admin(self, loop: asyncio.AbstractEventLoop) -> Any:
        from fastroute.admin import start_admin

        try:
            return await start_admin(self, loop)
        except (OSError, ValueError) as exc:
            log.error('fastroute: admin listener not started: %s', exc)
            return None

    def __rsgi_del__(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._watch is not None:
            self._watch.cancel()
        snap = self.snapshot
        if snap is not None:
            try:
                loop.run_until_complete(snap.close())
            except Exception:  # shutting down; nothing left to answer
                pass

    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        t0 = perf_counter_ns()
        if scope.proto != 'http':
            proto.close(1003)
            return
        snap = self.snapshot or self.load()
        path = scope.path
        kind = snap.paths.get(path)
        if kind is None:
            if snap.prefixes and path.startswith(snap.prefixes):
                kind = PROXY
            elif path.startswith('/v1/models/'):
                kind = MODELS
        method = scope.method
        ctx = Ctx(snap, scope, proto, t0, scope.headers.get('x-request-id') or new_request_id(), path)
        try:
            if kind == PROXY:
                allowed = snap.methods.get(path, _POST)
                if method in allowed:
                    await proxy(ctx, method)
                else:
                    _method_not_allowed(ctx, method, allowed)
            elif kind is None:
                answer_error(ctx, NoRouteError(f'no route for {method} {path}', code='unknown_url'))
            elif kind == EXPLAIN:
                if method == 'POST':
                    await explain(ctx)
                else:
                    _method_not_allowed(ctx, method, _POST)
            elif method not in _GET:
                _method_not_allowed(ctx, method, _GET)
            elif kind == HEALTH:
                answer_json(ctx, 200, b'{"status":"ok"}')
            elif kind == READY:
                await ready(ctx)
            else:
                await models(ctx)
        except Exception as exc:  # last line: every request gets one answer
            unhandled(ctx, exc)
        finally:
            record(ctx)

    def fast_lane(self, req: Any) -> bool:
        """The native server's way in for a whole request (body in hand), before it starts a task for it.
        False: not taken (nothing was done; the server runs `__rsgi__`). True: taken; the request ends with the
        connection's `done`, called here, from the upstream connection's callbacks, or from a task (see `_fast`)."""
        snap = self.snapshot
        if snap is None or snap.slow or EXPERIMENTS.active or req.method != 'POST':
            return False
        path = req.path
        if snap.paths.get(path) != PROXY or 'POST' not in snap.methods.get(path, _POST):
            return False
        ctx = Ctx(snap, req, req, perf_counter_ns(), req.headers.get('x-request-id') or new_request_id(), path)
        try:
            _fast(ctx)
        except Exception as exc:  # raised before the request was handed on: it is still this call's to end
            unhandled(ctx, exc)
            _end(ctx)
        return True


def unhandled(ctx: Ctx, exc: Exception) -> None:
    """An error no phase handled: a 500 when nothing was answered yet (logged with its traceback)."""
    if ctx.status == 0:
        log.exception('unhandled error on %s %s', ctx.scope.method, ctx.path)
        err = FastrouteError(f'internal error: {type(exc).__name__}')
        try:
            answer_error(ctx, err)
        except Exception:  # the client is gone
            pass
    else:
        log.debug('error after answering %s %s: %r', ctx.scope.method, ctx.path, exc)


# ---------------------------------------------------------------------------------------------
# The fast lane (native server only): a whole JSON request on an idle upstream connection, run from the
# connections' callbacks, without a task. What needs to wait (no idle connection, a stream, a failed try,
# a body still coming) goes on in a task from where the lane stopped.
# ---------------------------------------------------------------------------------------------
# NOTE: with 1,000 requests a second the worker idles between requests and each step runs with cold caches:
# the task's two wake-ups (request in, answer in) cost ~9-10 us each, measured with timestamps in the worker.


def _fast(ctx: Ctx) -> None:
    """`proxy` for the fast lane: the same phases, each handing over to a task where it would wait."""
    body = take_body(ctx)
    if body is None:
        _end(ctx)
        return
    if body is _LATER:
        _later(ctx, proxy(ctx, 'POST'))  # take_body answered nothing: proxy starts over
        return
    d = decide(ctx, 'POST')
    if d is None:
        _end(ctx)
        return
    ep = pick_endpoint(ctx)
    if ep is None:
        if ctx.status:
            _end(ctx)
        else:
            _later(ctx, _after_no_endpoint(ctx, d, body))
        return
    upath, headers, send_body = upstream_request(ctx, d, body)
    # the endpoint's slot is this request's from here, in the same step as the pick (as in `send`): a request
    # picked after this one sees it in flight, even when this one goes on in the task
    ctx.attempts += 1
    ep.outstanding += 1
    if d.stream:
        _later(ctx, stream_back(ctx, 'POST', upath, headers, send_body, reserved=True))
        return
    waiter = _Answer(ctx, ep, upath, headers, send_body)
    if not ep.start_now('POST', upath, headers, send_body, waiter):  # no idle connection: `send` connects
        _later(ctx, send(ctx, 'POST', upath, headers, send_body, reserved=True))
        return
    # the request is out: the answer's headers are rendered while the upstream works on it (the first try of a
    # route with no semantic classifier, which the lane never takes, so `decision_headers`' plain case)
    waiter.block = head_bytes(b'', decided_headers(d, ctx.rid), b'')


async def _after_no_endpoint(ctx: Ctx, d: Decision, body: bytes) -> None:
    if await no_endpoint(ctx) is not None:
        await forward(ctx, 'POST', d, body)


class _Answer:
    """The fast lane's waiter for one upstream exchange, in place of a future: the connection calls
    `set_result` with the whole answer, or `set_exception` on a failure, from its own callbacks."""

    __slots__ = ('block', 'body', 'ctx', 'ep', 'headers', 'resolved', 'sent', 'upath')

    def __init__(self, ctx: Ctx, ep: Endpoint, upath: str, headers: list[tuple[str, str]], body: bytes) -> None:
        self.ctx = ctx
        self.ep = ep
        self.upath = upath
        self.headers = headers
        self.body = body
        self.resolved = False
        self.sent = perf_counter_ns()
        self.block: bytes | None = None  # the decision's headers, rendered (`relay`)

    def done(self) -> bool:
        return self.resolved

    def relay(self, conn: Any, data: bytes) -> bool:
        """The upstream connection's first read of the answer: when it is a whole `200` (the common case), the
        client's answer is made from it in one Rust call and written before any bookkeeping. False: not that
        case, nothing was done (the connection goes on the general way, to `set_result`)."""
        block = self.block
        ctx = self.ctx
        req = ctx.proto
        cc = req.conn
        if block is None or req.started or not req.keep_alive or cc.closing or cc.closed or req.http_version == '1.0':
            return False
        now = perf_counter_ns()
        up = now - self.sent
        r = relay_answer(data, 0, block, (now - ctx.t0 - ctx.upstream_ns - up) // 1000)
        if r is None:
            return False
        out, at, keep_alive = r
        req.started = True
        req.status = 200
        cc.transport.write(out)
        # the answer is out; the rest is bookkeeping, as `set_result` and `answered` do it
        self.resolved = True
        conn.relayed(keep_alive)
        ctx.upstream_ns += up
        ctx.ttft_ns = now
        ctx.overhead_ns = now - ctx.t0 - ctx.upstream_ns
        ep = self.ep
        try:
            ep.outstanding -= 1
            if ep.pool_waiters:
                ep.release_wake()
            succeeded(ctx, ep, 200, data[at:])
        except Exception as exc:
            unhandled(ctx, exc)
        _end(ctx)
        return True

    def set_result(self, answer: tuple) -> None:
        # NOTE: the two callbacks' common start stays written out in each: a shared method cost ~0.5k
        # instructions per request (callgrind)
        self.resolved = True
        ctx = self.ctx
        ctx.upstream_ns += perf_counter_ns() - self.sent
        ep = self.ep
        try:
            ep.outstanding -= 1
            if ep.pool_waiters:
                ep.release_wake()
            resp = answer_response(answer)
            status = resp.status
            if status >= 400 and status in (ctx.walk or ctx.pool).policy.retry_on:  # type: ignore[union-attr]
                _later(ctx, self._retry(status_error(ep, resp), resp))
                return
            answered(ctx, ep, resp)
        except Exception as exc:
            unhandled(ctx, exc)
        _end(ctx)

    def set_exception(self, exc: BaseException) -> None:
        self.resolved = True
        ctx = self.ctx
        ctx.upstream_ns += perf_counter_ns() - self.sent
        ep = self.ep
        try:
            err = ep.error_from(exc, started=False)
            ep.release()
            _later(ctx, self._retry(err, None))
        except Exception as e:
            unhandled(ctx, e)
            _end(ctx)

    async def _retry(self, err: UpstreamError, resp: UpstreamResponse | None) -> None:
        """The first try failed: the rest of `send`'s walk."""
        ctx = self.ctx
        pool = ctx.pool
        if await on_upstream_error(ctx, err, resp) is None:
            return
        headers, body = self.headers, self.body
        if ctx.pool is not pool:
            pool, headers, body = _moved_pool(ctx, body)
        await send(ctx, 'POST', self.upath, headers, body)


def _end(ctx: Ctx) -> None:
    """A fast-lane request is over: record it, then the connection goes on (`done`)."""
    record(ctx)
    ctx.proto.conn.done(False, None)


def _later(ctx: Ctx, coro: Any) -> None:
    """Hand the request on to the connection's task (a new task would cost ~7k instructions): it runs `coro`,
    which ends the request as `__rsgi__` would, then the connection's `done`."""
    ctx.proto.conn.hand_over(_rest(ctx, coro))


async def _rest(ctx: Ctx, coro: Any) -> None:
    try:
        await coro
    except Exception as exc:
        unhandled(ctx, exc)
    finally:
        record(ctx)


_POST = frozenset({'POST'})
_GET = frozenset({'GET', 'HEAD'})
WATCH_INTERVAL = 1.0  # seconds between checks of the config file
RETIRE_MAX = 600.0  # a replaced config's pools close once idle, or after this long at most
_draining = False  # SIGTERM received: /readyz says 503


def _file_stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


async def _retire(old: Snapshot, kept: dict[str, Pool]) -> None:
    """Close the pools of a replaced config that the new one did not keep, once no request uses them."""
    keep = {id(p) for p in kept.values()}
    gone = [p for p in old.pools.values() if id(p) not in keep]
    if not gone:
        return
    for p in gone:  # health checks of a replaced pool stop at once
        for t in p.tasks:
            t.cancel()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RETIRE_MAX
    while loop.time() < deadline and any(ep.outstanding for p in gone for ep in p.endpoints):
        await asyncio.sleep(1.0)
    for p in gone:
        await p.close()


def _method_not_allowed(ctx: Ctx, method: str, allowed: frozenset[str]) -> None:
    exc = RequestError(f'method {method} is not allowed on {ctx.path}', status=405, code='method_not_allowed')
    answer_error(ctx, exc, [('allow', ', '.join(sorted(allowed)))])


async def ready(ctx: Ctx) -> None:
    """`/readyz`: 200 when every model has an endpoint that is reachable and not out (breaker open, failing
    health checks); each endpoint's state; 503 while draining."""
    result = await ctx.snap.readiness.check()
    now = time.perf_counter()
    models = {}
    endpoints = {}
    for name, pool in ctx.snap.pools.items():
        models[name] = bool(result.get(name)) and any(ep.usable(now, soft=True) for ep in pool.endpoints)
        endpoints[name] = [ep.state() for ep in pool.endpoints]
    ok = all(models.values()) and not _draining
    status = 'draining' if _draining else 'ready' if ok else 'not ready'
    worker = {'pid': os.getpid(), 'tasks': len(asyncio.all_tasks())}  # this /readyz request's task included
    answer_json(ctx, 200 if ok else 503, {'status': status, 'models': models, 'endpoints': endpoints, 'worker': worker})


def create_app(config_path: str | None = None) -> App:
    """An app for a given config file (granian `--factory` target, or programmatic use)."""
    return App(config_path)


# The granian target: `fastroute.gateway:app`, config from FASTROUTE_CONFIG, loaded in each worker.
app = App()


# ---------------------------------------------------------------------------------------------
# Command line: serve, explain.
# ---------------------------------------------------------------------------------------------


def cli_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument('-c', '--config', required=True, help='config file (YAML or TOML)')
    p.add_argument('--listen', help='HOST:PORT (default: server.listen from the config)')
    p.add_argument('--workers', type=int, help='worker processes (default: server.workers from the config)')
    p.add_argument('--log-level', default='info', choices=['debug', 'info', 'warning', 'error', 'critical'])
    p.add_argument('--access-log', action='store_true', help='log every request (off by default: it costs)')
    p.add_argument('--backlog', type=int, default=2048, help='listen backlog')
    p.add_argument(
        '--server',
        choices=SERVERS,
        default=os.environ.get(SERVER_ENV) or 'native',
        help=f'HTTP server: native (uvloop, fastroute.server) or granian (default: ${SERVER_ENV} or native)',
    )


def _split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(':')
    if not host or not port.isdigit():
        raise ValueError(f'--listen must be HOST:PORT, not {listen!r}')
    return host.strip('[]'), int(port)


def _setup_logging(level: str) -> None:
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter('[%(levelname)s] %(message)s'))
        log.addHandler(h)
        log.propagate = False
    log.setLevel(level.upper())


def _load_or_report(path: str) -> Snapshot | None:
    """Load and compile the config for a CLI command; on failure say why on stderr and return None."""
    try:
        return load_snapshot(path)
    except ConfigError as exc:
        print(f'fastroute: config error: {exc}', file=sys.stderr)
    except OSError as exc:
        print(f'fastroute: cannot read config {path}: {exc.strerror or exc}', file=sys.stderr)
    return None


def cli_serve(args: argparse.Namespace) -> int:
    """`fastroute serve`: validate the config, say what will be served, run the server (native or granian)."""
    _setup_logging(args.log_level)
    path = os.path.abspath(args.config)
    stamp = _file_stamp(path)  # before the read: a change after it is seen by the workers' file watch
    snap = _load_or_report(path)
    if snap is None:
        return 1
    cfg = snap.cfg
    try:
        host, port = _split_listen(args.listen or cfg.server.listen)
    except ValueError as exc:
        print(f'fastroute: {exc}', file=sys.stderr)
        return 1
    workers = args.workers or cfg.server.workers
    if workers > 1 and cfg.experiments and cfg.redis is None:
        from fastroute.experiments import share_between_workers

        log.info('fastroute: the %d workers share experiment state through %s', workers, share_between_workers())
    if cfg.admin is not None and not os.environ.get(cfg.admin.token_env):
        print(
            f'fastroute: config {path}: admin.token_env: the environment variable {cfg.admin.token_env} is not set; '
            'set it to the bearer token for the admin API (or remove the admin: section)',
            file=sys.stderr,
        )
        return 1
    server_kind = getattr(args, 'server', None) or os.environ.get(SERVER_ENV) or 'native'
    if server_kind not in SERVERS:
        print(f'fastroute: ${SERVER_ENV} must be one of {", ".join(SERVERS)}, not {server_kind!r}', file=sys.stderr)
        return 2

    log.info('fastroute: config %s', path)
    log.info('fastroute: listening on http://%s:%d with %d worker(s) (%s server)', host, port, workers, server_kind)
    if cfg.admin is not None:
        log.info('fastroute: admin API on http://%s (bearer token from $%s)', cfg.admin.listen, cfg.admin.token_env)
    for name, pool in snap.pools.items():
        um = f' (upstream model {pool.upstream_model})' if pool.upstream_model else ''
        log.info('fastroute: model %s%s -> %s', name, um, ', '.join(ep.base for ep in pool.endpoints))
    log.info(
        'fastroute: %d route(s) compiled, %d tenant(s), %d tenant key(s)',
        snap.router.route_count,
        len(cfg.tenants),
        snap.router.tenant_key_count,
    )
    os.environ[CONFIG_ENV] = path
    os.environ[LOG_LEVEL_ENV] = args.log_level
    from fastroute.metrics import setup_multiprocess

    setup_multiprocess(workers)  # before the workers start, so their metrics add up
    if server_kind == 'native':
        from fastroute.server import serve

        app.preload(path, stamp, cfg, snap.router)  # the forked workers serve exactly what was checked here
        try:
            return serve(
                'fastroute.gateway:app',
                host,
                port,
                workers,
                args.backlog,
                access_log=args.access_log,
                grace=cfg.server.grace_period,
            )
        except OSError as exc:
            print(f'fastroute: cannot listen on {host}:{port}: {exc.strerror or exc}', file=sys.stderr)
            return 1

    from granian.constants import Interfaces, Loops
    from granian.server import Server

    server = Server(
        'fastroute.gateway:app',
        address=host,
        port=port,
        interface=Interfaces.RSGI,
        workers=workers,
        loop=Loops.uvloop,
        websockets=False,
        backlog=args.backlog,
        log_level=args.log_level,
        log_access=args.access_log,
    )
    server.serve()
    return 0


def cli_explain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument('-c', '--config', required=True, help='config file (YAML or TOML)')
    p.add_argument(
        '-H', '--header', action='append', default=[], metavar="'NAME: VALUE'", help='a request header (repeatable)'
    )
    p.add_argument('--path', default=DEFAULT_EXPLAIN_PATH, help='request path (default: %(default)s)')
    p.add_argument('--method', default='POST')


def cli_explain(args: argparse.Namespace) -> int:
    """`fastroute explain`: the decision trace for a request JSON read on stdin. Forwards nothing."""
    snap = _load_or_report(os.path.abspath(args.config))
    if snap is None:
        return 1
    headers: dict[str, str] = {}
    for h in args.header:
        name, sep, value = h.partition(':')
        if not sep:
            print(f'fastroute: bad header {h!r}: expected "name: value"', file=sys.stderr)
            return 2
        headers[name.strip().lower()] = value.strip()
    body = sys.stdin.buffer.read()
    try:
        d = snap.router.decide(args.method.upper(), args.path, headers, body)
    except RequestError as exc:
        print(f'fastroute: bad request: {exc.message}', file=sys.stderr)
        return 1
    out = d.to_dict()
    out['path'] = args.path
    pool = snap.pools.get(d.pool) if d.pool else None
    ep = pool.pick() if pool is not None and pool.endpoints else None
    out['endpoint'] = ep.base if ep is not None else None
    sys.stdout.write(msgspec.json.format(_encode(out), indent=2).decode() + '\n')
    return 0
