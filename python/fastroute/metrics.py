"""Prometheus metrics (prometheus-client), summed across workers.

Several workers (the native server's forked processes, granian's workers): `setup_multiprocess()` runs in the
parent before the workers start and points prometheus-client's multiprocess mode at a fresh directory; each
worker writes its values to its own memory-mapped file and any worker's `GET /metrics` adds them all up.

Hot path: a request's figures go into plain Python accumulators (one dict lookup for its label set, a few
additions, a `bisect` per histogram); `flush()` moves them into the prometheus values once a second and before
every scrape of this worker. So a request costs a few microseconds, not one locked mmap write per figure.

Label values are only names from the config (models, routes, tenants, adapters, variants, endpoints) and HTTP
statuses; anything else becomes `other`, so a client can never grow the number of series.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import re
import shutil
import tempfile
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from fastroute.gateway import Snapshot

__all__ = ['FLUSH_EVERY', 'Metrics', 'flush', 'get', 'render', 'samples', 'setup_multiprocess']

MULTIPROC_ENV = 'PROMETHEUS_MULTIPROC_DIR'
FLUSH_EVERY = 1.0  # seconds between moves of the accumulators into the shared values
OTHER = 'other'

# Seconds. Total time and upstream time: LLM answers take from milliseconds to minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Seconds. fastroute's own time per request: tens of microseconds to milliseconds.
OVERHEAD_BUCKETS = (25e-6, 50e-6, 100e-6, 200e-6, 300e-6, 500e-6, 750e-6, 1e-3, 2e-3, 5e-3, 10e-3, 50e-3, 0.25)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)

_owned_dir: str | None = None


def setup_multiprocess(workers: int) -> str | None:
    """In the serving parent, before workers start: with more than one worker, give prometheus-client a fresh
    directory for the workers' values (unless `PROMETHEUS_MULTIPROC_DIR` is already set). Returns the directory."""
    global _owned_dir
    d = os.environ.get(MULTIPROC_ENV)
    if d:
        os.makedirs(d, exist_ok=True)
    elif workers > 1:
        d = _owned_dir = tempfile.mkdtemp(prefix='fastroute-metrics-')
        os.environ[MULTIPROC_ENV] = d
        owner = os.getpid()
        atexit.register(lambda: os.getpid() == owner and cleanup_multiprocess())
    else:
        return None
    from prometheus_client import values

    values.ValueClass = values.MultiProcessValue()  # chosen at import; the env var may have come later
    return d


def cleanup_multiprocess() -> None:
    """In the parent after the workers are gone: remove the directory `setup_multiprocess` made."""
    global _owned_dir
    if _owned_dir is not None:
        shutil.rmtree(_owned_dir, ignore_errors=True)
        if os.environ.get(MULTIPROC_ENV) == _owned_dir:
            del os.environ[MULTIPROC_ENV]
        _owned_dir = None


class _Hist:
    """Observations waiting to be flushed into one histogram child.

    The request path (`observe.Observer._count`) inlines `observe`: `counts[bisect_left(bounds, v)] += 1` and
    `total += v`."""

    __slots__ = ('bounds', 'child', 'counts', 'total')

    def __init__(self, child: Any, bounds: tuple[float, ...]) -> None:
        self.child = child
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, v: float) -> None:
        self.counts[bisect_left(self.bounds, v)] += 1
        self.total += v

    def flush(self) -> None:
        if not any(self.counts):
            return
        # NOTE: prometheus-client's Histogram keeps one value per bucket (`_buckets`, counted non-cumulatively
        # and summed at collect) and `_sum`; adding whole counts here is what `observe` would have done n times.
        child = self.child
        buckets = child._buckets
        for i, c in enumerate(self.counts):
            if c:
                buckets[i].inc(c)
                self.counts[i] = 0
        child._sum.inc(self.total)
        self.total = 0.0


class _Count:
    __slots__ = ('child', 'v')

    def __init__(self, child: Any) -> None:
        self.child = child
        self.v = 0.0

    def flush(self) -> None:
        if self.v and self.child is not None:
            self.child.inc(self.v)
        self.v = 0.0


class Series:
    """Accumulators of one (route, model, adapter, tenant, variant, status)."""

    __slots__ = (
        'cost',
        'decisions',
        'duration',
        'reference',
        'requests',
        'retries',
        'tokens_in',
        'tokens_out',
        'ttft',
        'upstream',
        'variant',
    )


