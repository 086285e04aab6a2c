"""Resilience: the per-model retry policy, the retry budget, per-endpoint circuit breakers and backoff.

The gateway's `on_upstream_error` phase walks a request's candidates (the model's other endpoints, then its
`fallback` models in order) with the helpers here. A try moves on only while nothing has reached the client:
connect error, reset, timeout to the first byte (the first token of a stream), or an upstream status listed
in `retry.on_status` (429 and 5xx by default; 400/413/422 never). Each move spends from the model's retry
budget and waits a jittered backoff; a 429's Retry-After is waited for when it is short (up to
`retry.retry_after_max`), else the endpoint cools down for that long and the request moves on.

Breaker (per endpoint, per worker): `breaker.consecutive_failures` failures in a row, or an error rate of
`breaker.error_rate` over `breaker.window` seconds (with at least `breaker.min_requests`), open it; after
`breaker.cooldown` it is half-open and lets `breaker.half_open_probes` requests through at once; a success
closes it, a failure opens it again. Windows are kept lazily (`Window`): a success or a request is one
addition to a running total, and the window is only rolled when a failure or a retry reads it.

Everything here is plain state on the worker's event loop: no locks, no tasks, no I/O.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import logging
import random
import time
from typing import TYPE_CHECKING, Any

import msgspec

from fastroute.errors import FallbackExhausted, UpstreamError

if TYPE_CHECKING:
    from fastroute.config import Breaker as BreakerCfg
    from fastroute.config import Config, Model
    from fastroute.config import Retry as RetryCfg
    from fastroute.gateway import Ctx, Snapshot
    from fastroute.upstream import Endpoint, Pool, UpstreamResponse

__all__ = [
    'CLOSED',
    'HALF_OPEN',
    'OPEN',
    'Breaker',
    'Policy',
    'RetryBudget',
    'Walk',
    'Window',
    'backoff_delay',
    'exhausted',
    'parse_retry_after',
    'policy_for',
    'rewrite_model',
    'status_error',
]

log = logging.getLogger('fastroute')

CLOSED, OPEN, HALF_OPEN = 'closed', 'open', 'half_open'
BUDGET_WINDOW = 10.0  # seconds over which the retry budget compares retries with requests


class Policy:
    """One model's retry settings, compiled once per config."""

    __slots__ = (
        'backoff',
        'backoff_max',
        'breaker',
        'budget_min_per_s',
        'budget_ratio',
        'first_token_timeout',
        'max_attempts',
        'retry_after_max',
        'retry_on',
    )

    def __init__(self, retry: RetryCfg, breaker: BreakerCfg, first_token_timeout: float | None) -> None:
        self.max_attempts = retry.max_attempts
        self.retry_on = frozenset(retry.on_status)
        self.retry_after_max = retry.retry_after_max
        self.backoff = retry.backoff
        self.backoff_max = retry.backoff_max
        self.budget_ratio = retry.budget_ratio
        self.budget_min_per_s = retry.budget_min_per_s
        self.breaker = breaker
        self.first_token_timeout = first_token_timeout


def policy_for(cfg: Config, model: Model) -> Policy:
    return Policy(model.retry or cfg.server.retry, model.breaker or cfg.server.breaker, model.first_token_timeout)


class Window:
    """Counts over a sliding window of `size` seconds, kept lazily so that counting costs one addition.

    `n` and `bad` only grow (the hot path does `window.n += 1`); the window is rolled when it is read: the
    counts since `start` become the previous window (scaled to `size` seconds when it lasted longer) and are
    weighed by how much of it still overlaps the last `size` seconds."""

    __slots__ = ('bad', 'bad0', 'n', 'n0', 'prev_bad', 'prev_n', 'size', 'start')

    def __init__(self, size: float) -> None:
        self.size = size
        self.start = time.perf_counter()
        self.n = self.bad = 0  # totals so far
        self.n0 = self.bad0 = 0  # the totals at `start`
        self.prev_n = self.prev_bad = 0.0

    def roll(self, now: float) -> float:
        """Start a new window if the current one is over; returns the previous window's weight."""
        age = now - self.start
        if age >= self.size:
            scale = self.size / age  # the counts since `start`, spread over its length, as one window
            self.prev_n = (self.n - self.n0) * scale
            self.prev_bad = (self.bad - self.bad0) * scale
            self.n0, self.bad0 = self.n, self.bad
            self.start = now
            age = 0.0
        return 1.0 - age / self.size

    def add(self, now: float, bad: bool) -> None:
        self.n += 1
        if bad:
            self.bad += 1

    def counts(self, now: float) -> tuple[float, float]:
        """(all, failed) over the last `size` seconds (approximately)."""
        w = self.roll(now)
        return self.n - self.n0 + self.prev_n * w, self.bad - self.bad0 + self.prev_bad * w


