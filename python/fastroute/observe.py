"""What the gateway's `record` phase and its limits step do: metrics, cost, tenant limits, the access log, traces.

An `Observer` is compiled with each config snapshot (`Snapshot.obs`): the allowed label values, prices, tenant
limits and the access-log writer. Per request, `record(ctx)` runs after the answer went out.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any

import msgspec

from fastroute import dashboard as _dashboard  # noqa: F401  (registers /metrics, /dashboard, /admin/stats)
from fastroute import metrics as _metrics
from fastroute.accesslog import Entry, writer_for
from fastroute.limits import LimitError, limiter_for
from fastroute.metrics import LATENCY_BUCKETS, OVERHEAD_BUCKETS, TTFT_BUCKETS, Names
from fastroute.spend import Prices, StreamUsage, body_usage

if TYPE_CHECKING:
    from fastroute._core import Decision
    from fastroute.config import Config
    from fastroute.gateway import Ctx
    from fastroute.obsconfig import Limits

__all__ = ['Observer', 'StreamUsage', 'admit']

log = logging.getLogger('fastroute')

EXPLAIN_PATH = '/v1/route/explain'


class Observer:
    """Observability compiled from one config."""

    __slots__ = ('limiter', 'limits', 'log', 'log_prompts', 'metrics', 'names', 'prices', 'tracer')

    def __init__(self, cfg: Config) -> None:
        self.names = Names(cfg)
        self.prices = Prices(cfg)
        self.limits: dict[str, Limits] = {
            name: t.limits
            for name, t in cfg.tenants.items()
            if t.limits is not None and any(v is not None for v in msgspec.structs.astuple(t.limits))
        }
        self.limiter = limiter_for(cfg.redis)
        self.metrics = cfg.metrics.enabled
        a = cfg.access_log
        self.log = writer_for(a) if a is not None else None
        self.log_prompts = bool(a is not None and a.log_prompts)
        self.tracer: Any = None
        if cfg.tracing is not None and cfg.tracing.enabled:
            from fastroute import otel

            self.tracer = otel.tracer_for(cfg.tracing)

        if self.metrics:  # counted in the worker, when they happen (metrics are made after the fork)
            self.limiter.on_backend_error = _bump_backend_errors
            if self.log is not None:
                self.log.on_drop = _bump_dropped

    def close(self) -> None:
        """The config is going away or the worker stops: write what is buffered."""
        if self.log is not None:
            self.log.flush_now()
        if self.tracer is not None:
            self.tracer.shutdown()
        _metrics.flush()

    def record(self, ctx: Ctx) -> None:
        """After the answer: tokens and cost, limits accounting, metrics, the access-log line."""
        d = ctx.decision
        if d is None:
            if ctx.status < 400:
                return  # health, readiness, model listings: not traffic
        elif ctx.scope.path == EXPLAIN_PATH:
            return
        now = perf_counter_ns()
        err = ctx.error
        status = 499 if err is not None and err.status == 499 else (ctx.status or 499)  # the client went away
        model = ctx.pool.name if ctx.pool is not None else (d.pool if d is not None else None)
        tin = tout = 0
        cost = ref = 0.0
        estimated = False
        if d is not None and ctx.endpoint is not None and 200 <= ctx.status < 300:  # 2xx upstream: it cost
            tin, tout, estimated = _tokens(ctx, d)
            cost, ref = self.prices.cost(model, tin, tout)
        tenant = d.tenant if d is not None else None
        if tenant is not None and tenant in self.limits and d is not None and ctx.endpoint is not None:
            self.limiter.commit(tenant, tin + tout - d.est_input_tokens, cost)
        latency_ns = now - ctx.t0
        overhead_ns = ctx.overhead_ns or (latency_ns - ctx.upstream_ns)
        if self.metrics:
            self._count(ctx, d, model, tenant, status, latency_ns, overhead_ns, tin, tout, cost, ref, estimated)
        if self.log is not None:
            self.log.add(
                Entry(
                    ts=_timestamp((now - ctx.t0) / 1e9),
                    request_id=ctx.rid,
                    method=ctx.scope.method,
                    path=ctx.path,
                    tenant=tenant,
                    route=d.route if d is not None else None,
                    model=model,
                    adapter=d.adapter if d is not None else None,
                    variant=d.variant if d is not None else None,
                    status=status,
                    input_tokens=tin,
                    output_tokens=tout,
                    cost_usd=round(cost, 8),
                    latency_ms=round(latency_ns / 1e6, 3),
                    overhead_us=overhead_ns // 1000,
                    ttft_ms=round((ctx.ttft_ns - ctx.t0) / 1e6, 3)
                    if ctx.ttft_ns and d is not None and d.stream
                    else None,
                    attempts=ctx.attempts,
                    fallbacks=[{'model': str(f[0]), 'endpoint': str(f[1]), 'cause': str(f[2])} for f in ctx.fallbacks]
                    if ctx.fallbacks
                    else [],
                    # only a body the core accepted is surely valid JSON to embed as is
                    request=msgspec.Raw(ctx.body) if self.log_prompts and d is not None and ctx.body else None,
                )
            )
        if self.tracer is not None:
            self.tracer.record(ctx, model, status, tin, tout, cost)

    def _count(
        self,
        ctx: Ctx,
        d: Decision | None,
        model: str | None,
        tenant: str | None,
        status: int,
        latency_ns: int,
        overhead_ns: int,
        tin: int,
        tout: int,
        cost: float,
        ref: float,
        estimated: bool,
    ) -> None:
        m = _metrics.get()
        names = self.names
        variant = None
        if d is not None:
            # NOTE: each Decision attribute is a getter call (~240 instructions, callgrind): each read once
            variant = d.variant
            key = (d.route, model, d.adapter, tenant, variant, status)
        else:
            key = (None, None, None, None, None, status)
        s = m.series.get(key)
        if s is None:
            s = m.series_for(key, names)
        s.requests.v += 1
        # NOTE: `_Hist.observe` inlined (bisect into the bucket counts, add to the sum): a method call per
        # histogram cost more than the observation itself (callgrind: metrics 15k -> ~11k instructions/request)
        v = latency_ns / 1e9
        h = s.duration
        h.counts[bisect_left(LATENCY_BUCKETS, v)] += 1
        h.total += v
        v = overhead_ns / 1e9
        h = m.overhead_acc
        h.counts[bisect_left(OVERHEAD_BUCKETS, v)] += 1
        h.total += v
        if d is None:
            return
        s.decisions.v += 1
        if variant is not None:
            s.variant.v += 1
        if ctx.endpoint is not None:
            v = ctx.upstream_ns / 1e9
            h = s.upstream
            h.counts[bisect_left(LATENCY_BUCKETS, v)] += 1
            h.total += v
            if ctx.ttft_ns and d.stream:  # streams only: a whole answer's first byte is its last
                v = (ctx.ttft_ns - ctx.t0) / 1e9
                h = s.ttft
                h.counts[bisect_left(TTFT_BUCKETS, v)] += 1
                h.total += v
        if tin or tout:
            s.tokens_in.v += tin
            s.tokens_out.v += tout
            s.cost.v += cost
            s.reference.v += ref
        if ctx.attempts > 1:
            s.retries.v += ctx.attempts - 1
        if model is not None:
            if estimated:
                m.estimated(model, names)
            if ctx.aborted:
                m.aborted(model, names)
        if ctx.fallbacks:
            for fb in ctx.fallbacks:
                m.fallback(str(fb[0]), str(fb[2]), names)

    def limit_refused(self, tenant: str, err: LimitError) -> None:
        if self.metrics:
            _metrics.get().limit_refused(tenant, err.limit, self.names)

    def semantic_outcome(self, route: str, outcome: str) -> None:
        """A semantic classifier run: in_budget, over_budget, busy or error (fastroute.semantic.Outcome)."""
        if self.metrics:
            _metrics.get().semantic_outcome(route, outcome, self.names)


def _tokens(ctx: Ctx, d: Decision) -> tuple[int, int, bool]:
    """(input, output, estimated): the upstream's usage, else the input estimate and a rough output count."""
    usage = ctx.usage
    if usage is None and ctx.resp_body is not None:
        usage = body_usage(ctx.resp_body)
    if usage is not None:
        return usage[0], usage[1], False
    tout = ctx.stream_chunks if d.stream else len(ctx.resp_body or b'') // 6
    if d.max_tokens is not None and 0 < d.max_tokens < tout:
        tout = d.max_tokens
    return d.est_input_tokens, tout, True


def _bump_backend_errors() -> None:
    _metrics.get().backend_errors.v += 1


def _bump_dropped() -> None:
    _metrics.get().dropped.v += 1


async def admit(ctx: Ctx, d: Decision) -> bool:
    """The limits step, right after `decide`: False when the tenant is over a limit (429 answered)."""
    obs: Observer = ctx.snap.obs
    tenant = d.tenant
    assert tenant is not None
    err = await obs.limiter.admit(tenant, obs.limits[tenant], d.est_input_tokens)
    if err is None:
        return True
    from fastroute.gateway import answer_error

    obs.limit_refused(tenant, err)
    answer_error(ctx, err)
    return False


_ts_sec = -1
_ts_prefix = ''


def _timestamp(ago: float) -> str:
    """The arrival time (`ago` seconds before now), ISO 8601 UTC with milliseconds; the formatted second is cached."""
    global _ts_sec, _ts_prefix
    now = time.time() - ago
    sec = int(now)
    if sec != _ts_sec:
        _ts_sec = sec
        _ts_prefix = time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(sec))
    return f'{_ts_prefix}.{int((now - sec) * 1000):03d}Z'
