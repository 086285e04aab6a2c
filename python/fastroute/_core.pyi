"""The compiled decision core of fastroute (Rust, built by maturin).

Pure and synchronous: no I/O, no clocks, no globals. Given the same compiled
spec and the same request it returns the same Decision.
"""

from collections.abc import Mapping, Sequence
from typing import Protocol, final

__version__: str

class Headers(Protocol):
    """Anything with `.get(name)`: granian's RSGI headers, a dict with lowercase keys."""

    def get(self, key: str, default: str | None = None, /) -> str | None: ...

@final
class Router:
    """Compiled routes, tenants and splits. Immutable: compile a new one to change anything."""

    @staticmethod
    def compile(spec: bytes, classifiers: Mapping[str, bytes] | None = None) -> Router:
        """Compile a validated config, given as the JSON bytes of `fastroute.config.Config`, with the
        classifier model files its classify routes name (`{routes[i].classifier: model JSON bytes}`).
        A classify route without `classifier` uses the built-in weights.

        Raises:
            fastroute.errors.ConfigError: the spec is unusable; `.path` names the config key
                (e.g. `routes[3].match.headers.x-tier.regex`).
        """

    def decide(
        self,
        method: str,
        path: str,
        headers: Headers | Mapping[str, str],
        body: bytes,
    ) -> Decision:
        """Decide where one request goes. Reads only the headers the rules name.

        Raises:
            fastroute.errors.RequestError: the body is not a JSON object, or a known field has the
                wrong type (`.param` names it).
        """

    def decide_scored(
        self,
        method: str,
        path: str,
        headers: Headers | Mapping[str, str],
        body: bytes,
        score: float,
        threshold: float,
    ) -> Decision:
        """`decide`, with a classify route's score and threshold computed by the caller (the semantic
        classifier) instead of the core.

        Raises:
            fastroute.errors.RequestError: as `decide`.
        """

    @property
    def route_count(self) -> int: ...
    @property
    def tenant_key_count(self) -> int: ...
    @property
    def header_names(self) -> tuple[str, ...]:
        """The lowercase header names decide() may read (the key header included)."""
    @property
    def classifier_keys(self) -> tuple[str, ...]:
        """The classifier model keys (resolved model file paths) this router loaded."""

@final
class Decision:
    """The outcome of one `decide` call. Frozen.

    `status` is 200 when the request may go upstream; otherwise 401 (unknown or missing key),
    403 (tenant not allowed this model/adapter) or 404 (no route, unknown model), and `error`
    holds a message for the client. "No route" is a Decision, never an exception.

    `upstream_model` is the `model` the upstream sees (the pool's `upstream_model`, else the
    client's own); with an adapter on an `adapter_field: model` pool the body's `model` is the
    adapter instead. `reasons` is rendered on first access by deciding again, traced, from the
    same inputs (`decide` is pure), so `decide` itself stays allocation-light; read it before
    mutating the headers object passed to `decide`.
    """

    status: int
    error: str | None
    route: str | None
    pool: str | None
    upstream_model: str | None
    adapter: str | None
    variant: str | None
    tenant: str | None
    upstream_path: str | None
    body: bytes | None  # the rewritten body, or None when it is unchanged
    requested_model: str | None
    stream: bool
    usage_injected: bool  # the body now asks the upstream for usage; the client did not
    max_tokens: int | None
    est_input_tokens: int
    score: float | None  # the complexity score, when a classify route ran
    threshold: float | None  # the threshold the score was compared with
    reasons: tuple[str, ...]

    def to_dict(self) -> dict[str, object]:
        """Every field as a plain dict (what `explain` prints), body as text or None."""

@final
class Classifier:
    """A trained complexity classifier, loaded from model file JSON: scores bodies exactly as a router's
    classify route does (fast token estimate). For `fastroute eval`."""

    @staticmethod
    def load(model: bytes) -> Classifier:
        """Check and load a model file's JSON.

        Raises:
            ValueError: not a model this build can use; the message says what is wrong.
        """

    @property
    def hash_bits(self) -> int:
        """log2 of the n-gram table length."""

    def score_many(self, bodies: list[bytes]) -> list[float]:
        """The score in [0, 1] of each request body (JSON bytes), in order.

        Raises:
            fastroute.errors.RequestError: a body is not a valid request.
        """

def builtin_score(body: bytes) -> float:
    """The built-in (untrained) complexity score of one request body."""

def classifier_features(bodies: list[bytes], hash_bits: int) -> list[tuple[list[float], list[int]]]:
    """The dense features (in `classifier_feature_names()` order) and the n-gram buckets hit, of each request
    body: what a trained classifier weighs. For `fastroute train`."""

def classifier_feature_names() -> tuple[list[str], str, int]:
    """The names of the dense classifier features, in order; and the model format and version this build reads."""

