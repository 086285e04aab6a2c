"""`fastroute mock`: an OpenAI-compatible model-server simulator (vLLM / LoRAX-like) on granian RSGI.

Used by the demo, the integration tests and the benchmarks. One process serves one base model and a list of
LoRA adapters; answers are deterministic given (seed, served model, prompt) and name who answered
(`[mock:<model or adapter>] ...`), so a test can assert where a request went.

Timing (latency, time to first token, tokens per second) uses asyncio sleeps only; with all of them at 0 the
simulator answers at once and does thousands of requests per second per worker.

Faults are rules `{kind, rate, count?, model?, path?, ...}` checked in order on every inference request; the
first that fires decides the request's fate. They are set at start (`--fault`, `--error-rate`, `--config`) and
live through the admin API (`/_mock/...`), which is never subject to faults or to the API key.

With several workers (processes), admin changes are shared through a small control directory: the worker that
receives `POST /_mock/faults` writes `control.json`, the others pick it up before their next request; each
worker publishes its counters to `stats-<pid>.json` every 0.2 s and `GET /_mock/stats` merges them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import functools
import itertools
import os
import random
import socket
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import msgspec

ENV_CONFIG = 'FASTROUTE_MOCK_CONFIG'
FAULT_KINDS = ('429', '500', '502', '503', '504', 'error', 'hang', 'reset', 'stream_cut', 'slow_first_byte')
ADMIN_PREFIX = '/_mock/'

_WORDS = (
    'the model answers with a short and fully deterministic reply so that tests can compare bytes across runs '
    'routing latency adapter token stream cost quality request response budget tenant canary split fallback '
    'upstream gateway cluster signal vector summary document label policy metric window batch cache'
).split()
_MASK64 = (1 << 64) - 1


class FaultRule(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One injectable fault. `rate` is the probability per matching request; `count` caps how often it fires."""

    kind: str
    rate: float = 1.0
    count: int | None = None  # fire at most this many times (None: unlimited)
    model: str | None = None  # only requests for this model/adapter name
    path: str | None = None  # only requests on this path
    status: int | None = None  # for kind 'error' (any status); defaults to the kind for '429'/'5xx'
    retry_after: float = 1.0  # seconds, for 429 (Retry-After header)
    delay_ms: float = 2000.0  # slow_first_byte: wait before any byte (headers included)
    after_tokens: int = 2  # stream_cut: content tokens sent before the stream stops
    abort: bool = False  # stream_cut: also reset the connection instead of ending the body cleanly
    message: str | None = None


class MockConfig(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    model: str = 'mock-model'
    adapters: list[str] = msgspec.field(default_factory=list)
    host: str = '127.0.0.1'
    port: int = 8001
    name: str | None = None  # x-mock-served-by; default host:port
    ttft_ms: float = 50.0
    tps: float = 50.0  # tokens per second while streaming; 0 = instant
    latency_ms: float = 0.0  # extra delay before any processing (network/queue)
    max_output_tokens: int = 64
    max_model_len: int = 8192
    embedding_dim: int = 256
    max_concurrency: int = 0  # requests generated at once; beyond it they wait (vllm:num_requests_waiting); 0 = no cap
    max_lora: int = 0  # reported in vllm:lora_requests_info; 0 = number of adapters
    seed: int = 0
    api_key: str | None = None  # require `Authorization: Bearer <key>` on /v1/* (as vLLM --api-key)
    faults: list[FaultRule] = msgspec.field(default_factory=list)
    record: int = 256  # keep the last N inference requests for GET /_mock/requests (0: off)
    workers: int = 1
    backlog: int = 4096
    control_dir: str | None = None  # set by the CLI when workers > 1
    log_level: str = 'info'


class _Stats:
    __slots__ = (
        'by_model',
        'by_path',
        'by_status',
        'completion_tokens',
        'disconnects',
        'faults_injected',
        'in_flight',
        'prompt_tokens',
        'requests',
        'running',
        'running_adapters',
        'streams',
        'success_by_reason',
        'version',
        'waiting',
        'waiting_adapters',
    )

    def __init__(self) -> None:
        self.requests = 0
        self.streams = 0
        self.in_flight = 0
        self.running = 0
        self.waiting = 0
        self.disconnects = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.by_model: collections.Counter[str] = collections.Counter()
        self.by_path: collections.Counter[str] = collections.Counter()
        self.by_status: collections.Counter[str] = collections.Counter()
        self.faults_injected: collections.Counter[str] = collections.Counter()
        self.success_by_reason: collections.Counter[str] = collections.Counter()
        self.running_adapters: collections.Counter[str] = collections.Counter()
        self.waiting_adapters: collections.Counter[str] = collections.Counter()
        self.version = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            'requests': self.requests,
            'streams': self.streams,
            'in_flight': self.in_flight,
            'running': self.running,
            'waiting': self.waiting,
            'disconnects': self.disconnects,
            'prompt_tokens': self.prompt_tokens,
            'completion_tokens': self.completion_tokens,
            'by_model': dict(self.by_model),
            'by_path': dict(self.by_path),
            'by_status': dict(self.by_status),
            'faults_injected': dict(self.faults_injected),
            'success_by_reason': dict(self.success_by_reason),
        }


def _merge_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, dict):
                acc = out.setdefault(key, {})
                for k, v in value.items():
                    acc[k] = acc.get(k, 0) + v
            else:
                out[key] = out.get(key, 0) + value
    return out


def _error_body(message: str, type_: str, code: int, param: str | None = None) -> bytes:
    return msgspec.json.encode({'error': {'message': message, 'type': type_, 'param': param, 'code': code}})


