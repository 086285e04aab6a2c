"""The admin listener: a separate port (default 127.0.0.1:9090) for operators, never the data port.

Every request needs `Authorization: Bearer <token>`, the token read from the env var `admin.token_env`
names; compared in constant time. 401 without a token, 403 with a wrong one.

Endpoints register themselves in `ROUTES` with `@route(method, path)`; a handler gets an `AdminRequest`
and returns `(status, body)`: body is JSON-encoded unless it is `bytes` (then `content_type` applies).
Each worker serves the admin port itself (SO_REUSEPORT), on its own event loop, off the hot path.

Built-in endpoints:
    GET  /admin/config    the serving config, secrets redacted
    GET  /admin/routes    routes in match order
    GET  /admin/models    models, their endpoints and each endpoint's state
    POST /admin/reload    load, validate and compile the config file again; swap it in if it is valid
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import msgspec

if TYPE_CHECKING:
    from fastroute.gateway import App

__all__ = ['ROUTES', 'AdminRequest', 'AdminResponse', 'AdminServer', 'redacted_config', 'route', 'start_admin']

log = logging.getLogger('fastroute')

_encode = msgspec.json.Encoder().encode


@dataclass(slots=True)
class AdminRequest:
    app: App
    method: str
    path: str
    query: dict[str, list[str]]
    headers: Any
    body: bytes = b''

    def json(self) -> Any:
        """The body as JSON (an empty body is `{}`). Raises `ValueError` with a message fit for a 400."""
        if not self.body:
            return {}
        try:
            return msgspec.json.decode(self.body)
        except msgspec.DecodeError as exc:
            raise ValueError(f'the request body is not valid JSON: {exc}') from None


@dataclass(slots=True)
class AdminResponse:
    """For handlers that need a content type or headers; a plain `(status, body)` tuple is the short form."""

    status: int
    body: bytes
    content_type: str = 'application/json'
    headers: list[tuple[str, str]] = field(default_factory=list)


Handler = Callable[[AdminRequest], Awaitable['tuple[int, Any] | AdminResponse']]
ROUTES: dict[tuple[str, str], Handler] = {}
PUBLIC: set[tuple[str, str]] = set()  # endpoints served without the token (static pages that hold no data)


def route(method: str, path: str, *, public: bool = False) -> Callable[[Handler], Handler]:
    """Register an admin endpoint (exact path). `public`: no token needed (only for pages without data)."""

    def deco(fn: Handler) -> Handler:
        ROUTES[(method.upper(), path)] = fn
        if public:
            PUBLIC.add((method.upper(), path))
        return fn

    return deco


def _error(status: int, message: str, code: str) -> AdminResponse:
    body = _encode({'error': {'message': message, 'type': 'admin_error', 'param': None, 'code': code}})
    return AdminResponse(status, body)


class AdminServer:
    """The admin RSGI app of one worker: auth, dispatch, JSON."""

    def __init__(self, app: App, token: str) -> None:
        self.app = app
        self.token = token.encode()

    def authorized(self, headers: Any) -> AdminResponse | None:
        raw = headers.get('authorization')
        if not raw:
            return _error(401, 'the admin API needs Authorization: Bearer <token>', 'missing_admin_token')
        scheme, _, token = raw.strip().partition(' ')
        if scheme.lower() != 'bearer' or not hmac.compare_digest(token.strip().encode(), self.token):
            return _error(403, 'the admin token is not valid', 'invalid_admin_token')
        return None

    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        try:
            resp = await self.handle(scope, proto)
        except Exception as exc:  # every admin request gets one answer
            log.exception('admin: %s %s failed', scope.method, scope.path)
            resp = _error(500, f'internal error: {type(exc).__name__}: {exc}', 'internal_error')
        headers = [('content-type', resp.content_type), *resp.headers]
        proto.response_bytes(resp.status, headers, resp.body)

    async def handle(self, scope: Any, proto: Any) -> AdminResponse:
        denied = None if (scope.method, scope.path) in PUBLIC else self.authorized(scope.headers)
        if denied is not None:
            return denied
        handler = ROUTES.get((scope.method, scope.path))
        if handler is None:
            if any(p == scope.path for _, p in ROUTES):
                allowed = sorted(m for m, p in ROUTES if p == scope.path)
                r = _error(405, f'method {scope.method} is not allowed on {scope.path}', 'method_not_allowed')
                r.headers.append(('allow', ', '.join(allowed)))
                return r
            return _error(404, f'no admin endpoint {scope.method} {scope.path}', 'unknown_url')
        body = await proto() if scope.method in ('POST', 'PUT', 'PATCH') else b''
        qs = scope.query_string
        req = AdminRequest(self.app, scope.method, scope.path, parse_qs(qs) if qs else {}, scope.headers, body)
        try:
            out = await handler(req)
        except ValueError as exc:
            return _error(400, str(exc), 'invalid_request')
        if isinstance(out, AdminResponse):
            return out
        status, obj = out
        return AdminResponse(status, obj if isinstance(obj, bytes) else _encode(obj))


# ---------------------------------------------------------------------------------------------
# Starting the listener in a worker.
# ---------------------------------------------------------------------------------------------


def _admin_socket(host: str, port: int) -> socket.socket:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # each worker binds the admin port
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def start_admin(app: App, loop: asyncio.AbstractEventLoop) -> Any:
    """Serve the admin API of `app` on `admin.listen` in this worker. Returns the server, or None when the
    config has no `admin:` section. Raises `OSError` when the port cannot be bound and `ValueError` when
    the token env var is unset."""
    snap = app.snapshot
    cfg = snap.cfg if snap is not None else None
    if cfg is None or cfg.admin is None:
        return None
    token = os.environ.get(cfg.admin.token_env)
    if not token:
        raise ValueError(
            f'admin.token_env: the environment variable {cfg.admin.token_env} is not set; '
            'set it to the bearer token operators use for the admin API'
        )
    from fastroute.gateway import _split_listen
    from fastroute.server import Server

    host, port = _split_listen(cfg.admin.listen)
    server = Server(AdminServer(app, token), loop)
    await server.start(_admin_socket(host, port), 128)
    return server


# ---------------------------------------------------------------------------------------------
# Built-in endpoints.
# ---------------------------------------------------------------------------------------------

_SECRET_KEYS = frozenset({'api_key', 'keys_sha256', 'keys_env', 'keys_file'})


def _redact(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: ('<redacted>' if k in _SECRET_KEYS and v else _redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_redact(v) for v in obj]
    return obj


def redacted_config(app: App) -> dict[str, Any]:
    """The serving config as JSON-able data, with upstream keys and tenant key material replaced."""
    snap = app.snapshot
    if snap is None:
        return {}
    out: dict[str, Any] = _redact(msgspec.to_builtins(snap.cfg))
    if out.get('redis'):
        from fastroute.sharedstate import safe_url

        out['redis']['url'] = safe_url(out['redis']['url'])  # a password in the URL
    return out


@route('GET', '/admin/config')
async def _config(req: AdminRequest) -> tuple[int, Any]:
    snap = req.app.snapshot
    return 200, {'path': snap.path if snap else None, 'config': redacted_config(req.app)}


@route('GET', '/admin/routes')
async def _routes(req: AdminRequest) -> tuple[int, Any]:
    snap = req.app.snapshot
    routes = msgspec.to_builtins(snap.cfg.routes) if snap else []
    return 200, {'routes': routes, 'default': snap.cfg.default if snap else None}


def endpoint_state(ep: Any) -> dict[str, Any]:
    """One endpoint's state for operators; the resilience layer may give endpoints a richer `state()`."""
    state = getattr(ep, 'state', None)
    if callable(state):
        out: dict[str, Any] = state()
        return out
    return {'url': ep.base, 'outstanding': ep.outstanding, 'consecutive_failures': ep.failures}


@route('GET', '/admin/models')
async def _models(req: AdminRequest) -> tuple[int, Any]:
    snap = req.app.snapshot
    if snap is None:
        return 200, {'models': {}}
    models = {
        name: {'endpoints': [endpoint_state(ep) for ep in pool.endpoints], 'upstream_model': pool.upstream_model}
        for name, pool in snap.pools.items()
    }
    return 200, {'models': models}


@route('POST', '/admin/reload')
async def _reload(req: AdminRequest) -> tuple[int, Any]:
    ok, message = await req.app.reload()
    return (200 if ok else 422), {'reloaded': ok, 'message': message}
