"""The exception hierarchy. Each class carries its HTTP status and OpenAI error type.

`fastroute._core` raises `ConfigError` (compile) and `RequestError` (decide); the rest are
raised by the Python layers. The gateway turns any of them into one OpenAI-shaped answer
with `error_body(exc)`.
"""

from __future__ import annotations

import msgspec

__all__ = [
    'AuthError',
    'ConfigError',
    'FallbackExhausted',
    'FastrouteError',
    'LimitError',
    'NoRouteError',
    'PermissionError_',
    'RequestError',
    'UpstreamError',
    'error_body',
]


class FastrouteError(Exception):
    status: int = 500
    type: str = 'internal_error'
    code: str | None = None
    param: str | None = None

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if param is not None:
            self.param = param


class ConfigError(FastrouteError, ValueError):
    """A config that cannot be used. `.file` and `.path` say where; the last good config keeps serving."""

    type = 'config_error'

    def __init__(self, message: str, *, file: str | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.file = file
        self.path = path

    def __str__(self) -> str:
        where = ':'.join(p for p in (self.file, self.path) if p)
        return f'{where}: {self.message}' if where else self.message


class RequestError(FastrouteError, ValueError):
    """The request itself is wrong (400), or too large (413)."""

    status = 400
    type = 'invalid_request_error'

    def __init__(self, message: str, *, status: int = 400, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message, code=code, param=param)
        self.status = status


class AuthError(FastrouteError):
    """Missing or unknown API key (401)."""

    status = 401
    type = 'authentication_error'
    code = 'invalid_api_key'


class PermissionError_(FastrouteError):  # trailing underscore: the builtin name is taken
    """The key is valid, but its tenant may not use this model or adapter (403)."""

    status = 403
    type = 'permission_error'
    code = 'model_not_allowed'


class NoRouteError(FastrouteError):
    """No route matched, or the requested model is unknown (404)."""

    status = 404
    type = 'not_found_error'
    code = 'model_not_found'


class LimitError(FastrouteError):
    """A rate or budget limit (429). `.retry_after` in seconds, when known."""

    status = 429
    type = 'rate_limit_error'
    code = 'rate_limit_exceeded'

    def __init__(self, message: str, *, retry_after: float | None = None, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class UpstreamError(FastrouteError):
    """An upstream failed. `.stage` is "connect", "status", "timeout", "read" or "protocol".

    `.retryable` is decided once, where the failure happens: true only while no byte has
    reached the client and the failure is not the request's own fault.
    """

    status = 502
    type = 'upstream_error'

    def __init__(
        self,
        message: str,
        *,
        endpoint: str | None = None,
        stage: str = 'connect',
        retryable: bool = True,
        status: int = 502,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.endpoint = endpoint
        self.stage = stage
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after


class FallbackExhausted(UpstreamError):
    """Every candidate failed. `.errors` maps each candidate tried to its failure."""

    def __init__(self, message: str, *, errors: dict[str, UpstreamError], status: int = 502) -> None:
        super().__init__(message, stage='fallback', retryable=False, status=status)
        self.errors = errors


class _ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class _ErrorBody(msgspec.Struct):
    error: _ErrorDetail


_encode = msgspec.json.Encoder().encode


def error_body(exc: FastrouteError) -> bytes:
    """The OpenAI-shaped JSON body for `exc`: {"error": {"message", "type", "param", "code"}}."""
    return _encode(_ErrorBody(_ErrorDetail(exc.message, exc.type, exc.param, exc.code)))