_ERROR_TYPES = {
    400: 'BadRequestError',
    401: 'AuthenticationError',
    404: 'NotFoundError',
    413: 'RequestEntityTooLarge',
    429: 'RateLimitError',
    500: 'InternalServerError',
    502: 'BadGatewayError',
    503: 'ServiceUnavailableError',
    504: 'GatewayTimeoutError',
}


def _prompt_text(req: dict[str, Any]) -> str:
    """The text a request asks about: chat messages, else prompt/input (strings, lists, token ids)."""
    msgs = req.get('messages')
    if isinstance(msgs, list):
        parts: list[str] = []
        for m in msgs:
            c = m.get('content') if isinstance(m, dict) else None
            if isinstance(c, str):
                parts.append(c)
            elif isinstance(c, list):
                parts.extend(p['text'] for p in c if isinstance(p, dict) and isinstance(p.get('text'), str))
        return '\n'.join(parts)
    for key in ('prompt', 'input', 'inputs', 'text'):
        p = req.get(key)
        if p is not None:
            return _flatten_text(p)
    return ''


def _flatten_text(p: Any) -> str:
    if isinstance(p, str):
        return p
    if isinstance(p, list):
        return '\n'.join(_flatten_text(x) if isinstance(x, (str, list)) else str(x) for x in p)
    return str(p)


