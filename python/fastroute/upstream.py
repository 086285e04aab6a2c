"""Upstream endpoints: pools, the keep-alive HTTP client, endpoint picking and reachability.

One `Pool` per logical model, one `Endpoint` per upstream URL in it. Each endpoint owns a
keep-alive client (pyreqwest, Rust/hyper) with a bounded number of connections and the model's
timeouts, so a slow or saturated upstream cannot starve the others. The HTTP library sits behind
`Endpoint.send` / `Endpoint.open_stream` and `UpstreamResponse` / `UpstreamStream`; nothing else
in fastroute imports it, so switching libraries touches this file only.

Timeouts (seconds, `server.timeouts`, overridden per model):
- connect: TCP connect (client level, enforced in Rust);
- first_byte: request sent until the response headers arrive;
- idle: the longest silence between two chunks of a streamed answer;
- total: the whole exchange, body included (client level, in Rust).
`first_byte` and `idle` both map onto the client's per-read timeout, set to the larger of the two;
a Python timer covers the smaller one only when they differ (never, with the defaults), so the
common path has no Python timer at all.

Every failure becomes `UpstreamError(stage=..., endpoint=..., retryable=...)`: stage "connect"
(could not connect or no free connection), "timeout", "read" (reset or broken body) or
"protocol" (an answer that is not HTTP).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from time import monotonic
from typing import TYPE_CHECKING

from pyreqwest import exceptions as rqe
from pyreqwest.client import Client, ClientBuilder

from fastroute.errors import UpstreamError

if TYPE_CHECKING:
    from fastroute.config import Config, Model

__all__ = [
    'Endpoint',
    'Pool',
    'Timeouts',
    'UpstreamResponse',
    'UpstreamStream',
    'build_pools',
    'check_reachable',
]

# NOTE: per-endpoint limits. Not (yet) config keys: 1024 requests in flight per endpoint is far
# above what one LLM server takes, and 256 idle keep-alive connections cover a 10k req/s burst.
MAX_IN_FLIGHT = int(os.environ.get('FASTROUTE_UPSTREAM_MAX_IN_FLIGHT', '1024'))
MAX_IDLE = int(os.environ.get('FASTROUTE_UPSTREAM_MAX_IDLE', '256'))
IDLE_KEEPALIVE_S = 90.0

# Response headers never relayed: hop-by-hop ones, and those the server in front sets itself.
RESPONSE_DROP = frozenset(
    {
        'connection',
        'keep-alive',
        'proxy-authenticate',
        'proxy-authorization',
        'proxy-connection',
        'te',
        'trailer',
        'transfer-encoding',
        'upgrade',
        'content-length',
        'date',
        'server',
        'x-request-id',
    }
)


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float
    first_byte: float
    idle: float
    total: float


class UpstreamResponse:
    """A complete, non-streamed upstream answer."""

    __slots__ = ('body', 'content_type', 'headers', 'status')

    def __init__(self, status: int, headers: list[tuple[str, str]], content_type: str | None, body: object) -> None:
        self.status = status
        # Headers to relay: a success's content-type (and content-encoding); an error's every
        # end-to-end header (retry-after, rate-limit state, ...).
        self.headers = headers
        self.content_type = content_type
        self.body = body  # a bytes-like buffer (zero-copy from the client)


class UpstreamStream:
    """An upstream answer whose body is read chunk by chunk. Always `aclose()` it."""

    __slots__ = ('_cm', '_endpoint', '_idle', '_reader', 'content_type', 'headers', 'status')

    def __init__(self, cm: object, resp: object, endpoint: Endpoint, idle: float | None) -> None:
        self._cm = cm
        self._endpoint = endpoint
        self._idle = idle
        self._reader = resp.body_reader  # type: ignore[attr-defined]
        self.status: int = resp.status  # type: ignore[attr-defined]
        self.headers, self.content_type = relay_headers(resp)

    async def read_chunk(self) -> object | None:
        """The next chunk as it arrived (a bytes-like buffer), or None at the end.

        Raises:
            UpstreamError: the body broke or went silent for longer than `idle` (not retryable:
                the caller has started answering).
        """
        try:
            if self._idle is None:
                return await self._reader.read_chunk()
            async with asyncio.timeout(self._idle):
                return await self._reader.read_chunk()
        except TimeoutError as exc:
            raise self._endpoint.error_from(exc, started=True) from None
        except rqe.PyreqwestError as exc:
            raise self._endpoint.error_from(exc, started=True) from None

    async def aclose(self) -> None:
        """Release the upstream connection. An unfinished body closes it, which cancels the upstream work."""
        cm, self._cm = self._cm, None
        if cm is not None:
            try:
                await cm.__aexit__(None, None, None)  # type: ignore[attr-defined]
            except Exception:  # closing must never raise
                pass


def relay_headers(resp: object) -> tuple[list[tuple[str, str]], str | None]:
    """The upstream response headers worth relaying, and its content-type."""
    out = []
    ctype = None
    for k, v in resp.headers.items():  # type: ignore[attr-defined]
        if k in RESPONSE_DROP:
            continue
        if k == 'content-type':
            ctype = v
        out.append((k, v))
    return out, ctype


class Endpoint:
    """One upstream base URL inside a pool, with its own bounded keep-alive client."""

    __slots__ = (
        '_client',
        '_first_byte',
        '_idle',
        'base',
        'failures',
        'last_error',
        'model',
        'outstanding',
        'timeouts',
        'weight',
    )

    def __init__(self, model: str, base: str, weight: float, timeouts: Timeouts) -> None:
        self.model = model
        self.base = base.rstrip('/')
        self.weight = weight
        self.timeouts = timeouts
        self.outstanding = 0  # requests in flight through this worker
        self.failures = 0  # consecutive failures (the resilience layer reads and resets these)
        self.last_error: UpstreamError | None = None
        read = max(timeouts.first_byte, timeouts.idle)
        # A Python timer only for the smaller of first_byte/idle when they differ.
        self._first_byte = timeouts.first_byte if timeouts.first_byte < read else None
        self._idle = timeouts.idle if timeouts.idle < read else None
        self._client: Client | None = None

    def __repr__(self) -> str:
        return f'Endpoint({self.model}: {self.base}, outstanding={self.outstanding})'

    @property
    def client(self) -> Client:
        client = self._client
        if client is None:
            t = self.timeouts
            client = self._client = (
                ClientBuilder()
                .max_connections(MAX_IN_FLIGHT)
                .pool_max_idle_per_host(MAX_IDLE)
                .pool_idle_timeout(timedelta(seconds=IDLE_KEEPALIVE_S))
                .pool_timeout(timedelta(seconds=t.connect))
                .connect_timeout(timedelta(seconds=t.connect))
                .read_timeout(timedelta(seconds=max(t.first_byte, t.idle)))
                .timeout(timedelta(seconds=t.total))
                .follow_redirects(False)
                .referer(False)
                .gzip(False)
                .brotli(False)
                .zstd(False)
                .deflate(False)
                .no_proxy()
                .user_agent('fastroute')
                .build()
            )
        return client

    async def send(self, method: str, path: str, headers: Sequence[tuple[str, str]], body: bytes) -> UpstreamResponse:
        """Send one request and read the whole answer.

        Raises:
            UpstreamError: connect, timeout, reset or protocol failure (retryable: nothing was relayed yet).
        """
        req = self.client.request(method, self.base + path).headers(headers).body_bytes(body).build()
        t0 = monotonic()
        try:
            if self._first_byte is None:
                resp = await req.send()
            else:
                async with asyncio.timeout(self._first_byte):
                    resp = await req.send()
            data = await resp.bytes()
        except (rqe.PyreqwestError, TimeoutError) as exc:
            raise self.error_from(exc, started=False, elapsed=monotonic() - t0) from None
        status = resp.status
        if status < 300:
            # NOTE: a success relays its content-type (and content-encoding) only: walking every
            # upstream header costs ~6% of a proxied request (callgrind, 11k of 199k instructions).
            ctype = resp.get_header('content-type')
            hdrs = [('content-type', ctype)] if ctype is not None else []
            enc = resp.get_header('content-encoding')
            if enc is not None:
                hdrs.append(('content-encoding', enc))
        else:  # errors keep every end-to-end header: retry-after, rate-limit state, ...
            hdrs, ctype = relay_headers(resp)
        return UpstreamResponse(status, hdrs, ctype, data)

    async def open_stream(
        self, method: str, path: str, headers: Sequence[tuple[str, str]], body: bytes
    ) -> UpstreamStream:
        """Send one request and return once the response headers are in; the body is read by the caller.

        Raises:
            UpstreamError: as `send` (retryable).
        """
        # NOTE: a read-ahead buffer of 0: the client otherwise reads up to 64 KiB of body before it
        # returns the headers, which holds back a whole SSE answer (measured: 2 s instead of 9 ms).
        cm = (
            self.client.request(method, self.base + path)
            .headers(headers)
            .body_bytes(body)
            .streamed_read_buffer_limit(0)
            .build_streamed()
        )
        t0 = monotonic()
        try:
            if self._first_byte is None:
                resp = await cm.__aenter__()
            else:
                async with asyncio.timeout(self._first_byte):
                    resp = await cm.__aenter__()
        except (rqe.PyreqwestError, TimeoutError) as exc:
            raise self.error_from(exc, started=False, elapsed=monotonic() - t0) from None
        return UpstreamStream(cm, resp, self, self._idle)

    def error_from(self, exc: BaseException, *, started: bool, elapsed: float = 0.0) -> UpstreamError:
        """Classify a client failure, once, where it happened. `started`: the answer had begun."""
        where = f'{self.model} at {self.base}'
        retryable = not started
        t = self.timeouts
        if isinstance(exc, rqe.ConnectTimeoutError) and elapsed > t.connect * 1.5:
            # The client reports any timeout before the response headers as a connect timeout;
            # past the connect budget it was the first byte that never came.
            exc = TimeoutError()
        if isinstance(exc, rqe.PoolTimeoutError):
            err = UpstreamError(
                f'upstream {where}: no free connection (pool of {MAX_IN_FLIGHT} busy)',
                endpoint=self.base,
                stage='connect',
                retryable=retryable,
                status=503,
                code='upstream_overloaded',
            )
        elif isinstance(exc, rqe.ConnectTimeoutError):
            err = UpstreamError(
                f'upstream {where}: connect timed out after {self.timeouts.connect:g}s',
                endpoint=self.base,
                stage='connect',
                retryable=retryable,
                status=504,
                code='upstream_timeout',
            )
        elif isinstance(exc, rqe.ConnectError):
            err = UpstreamError(
                f'upstream {where}: connection failed',
                endpoint=self.base,
                stage='connect',
                retryable=retryable,
                status=502,
                code='upstream_connect_error',
            )
        elif isinstance(exc, TimeoutError):  # pyreqwest's timeouts subclass TimeoutError too
            if started:
                what = f'no data for {self.timeouts.idle:g}s'
            else:
                what = f'no answer within {min(self.timeouts.first_byte, self.timeouts.total):g}s'
            err = UpstreamError(
                f'upstream {where}: {what}',
                endpoint=self.base,
                stage='timeout',
                retryable=retryable,
                status=504,
                code='upstream_timeout',
            )
        elif isinstance(exc, rqe.TransportError):
            err = UpstreamError(
                f'upstream {where}: connection broken',
                endpoint=self.base,
                stage='read',
                retryable=retryable,
                status=502,
                code='upstream_reset',
            )
        else:
            err = UpstreamError(
                f'upstream {where}: bad response',
                endpoint=self.base,
                stage='protocol',
                retryable=retryable,
                status=502,
                code='upstream_bad_response',
            )
        self.last_error = err
        return err

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()


class Pool:
    """The endpoints of one logical model, and the constant parts of every request sent to them."""

    __slots__ = ('_rr', 'api_key', 'auth_headers', 'endpoints', 'name', 'timeouts', 'upstream_model')

    def __init__(self, name: str, endpoints: list[Endpoint], api_key: str | None, upstream_model: str | None) -> None:
        self.name = name
        self.endpoints = tuple(endpoints)
        self.api_key = api_key
        self.upstream_model = upstream_model
        # Prepended to every upstream request: the model's own key, never the client's.
        self.auth_headers: tuple[tuple[str, str], ...] = (('authorization', f'Bearer {api_key}'),) if api_key else ()
        self.timeouts = endpoints[0].timeouts if endpoints else None
        self._rr = 0

    def pick(self) -> Endpoint:
        """Least outstanding requests; ties go round-robin. O(endpoints), no allocation."""
        eps = self.endpoints
        n = len(eps)
        if n == 1:
            return eps[0]
        start = self._rr = (self._rr + 1) % n
        best = eps[start]
        low = best.outstanding
        if low:
            for i in range(1, n):
                ep = eps[(start + i) % n]
                if ep.outstanding < low:
                    best, low = ep, ep.outstanding
                    if not low:
                        break
        return best

    async def close(self) -> None:
        for ep in self.endpoints:
            await ep.close()


def _timeouts(cfg: Config, model: Model) -> Timeouts:
    t = model.timeouts or cfg.server.timeouts
    return Timeouts(connect=t.connect, first_byte=t.first_byte, idle=t.idle, total=t.total)


def _api_key(model: Model) -> str | None:
    if model.api_key:
        return model.api_key
    if model.api_key_env:
        return os.environ.get(model.api_key_env) or None
    return None


def build_pools(cfg: Config) -> dict[str, Pool]:
    """One Pool per configured model. Clients are created lazily, inside the worker's event loop."""
    pools = {}
    for name, model in cfg.models.items():
        timeouts = _timeouts(cfg, model)
        eps = []
        for ep in model.endpoints:
            if isinstance(ep, str):
                eps.append(Endpoint(name, ep, 1.0, timeouts))
            else:
                eps.append(Endpoint(name, ep.url, ep.weight, timeouts))
        pools[name] = Pool(name, eps, _api_key(model), model.upstream_model)
    return pools


