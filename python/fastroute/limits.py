"""Per-tenant limits: requests and tokens per minute, spend per UTC day and month.

Checked right after the routing decision (`admit`), accounted when the answer is done (`commit`). Over a limit
the request gets 429 with Retry-After and a message naming the limit.

- Without `redis:` the counters live in the process (one worker: exact; several workers: each its own).
- With `redis:` one Lua script checks and counts atomically, so N replicas (and workers) share one budget and
  never allow N times the limit. Every Redis call is bounded by `redis.timeout`. When Redis fails or is slow,
  traffic is served on the process's own counters (always kept alongside) and each failure is logged and counted
  (`fastroute_limits_backend_errors_total`); Redis is tried again after a second.

Windows are fixed: the wall-clock minute, the UTC day, the UTC month. Tokens are counted at admission with the
decision's input estimate and corrected to the upstream's usage (input + output) when the answer ends; spend is
added when the answer ends, so requests in flight when a budget runs out may overshoot it by their own cost.
With Redis, the corrections and spend of finished requests are sent in one call per tenant every 50 ms.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from fastroute.errors import FastrouteError
from fastroute.resp import RespClient, Script

if TYPE_CHECKING:
    from fastroute.config import Redis
    from fastroute.obsconfig import Limits

__all__ = ['LimitError', 'Limiter', 'limiter_for']

log = logging.getLogger('fastroute')

RPM, TPM, DAY, MONTH = 'requests_per_minute', 'tokens_per_minute', 'spend_per_day', 'spend_per_month'
KINDS = (RPM, TPM, DAY, MONTH)
RETRY_REDIS_AFTER = 1.0  # seconds without Redis after a failure
COMMIT_EVERY = 0.05  # seconds: finished requests' tokens and spend go to Redis in one call per tenant this often


class LimitError(FastrouteError):
    status = 429
    type = 'rate_limit_error'

    def __init__(self, message: str, *, code: str, retry_after: float, limit: str) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after
        self.limit = limit


_win_sec = -1
_win: tuple[str, str, str, float, float, float] = ('', '', '', 0.0, 0.0, 0.0)  # ids and the ends of the windows


def _windows(now: float) -> tuple[str, str, str, float, float, float]:
    """(minute, day, month) window ids and the seconds left in each. The ids are worked out once a second."""
    global _win_sec, _win
    sec = int(now)
    if sec != _win_sec:
        minute = sec // 60
        t = datetime.fromtimestamp(sec, UTC)
        day_end = datetime(t.year, t.month, t.day, tzinfo=UTC).timestamp() + 86400
        month_end = datetime(t.year + (t.month == 12), t.month % 12 + 1, 1, tzinfo=UTC).timestamp()
        _win = (str(minute), t.strftime('%Y%m%d'), t.strftime('%Y%m'), minute * 60 + 60.0, day_end, month_end)
        _win_sec = sec
    mw, dw, mo, m_end, d_end, mo_end = _win
    return mw, dw, mo, m_end - now, d_end - now, mo_end - now


def _refusal(kind: str, lim: Limits, used: float, left: float, tenant: str) -> LimitError:
    limit = getattr(lim, kind)
    what = {
        RPM: f'{limit} requests per minute',
        TPM: f'{limit} tokens per minute',
        DAY: f'${limit:g} spend per day (UTC)',
        MONTH: f'${limit:g} spend per month (UTC)',
    }[kind]
    used_s = f'${used:.4f}' if kind in (DAY, MONTH) else f'{int(used)}'
    return LimitError(
        f'tenant {tenant!r} is over its limit of {what} (used: {used_s}); retry in {int(left + 0.999)} s '
        f'or ask the operator to raise tenants.{tenant}.limits.{kind}',
        code=f'{kind}_exceeded',
        retry_after=left,
        limit=kind,
    )


class _Local:
    """Counters of this process: {(tenant, kind): (window id, value)}."""

    def __init__(self) -> None:
        self.c: dict[tuple[str, str], list[Any]] = {}

    def get(self, tenant: str, kind: str, window: str) -> float:
        v = self.c.get((tenant, kind))
        return v[1] if v is not None and v[0] == window else 0

    def add(self, tenant: str, kind: str, window: str, amount: float) -> None:
        v = self.c.get((tenant, kind))
        if v is None or v[0] != window:
            self.c[(tenant, kind)] = [window, amount]
        else:
            v[1] += amount


# KEYS: rpm, tpm, day, month counters. ARGV: the four limits (-1: none), the input estimate, the TTLs.
# Returns {0} when admitted (and counted), else {index of the limit (1..4), value used}.
_ADMIT = Script("""
local est = tonumber(ARGV[5])
local rpm = tonumber(redis.call('GET', KEYS[1]) or '0')
local lim = tonumber(ARGV[1])
if lim >= 0 and rpm + 1 > lim then return {1, tostring(rpm)} end
local tpm = tonumber(redis.call('GET', KEYS[2]) or '0')
lim = tonumber(ARGV[2])
if lim >= 0 and tpm + est > lim then return {2, tostring(tpm)} end
for i = 3, 4 do
  lim = tonumber(ARGV[i])
  if lim >= 0 then
    local spent = tonumber(redis.call('GET', KEYS[i]) or '0')
    if spent >= lim then return {i, tostring(spent)} end
  end
