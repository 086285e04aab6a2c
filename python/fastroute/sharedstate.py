"""Control state shared across workers and replicas through Redis (config `redis:`).

What lives here: each experiment's control state (one JSON document with a version, changed only by
compare-and-set), the canary's sample counters (one hash per experiment and epoch, added to with
HINCRBY, so every worker's and replica's requests count), and a short lease that names the one process
whose canary controller decides.

Every call is bounded by `redis.timeout`. When Redis cannot be reached the call raises `Unavailable`;
the caller keeps serving with the last state it read. The first failure of an outage is logged as an
error naming the Redis URL, the recovery as info; `STATS` counts calls that failed and outages, for the
metrics. Nothing here is on the request path: a worker's sync loop calls it a few times a second.

Without Redis, the workers of one `fastroute serve` share the same documents through `LocalFiles` (a
directory created before the workers start), so an operator's action or a canary decision taken by any
worker holds on all of them; separate replicas need Redis.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

__all__ = ['STATE_DIR_ENV', 'STATS', 'LocalFiles', 'SharedState', 'Unavailable', 'safe_url']

log = logging.getLogger('fastroute')

T = TypeVar('T')

# Set by `fastroute serve` for its workers when they share experiment state through a directory (no Redis).
STATE_DIR_ENV = 'FASTROUTE_STATE_DIR'

# Process-wide counters the metrics layer may export.
STATS: dict[str, int] = {'calls': 0, 'failures': 0, 'outages': 0}

# KEYS[1] state key; ARGV[1] the version the writer read (0: absent), ARGV[2] the new document.
_CAS = """
local cur = redis.call('GET', KEYS[1])
local v = 0
if cur then v = tonumber(cjson.decode(cur)['version']) or 0 end
if v ~= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""

# KEYS[1] lease key; ARGV[1] owner, ARGV[2] ttl ms. Take the lease if free, renew it if ours.
_LEASE = """
local cur = redis.call('GET', KEYS[1])
if (not cur) or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
  return 1
end
return 0
"""


def safe_url(url: str) -> str:
    """`url` without its password, for logs and the admin API."""
    scheme, sep, rest = url.partition('://')
    creds, at, host = rest.rpartition('@')
    if not sep or not at:
        return url
    user = creds.split(':', 1)[0]
    return f'{scheme}://{user + ":" if user else ":"}<redacted>@{host}' if ':' in creds else url


class Unavailable(Exception):
    """Redis did not answer within `redis.timeout` (or refused the connection)."""


class SharedState:
    """A small async façade over redis-py for the experiment control state."""

    def __init__(self, url: str, prefix: str, timeout: float) -> None:
        import redis.asyncio as aioredis

        self.url = safe_url(url)
        self.prefix = prefix
        self.timeout = timeout
        self.client = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry_on_timeout=False
        )
        self.up = True
        self.last_error = ''
        self._cas = self.client.register_script(_CAS)
        self._lease = self.client.register_script(_LEASE)

    def key(self, *parts: str) -> str:
        return self.prefix + ':'.join(parts)

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        STATS['calls'] += 1
        try:
            out = await asyncio.wait_for(fn(), self.timeout * 2)
        except Exception as exc:  # redis.RedisError, OSError, TimeoutError: all mean "not now"
            STATS['failures'] += 1
            self.last_error = f'{type(exc).__name__}: {exc}'
            if self.up:
                self.up = False
                STATS['outages'] += 1
                log.error(
                    'fastroute: redis %s unreachable (%s failed: %s); serving with the last known experiment state',
                    self.url,
                    what,
                    self.last_error,
                )
            raise Unavailable(self.last_error) from None
        if not self.up:
            self.up = True
            log.info('fastroute: redis %s reachable again; experiment state catching up', self.url)
        return out

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        if not keys:
            return []
        out: list[bytes | None] = await self._call('MGET', lambda: self.client.mget(keys))
        return out

    async def create(self, key: str, doc: bytes) -> bool:
        """Write `doc` only if nothing is there yet."""
        return bool(await self._call('SET NX', lambda: self.client.set(key, doc, nx=True)))

    async def cas(self, key: str, version: int, doc: bytes) -> bool:
        """Write `doc` only if the stored document still has `version` (0: absent)."""
        out = await self._call('CAS', lambda: self._cas(keys=[key], args=[version, doc]))
        return bool(out)

    async def add_counts(self, key: str, fields: Mapping[str, int], ttl: int = 7 * 86400) -> None:
        async def run() -> Any:
            pipe = self.client.pipeline(transaction=False)
            for f, n in fields.items():
                pipe.hincrby(key, f, n)
            pipe.expire(key, ttl)
            return await pipe.execute()

        if fields:
            await self._call('HINCRBY', run)

    async def counts(self, key: str) -> dict[bytes, bytes]:
        out: dict[bytes, bytes] = await self._call('HGETALL', lambda: self.client.hgetall(key))
        return out

    async def lease(self, key: str, owner: str, ttl_ms: int) -> bool:
        return bool(await self._call('lease', lambda: self._lease(keys=[key], args=[owner, ttl_ms])))

    async def close(self) -> None:
        try:
            await self.client.aclose()
        except Exception:  # closing; nothing to report
            pass


