"""Config sections of observability, cost and limits: `tenants.<name>.limits`, `spend:`, `access_log:`,
`metrics:` and `tracing:`. The structs are part of the config schema (`fastroute.config.Config`); the checks
run with the other semantic checks so every problem names its key path."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import msgspec

if TYPE_CHECKING:
    from fastroute.config import Config

__all__ = ['AccessLog', 'Limits', 'Metrics', 'Spend', 'Tracing', 'check']


class _Base(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    pass


class Limits(_Base):
    """A tenant's limits. Over one, requests get 429 with Retry-After. Unset: no limit."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None  # input + output tokens (the upstream's usage, else the estimate)
    spend_per_day: float | None = None  # USD, UTC day
    spend_per_month: float | None = None  # USD, UTC month


class Spend(_Base):
    """Cost accounting. `reference` names the model every request is priced against to report the saving
    (e.g. the large model: "what would this traffic have cost without routing")."""

    reference: str | None = None


class AccessLog(_Base):
    """One JSON line per request (also what `fastroute simulate` replays). Buffered; written off the event loop."""

    path: str  # file appended to ("-": standard output)
    log_prompts: bool = False  # add the request body as `request`; it holds prompt text: off unless you need it
    flush_interval: float = 1.0  # seconds between writes
    max_buffer_lines: int = 100_000  # beyond this many unwritten lines (a stalled disk) lines are dropped and counted


class Metrics(_Base):
    """Prometheus metrics on the admin listener (`GET /metrics`)."""

    enabled: bool = True


class Tracing(_Base):
    """OpenTelemetry tracing (needs `pip install fastroute[otel]`): a span per request, context sent upstream."""

    enabled: bool = True
    service_name: str = 'fastroute'
    exporter: Literal['otlp', 'console'] = 'otlp'
    endpoint: str | None = None  # OTLP/HTTP endpoint; default: the OTEL_EXPORTER_OTLP_ENDPOINT env var


def _positive(add: Callable[[str, str], None], path: str, value: float | None, example: str) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        add(path, f'must be a positive number, got {value!r}; e.g. {example}')


def check(cfg: Config, add: Callable[[str, str], None], warn: Callable[[str, str], None] | None = None) -> None:
    """Semantic checks of these sections; `add(key_path, message)` reports a problem, `warn` a doubt."""
    models = list(cfg.models)
    for name, tenant in cfg.tenants.items():
        lim = tenant.limits
        if lim is None:
            continue
        path = f'tenants.{name}.limits'
        if warn is not None and cfg.redis is None and cfg.server.workers > 1:
            warn(
                path,
                f'with server.workers: {cfg.server.workers} and no redis: section each worker counts this limit '
                'alone (up to workers x the limit); add a redis: section to share it',
            )
        _positive(add, f'{path}.requests_per_minute', lim.requests_per_minute, '600')
        _positive(add, f'{path}.tokens_per_minute', lim.tokens_per_minute, '100000')
        _positive(add, f'{path}.spend_per_day', lim.spend_per_day, '5.0 (USD)')
        _positive(add, f'{path}.spend_per_month', lim.spend_per_month, '100.0 (USD)')
    if cfg.spend is not None and cfg.spend.reference is not None and cfg.spend.reference not in cfg.models:
        add('spend.reference', f'unknown model {cfg.spend.reference!r}; known models: {", ".join(models)}')
    a = cfg.access_log
    if a is not None:
        if not a.path:
            add('access_log.path', 'must name a file to append to, or "-" for standard output')
        elif a.path != '-':
            d = os.path.dirname(os.path.abspath(a.path))
            if not os.path.isdir(d):
                add('access_log.path', f'the directory {d} does not exist; create it or choose another path')
        _positive(add, 'access_log.flush_interval', a.flush_interval, '1.0 (seconds)')
        _positive(add, 'access_log.max_buffer_lines', a.max_buffer_lines, '100000')
