"""Admin endpoints of observability: `GET /metrics` (Prometheus), `GET /dashboard` (one HTML page, no build
step) and `GET /admin/stats` (the JSON the page polls). All on the admin listener. The data endpoints need the
admin bearer token; the page itself holds no data, is served without it, asks for the token once and keeps it
in the browser tab's session storage (or takes it from the address's `#token=` fragment, never sent to a server).

Figures are the sums over all workers (the metrics' multiprocess mode); rates and recent percentiles are
computed by the page from the difference between two polls. Endpoint state and circuits are this worker's view.
"""

from __future__ import annotations

import math
import time
from importlib import resources
from typing import TYPE_CHECKING, Any

from fastroute import metrics
from fastroute.admin import AdminRequest, AdminResponse, endpoint_state, route
from fastroute.limits import KINDS

if TYPE_CHECKING:
    from fastroute.gateway import Snapshot

__all__ = ['stats']

_STARTED = time.time()


@route('GET', '/metrics')
async def _metrics(req: AdminRequest) -> AdminResponse:
    snap = req.app.snapshot
    usage = {t: await snap.obs.limiter.usage(t) for t in snap.obs.limits} if snap is not None else None
    body, ctype = metrics.render(snap, usage)
    return AdminResponse(200, body, ctype)


@route('GET', '/dashboard', public=True)  # the page holds no data; it asks for the token
async def _dashboard(req: AdminRequest) -> AdminResponse:
    page = resources.files('fastroute').joinpath('static/dashboard.html').read_bytes()
    return AdminResponse(200, page, 'text/html; charset=utf-8', [('cache-control', 'no-store')])


@route('GET', '/favicon.ico', public=True)
async def _favicon(req: AdminRequest) -> AdminResponse:
    return AdminResponse(204, b'', 'image/x-icon')


@route('GET', '/admin/stats')
async def _stats(req: AdminRequest) -> tuple[int, Any]:
    return 200, await stats(req.app.snapshot)


def _add(d: dict[Any, Any], key: Any, field: str, v: float) -> None:
    row = d.get(key)
    if row is None:
        row = d[key] = {}
    row[field] = row.get(field, 0.0) + v


def _hist(acc: dict[str, Any], labels: dict[str, str], value: float) -> None:
    le = labels['le']
    b = math.inf if le == '+Inf' else float(le)
    acc[b] = acc.get(b, 0.0) + value