class Metrics:
    """The metric families and this worker's accumulators."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        lbl = ('route', 'model', 'adapter', 'tenant', 'variant', 'status')
        self.requests = Counter('fastroute_requests', 'Requests answered, by decision and status', lbl)
        self.duration = Histogram(
            'fastroute_request_duration_seconds',
            'Total time from arrival to the end of the answer',
            ('route', 'model'),
            buckets=LATENCY_BUCKETS,
        )
        self.ttft = Histogram(
            'fastroute_time_to_first_token_seconds',
            'Time from arrival to the first byte of a streamed answer sent to the client',
            ('model',),
            buckets=TTFT_BUCKETS,
        )
        self.upstream = Histogram(
            'fastroute_upstream_duration_seconds',
            'Time spent waiting on the upstream (all attempts; for streams: until the answer headers)',
            ('model',),
            buckets=LATENCY_BUCKETS,
        )
        self.overhead = Histogram(
            'fastroute_overhead_seconds',
            'Time spent in fastroute itself per request, upstream excluded',
            buckets=OVERHEAD_BUCKETS,
        )
        self.tokens = Counter(
            'fastroute_tokens', 'Tokens: the upstream usage, else the estimate', ('model', 'tenant', 'direction')
        )
        self.cost = Counter('fastroute_cost_usd', 'Cost in USD at the configured prices', ('model', 'tenant'))
        self.reference = Counter(
            'fastroute_reference_cost_usd',
            'What the same requests would have cost on the reference model (spend.reference)',
            ('tenant',),
        )
        self.decisions = Counter(
            'fastroute_decisions', 'Routing decisions by rule (route) and outcome', ('route', 'model')
        )
        self.variants = Counter(
            'fastroute_variant_requests', 'Requests per split/experiment variant', ('variant', 'model')
        )
        self.fallbacks = Counter(
            'fastroute_fallbacks', 'Failed upstream attempts that moved on, by model and cause', ('model', 'cause')
        )
        self.retries = Counter('fastroute_retries', 'Upstream attempts beyond the first', ('model',))
        self.aborts = Counter('fastroute_stream_aborts', 'Streams the upstream broke after bytes were sent', ('model',))
        self.usage_estimated = Counter(
            'fastroute_usage_estimated', 'Requests whose tokens are estimated (no usage from the upstream)', ('model',)
        )
        self.limited = Counter('fastroute_limit_rejections', 'Requests refused by a tenant limit', ('tenant', 'limit'))
        self.experiment_transitions = Counter(
            'fastroute_experiment_transitions',
            'Experiment state changes (promoted, rolled_back, paused, ...), by the controller or an operator',
            ('experiment', 'transition'),
        )
        self.limit_backend_errors = Counter(
            'fastroute_limits_backend_errors', 'Redis failures of the limits (traffic went on with local counters)'
        )
        self.semantic = Counter(
            'fastroute_semantic',
            'Semantic classifier runs by route and outcome (in_budget decided; over_budget, busy, error: the fast '
            "classifier's decision stood)",
            ('route', 'outcome'),
        )
        self.log_dropped = Counter(
            'fastroute_access_log_dropped_lines', 'Access-log lines dropped because the disk did not keep up'
        )
        self.series: dict[tuple[Any, ...], Series] = {}
        self.small: list[_Count | _Hist] = []  # accumulators besides the series
        self._fallback: dict[tuple[str, str], _Count] = {}
        self._limited: dict[tuple[str, str], _Count] = {}
        self._aborts: dict[str, _Count] = {}  # model name as given -> its counter
        self._estimated: dict[str, _Count] = {}
        self._aborts_by_label: dict[str, _Count] = {}  # label value ('other' for a name not in the config)
        self._estimated_by_label: dict[str, _Count] = {}
        self._semantic: dict[tuple[str, str], _Count] = {}
        self.overhead_acc = _Hist(self.overhead, OVERHEAD_BUCKETS)
        self.backend_errors = _Count(self.limit_backend_errors)
        self.dropped = _Count(self.log_dropped)
        self.small += [self.overhead_acc, self.backend_errors, self.dropped]
        self._timer: asyncio.TimerHandle | None = None

    # -- accumulators -----------------------------------------------------------------------------

    def series_for(self, key: tuple[Any, ...], names: Names) -> Series:
        """The accumulators of one label set (made on first use; label values checked against the config)."""
        route, model, adapter, tenant, variant, status = key
        route, model, adapter = names.route(route), names.model(model), names.adapter(adapter)
        tenant, variant = names.tenant(tenant), names.variant(variant)
        s = Series()
        s.requests = _Count(self.requests.labels(route, model, adapter, tenant, variant, str(status)))
        s.duration = _Hist(self.duration.labels(route, model), LATENCY_BUCKETS)
        s.ttft = _Hist(self.ttft.labels(model), TTFT_BUCKETS)
        s.upstream = _Hist(self.upstream.labels(model), LATENCY_BUCKETS)
        s.tokens_in = _Count(self.tokens.labels(model, tenant, 'input'))
        s.tokens_out = _Count(self.tokens.labels(model, tenant, 'output'))
        s.cost = _Count(self.cost.labels(model, tenant))
        s.reference = _Count(self.reference.labels(tenant))
        s.decisions = _Count(self.decisions.labels(route, model))
        s.variant = _Count(self.variants.labels(variant, model) if variant else None)
        s.retries = _Count(self.retries.labels(model))
        self.series[key] = s
        self._arm()
        return s

    def _one(self, table: dict[Any, _Count], key: Any, make: Any) -> _Count:
        c = table.get(key)
        if c is None:
            c = table[key] = _Count(make())
            self.small.append(c)
        self._arm()
        return c

    def fallback(self, model: str, cause: str, names: Names) -> None:
        m, c = names.model(model), cause if _CAUSE.match(cause) else OTHER
        self._one(self._fallback, (m, c), lambda: self.fallbacks.labels(m, c)).v += 1

    def limit_refused(self, tenant: str, limit: str, names: Names) -> None:
        t = names.tenant(tenant)
        self._one(self._limited, (t, limit), lambda: self.limited.labels(t, limit)).v += 1

    def aborted(self, model: str, names: Names) -> None:
        c = self._aborts.get(model)  # keyed by the model as given: one lookup on the request path
        if c is None:
            m = names.model(model)
            c = self._aborts[model] = self._one(self._aborts_by_label, m, lambda: self.aborts.labels(m))
        elif self._timer is None:
            self._arm()
        c.v += 1

    def estimated(self, model: str, names: Names) -> None:
        c = self._estimated.get(model)
        if c is None:
            m = names.model(model)
            c = self._estimated[model] = self._one(self._estimated_by_label, m, lambda: self.usage_estimated.labels(m))
        elif self._timer is None:
            self._arm()
        c.v += 1

    def semantic_outcome(self, route: str, outcome: str, names: Names) -> None:
        r, o = names.route(route), outcome if outcome in _SEMANTIC_OUTCOMES else OTHER
        self._one(self._semantic, (r, o), lambda: self.semantic.labels(r, o)).v += 1

    def _arm(self) -> None:
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._timer = loop.call_later(FLUSH_EVERY, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self.flush()
        self._arm()

    def flush(self) -> None:
        """Move every accumulated figure into the prometheus values (shared with the other workers)."""
        for s in self.series.values():
            for name in Series.__slots__:
                getattr(s, name).flush()
        for acc in self.small:
            acc.flush()


_SEMANTIC_OUTCOMES = frozenset({'in_budget', 'over_budget', 'busy', 'error'})

# A fallback's cause is a word from the resilience layer's code (never client input); anything else is `other`.
_CAUSE = re.compile(r'[a-z][a-z0-9_]{0,31}\Z')


class Names:
    """The label values a config allows; built per config snapshot."""

    __slots__ = ('adapters', 'models', 'routes', 'tenants', 'variants')

    def __init__(self, snap_cfg: Any) -> None:
        cfg = snap_cfg
        self.models = frozenset(cfg.models)
        self.routes = frozenset(r.name for r in cfg.routes)
        self.tenants = frozenset(cfg.tenants)
        ad = {a for m in cfg.models.values() for a in m.adapters}
        ad |= {t.adapter for t in cfg.tenants.values() if t.adapter}
        ad |= {v.adapter for s in cfg.splits.values() for v in s.variants if v.adapter}
        self.adapters = frozenset(ad)
        self.variants = frozenset(v.name for s in cfg.splits.values() for v in s.variants)

    @staticmethod
    def _pick(v: str | None, allowed: frozenset[str]) -> str:
        if v is None:
            return ''
        return v if v in allowed else OTHER

    def model(self, v: str | None) -> str:
        return self._pick(v, self.models)

    def route(self, v: str | None) -> str:
        return self._pick(v, self.routes)

    def tenant(self, v: str | None) -> str:
        return self._pick(v, self.tenants)

    def adapter(self, v: str | None) -> str:
        return self._pick(v, self.adapters)

    def variant(self, v: str | None) -> str:
        return self._pick(v, self.variants)


_metrics: Metrics | None = None


def get() -> Metrics:
    """This process's metrics (made on first use, in the worker)."""
    global _metrics
    if _metrics is None:
        _metrics = Metrics()
    return _metrics