class RetryBudget:
    """Retries of one model stay within `ratio` of its requests plus `min_per_s` a second (sliding window).

    `window.n` counts requests (the gateway adds to it directly), `window.bad` retries."""

    __slots__ = ('min_retries', 'ratio', 'reported', 'window')

    def __init__(self, ratio: float, min_per_s: float, window: float = BUDGET_WINDOW) -> None:
        self.reported = -1e9
        self.ratio = ratio
        self.min_retries = min_per_s * window
        self.window = Window(window)

    def request(self) -> None:
        """Count one request (the gateway does `window.n += 1` itself)."""
        self.window.n += 1

    def try_spend(self) -> bool:
        """Take one retry if the budget allows it."""
        now = time.perf_counter()
        requests, retries = self.window.counts(now)
        if retries + 1 > requests * self.ratio + self.min_retries:
            return False
        self.window.bad += 1
        return True

    def report_spent(self, model: str) -> None:
        """Log (at most once per window) that requests of `model` are failing without a retry."""
        now = time.perf_counter()
        if now - self.reported < self.window.size:
            return
        self.reported = now
        requests, retries = self.window.counts(now)
        log.warning(
            'fastroute: model %s: retry budget spent (%.0f retries for %.0f requests in %gs; budget_ratio %g, '
            'budget_min_per_s %g): failed tries are answered without a retry until it recovers',
            model,
            retries,
            requests,
            self.window.size,
            self.ratio,
            self.min_retries / self.window.size,
        )

    def state(self) -> dict[str, float]:
        requests, retries = self.window.counts(time.perf_counter())
        return {
            'requests': round(requests, 1),
            'retries': round(retries, 1),
            'allowed': round(requests * self.ratio + self.min_retries, 1),
        }


class Breaker:
    """One endpoint's circuit breaker. `state` is CLOSED, OPEN or HALF_OPEN."""

    __slots__ = ('cfg', 'consecutive', 'opened', 'state', 'until', 'window')

    def __init__(self, cfg: BreakerCfg) -> None:
        self.cfg = cfg
        self.state = CLOSED
        self.consecutive = 0
        self.until = 0.0  # while OPEN: when probes may start
        self.opened = 0  # times opened
        self.window = Window(cfg.window)

    def ready(self, now: float, outstanding: int) -> bool:
        """May a request go to this endpoint now? Moves OPEN to HALF_OPEN once the cool-down is over."""
        state = self.state
        if state == CLOSED:
            return True
        if state == OPEN:
            if now < self.until:
                return False
            self.state = HALF_OPEN
        return outstanding < self.cfg.half_open_probes

    def success(self, now: float) -> bool:
        """Record a success; True when this closed the breaker."""
        self.consecutive = 0
        self.window.add(now, False)
        if self.state != CLOSED:
            self.state = CLOSED
            return True
        return False

    def failure(self, now: float) -> bool:
        """Record a failure; True when this opened the breaker."""
        self.consecutive += 1
        self.window.add(now, True)
        cfg = self.cfg
        if self.state == HALF_OPEN:
            return self._open(now)
        if self.state == OPEN:
            return False
        if self.consecutive >= cfg.consecutive_failures:
            return self._open(now)
        n, bad = self.window.counts(now)
        if n >= cfg.min_requests and bad >= cfg.error_rate * n:
            return self._open(now)
        return False

    def _open(self, now: float) -> bool:
        self.state = OPEN
        self.until = now + self.cfg.cooldown
        self.opened += 1
        return True

    def error_rate(self, now: float) -> float:
        n, bad = self.window.counts(now)
        return round(bad / n, 3) if n else 0.0


def backoff_delay(policy: Policy, retry_no: int) -> float:
    """Full-jitter exponential backoff before retry number `retry_no` (1-based)."""
    if policy.backoff <= 0:
        return 0.0
    cap = min(policy.backoff_max, policy.backoff * (2 ** (retry_no - 1)))
    return random.uniform(0, cap)


