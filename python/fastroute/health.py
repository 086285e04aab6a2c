"""Background upkeep of endpoints, per worker: active health checks and LoRA adapter / load polling.

- `models.<name>.health`: GET `path` on every endpoint each `interval`; `unhealthy_after` failed checks in a
  row (no answer within `timeout`, or a status that is not 2xx) take the endpoint out of balancing,
  `healthy_after` good ones bring it back. Passive health (the circuit breakers) works without this.
- `models.<name>.adapter_affinity`: every `interval`, read what vLLM-style servers expose: `/metrics`
  (`vllm:num_requests_running`, `vllm:num_requests_waiting`, and the running/waiting adapters of
  `vllm:lora_requests_info`) and, with `source: models`, the adapters listed by `/v1/models` (entries with a
  `parent`). The pool then prefers endpoints that have the request's adapter loaded and few requests
  waiting. An endpoint that cannot be read keeps its last known state until it can.

Each probe opens its own short connection (`connection: close`), so upkeep never takes a connection the
requests need. Tasks belong to a pool: a reload that keeps the pool keeps them, closing the pool ends them.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from typing import TYPE_CHECKING

import msgspec

from fastroute.upstream import _host_port, _ssl_context

if TYPE_CHECKING:
    from fastroute.config import AdapterPoll, HealthCheck
    from fastroute.gateway import Snapshot
    from fastroute.upstream import Endpoint, Pool

__all__ = ['http_get', 'parse_vllm_metrics', 'start_upkeep']

log = logging.getLogger('fastroute')

MAX_BODY = 4 * 1024 * 1024


async def http_get(
    base: str, path: str, timeout: float, headers: tuple[tuple[str, str], ...] = ()
) -> tuple[int, bytes]:
    """GET base+path on a fresh connection; (status, body). Raises OSError / TimeoutError / ValueError."""
    host, port = _host_port(base)
    tls = base.startswith('https://')
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(
            host, port, ssl=_ssl_context() if tls else None, server_hostname=host if tls else None
        )
        try:
            head = (
                f'GET {path} HTTP/1.1\r\nhost: {host}:{port}\r\nconnection: close\r\nuser-agent: fastroute-health\r\n'
            )
            head += ''.join(f'{k}: {v}\r\n' for k, v in headers)
            writer.write(head.encode() + b'\r\n')
            data = await reader.read(MAX_BODY)
            while True:
                more = await reader.read(MAX_BODY)
                if not more or len(data) > MAX_BODY:
                    break
                data += more
        finally:
            writer.close()
    line, _, rest = data.partition(b'\r\n')
    parts = line.split(b' ', 2)
    if len(parts) < 2 or not parts[0].startswith(b'HTTP/'):
        raise ValueError(f'not an HTTP answer from {base}{path}')
    status = int(parts[1])
    hdrs, _, body = rest.partition(b'\r\n\r\n')
    if b'transfer-encoding: chunked' in hdrs.lower():
        body = _unchunk(body)
    return status, body


def _unchunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b'\r\n')
        size = int(size_line.split(b';', 1)[0] or b'0', 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return bytes(out)


async def _check(ep: Endpoint, hc: HealthCheck, headers: tuple[tuple[str, str], ...]) -> None:
    try:
        status, _ = await http_get(ep.base, hc.path, hc.timeout, headers)
        ok = 200 <= status < 300
        why = f'status {status}'
    except (OSError, TimeoutError, ValueError, ssl.SSLError) as exc:
        ok = False
        why = type(exc).__name__ if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
    if ok == ep.healthy:
        ep.health_streak = 0
        return
    ep.health_streak += 1
    if ep.health_streak >= (hc.healthy_after if ok else hc.unhealthy_after):
        ep.health_streak = 0
        ep.set_healthy(ok)
        if ok:
            log.warning('fastroute: model %s endpoint %s is healthy again (%s)', ep.model, ep.base, hc.path)
        else:
            log.warning(
                'fastroute: model %s endpoint %s taken out: health check %s failed %d times (last: %s)',
                ep.model,
                ep.base,
                hc.path,
                hc.unhealthy_after,
                why,
            )


async def _health_loop(pool: Pool, hc: HealthCheck) -> None:
    while True:
        await asyncio.gather(*(_check(ep, hc, pool.auth_headers) for ep in pool.endpoints))
        await asyncio.sleep(hc.interval)


_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_vllm_metrics(text: str) -> tuple[int, int, set[str]]:
    """(running, waiting, adapters running or waiting) from a vLLM `/metrics` page (summed over models)."""
    running = waiting = 0
    adapters: set[str] = set()
    for line in text.splitlines():
        if not line.startswith('vllm:'):
            continue
        name, _, rest = line.partition('{')
        if name == 'vllm:num_requests_running':
            running += int(float(rest.rsplit(' ', 1)[-1]))
        elif name == 'vllm:num_requests_waiting':
            waiting += int(float(rest.rsplit(' ', 1)[-1]))
        elif name == 'vllm:lora_requests_info':
            labels = dict(_LABEL.findall(rest.rpartition('}')[0]))
            for key in ('running_lora_adapters', 'waiting_lora_adapters'):
                adapters.update(a for a in labels.get(key, '').split(',') if a)
    return running, waiting, adapters


def _model_adapters(body: bytes) -> set[str]:
    data = msgspec.json.decode(body)
    out = set()
    for m in data.get('data', []) if isinstance(data, dict) else []:
        if isinstance(m, dict) and m.get('parent') and m.get('id') != m.get('parent'):
            out.add(str(m['id']))
    return out


async def _poll(ep: Endpoint, ap: AdapterPoll, headers: tuple[tuple[str, str], ...]) -> None:
    try:
        status, body = await http_get(ep.base, '/metrics', ap.timeout, headers)
        if status == 200:
            running, waiting, adapters = parse_vllm_metrics(body.decode('utf-8', 'replace'))
            ep.load = (running, waiting)
            if ap.source == 'metrics':
                ep.adapters = frozenset(adapters)
        if ap.source == 'models':
            status, body = await http_get(ep.base, '/v1/models', ap.timeout, headers)
            if status == 200:
                ep.adapters = frozenset(_model_adapters(body))
    except (OSError, TimeoutError, ValueError, ssl.SSLError, msgspec.DecodeError) as exc:
        log.debug('fastroute: adapter poll of %s failed: %s', ep.base, exc)


async def _adapter_loop(pool: Pool, ap: AdapterPoll) -> None:
    while True:
        await asyncio.gather(*(_poll(ep, ap, pool.auth_headers) for ep in pool.endpoints))
        await asyncio.sleep(ap.interval)


def start_upkeep(snap: Snapshot, loop: asyncio.AbstractEventLoop) -> None:
    """Start the health checks and adapter polls of the snapshot's pools that have none running yet."""
    for name, pool in snap.pools.items():
        if pool.tasks:
            continue
        model = snap.cfg.models.get(name)
        if model is None:
            continue
        if model.health is not None:
            pool.tasks.append(loop.create_task(_health_loop(pool, model.health)))
        if model.adapter_affinity is not None:
            pool.tasks.append(loop.create_task(_adapter_loop(pool, model.adapter_affinity)))
