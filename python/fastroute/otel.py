"""Optional OpenTelemetry tracing (`pip install fastroute[otel]`, then a `tracing:` section in the config).

One span per proxied request, from its arrival to the end of the answer, a child of the client's `traceparent`
when it sent one. The span's context goes upstream in `traceparent`/`tracestate`, so the model server's spans join
the same trace. Attributes: the decision (route, model, adapter, tenant, variant), status, tokens, cost, request
id; one event per failed upstream attempt (model, endpoint, cause). Spans are exported by a background thread
(BatchSpanProcessor), never on the event loop; the provider is made in each worker, after the fork.
"""

from __future__ import annotations

import os
import time
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastroute.gateway import Ctx
    from fastroute.obsconfig import Tracing

__all__ = ['Tracer', 'tracer_for']

EXPORT_DELAY_MS = 500
_PROP: Any = None  # the W3C trace-context propagator


class Tracer:
    """Spans of one process for one `tracing:` config."""

    def __init__(self, cfg: Tracing) -> None:
        try:
            from opentelemetry import trace  # noqa: F401
            from opentelemetry.sdk.trace import TracerProvider  # noqa: F401
        except ImportError:
            from fastroute.errors import ConfigError

            raise ConfigError(
                'tracing: OpenTelemetry is not installed; `pip install fastroute[otel]`, or remove the tracing: section'
            ) from None
        global _PROP
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        _PROP = TraceContextTextMapPropagator()
        self.cfg = cfg
        self._tracer: Any = None
        self._pid = -1

    def _get(self) -> Any:
        if self._tracer is None or self._pid != os.getpid():
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            cfg = self.cfg
            if cfg.exporter == 'console':
                from opentelemetry.sdk.trace.export import ConsoleSpanExporter

                exporter: Any = ConsoleSpanExporter(formatter=lambda s: s.to_json(indent=None) + '\n')
            else:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

                exporter = OTLPSpanExporter(endpoint=cfg.endpoint) if cfg.endpoint else OTLPSpanExporter()
            provider = TracerProvider(resource=Resource.create({'service.name': cfg.service_name}))
            provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=EXPORT_DELAY_MS))
            self._provider = provider
            self._tracer = provider.get_tracer('fastroute')
            self._pid = os.getpid()
        return self._tracer

    def _open(self, ctx: Ctx) -> Any:
        from opentelemetry.trace import SpanKind

        get = ctx.scope.headers.get
        carrier = {k: v for k in ('traceparent', 'tracestate') if (v := get(k)) is not None}
        parent = _PROP.extract(carrier) if carrier else None
        start_ns = time.time_ns() - (perf_counter_ns() - ctx.t0)
        return self._get().start_span(
            f'{ctx.scope.method} {ctx.path}', context=parent, kind=SpanKind.SERVER, start_time=start_ns
        )

    def start(self, ctx: Ctx, headers: list[tuple[str, str]]) -> None:
        """Open the request's span (started at its arrival) and put its context in the upstream headers."""
        from opentelemetry.trace import set_span_in_context

        span = ctx.span = self._open(ctx)
        out: dict[str, str] = {}
        _PROP.inject(out, context=set_span_in_context(span))
        headers[:] = [(k, v) for k, v in headers if k not in ('traceparent', 'tracestate')]
        headers.extend(out.items())

    def record(self, ctx: Ctx, model: str | None, status: int, tin: int, tout: int, cost: float) -> None:
        span = ctx.span or self._open(ctx)  # a request answered before going upstream gets its span here
        ctx.span = None
        from opentelemetry.trace import Status, StatusCode

        d = ctx.decision
        attrs: dict[str, Any] = {
            'http.request.method': ctx.scope.method,
            'url.path': ctx.path,
            'http.response.status_code': status,
            'fastroute.request_id': ctx.rid,
            'fastroute.attempts': ctx.attempts,
            'gen_ai.usage.input_tokens': tin,
            'gen_ai.usage.output_tokens': tout,
            'fastroute.cost_usd': cost,
        }
        if d is not None:
            for key, v in (
                ('route', d.route),
                ('model', model),
                ('adapter', d.adapter),
                ('tenant', d.tenant),
                ('variant', d.variant),
            ):
                if v is not None:
                    attrs[f'fastroute.{key}'] = v
            attrs['fastroute.stream'] = d.stream
            if d.score is not None:
                attrs['fastroute.score'] = d.score
        if ctx.endpoint is not None:
            attrs['server.address'] = ctx.endpoint.base
        span.set_attributes(attrs)
        for fb in ctx.fallbacks or ():
            span.add_event(
                'upstream attempt failed', {'model': str(fb[0]), 'endpoint': str(fb[1]), 'cause': str(fb[2])}
            )
        if ctx.aborted:
            span.add_event('upstream stream broke after bytes were sent')
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        span.end()

    def shutdown(self) -> None:
        provider = getattr(self, '_provider', None)
        if provider is not None and self._pid == os.getpid():
            provider.force_flush(2000)


_tracers: dict[Any, Tracer] = {}


def tracer_for(cfg: Tracing) -> Tracer:
    t = _tracers.get(cfg)
    if t is None:
        t = _tracers[cfg] = Tracer(cfg)
    return t