def parse_retry_after(headers: list[tuple[str, str]]) -> float | None:
    """Seconds from an upstream's `retry-after-ms` or `retry-after` (seconds or an HTTP date)."""
    for name, value in headers:
        if name == 'retry-after-ms':
            try:
                return max(0.0, float(value) / 1000)
            except ValueError:
                continue
    for name, value in headers:
        if name == 'retry-after':
            try:
                return max(0.0, float(value))
            except ValueError:
                return _retry_after_date(value)
    return None


def _retry_after_date(value: str) -> float | None:
    """Seconds until an HTTP date (`Retry-After: Wed, 21 Oct 2015 07:28:00 GMT`), 0 if it has passed; None
    when the value is not a date either."""
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; a date without a zone is read as UTC
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, when.timestamp() - time.time())


_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


def rewrite_model(body: bytes, model: str, drop: tuple[str, ...] = ('adapter_id',)) -> bytes:
    """The request body for a fallback model: `model` replaced, adapter fields of the first model removed.

    A cold path (only when falling back to another model), so Python parses the body here."""
    obj: Any = _decode(body)
    if not isinstance(obj, dict):
        return body
    obj['model'] = model
    for key in drop:
        obj.pop(key, None)
    return _encode(obj)


def exhausted(tried: list[tuple[str, str | None, UpstreamError]], skipped: list[str]) -> FallbackExhausted:
    """The error for a request whose every candidate failed: names each one and why; 502, 503 or 504 as fits.

    503: every failure was the upstreams being busy (429, 503, shed, circuits open); 504: every failure was a
    timeout; else 502. Retry-After: the shortest one an upstream gave, else 1 s for a busy fleet."""
    parts = [f'{model} at {url or "-"}: {_cause_text(err)}' for model, url, err in tried]
    parts += skipped
    statuses = {_kind(err) for _, _, err in tried} or {'busy'}
    if skipped and not tried:
        statuses = {'busy'}
    if statuses == {'busy'}:
        status = 503
    elif statuses == {'timeout'}:
        status = 504
    else:
        status = 502
    errors = {f'{model}@{url}': err for model, url, err in tried}
    n = len(tried)
    what = f'{n} upstream attempt{"s" if n != 1 else ""} failed' if n else 'no upstream could take the request'
    exc = FallbackExhausted(f'{what}: ' + '; '.join(parts), errors=errors, status=status)
    exc.code = 'upstream_unavailable' if status == 503 else 'upstream_timeout' if status == 504 else 'upstream_error'
    ras = [err.retry_after for _, _, err in tried if err.retry_after is not None]
    exc.retry_after = min(ras) if ras else (1.0 if status == 503 else None)
    return exc


def _kind(err: UpstreamError) -> str:
    if err.stage == 'timeout':
        return 'timeout'
    if err.status in (429, 503) or err.code in ('upstream_overloaded', 'circuit_open'):
        return 'busy'
    return 'error'


def _cause_text(err: UpstreamError) -> str:
    msg = err.message
    # the endpoint's own messages start with "upstream <model> at <url>: "; keep only the why
    head, sep, rest = msg.partition(': ')
    return rest if sep and head.startswith('upstream ') else msg


def cause(err: UpstreamError) -> str:
    """A short cause for `Ctx.fallbacks` and the logs: 'status 503', 'upstream_timeout', ..."""
    if err.stage == 'status':
        return f'status {err.status}'
    return err.code or err.stage


def status_error(ep: Endpoint, resp: UpstreamResponse) -> UpstreamError:
    """An upstream's error status as a failure of that try (Retry-After read for 429 and 503)."""
    ra = parse_retry_after(resp.headers) if resp.status in (429, 503) else None
    return UpstreamError(
        f'upstream {ep.model} at {ep.base}: answered {resp.status}',
        endpoint=ep.base,
        stage='status',
        status=resp.status,
        code='upstream_status',
        retry_after=ra,
    )