async def stats(snap: Snapshot | None) -> dict[str, Any]:
    """Everything the dashboard shows, summed over workers; counters are totals since start."""
    by_model: dict[str, dict[str, float]] = {}
    by_pair: dict[tuple[str, str], dict[str, float]] = {}
    by_tenant: dict[str, dict[str, float]] = {}
    by_route: dict[str, dict[str, float]] = {}
    by_variant: dict[tuple[str, str], dict[str, float]] = {}
    fallbacks: dict[tuple[str, str], dict[str, float]] = {}
    refused: dict[tuple[str, str], dict[str, float]] = {}
    hists: dict[str, dict[float, float]] = {'latency': {}, 'ttft': {}, 'overhead': {}, 'upstream': {}}
    totals = {'requests': 0.0, 'errors': 0.0, 'cost': 0.0, 'reference_cost': 0.0, 'tokens_in': 0.0, 'tokens_out': 0.0}
    hist_names = {
        'fastroute_request_duration_seconds_bucket': 'latency',
        'fastroute_time_to_first_token_seconds_bucket': 'ttft',
        'fastroute_overhead_seconds_bucket': 'overhead',
        'fastroute_upstream_duration_seconds_bucket': 'upstream',
    }
    for s in metrics.samples(snap):
        name, lb, v = s.name, s.labels, s.value
        if name == 'fastroute_requests_total':
            err = 1.0 if int(lb['status']) >= 400 else 0.0
            totals['requests'] += v
            totals['errors'] += v * err
            if lb['model']:
                _add(by_model, lb['model'], 'requests', v)
                _add(by_model, lb['model'], 'errors', v * err)
                _add(by_pair, (lb['model'], lb['adapter']), 'requests', v)
            _add(by_tenant, lb['tenant'], 'requests', v)
            _add(by_route, lb['route'], 'requests', v)
        elif name == 'fastroute_cost_usd_total':
            totals['cost'] += v
            _add(by_model, lb['model'], 'cost', v)
            _add(by_tenant, lb['tenant'], 'cost', v)
        elif name == 'fastroute_reference_cost_usd_total':
            totals['reference_cost'] += v
            _add(by_tenant, lb['tenant'], 'reference_cost', v)
        elif name == 'fastroute_tokens_total':
            key = 'tokens_in' if lb['direction'] == 'input' else 'tokens_out'
            totals[key] += v
            _add(by_model, lb['model'], key, v)
            _add(by_tenant, lb['tenant'], key, v)
        elif name == 'fastroute_variant_requests_total':
            _add(by_variant, (lb['variant'], lb['model']), 'requests', v)
        elif name == 'fastroute_fallbacks_total':
            _add(fallbacks, (lb['model'], lb['cause']), 'count', v)
        elif name == 'fastroute_limit_rejections_total':
            _add(refused, (lb['tenant'], lb['limit']), 'count', v)
        elif name in hist_names:
            _hist(hists[hist_names[name]], lb, v)
    totals['saving'] = totals['reference_cost'] - totals['cost']
    out: dict[str, Any] = {
        'time': time.time(),
        'started': _STARTED,
        'totals': totals,
        'reference_model': None,
        'models': [{'model': k, **v} for k, v in sorted(by_model.items())],
        'model_adapters': [{'model': m, 'adapter': a, **v} for (m, a), v in sorted(by_pair.items())],
        'routes': [{'route': k, **v} for k, v in sorted(by_route.items())],
        'variants': [{'variant': k, 'model': m, **v} for (k, m), v in sorted(by_variant.items())],
        'fallbacks': [{'model': m, 'cause': c, **v} for (m, c), v in sorted(fallbacks.items())],
        'histograms': {k: _cumulative(h) for k, h in hists.items()},
        'tenants': [],
        'endpoints': [],
        'splits': [],
        'experiments': None,
        'limits_shared': False,
    }
    if snap is None:
        return out
    obs = snap.obs
    out['reference_model'] = obs.prices.reference_name
    out['limits_shared'] = obs.limiter.shared
    tenants = []
    for name in sorted(set(by_tenant) | set(obs.limits) | set(snap.cfg.tenants)):
        row = {'tenant': name or '(anonymous)', **{k: 0.0 for k in ('requests', 'cost', 'reference_cost')}}
        row.update(by_tenant.get(name, {}))
        row['saving'] = row['reference_cost'] - row['cost']
        lim = obs.limits.get(name)
        row['limits'] = {k: getattr(lim, k) for k in KINDS} if lim is not None else None
        row['usage'] = await obs.limiter.usage(name) if lim is not None else None
        row['refused'] = {lim_kind: v['count'] for (t, lim_kind), v in refused.items() if t == name}
        tenants.append(row)
    tenants.sort(key=lambda r: -r['cost'])
    out['tenants'] = tenants
    for name, pool in snap.pools.items():
        for ep in pool.endpoints:
            st = endpoint_state(ep)
            out['endpoints'].append(
                {
                    'model': name,
                    'url': ep.base,
                    'circuit': metrics.circuit_of(st),
                    'outstanding': st.get('outstanding', ep.outstanding),
                    'failures': st.get('consecutive_failures', ep.failures),
                    'state': st,
                }
            )
    for sname, split in snap.cfg.splits.items():
        out['splits'].append(
            {'name': sname, 'variants': [{'name': v.name, 'model': v.to, 'weight': v.weight} for v in split.variants]}
        )
    out['experiments'] = _experiments(snap)
    return out


def _cumulative(h: dict[float, float]) -> dict[str, list[float]]:
    bounds = sorted(h)
    return {'le': [b if math.isfinite(b) else -1.0 for b in bounds], 'count': [h[b] for b in bounds]}


def _experiments(snap: Snapshot) -> Any:
    """The experiments layer's state (canary step, weights), when it is present; None otherwise."""
    try:
        from fastroute import experiments  # type: ignore[attr-defined]
    except ImportError:
        return None
    for attr in ('dashboard_state', 'status', 'state'):
        fn = getattr(experiments, attr, None)
        if callable(fn):
            try:
                res = fn(snap)
            except Exception:  # the page shows what it can
                return None
            try:
                import msgspec

                return msgspec.to_builtins(res)
            except (TypeError, ValueError):
                return None
    return None