def flush() -> None:
    if _metrics is not None:
        _metrics.flush()


# -- reading ------------------------------------------------------------------------------------


class _EndpointCollector:
    """Endpoint health and circuit state as this worker sees them, and tenant limits with what is used of them
    (gauges computed at scrape time)."""

    def __init__(self, snap: Snapshot | None, usage: dict[str, dict[str, float]] | None = None) -> None:
        self.snap = snap
        self.usage = usage or {}

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        from fastroute.admin import endpoint_state

        state = GaugeMetricFamily(
            'fastroute_endpoint_circuit_state',
            'Circuit-breaker state per endpoint (1 for the current state: closed, open, half_open)',
            labels=('model', 'endpoint', 'state'),
        )
        outstanding = GaugeMetricFamily(
            'fastroute_endpoint_outstanding',
            'Requests in flight to the endpoint (this worker)',
            labels=('model', 'endpoint'),
        )
        snap = self.snap
        if snap is not None:
            for name, pool in snap.pools.items():
                for ep in pool.endpoints:
                    st = endpoint_state(ep)
                    cur = circuit_of(st)
                    for s in ('closed', 'open', 'half_open'):
                        state.add_metric((name, ep.base, s), 1.0 if s == cur else 0.0)
                    outstanding.add_metric((name, ep.base), float(st.get('outstanding', ep.outstanding)))
        yield state
        yield outstanding
        limit = GaugeMetricFamily(
            'fastroute_tenant_limit',
            'A tenant limit (USD for spend, else requests or tokens)',
            labels=('tenant', 'limit'),
        )
        used = GaugeMetricFamily(
            'fastroute_tenant_limit_used',
            'What the tenant used of the limit in its current window (minute, UTC day, UTC month)',
            labels=('tenant', 'limit'),
        )
        if snap is not None:
            for tenant, lim in snap.obs.limits.items():
                for kind, v in msgspec.structs.asdict(lim).items():
                    if v is not None:
                        limit.add_metric((tenant, kind), float(v))
                        used.add_metric((tenant, kind), float(self.usage.get(tenant, {}).get(kind, 0.0)))
        yield limit
        yield used


