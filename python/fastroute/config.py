"""The configuration schema of fastroute, and its loading and validation.

One schema, in msgspec Structs. A config is parsed (unknown keys rejected), then
validated (cross-references, weights, regexes), then encoded with
`msgspec.json.encode` and handed as bytes to `fastroute._core.Router.compile`.
The Rust side (`rust/src/spec.rs`) mirrors these Structs field for field, so the
key names are identical in YAML/TOML, here and in Rust.

SCHEMA CONTRACT (shared by config.py and spec.rs; change both together):

    Config
      server:   Server
      models:   {name: Model}                  logical models = upstream pools
      tenants:  {name: Tenant}
      routes:   [Route]                        ordered, first match wins
      default:  str | None                     model for requests no route matched (None: 404)
      splits:   {name: Split}

    Route.match is a Match: every field set must hold (AND); `all`/`any`/`not` nest.
    Route target: exactly one of `to` (a model name), `split` (a split name),
    `requested: true` (the model named by the request's `model` field, by logical
    name, upstream_model or alias), or `classify: complexity` with
    `to: {simple: <model>, complex: <model>}` and a `threshold`.

    Tenancy: a present-but-unknown key is 401; no key is 401 unless
    server.allow_anonymous. After routing, a tenant whose allowed_models excludes the
    chosen model gets 403. When the chosen model is the tenant's `base` and the tenant
    has an `adapter`, the adapter is applied (split variants may override it). A request
    whose `model` names an adapter that belongs to another tenant is 403, never served.
"""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = [
    'ClassifyTargets',
    'Config',
    'Endpoint',
    'HeaderMatch',
    'Match',
    'Model',
    'PathMatch',
    'Price',
    'Range',
    'Route',
    'Server',
    'Split',
    'Timeouts',
    'Tenant',
    'Variant',
]


class _Base(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    pass


class Timeouts(_Base):
    """Upstream timeouts, in seconds."""

    connect: float = 2.0
    first_byte: float = 60.0
    idle: float = 60.0  # longest silence between two chunks of a streamed answer
    total: float = 600.0


class Server(_Base):
    listen: str = '127.0.0.1:8080'
    workers: int = 1
    max_body_bytes: int | str = 4 * 1024 * 1024  # an int, or a size string: "4MiB", "512KB"
    # Where the tenant's API key is read: "authorization" means `Authorization: Bearer <key>`;
    # any other name is a header whose whole value is the key (e.g. "x-api-key").
    key_header: str = 'authorization'
    # Requests with no key at all are served as the anonymous caller (no tenant) when true;
    # otherwise they get 401. A key that is present but unknown is always 401.
    allow_anonymous: bool = False
    # "fast": byte-class heuristic calibrated against o200k_base; "exact": a real BPE.
    token_estimator: Literal['fast', 'exact'] = 'fast'
    encoding: Literal['o200k_base', 'cl100k_base'] = 'o200k_base'
    timeouts: Timeouts = Timeouts()


class Price(_Base):
    """Price in USD. Per 1k tokens, per request, or both (they add up)."""

    input_per_1k: float = 0.0
    output_per_1k: float = 0.0
    per_request: float = 0.0


class Endpoint(_Base):
    url: str
    weight: float = 1.0


class Model(_Base):
    """A logical model: a pool of upstream endpoints serving one upstream model."""

    endpoints: list[str | Endpoint]
    upstream_model: str | None = None  # the `model` value upstreams expect; None: keep the client's
    aliases: list[str] = []  # extra names a request's `model` may use to mean this pool
    api_key: str | None = None  # the upstream's key (use ${ENV} interpolation), never the client's
    api_key_env: str | None = None  # or: the name of an env var holding it
    # Where a LoRA adapter goes in the upstream body: "model" (vLLM, OpenAI-compatible servers:
    # the adapter name replaces `model`) or "adapter_id" (LoRAX: `model` stays upstream_model and
    # an `adapter_id` field is added).
    adapter_field: Literal['model', 'adapter_id'] = 'model'
    adapters: list[str] = []  # adapters this pool serves (tenant adapters are added implicitly)
    price: Price = Price()
    fallback: list[str] = []  # other models to try, in order (used by the resilience layer)
    timeouts: Timeouts | None = None  # overrides server.timeouts for this pool


class Tenant(_Base):
    """A caller. Its keys are never stored in clear: SHA-256 hex digests, or read from env/file."""

    keys_sha256: list[str] = []
    keys_env: list[str] = []  # env var names, each holding one clear key (hashed at load)
    keys_file: str | None = None  # a file with one clear key per line (hashed at load; # comments)
    base: str | None = None  # the model this tenant's adapter sits on
    adapter: str | None = None  # the tenant's LoRA adapter, applied when the request goes to `base`
    allowed_models: list[str] | None = None  # None: any model; else only these (403 otherwise)


class Range(_Base):
    gt: int | None = None
    gte: int | None = None
    lt: int | None = None
    lte: int | None = None


class PathMatch(_Base):
    exact: str | None = None
    prefix: str | None = None


class HeaderMatch(_Base):
    present: bool | None = None  # true: must be present; false: must be absent
    equals: str | None = None
    one_of: list[str] | None = None
    regex: str | None = None


class Match(_Base):
    """Conditions on a request; all set fields must hold."""

    path: str | PathMatch | None = None  # a str is an exact match
    method: str | list[str] | None = None
    headers: dict[str, str | HeaderMatch] | None = None  # a str is `equals`
    tenant: str | list[str] | None = None
    model: str | list[str] | None = None  # glob(s) on the request's `model` (`*`, `?`)
    input_tokens: Range | None = None
    max_tokens: Range | None = None
    stream: bool | None = None
    metadata: dict[str, str] | None = None  # the request body's `metadata.<key>` equals value
    all: list[Match] | None = None
    any: list[Match] | None = None
    not_: Match | None = msgspec.field(default=None, name='not')


class ClassifyTargets(_Base):
    simple: str  # model for score < threshold
    complex: str  # model for score >= threshold


class Route(_Base):
    name: str
    match: Match = Match()
    # Target: exactly one of `to` (a model; with `classify`, a ClassifyTargets), `split`, `requested`.
    to: str | ClassifyTargets | None = None
    split: str | None = None
    requested: bool = False
    # `classify: complexity` scores the prompt in [0, 1] (rust/src/classify.rs) and sends it to
    # `to.complex` when score >= threshold, else `to.simple`.
    classify: Literal['complexity'] | None = None
    threshold: float = 0.5
    upstream_path: str | None = None  # path sent upstream; default: the request's own path


class Variant(_Base):
    name: str
    to: str  # a model
    weight: float
    adapter: str | None = None  # optional adapter override for this variant


class Split(_Base):
    # The sticky key: "header:<name>", "tenant", "user" (the body's `user` field), or a
    # list of those tried in order (first one present wins). No key present: bucket by a
    # hash of the body, so identical requests still land on the same variant.
    sticky: str | list[str] = 'tenant'
    variants: list[Variant] = []


class Config(_Base):
    models: dict[str, Model]
    server: Server = Server()
    tenants: dict[str, Tenant] = {}
    routes: list[Route] = []
    default: str | None = None
    splits: dict[str, Split] = {}