class Walk:
    """One request's way through its candidates once a try failed: the decided model's other endpoints, then
    each of its `fallback` models (their endpoints in turn). Created on the first failure only."""

    __slots__ = (
        'bodies',
        'budget_out',
        'decided',
        'models',
        'policy',
        'retries',
        'skipped',
        'snap',
        'tried',
        'tried_eps',
        'waited',
    )

    def __init__(self, snap: Snapshot, pool: Pool) -> None:
        self.snap = snap
        self.decided = pool
        self.policy = pool.policy
        self.tried: list[tuple[str, str | None, UpstreamError]] = []
        self.tried_eps: set[Endpoint] = set()
        self.models = list(pool.fallback)
        self.skipped: list[str] = []  # candidates that could not take the request (circuit open, ...)
        self.bodies: dict[str, bytes] = {}
        self.retries = 0
        self.budget_out = False
        self.waited = False  # a short Retry-After was waited for once

    def next_endpoint(self, ctx: Ctx, last: bool = False) -> Endpoint | None:
        """The next usable candidate not tried yet; sets `ctx.pool` to its model. `last`: the request's last
        try, which goes to a fallback model when one is left (it is more likely to work than another endpoint
        of a model that just failed)."""
        pool = ctx.pool
        assert pool is not None
        if not (last and self.models):
            ep = pool.pick_other(self.tried_eps)
            if ep is not None:
                return ep
        while self.models:
            name = self.models.pop(0)
            p = self.snap.pools.get(name)
            if p is None or not p.endpoints:
                continue
            ep = p.pick_other(self.tried_eps)
            if ep is None:
                self.skipped.extend(p.unavailable() or [f'{name}: no endpoint available'])
                continue
            ctx.pool = p
            return ep
        if last:  # no fallback model can take it: another endpoint of this one, then
            return pool.pick_other(self.tried_eps)
        return None

    async def next_after(self, ctx: Ctx, err: UpstreamError) -> Endpoint | None:
        """Record the failed try of `ctx.endpoint`; the next candidate (after backoff), or None to stop."""
        ep = ctx.endpoint
        pool = ctx.pool
        assert ep is not None and pool is not None
        err = err.with_traceback(None)  # kept in the walk and on the endpoint: no frames (they hold ctx)
        ra = err.retry_after
        if err.stage == 'status' and err.status == 429:
            ep.last_error = err
            if ra:
                ep.cool_down(ra)
        elif err.code != 'upstream_overloaded':  # fastroute's own connection limit is not the upstream's fault
            ep.failed(err)
        if ctx.fallbacks is None:
            ctx.fallbacks = []
        ctx.fallbacks.append((pool.name, ep.base, cause(err)))
        self.tried.append((pool.name, ep.base, err))
        self.tried_eps.add(ep)
        policy = self.policy
        if ctx.attempts >= policy.max_attempts:
            return None
        nxt = self.next_endpoint(ctx, last=ctx.attempts + 1 == policy.max_attempts)
        wait = 0.0
        if nxt is None and ra is not None and err.status == 429 and ra <= policy.retry_after_max and not self.waited:
            # nobody else to ask and the upstream says it is soon ready: ask it again after its Retry-After
            self.waited = True
            ctx.pool = pool
            nxt = ep
            wait = ra
        if nxt is None:
            return None
        budget = self.decided.budget
        if not budget.try_spend():
            self.budget_out = True
            budget.report_spent(self.decided.name)
            return None
        self.retries += 1
        delay = max(wait, backoff_delay(policy, self.retries))
        if delay > 0:
            await asyncio.sleep(delay)
        ctx.endpoint = nxt
        return nxt

    def final(self, err: UpstreamError) -> UpstreamError:
        """The error to answer with once the walk stops: the only failure itself, or all of them named."""
        if len(self.tried) == 1 and not self.skipped:
            return err
        exc = exhausted(self.tried, self.skipped)
        if self.budget_out:
            exc.message += f' (no more retries: the retry budget of model {self.decided.name!r} is spent)'
        return exc

    def shed(self, pool: Pool) -> UpstreamError:
        """Nothing could take the request at all: 503 with Retry-After."""
        exc = exhausted([], self.skipped or [f'{pool.name}: no endpoint available'])
        ra = pool.retry_in()
        if ra is not None:
            exc.retry_after = ra
        return exc

    def body_for(self, pool: Pool, body: bytes) -> bytes:
        """The request body for `pool`: the decided body for the decided model, else the model renamed."""
        if pool is self.decided:
            return body
        out = self.bodies.get(pool.name)
        if out is None:
            out = self.bodies[pool.name] = rewrite_model(body, pool.upstream_model or pool.name)
        return out