def noop() -> None:
    """Does nothing: the baseline for timing the Python→Rust crossing."""

def estimate_tokens(text: str | bytes, exact: bool = False, encoding: str = 'o200k_base') -> int:
    """Tokens in `text`: the fast estimate, or the exact BPE count when `exact`."""

def bucket(salt: str, key: str) -> float:
    """The bucket in [0, 1) of `key` for the experiment or split named `salt` (the pinned split hash)."""

def rewrite_body(body: bytes, model: str | None = None, adapter_id: str | None = None) -> bytes:
    """`body` with `model` and/or `adapter_id` set; the same object when nothing changes.

    Raises:
        fastroute.errors.RequestError: the body is not a JSON object.
    """

def body_user(body: bytes) -> str | None:
    """The body's `user` field as written (escapes kept), or None.

    Raises:
        fastroute.errors.RequestError: the body is not a JSON object.
    """

class HttpError(ValueError):
    """Malformed HTTP: not HTTP/1.x, or framed ambiguously (answer 400)."""

class HeadTooLarge(HttpError):
    """A head longer than allowed or with too many header lines (answer 431)."""

def parse_request_head(
    buf: bytes, start: int = 0, max_len: int = 65536, max_headers: int = 256
) -> tuple[int, str, str, str, str, dict[str, str], int, bool, bool, bool] | None:
    """The request head at `buf[start:]`: None until it is complete, else (end, method, path, query, version,
    headers, content_length or -1, chunked, keep_alive, upgrade); headers: lower-case names, the first value of
    each. A request with both Content-Length and Transfer-Encoding, differing Content-Lengths, or a
    Transfer-Encoding not ending in chunked is refused.

    Raises:
        HeadTooLarge: the head is longer than `max_len` or has more than `max_headers` lines.
        HttpError: the head is not valid HTTP/1.x.
    """

@final
class HeaderNames:
    """A fixed set of header names, matched without regard to case; made once (e.g. the headers never relayed)."""

    def __init__(self, names: list[str]) -> None: ...
    def __contains__(self, name: str) -> bool: ...
    def __len__(self) -> int: ...

def parse_response_head(
    buf: bytes,
    start: int = 0,
    headers_from: int = 1000,
    max_len: int = 65536,
    max_headers: int = 256,
    drop: HeaderNames | None = None,
) -> tuple[int, int, list[tuple[str, str]] | None, int, bool, bool, str | None, str | None] | None:
    """The response head at `buf[start:]`: None until it is complete, else (end, status, headers, content_length
    or -1, chunked, keep_alive, content_type, content_encoding); headers, when the status is at least
    `headers_from` (0: always; the default 1000: never; else None): every header as (lower-case name, value), in
    order, but those named in `drop`.

    Raises:
        HeadTooLarge: as `parse_request_head`.
        HttpError: the head is not valid HTTP/1.x.
    """

@final
class ChunkedBody:
    """A chunked body's decoder, fed the bytes as they arrive."""

    def __init__(self) -> None: ...
    def feed(self, buf: bytes, start: int = 0) -> tuple[bytes, int, bool]:
        """Decode `buf[start:]`: (the body bytes in it, where decoding stopped, whether the body ended). Once
        ended, the bytes from where it stopped belong to the next message.

        Raises:
            HttpError: a malformed chunk size, chunk end or trailer.
        """
    @property
    def done(self) -> bool:
        """The whole body has been decoded."""

def head_bytes(
    first: bytes,
    headers: Sequence[tuple[str, str]],
    last: bytes,
    body: bytes | bytearray | memoryview | None = None,
    tail: bytes | None = None,
    utf8: bool = False,
) -> bytes:
    """`first`, then `name: value\\r\\n` for each header, then `last`, `body` and `tail`, as one bytes object: an
    HTTP head (and body) in one write. Names and values are encoded as latin-1 (or, when one has a character
    beyond it, all of them as UTF-8); with `utf8`, as UTF-8."""

def relay_answer(
    buf: bytes,
    start: int,
    block: bytes,
    overhead_us: int,
    max_len: int = 65536,
    max_headers: int = 256,
) -> tuple[bytes, int, bool] | None:
    """The fast lane's way back, in one step: a whole `200` answer at `buf[start:]`, framed by its content-length
    and ending exactly at the end of `buf`, made into the client's answer (our status line, the upstream's
    content-type and content-encoding, `block`, the overhead header, content-length, the body). Returns
    (answer, where the body starts in `buf`, keep-alive), or None for anything else: the caller then parses the
    same bytes the general way."""

def find_bytes(haystack: bytes | bytearray | memoryview, needle: bytes, start: int = 0) -> int:
    """`haystack.find(needle, start)` by a SIMD substring search: ~10x fewer instructions than `bytes.find` on
    kilobytes."""