def _estimate_tokens(text: str) -> int:
    return max(1, (len(text) + 3) // 4)


@functools.lru_cache(maxsize=8192)
def _tokens(label: str, h: int, n: int) -> tuple[str, ...]:
    """n content tokens: the `[mock:<label>]` tag, then pseudo-random words drawn from h (a 64-bit LCG)."""
    toks = [f'[mock:{label}]']
    x = h | 1
    for _ in range(n - 1):
        x = (x * 6364136223846793005 + 1442695040888963407) & _MASK64
        toks.append(' ' + _WORDS[(x >> 33) % len(_WORDS)])
    return tuple(toks)


@functools.lru_cache(maxsize=4096)
def _vector(h: int, dim: int) -> tuple[float, ...]:
    rng = random.Random(h)
    v = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = sum(x * x for x in v) ** 0.5 or 1.0
    return tuple(x / norm for x in v)


def _find_client_socket(peer: str) -> socket.socket | None:
    """A duplicate of this process's socket connected to `peer` ('host:port'), found through /proc/self/fd."""
    host, _, port_s = peer.rpartition(':')
    host = host.strip('[]')
    try:
        port = int(port_s)
        fds = os.listdir('/proc/self/fd')
    except (ValueError, OSError):
        return None
    for fd_s in fds:
        try:
            if not os.readlink(f'/proc/self/fd/{fd_s}').startswith('socket:'):
                continue
            s = socket.socket(fileno=os.dup(int(fd_s)))
        except (OSError, ValueError):
            continue
        try:
            p = s.getpeername()
            if isinstance(p, tuple) and p[1] == port and p[0] in (host, f'::ffff:{host}'):
                return s
        except OSError:
            pass
        s.close()
    return None


def _abort_connection(peer: str) -> bool:
    """Kill the client's TCP connection without an HTTP response.

    RSGI gives an application no handle on the connection, and answering nothing makes granian send a 500.
    So the simulator finds the connected socket itself (it lives in this worker process), sets SO_LINGER to
    zero and shuts it down both ways: the client sees the connection end with no response, and granian's
    own close then sends an RST.
    """
    s = _find_client_socket(peer)
    if s is None:
        return False
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        return False
    finally:
        s.close()
    return True


class _Control:
    """Admin state shared between worker processes through files in a control directory."""

    def __init__(self, directory: str) -> None:
        self.dir = Path(directory)
        self.file = self.dir / 'control.json'
        self.mtime = 0
        self.pid = os.getpid()

    def publish(self, state: dict[str, Any]) -> None:
        tmp = self.dir / f'.control.{self.pid}.tmp'
        tmp.write_bytes(msgspec.json.encode(state))
        os.replace(tmp, self.file)
        self.mtime = self.file.stat().st_mtime_ns

    def poll(self) -> dict[str, Any] | None:
        try:
            mtime = os.stat(self.file).st_mtime_ns
        except FileNotFoundError:
            return None
        if mtime == self.mtime:
            return None
        self.mtime = mtime
        try:
            return msgspec.json.decode(self.file.read_bytes())
        except (OSError, msgspec.DecodeError):
            return None

    def dump_stats(self, stats: dict[str, Any]) -> None:
        tmp = self.dir / f'.stats-{self.pid}.tmp'
        tmp.write_bytes(msgspec.json.encode(stats))
        os.replace(tmp, self.dir / f'stats-{self.pid}.json')

    def other_stats(self, generation: int) -> list[dict[str, Any]]:
        out = []
        for f in self.dir.glob('stats-*.json'):
            pid = int(f.stem.split('-', 1)[1])
            if pid == self.pid:
                continue
            try:
                os.kill(pid, 0)
                data = msgspec.json.decode(f.read_bytes())
            except (OSError, msgspec.DecodeError):
                continue
            if data.pop('generation', -1) == generation:
                out.append(data)
        return out


class MockApp:
    """The RSGI application of one worker."""

    def __init__(self, config: MockConfig) -> None:
        self.cfg = config
        self.name = config.name or f'{config.host}:{config.port}'
        self.adapters: dict[str, str] = {a: f'/adapters/{a}' for a in config.adapters}
        self.rng = random.Random(config.seed)
        self.ids = itertools.count(1)
        self.id_prefix = f'{os.getpid():x}{random.getrandbits(24):06x}'
        self.started = time.time()
        self.requests: collections.deque[tuple[float, str, str, list[tuple[str, str]], bytes]] = collections.deque(
            maxlen=max(config.record, 1)
        )
        self.control = _Control(config.control_dir) if config.control_dir else None
        self.generation = 0
        self._apply_settings(self._initial_settings())
        self.stats = _Stats()
        self._slots: asyncio.Semaphore | None = None
        self._dumper: asyncio.Task[None] | None = None

    # ----- settings (timing + faults), shared across workers when there are several -----

    def _initial_settings(self) -> dict[str, Any]:
        c = self.cfg
        return {
            'ttft_ms': c.ttft_ms,
            'tps': c.tps,
            'latency_ms': c.latency_ms,
            'max_concurrency': c.max_concurrency,
            'faults': [msgspec.to_builtins(f) for f in c.faults],
            'adapters': dict.fromkeys(c.adapters, ''),
        }

    def _settings(self) -> dict[str, Any]:
        return {
            'ttft_ms': self.ttft_ms,
            'tps': self.tps,
            'latency_ms': self.latency_ms,
            'max_concurrency': self.max_concurrency,
            'faults': [msgspec.to_builtins(f) for f in self.faults],
            'adapters': self.adapters,
        }

    def _apply_settings(self, s: dict[str, Any]) -> None:
        self.ttft_ms = float(s['ttft_ms'])
        self.tps = float(s['tps'])
        self.latency_ms = float(s['latency_ms'])
        self.max_concurrency = int(s['max_concurrency'])
        self._slots = None
        self.faults = [msgspec.convert(f, FaultRule) for f in s['faults']]
        self.adapters = {a: p or f'/adapters/{a}' for a, p in s['adapters'].items()}
        self.header_base = [('content-type', 'application/json'), ('x-mock-served-by', self.name)]

    def _publish(self) -> None:
        if self.control is not None:
            self.control.publish({'generation': self.generation, 'settings': self._settings()})

    def _sync(self) -> None:
        """Pick up admin changes made through another worker (a stat() per request, only with workers > 1)."""
        if self.control is None:
            return
        state = self.control.poll()
        if state is None:
            return
        if state['generation'] != self.generation:
            self.generation = state['generation']
            self.stats = _Stats()
            self.requests.clear()
        self._apply_settings(state['settings'])

    def __rsgi_init__(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.control is not None:
            self._dumper = loop.create_task(self._dump_loop())

    def __rsgi_del__(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._dumper is not None:
            self._dumper.cancel()

    async def _dump_loop(self) -> None:
        assert self.control is not None
        seen = (-1, -1)
        while True:
            self._sync()
            key = (self.generation, self.stats.version)
            if key != seen:
                seen = key
                try:
                    self.control.dump_stats({**self.stats.as_dict(), 'generation': self.generation})
                except OSError:
                    pass
            await asyncio.sleep(0.2)

    # ----- RSGI entry -----

    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        if scope.proto != 'http':
            return
        path = scope.path
        if path.startswith(ADMIN_PREFIX):
            await self._admin(scope, proto, path)
        elif scope.method == 'POST':
            if path in ('/v1/load_lora_adapter', '/v1/unload_lora_adapter'):
                await self._lora_admin(proto, path)
            else:
                await self._inference(scope, proto, path)
        elif scope.method in ('GET', 'HEAD'):
            self._get(scope, proto, path)
        else:
            self._send_error(proto, 405, f'Method {scope.method} not allowed on {path}')

    def _send(self, proto: Any, status: int, body: bytes, headers: list[tuple[str, str]] | None = None) -> None:
        self.stats.by_status[str(status)] += 1
        proto.response_bytes(status, headers or self.header_base, body)

    def _send_error(
        self, proto: Any, status: int, message: str, param: str | None = None, extra: list | None = None
    ) -> None:
        headers = self.header_base + extra if extra else self.header_base
        self._send(proto, status, _error_body(message, _ERROR_TYPES.get(status, 'APIError'), status, param), headers)

    def _json(self, proto: Any, obj: Any, status: int = 200) -> None:
        proto.response_bytes(status, self.header_base, msgspec.json.encode(obj))

    # ----- GET endpoints -----

    def _get(self, scope: Any, proto: Any, path: str) -> None:
        if path == '/health':
            proto.response_bytes(200, self.header_base, b'{"status":"ok"}')
        elif path == '/v1/models':
            if not self._authorized(scope):
                self._send_error(proto, 401, 'Unauthorized')
                return
            self._json(proto, self._models())
        elif path == '/metrics':
            proto.response_bytes(
                200,
                [('content-type', 'text/plain; version=0.0.4; charset=utf-8'), ('x-mock-served-by', self.name)],
                self._metrics().encode(),
            )
        elif path == '/version':
            self._json(proto, {'version': 'fastroute-mock'})
        else:
            self._send_error(proto, 404, f'Not found: {path}')

    def _models(self) -> dict[str, Any]:
        created = int(self.started)
        base = self.cfg.model

        def card(model_id: str, root: str, parent: str | None) -> dict[str, Any]:
            return {
                'id': model_id,
                'object': 'model',
                'created': created,
                'owned_by': 'vllm',
                'root': root,
                'parent': parent,
                'max_model_len': self.cfg.max_model_len,
                'permission': [],
            }

        data = [card(base, base, None)] + [card(a, p, base) for a, p in self.adapters.items()]
        return {'object': 'list', 'data': data}

    def _metrics(self) -> str:
        st = self.stats
        m = self.cfg.model.replace('\\', '\\\\').replace('"', '\\"')
        lbl = f'model_name="{m}"'
        running_ad = ','.join(sorted(a for a, n in st.running_adapters.items() if n > 0))
        waiting_ad = ','.join(sorted(a for a, n in st.waiting_adapters.items() if n > 0))
        max_lora = self.cfg.max_lora or len(self.adapters)
        cache = st.running / self.max_concurrency if self.max_concurrency else 0.0
        lines = [
            '# HELP vllm:num_requests_running Number of requests in model execution batches.',
            '# TYPE vllm:num_requests_running gauge',
            f'vllm:num_requests_running{{{lbl}}} {float(st.running)}',
            '# HELP vllm:num_requests_waiting Number of requests waiting to be processed.',
            '# TYPE vllm:num_requests_waiting gauge',
            f'vllm:num_requests_waiting{{{lbl}}} {float(st.waiting)}',
            '# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.',
            '# TYPE vllm:kv_cache_usage_perc gauge',
            f'vllm:kv_cache_usage_perc{{{lbl}}} {cache}',
            '# HELP vllm:lora_requests_info Running stats on lora requests.',
            '# TYPE vllm:lora_requests_info gauge',
            f'vllm:lora_requests_info{{max_lora="{max_lora}",{lbl},running_lora_adapters="{running_ad}",'
            f'waiting_lora_adapters="{waiting_ad}"}} {time.time()}',
            '# HELP vllm:prompt_tokens_total Number of prefill tokens processed.',
            '# TYPE vllm:prompt_tokens_total counter',
            f'vllm:prompt_tokens_total{{{lbl}}} {float(st.prompt_tokens)}',
            '# HELP vllm:generation_tokens_total Number of generation tokens processed.',
            '# TYPE vllm:generation_tokens_total counter',
            f'vllm:generation_tokens_total{{{lbl}}} {float(st.completion_tokens)}',
            '# HELP vllm:request_success_total Count of successfully processed requests.',
            '# TYPE vllm:request_success_total counter',
        ]
        for reason in ('stop', 'length'):
            lines.append(
                f'vllm:request_success_total{{finished_reason="{reason}",{lbl}}} '
                f'{float(st.success_by_reason.get(reason, 0))}'
            )
        return '\n'.join(lines) + '\n'

    # ----- admin -----

    async def _admin(self, scope: Any, proto: Any, path: str) -> None:
        self._sync()
        method = scope.method
        if method == 'GET' and path == '/_mock/stats':
            self._json(proto, self._stats_view())
        elif method == 'GET' and path == '/_mock/faults':
            self._json(proto, {'faults': self._settings()['faults']})
        elif method == 'GET' and path == '/_mock/config':
            self._json(proto, self._settings())
        elif method == 'GET' and path == '/_mock/requests':
            self._json(proto, {'requests': self._recorded()})
        elif method == 'POST' and path == '/_mock/faults':
            body = await proto()
            try:
                self.faults = _parse_faults(body)
            except ValueError as e:
                self._json(proto, {'error': {'message': str(e), 'type': 'BadRequestError', 'code': 400}}, 400)
                return
            self._publish()
            self._json(proto, {'faults': self._settings()['faults']})
        elif method == 'POST' and path == '/_mock/config':
            body = await proto()
            try:
                self._apply_settings(_merge_config(self._settings(), body))
            except ValueError as e:
                self._json(proto, {'error': {'message': str(e), 'type': 'BadRequestError', 'code': 400}}, 400)
                return
            self._publish()
            self._json(proto, self._settings())
        elif method == 'POST' and path == '/_mock/reset':
            self.generation += 1
            self._apply_settings(self._initial_settings())
            self.stats = _Stats()
            self.requests.clear()
            self._publish()
            self._json(proto, self._stats_view())
        else:
            self._json(proto, {'error': {'message': f'no admin route {method} {path}', 'code': 404}}, 404)

    def _stats_view(self) -> dict[str, Any]:
        parts = [self.stats.as_dict()]
        if self.control is not None:
            parts += self.control.other_stats(self.generation)
        merged = _merge_stats(parts)
        return {
            'name': self.name,
            'model': self.cfg.model,
            'adapters': list(self.adapters),
            'workers': self.cfg.workers,
            'uptime_s': round(time.time() - self.started, 3),
            **merged,
            'faults': self._settings()['faults'],
        }

    def _recorded(self) -> list[dict[str, Any]]:
        out = []
        for ts, method, path, headers, body in self.requests:
            try:
                parsed: Any = msgspec.json.decode(body)
            except msgspec.DecodeError:
                parsed = body.decode('utf-8', 'replace')
            out.append({'time': ts, 'method': method, 'path': path, 'headers': dict(headers), 'body': parsed})
        return out

    async def _lora_admin(self, proto: Any, path: str) -> None:
        """vLLM's dynamic LoRA endpoints: {"lora_name": ..., "lora_path": ...}."""
        self._sync()
        try:
            req = msgspec.json.decode(await proto())
            name = req['lora_name']
            if not isinstance(name, str) or not name:
                raise TypeError
        except (msgspec.DecodeError, KeyError, TypeError):
            self._send_error(proto, 400, 'lora_name is required', 'lora_name')
            return
        if path.endswith('/load_lora_adapter'):
            if name in self.adapters:
                self._send_error(proto, 400, f'The lora adapter {name!r} has already been loaded.', 'lora_name')
                return
            self.adapters[name] = str(req.get('lora_path') or f'/adapters/{name}')
            msg = f'Success: LoRA adapter {name!r} added successfully.'
        else:
            if self.adapters.pop(name, None) is None:
                self._send_error(proto, 404, f'The lora adapter {name!r} cannot be found.', 'lora_name')
                return
            msg = f'Success: LoRA adapter {name!r} removed successfully.'
        self._publish()
        proto.response_str(200, [('content-type', 'text/plain'), ('x-mock-served-by', self.name)], msg)

    # ----- inference -----

    def _authorized(self, scope: Any) -> bool:
        key = self.cfg.api_key
        return key is None or scope.headers.get('authorization') == f'Bearer {key}'

    def _pick_fault(self, path: str, served: str) -> FaultRule | None:
        for rule in self.faults:
            if rule.count is not None and rule.count <= 0:
                continue
            if (rule.model is not None and rule.model != served) or (rule.path is not None and rule.path != path):
                continue
            if rule.rate < 1.0 and self.rng.random() >= rule.rate:
                continue
            if rule.count is not None:
                rule.count -= 1
            self.stats.faults_injected[rule.kind] += 1
            self.stats.version += 1
            return rule
        return None

    async def _inference(self, scope: Any, proto: Any, path: str) -> None:
        self._sync()
        st = self.stats
        st.requests += 1
        st.version += 1
        st.by_path[path] += 1
        st.in_flight += 1
        try:
            body = await proto()
            if self.cfg.record:
                self.requests.append((time.time(), scope.method, path, scope.headers.items(), body))
            if self.latency_ms > 0:
                await asyncio.sleep(self.latency_ms / 1000)
            await self._handle(scope, proto, path, body)
        finally:
            st.in_flight -= 1

    async def _handle(self, scope: Any, proto: Any, path: str, body: bytes) -> None:
        if not self._authorized(scope):
            self._send_error(proto, 401, 'Unauthorized')
            return
        try:
            req = msgspec.json.decode(body)
        except msgspec.DecodeError as e:
            self._send_error(proto, 400, f'Invalid JSON body: {e}')
            return
        if not isinstance(req, dict):
            self._send_error(proto, 400, 'The request body must be a JSON object')
            return
        requested = req.get('model')
        served = _adapter_id(req) or requested or self.cfg.model
        if not isinstance(served, str):
            self._send_error(proto, 400, 'model must be a string', 'model')
            return
        fault = self._pick_fault(path, served) if self.faults else None
        if fault is not None and fault.kind != 'stream_cut':
            await self._inject(scope, proto, fault)
            if fault.kind != 'slow_first_byte':
                return
            fault = None
        if served != self.cfg.model and served not in self.adapters:
            self._send_error(proto, 404, f'The model `{served}` does not exist.', 'model')
            return
        kind = 'embeddings' if path == '/v1/embeddings' else 'completions' if path == '/v1/completions' else 'chat'
        problem = _validate(req, kind, path)
        if problem:
            self._send_error(proto, 400, problem[0], problem[1])
            return
        extra = [('x-mock-model', served)]
        rid = scope.headers.get('x-request-id')
        if rid:
            extra.append(('x-request-id', rid))
        self.stats.by_model[served] += 1
        if kind == 'embeddings':
            await self._embeddings(proto, req, served, requested or served, extra)
        else:
            await self._generate(proto, req, kind, served, requested or served, extra, fault, scope.client)

    async def _inject(self, scope: Any, proto: Any, fault: FaultRule) -> None:
        kind = fault.kind
        if kind == 'hang':
            await proto.client_disconnect()
            self.stats.disconnects += 1
        elif kind == 'reset':
            if _abort_connection(scope.client):
                try:
                    await asyncio.wait_for(proto.client_disconnect(), 2.0)
                except TimeoutError:
                    pass
            else:  # no socket found (should not happen on Linux): closest observable effect
                self._send_error(proto, 502, 'connection reset (mock fault; socket not found)')
        elif kind == 'slow_first_byte':
            await self._sleep_or_disconnect(proto, fault.delay_ms / 1000)
        else:
            status = fault.status or (int(kind) if kind.isdigit() else 500)
            message = fault.message or f'Injected fault {kind} (mock {self.name})'
            extra = None
            if status == 429:
                ra = fault.retry_after
                extra = [
                    ('retry-after', str(int(ra) if ra == int(ra) else ra)),
                    ('retry-after-ms', str(int(ra * 1000))),
                ]
            self._send_error(proto, status, message, extra=extra)

    async def _sleep_or_disconnect(self, proto: Any, seconds: float) -> bool:
        """Sleep; return False early if the client went away meanwhile."""
        waiter = asyncio.ensure_future(proto.client_disconnect())
        try:
            done, _ = await asyncio.wait((waiter,), timeout=seconds)
            return not done
        finally:
            waiter.cancel()

    async def _acquire_slot(self, served: str) -> None:
        st = self.stats
        if self.max_concurrency > 0:
            if self._slots is None:
                self._slots = asyncio.Semaphore(self.max_concurrency)
            if self._slots.locked():
                st.waiting += 1
                st.waiting_adapters[served] += 1
                try:
                    await self._slots.acquire()
                finally:
                    st.waiting -= 1
                    st.waiting_adapters[served] -= 1
            else:
                await self._slots.acquire()
        st.running += 1
        if served != self.cfg.model:
            st.running_adapters[served] += 1

    def _release_slot(self, served: str, slots: asyncio.Semaphore | None) -> None:
        st = self.stats
        st.running -= 1
        if served != self.cfg.model:
            st.running_adapters[served] -= 1
        if slots is not None:
            slots.release()

    async def _embeddings(self, proto: Any, req: dict, served: str, model_out: str, extra: list) -> None:
        inputs = req.get('input')
        items = inputs if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else [inputs]
        dim = req.get('dimensions') or self.cfg.embedding_dim
        if not isinstance(dim, int) or dim < 1 or dim > 65536:
            self._send_error(proto, 400, 'dimensions must be a positive integer', 'dimensions')
            return
        b64 = req.get('encoding_format') == 'base64'
        seed = zlib.crc32(f'{self.cfg.seed}\0{served}\0'.encode())
        data = []
        tokens = 0
        for i, item in enumerate(items):
            text = _flatten_text(item)
            tokens += _estimate_tokens(text)
            vec = _vector(zlib.crc32(text.encode(), seed), dim)
            emb: Any = base64.b64encode(struct.pack(f'<{dim}f', *vec)).decode() if b64 else vec
            data.append({'object': 'embedding', 'index': i, 'embedding': emb})
        self.stats.prompt_tokens += tokens
        self.stats.success_by_reason['stop'] += 1
        out = {
            'object': 'list',
            'id': f'embd-{self.id_prefix}{next(self.ids)}',
            'created': int(time.time()),
            'model': model_out,
            'data': data,
            'usage': {'prompt_tokens': tokens, 'total_tokens': tokens},
        }
        self._send(proto, 200, msgspec.json.encode(out), self.header_base + extra)

    async def _generate(
        self,
        proto: Any,
        req: dict,
        kind: str,
        served: str,
        model_out: str,
        extra: list,
        cut: FaultRule | None,
        peer: str,
    ) -> None:
        prompt = _prompt_text(req)
        h = zlib.crc32(prompt.encode(), zlib.crc32(f'{self.cfg.seed}\0{served}\0'.encode()))
        limit = req.get('max_completion_tokens') or req.get('max_tokens')
        cap = self.cfg.max_output_tokens
        if limit is None:
            n, finish = min(16 + h % 33, cap), 'stop'
        else:
            n, finish = max(1, min(limit, cap)), 'length'
        toks = _tokens(served, h, n)
        usage = {'prompt_tokens': _estimate_tokens(prompt), 'completion_tokens': n, 'total_tokens': 0}
        usage['total_tokens'] = usage['prompt_tokens'] + n
        stream = req.get('stream') is True
        if cut is not None and not stream:
            cut = None  # a stream cut only applies to streaming requests
        ctx = _Gen(self, proto, kind, served, model_out, toks, finish, usage, extra, peer)
        await self._acquire_slot(served)
        slots = self._slots
        try:
            if stream:
                opts = req.get('stream_options')
                include_usage = isinstance(opts, dict) and opts.get('include_usage') is True
                await ctx.stream(include_usage, cut)
            else:
                await ctx.whole()
        finally:
            self._release_slot(served, slots)


class _Gen:
    """One generation: the tokens are fixed up front; this paces and frames them."""

    __slots__ = (
        'app',
        'created',
        'extra',
        'finish',
        'id',
        'kind',
        'model',
        'peer',
        'proto',
        'served',
        'toks',
        'usage',
    )

    def __init__(self, app, proto, kind, served, model, toks, finish, usage, extra, peer) -> None:
        self.app: MockApp = app
        self.peer: str = peer
        self.proto = proto
        self.kind = kind
        self.served = served
        self.model = model
        self.toks = toks
        self.finish = finish
        self.usage = usage
        self.extra = extra
        self.created = int(time.time())
        prefix = 'chatcmpl' if kind == 'chat' else 'cmpl'
        self.id = f'{prefix}-{app.id_prefix}{next(app.ids)}'

    def _account(self, completion_tokens: int, finish: str | None) -> None:
        st = self.app.stats
        st.prompt_tokens += self.usage['prompt_tokens']
        st.completion_tokens += completion_tokens
        if finish:
            st.success_by_reason[finish] += 1

    async def whole(self) -> None:
        app = self.app
        delay = app.ttft_ms / 1000 + ((len(self.toks) - 1) / app.tps if app.tps > 0 else 0.0)
        if delay > 0:
            await asyncio.sleep(delay)
        text = ''.join(self.toks)
        if self.kind == 'chat':
            choice: dict[str, Any] = {
                'index': 0,
                'message': {'role': 'assistant', 'content': text},
                'logprobs': None,
                'finish_reason': self.finish,
            }
            obj = 'chat.completion'
        else:
            choice = {'index': 0, 'text': text, 'logprobs': None, 'finish_reason': self.finish}
            obj = 'text_completion'
        out = {
            'id': self.id,
            'object': obj,
            'created': self.created,
            'model': self.model,
            'choices': [choice],
            'usage': self.usage,
        }
        self._account(len(self.toks), self.finish)
        app._send(self.proto, 200, msgspec.json.encode(out), app.header_base + self.extra)

    def _chunk(self, content: str | None, finish: str | None, role: bool = False) -> bytes:
        if self.kind == 'chat':
            delta: dict[str, Any] = {}
            if role:
                delta['role'] = 'assistant'
            if content is not None:
                delta['content'] = content
            choice: dict[str, Any] = {'index': 0, 'delta': delta, 'logprobs': None, 'finish_reason': finish}
            obj = 'chat.completion.chunk'
        else:
            choice = {'index': 0, 'text': content or '', 'logprobs': None, 'finish_reason': finish}
            obj = 'text_completion'
        out = {'id': self.id, 'object': obj, 'created': self.created, 'model': self.model, 'choices': [choice]}
        return b'data: ' + msgspec.json.encode(out) + b'\n\n'

    def _usage_chunk(self) -> bytes:
        obj = 'chat.completion.chunk' if self.kind == 'chat' else 'text_completion'
        out = {
            'id': self.id,
            'object': obj,
            'created': self.created,
            'model': self.model,
            'choices': [],
            'usage': self.usage,
        }
        return b'data: ' + msgspec.json.encode(out) + b'\n\n'

    async def stream(self, include_usage: bool, cut: FaultRule | None) -> None:
        app = self.app
        app.stats.streams += 1
        app.stats.by_status['200'] += 1
        headers = [
            ('content-type', 'text/event-stream; charset=utf-8'),
            ('cache-control', 'no-cache'),
            ('x-mock-served-by', app.name),
            *self.extra,
        ]
        transport = self.proto.response_stream(200, headers)
        toks = self.toks
        stop_at = min(cut.after_tokens, len(toks)) if cut is not None else len(toks)
        events = [self._chunk('', None, role=True)] if self.kind == 'chat' else []
        events += [self._chunk(t, None) for t in toks[:stop_at]]
        tail: list[bytes] = []
        if cut is None:
            tail.append(self._chunk(None if self.kind == 'chat' else '', self.finish))
            if include_usage:
                tail.append(self._usage_chunk())
            tail.append(b'data: [DONE]\n\n')
        sent = 0
        try:
            if app.ttft_ms > 0:
                await asyncio.sleep(app.ttft_ms / 1000)
            if app.tps > 0:
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                interval = 1.0 / app.tps
                first = 2 if self.kind == 'chat' else 1  # the role chunk and the first token leave together
                if events:
                    await transport.send_bytes(b''.join(events[:first]))
                sent = min(first, len(events))
                for i, ev in enumerate(events[first:], 1):
                    delay = t0 + i * interval - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    await transport.send_bytes(ev)
                    sent = i + 1
                if tail:
                    await transport.send_bytes(b''.join(tail))
            else:
                await transport.send_bytes(b''.join(events + tail))
                sent = len(events)
        except RuntimeError:  # the client went away: granian's RSGIProtocolClosed / RSGIProtocolError
            app.stats.disconnects += 1
            self._account(max(0, sent - (1 if self.kind == 'chat' else 0)), None)
            return
        if cut is not None:
            self._account(stop_at, None)
            if cut.abort:
                _abort_connection(self.peer)
            return
        self._account(len(toks), self.finish)


def _adapter_id(req: dict[str, Any]) -> str | None:
    """LoRAX-style adapter selection: top-level `adapter_id` or `parameters.adapter_id`."""
    a = req.get('adapter_id')
    if a is None:
        params = req.get('parameters')
        if isinstance(params, dict):
            a = params.get('adapter_id')
    return a if isinstance(a, str) and a else None


def _validate(req: dict[str, Any], kind: str, path: str) -> tuple[str, str] | None:
    if kind == 'chat' and path == '/v1/chat/completions':
        msgs = req.get('messages')
        if not isinstance(msgs, list) or not msgs:
            return ('messages must be a non-empty list', 'messages')
    elif kind == 'completions' and req.get('prompt') is None:
        return ('prompt is required', 'prompt')
    elif kind == 'embeddings' and req.get('input') is None:
        return ('input is required', 'input')
    for key in ('max_tokens', 'max_completion_tokens'):
        v = req.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            return (f'{key} must be a positive integer', key)
    s = req.get('stream')
    if s is not None and not isinstance(s, bool):
        return ('stream must be a boolean', 'stream')
    return None


def _parse_faults(body: bytes) -> list[FaultRule]:
    """`{kind, rate, ...}`, a list of those, or `{"faults": [...]}`; `{"kind": "none"}` or `[]` clears."""
    try:
        data = msgspec.json.decode(body) if body.strip() else []
    except msgspec.DecodeError as e:
        raise ValueError(f'invalid JSON: {e}') from None
    if isinstance(data, dict) and 'faults' in data:
        data = data['faults']
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ValueError('expected a fault object, a list of them, or {"faults": [...]}')
    rules = []
    for item in data:
        if isinstance(item, dict) and item.get('kind') in ('none', 'off', None) and len(item) <= 2:
            continue
        try:
            rule = msgspec.convert(item, FaultRule)
        except msgspec.ValidationError as e:
            raise ValueError(f'invalid fault rule: {e}') from None
        _check_rule(rule)
        rules.append(rule)
    return rules


def _check_rule(rule: FaultRule) -> None:
    if rule.kind not in FAULT_KINDS:
        raise ValueError(f'unknown fault kind {rule.kind!r}; expected one of {", ".join(FAULT_KINDS)}')
    if not 0.0 <= rule.rate <= 1.0:
        raise ValueError(f'fault rate must be within [0, 1], got {rule.rate}')
    if rule.status is not None and not 400 <= rule.status <= 599:
        raise ValueError(f'fault status must be a 4xx/5xx code, got {rule.status}')


_RUNTIME_KEYS = {'ttft_ms': float, 'tps': float, 'latency_ms': float, 'max_concurrency': int}


def _merge_config(current: dict[str, Any], body: bytes) -> dict[str, Any]:
    try:
        patch = msgspec.json.decode(body)
    except msgspec.DecodeError as e:
        raise ValueError(f'invalid JSON: {e}') from None
    if not isinstance(patch, dict):
        raise ValueError('expected a JSON object')
    out = dict(current)
    for key, value in patch.items():
        if key == 'faults':
            out['faults'] = [msgspec.to_builtins(f) for f in _parse_faults(msgspec.json.encode(value))]
            continue
        typ = _RUNTIME_KEYS.get(key)
        if typ is None:
            raise ValueError(f'unknown or read-only setting {key!r}; settable: faults, {", ".join(_RUNTIME_KEYS)}')
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f'{key} must be a non-negative number')
        out[key] = typ(value)
    return out


# ----- process entry points -----


def _rsgi_factory() -> MockApp:
    """Granian factory target: each worker builds its app from the config the CLI put in the environment."""
    return MockApp(msgspec.json.decode(os.environ[ENV_CONFIG].encode(), type=MockConfig))


def cli_mock_args(p: argparse.ArgumentParser) -> None:
    # Defaults are None so that a --config file can supply values and explicit flags still win.
    p.add_argument('--config', help='JSON/YAML/TOML file with the same keys as the long options (and "faults": [...])')
    p.add_argument('--host', help='listen address (default 127.0.0.1)')
    p.add_argument('--port', type=int, help='listen port (default 8001)')
    p.add_argument('--model', help='base model name (default mock-model)')
    p.add_argument('--adapters', help='comma-separated LoRA adapter names served on top of the base model')
    p.add_argument('--name', help='x-mock-served-by header value (default host:port)')
    p.add_argument('--ttft-ms', type=float, help='time to first token, ms (default 50)')
    p.add_argument('--tps', type=float, help='tokens per second; 0 = instant (default 50)')
    p.add_argument('--latency-ms', type=float, help='extra delay before processing each request, ms (default 0)')
    p.add_argument('--max-output-tokens', type=int, help='cap on completion tokens (default 64)')
    p.add_argument('--embedding-dim', type=int, help='embedding dimension (default 256)')
    p.add_argument('--max-concurrency', type=int, help='generation slots; excess requests wait (default 0 = no cap)')
    p.add_argument('--max-lora', type=int, help='max_lora reported in /metrics (default: number of adapters)')
    p.add_argument('--api-key', help='require this bearer key on /v1/* (as vLLM --api-key)')
    p.add_argument('--error-rate', type=float, help='shorthand for --fault 500 --fault-rate R')
    p.add_argument('--fault', choices=FAULT_KINDS, help='inject this fault kind')
    p.add_argument('--fault-rate', type=float, default=1.0, help='probability of --fault per request (default 1)')
    p.add_argument('--retry-after', type=float, default=1.0, help='Retry-After seconds for 429 (default 1)')
    p.add_argument('--fault-delay-ms', type=float, default=2000.0, help='delay for slow_first_byte (default 2000)')
    p.add_argument('--fault-status', type=int, help='status for --fault error (any 4xx/5xx)')
    p.add_argument('--record', type=int, help='keep the last N requests for GET /_mock/requests (default 256)')
    p.add_argument('--workers', type=int, help='worker processes (default 1)')
    p.add_argument('--seed', type=int, help='seed for replies and fault draws (default 0)')
    p.add_argument('--log-level', choices=('debug', 'info', 'warning', 'error'), help='granian log level')


def build_config(args: argparse.Namespace) -> MockConfig:
    data: dict[str, Any] = {}
    if args.config:
        raw = Path(args.config).read_bytes()
        suffix = Path(args.config).suffix.lower()
        if suffix in ('.yaml', '.yml'):
            data = msgspec.yaml.decode(raw)
        elif suffix == '.toml':
            data = msgspec.toml.decode(raw)
        else:
            data = msgspec.json.decode(raw)
        data = {k.replace('-', '_'): v for k, v in (data or {}).items()}
    for key in MockConfig.__struct_fields__:
        value = getattr(args, key, None)
        if value is not None and key not in ('faults', 'adapters'):
            data[key] = value
    if args.adapters is not None:
        data['adapters'] = [a.strip() for a in args.adapters.split(',') if a.strip()]
    faults = list(data.get('faults') or [])
    if args.fault:
        faults.append(
            {
                'kind': args.fault,
                'rate': args.fault_rate,
                'retry_after': args.retry_after,
                'delay_ms': args.fault_delay_ms,
                **({'status': args.fault_status} if args.fault_status else {}),
            }
        )
    if args.error_rate:
        faults.append({'kind': '500', 'rate': args.error_rate})
    data['faults'] = faults
    cfg = msgspec.convert(data, MockConfig)
    for rule in cfg.faults:
        _check_rule(rule)
    if cfg.model in cfg.adapters:
        raise ValueError(f'adapter name {cfg.model!r} clashes with the base model')
    return cfg


def cli_mock(args: argparse.Namespace) -> int:
    from granian import Granian
    from granian.constants import HTTPModes, Interfaces, Loops
    from granian.log import LogLevels

    try:
        cfg = build_config(args)
    except (ValueError, OSError, msgspec.DecodeError, msgspec.ValidationError) as e:
        print(f'fastroute mock: {e}', file=sys.stderr)
        return 2
    tmp = None
    if cfg.workers > 1:
        tmp = tempfile.TemporaryDirectory(prefix='fastroute-mock-')
        cfg.control_dir = tmp.name
    os.environ[ENV_CONFIG] = msgspec.json.encode(cfg).decode()
    name = cfg.name or f'{cfg.host}:{cfg.port}'
    faults = ', '.join(f'{f.kind}@{f.rate}' for f in cfg.faults) or 'none'
    print(
        f'fastroute mock {name}: http://{cfg.host}:{cfg.port} model={cfg.model} adapters={cfg.adapters or "-"} '
        f'ttft={cfg.ttft_ms}ms tps={cfg.tps} latency={cfg.latency_ms}ms faults={faults} workers={cfg.workers}',
        file=sys.stderr,
        flush=True,
    )
    try:
        Granian(
            'fastroute.mock:_rsgi_factory',
            address=cfg.host,
            port=cfg.port,
            interface=Interfaces.RSGI,
            workers=cfg.workers,
            loop=Loops.uvloop,
            http=HTTPModes.http1,
            websockets=False,
            backlog=cfg.backlog,
            factory=True,
            log_level=LogLevels(cfg.log_level),
            workers_kill_timeout=3,
        ).serve()
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0