def circuit_of(st: dict[str, Any]) -> str:
    """The circuit state in an endpoint's state dict ('closed' when the resilience layer gives none)."""
    c = st.get('circuit') or st.get('circuit_state') or st.get('state') or 'closed'
    if isinstance(c, dict):
        c = c.get('state', 'closed')
    c = str(c).lower().replace('-', '_')
    return c if c in ('closed', 'open', 'half_open') else 'closed'


def _registry(snap: Snapshot | None, usage: dict[str, dict[str, float]] | None = None) -> Any:
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    d = os.environ.get(MULTIPROC_ENV)
    reg = CollectorRegistry()
    if d:
        MultiProcessCollector(reg, path=d)
    else:
        for c in list(REGISTRY._collector_to_names):  # this process's own metrics (no multiprocess dir)
            reg.register(c)
    reg.register(_EndpointCollector(snap, usage))
    return reg


def render(snap: Snapshot | None, usage: dict[str, dict[str, float]] | None = None) -> tuple[bytes, str]:
    """The exposition text of all workers' metrics (and the tenants' limit `usage`), and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    flush()
    return generate_latest(_registry(snap, usage)), CONTENT_TYPE_LATEST


def samples(snap: Snapshot | None) -> Iterable[Any]:
    """Every sample of every worker's metrics (for the dashboard's figures)."""
    flush()
    for family in _registry(snap).collect():
        yield from family.samples