def _host_port(base: str) -> tuple[str, int]:
    scheme, _, rest = base.partition('://')
    hostport = rest.split('/', 1)[0].rsplit('@', 1)[-1]
    if hostport.startswith('['):
        host, _, port = hostport[1:].partition(']')
        port = port.lstrip(':')
    else:
        host, _, port = hostport.partition(':')
    return host, int(port) if port else (443 if scheme == 'https' else 80)


async def check_reachable(base: str, timeout: float = 0.5) -> bool:
    """True when a TCP connection to the endpoint opens within `timeout` seconds."""
    host, port = _host_port(base)
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return True


class Readiness:
    """`/readyz`: at least one reachable endpoint per model, probed at most every `ttl` seconds."""

    __slots__ = ('_at', '_lock', '_result', 'pools', 'ttl')

    def __init__(self, pools: dict[str, Pool], ttl: float = 2.0) -> None:
        self.pools = pools
        self.ttl = ttl
        self._at = -1e9
        self._result: dict[str, bool] = {}
        self._lock = asyncio.Lock()

    async def check(self) -> dict[str, bool]:
        """Model name -> reachable, cached for `ttl` seconds."""
        if time.monotonic() - self._at < self.ttl:
            return self._result
        async with self._lock:
            if time.monotonic() - self._at < self.ttl:
                return self._result
            bases = sorted({ep.base for p in self.pools.values() for ep in p.endpoints})
            up = dict(zip(bases, await asyncio.gather(*(check_reachable(b) for b in bases)), strict=True))
            self._result = {name: any(up[ep.base] for ep in p.endpoints) for name, p in self.pools.items()}
            self._at = time.monotonic()
            return self._result