end
redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[6])
if est > 0 then
  redis.call('INCRBY', KEYS[2], est)
  redis.call('EXPIRE', KEYS[2], ARGV[6])
end
return {0, ''}
""")

# KEYS: tpm, day, month. ARGV: token correction, cost, TTLs of the minute, day and month.
_COMMIT = Script("""
if tonumber(ARGV[1]) ~= 0 then
  redis.call('INCRBY', KEYS[1], ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
if tonumber(ARGV[2]) > 0 then
  redis.call('INCRBYFLOAT', KEYS[2], ARGV[2])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
  redis.call('INCRBYFLOAT', KEYS[3], ARGV[2])
  redis.call('EXPIRE', KEYS[3], ARGV[5])
end
return 1
""")


class Limiter:
    """Admission and accounting of tenant limits; one per process and Redis URL (see `limiter_for`)."""

    def __init__(self, redis_cfg: Redis | None) -> None:
        self.local = _Local()
        self.redis_cfg = redis_cfg
        self._client: RespClient | None = None
        self._key_cache: dict[str, tuple[tuple[str, str, str, str], list[str]]] = {}
        self._pending: dict[tuple[str, str, str, str], list[Any]] = {}  # commits not yet sent to Redis
        self._flush_at: asyncio.TimerHandle | None = None
        self._down_until = 0.0
        self._last_log = 0.0
        self.backend_errors = 0
        self.on_backend_error: Any = None  # callback(count) for metrics
        self._tasks: set[asyncio.Task] = set()

    # -- Redis ------------------------------------------------------------------------------------

    def _redis(self) -> RespClient:
        if self._client is None:
            assert self.redis_cfg is not None
            self._client = RespClient(self.redis_cfg.url, self.redis_cfg.timeout)
        return self._client

    def _use_redis(self) -> bool:
        return self.redis_cfg is not None and time.monotonic() >= self._down_until

    def _failed(self, exc: BaseException, what: str) -> None:
        if self._client is not None:
            self._client.reset()  # a late reply must not answer a newer call
        self.backend_errors += 1
        self._down_until = time.monotonic() + RETRY_REDIS_AFTER
        if self.on_backend_error is not None:
            self.on_backend_error()
        now = time.monotonic()
        if now - self._last_log > 10.0:
            self._last_log = now
            url = self.redis_cfg.url if self.redis_cfg else '?'
            log.warning(
                "limits: Redis %s failed at %s (%s: %s); serving on this process's own counters and retrying in %.0f s",
                what,
                url,
                type(exc).__name__,
                exc,
                RETRY_REDIS_AFTER,
            )

    def _key(self, tenant: str, kind: str, window: str) -> str:
        prefix = self.redis_cfg.key_prefix if self.redis_cfg else ''
        return f'{prefix}limit:{tenant}:{kind}:{window}'

    def _keys(self, tenant: str, windows: tuple[str, str, str, str]) -> list[str]:
        """The four counters' keys for the current windows (kept until a window changes)."""
        hit = self._key_cache.get(tenant)
        if hit is not None and hit[0] == windows:
            return hit[1]
        keys = [self._key(tenant, k, w) for k, w in zip(KINDS, windows, strict=True)]
        self._key_cache[tenant] = (windows, keys)
        return keys

    # -- admission and accounting -----------------------------------------------------------------

    async def admit(self, tenant: str, lim: Limits, est_tokens: int) -> LimitError | None:
        """Check and count one request; a `LimitError` to answer with when it is over a limit."""
        now = time.time()
        mw, dw, mo, m_left, d_left, mo_left = _windows(now)
        windows = (mw, mw, dw, mo)
        lefts = (m_left, m_left, d_left, mo_left)
        if self._use_redis():
            try:
                client = self._redis()
                keys = self._keys(tenant, windows)
                args = [_lim(lim.requests_per_minute), _lim(lim.tokens_per_minute), _lim(lim.spend_per_day)]
                args += [_lim(lim.spend_per_month), est_tokens, 120]
                res = await client.script(_ADMIT, keys, args)  # bounded by redis.timeout
            except Exception as exc:  # any Redis failure: serve on local counters
                self._failed(exc, 'admission')
            else:
                i = int(res[0])
                if i:
                    return _refusal(KINDS[i - 1], lim, float(res[1].decode()), lefts[i - 1], tenant)
                self.local.add(tenant, RPM, mw, 1)
                self.local.add(tenant, TPM, mw, est_tokens)
                return None
        loc = self.local
        used = loc.get(tenant, RPM, mw)
        if lim.requests_per_minute is not None and used + 1 > lim.requests_per_minute:
            return _refusal(RPM, lim, used, m_left, tenant)
        used = loc.get(tenant, TPM, mw)
        if lim.tokens_per_minute is not None and used + est_tokens > lim.tokens_per_minute:
            return _refusal(TPM, lim, used, m_left, tenant)
        for kind, w, left in ((DAY, dw, d_left), (MONTH, mo, mo_left)):
            cap = getattr(lim, kind)
            used = loc.get(tenant, kind, w)
            if cap is not None and used >= cap:
                return _refusal(kind, lim, used, left, tenant)
        loc.add(tenant, RPM, mw, 1)
        loc.add(tenant, TPM, mw, est_tokens)
        return None

    def commit(self, tenant: str, token_correction: int, cost: float) -> None:
        """Account a finished request: the tokens beyond the admission estimate, and its cost. Never waits."""
        now = time.time()
        mw, dw, mo, _, d_left, mo_left = _windows(now)
        loc = self.local
        if token_correction:
            loc.add(tenant, TPM, mw, token_correction)
        if cost > 0:
            loc.add(tenant, DAY, dw, cost)
            loc.add(tenant, MONTH, mo, cost)
        if self._use_redis() and (token_correction or cost > 0):
            # Batched: one Redis call per tenant and window every COMMIT_EVERY seconds, not one per request.
            key = (tenant, mw, dw, mo)
            p = self._pending.get(key)
            if p is None:
                self._pending[key] = [token_correction, cost, d_left, mo_left]
            else:
                p[0] += token_correction
                p[1] += cost
            if self._flush_at is None:
                self._flush_at = asyncio.get_running_loop().call_later(COMMIT_EVERY, self._flush)

    def _flush(self) -> None:
        self._flush_at = None
        pending, self._pending = self._pending, {}
        for (tenant, mw, dw, mo), (tokens, cost, d_left, mo_left) in pending.items():
            t = asyncio.ensure_future(self._commit_redis(tenant, mw, dw, mo, tokens, cost, d_left, mo_left))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _commit_redis(
        self, tenant: str, mw: str, dw: str, mo: str, tokens: int, cost: float, d_left: float, mo_left: float
    ) -> None:
        try:
            client = self._redis()
            keys = self._keys(tenant, (mw, mw, dw, mo))[1:]
            args = [tokens, repr(cost), 120, int(d_left) + 3600, int(mo_left) + 86400]
            await client.script(_COMMIT, keys, args)
        except Exception as exc:  # accounted locally; Redis misses this request
            self._failed(exc, 'accounting')

    async def usage(self, tenant: str) -> dict[str, float]:
        """What the tenant used in the current windows (shared counters when Redis answers)."""
        mw, dw, mo, *_ = _windows(time.time())
        windows = (mw, mw, dw, mo)
        if self._use_redis():
            try:
                client = self._redis()
                vals = await client.call(
                    'MGET', *(self._key(tenant, k, w) for k, w in zip(KINDS, windows, strict=True))
                )
                return {k: float(v.decode()) if v else 0.0 for k, v in zip(KINDS, vals, strict=True)}
            except Exception as exc:
                self._failed(exc, 'read')
        return {k: float(self.local.get(tenant, k, w)) for k, w in zip(KINDS, windows, strict=True)}

    @property
    def shared(self) -> bool:
        return self.redis_cfg is not None


def _lim(v: float | None) -> float:
    return -1 if v is None else v


_limiters: dict[tuple[str, str, float] | None, Limiter] = {}


def limiter_for(redis_cfg: Redis | None) -> Limiter:
    """The process's limiter for this Redis config (kept across reloads so counters survive them)."""
    key = (redis_cfg.url, redis_cfg.key_prefix, redis_cfg.timeout) if redis_cfg is not None else None
    lim = _limiters.get(key)
    if lim is None:
        lim = _limiters[key] = Limiter(redis_cfg)
    return lim