class LocalFiles:
    """The same interface over small files in one directory, for the workers of one server without Redis.

    `fastroute serve` with several workers, experiments and no `redis:` creates the directory before the
    workers start (`STATE_DIR_ENV`); each write takes an exclusive `flock` and replaces its file whole, so a
    reader always sees a complete document. A few file operations per worker every quarter second, on a
    local disk or tmpfs; nothing on the request path.
    """

    def __init__(self, directory: str) -> None:
        self.dir = directory
        self.url = f'file://{directory}'
        self.prefix = ''
        self.up = True
        self.last_error = ''
        self._lock = os.path.join(directory, '.lock')

    def key(self, *parts: str) -> str:
        return ':'.join(parts)

    def _path(self, key: str) -> str:
        return os.path.join(self.dir, key.replace('/', '_'))

    def _read(self, key: str) -> bytes | None:
        try:
            with open(self._path(key), 'rb') as f:
                return f.read()
        except FileNotFoundError:
            return None

    def _write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = f'{path}.{os.getpid()}.tmp'
        with open(tmp, 'wb') as f:
            f.write(data)
        os.replace(tmp, path)

    def _locked(self, what: str, fn: Callable[[], T]) -> T:
        STATS['calls'] += 1
        try:
            fd = os.open(self._lock, os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                return fn()
            finally:
                os.close(fd)
        except OSError as exc:
            STATS['failures'] += 1
            self.last_error = f'{what}: {exc}'
            if self.up:
                self.up = False
                STATS['outages'] += 1
                log.error('fastroute: experiment state directory %s failed (%s)', self.dir, self.last_error)
            raise Unavailable(self.last_error) from None

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        return self._locked('read', lambda: [self._read(k) for k in keys])

    async def create(self, key: str, doc: bytes) -> bool:
        def run() -> bool:
            if self._read(key) is not None:
                return False
            self._write(key, doc)
            return True

        return self._locked('create', run)

    async def cas(self, key: str, version: int, doc: bytes) -> bool:
        def run() -> bool:
            cur = self._read(key)
            v = 0
            if cur is not None:
                try:
                    v = int(json.loads(cur).get('version', 0))
                except (ValueError, AttributeError, TypeError):
                    v = -1
            if v != version:
                return False
            self._write(key, doc)
            return True

        return self._locked('cas', run)

    async def add_counts(self, key: str, fields: Mapping[str, int], ttl: int = 0) -> None:
        def run() -> None:
            raw = self._read(key)
            cur: dict[str, int] = json.loads(raw) if raw else {}
            for f, n in fields.items():
                cur[f] = cur.get(f, 0) + n
            self._write(key, json.dumps(cur).encode())

        if fields:
            self._locked('add', run)

    async def counts(self, key: str) -> dict[bytes, bytes]:
        raw = self._locked('read', lambda: self._read(key))
        data: dict[str, int] = json.loads(raw) if raw else {}
        return {k.encode(): str(v).encode() for k, v in data.items()}

    async def lease(self, key: str, owner: str, ttl_ms: int) -> bool:
        def run() -> bool:
            raw = self._read(key)
            now = time.time()
            if raw:
                holder, _, until = raw.decode().rpartition(' ')
                if holder != owner and float(until or 0) > now:
                    return False
            self._write(key, f'{owner} {now + ttl_ms / 1000}'.encode())
            return True

        return self._locked('lease', run)

    async def close(self) -> None:
        return None
