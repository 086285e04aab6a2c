"""Properties of the compiled decision core, checked with hypothesis:

- any bytes as a body give a Decision or a RequestError, never a crash;
- a rewritten body is valid JSON equal to the original but for the rewritten fields;
- split buckets are stable and agree with an independent implementation of the documented hash
  (fastroute-split-v1, rust/src/split.rs), so variants survive processes and releases;
- a tenant key never yields another tenant's adapter.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import msgspec
from fastroute import _core
from fastroute.config import Config
from fastroute.errors import RequestError
from hypothesis import given, settings
from hypothesis import strategies as st

TENANTS = 6
MASK = (1 << 64) - 1


def build(spec: dict[str, Any]) -> _core.Router:
    return _core.Router.compile(msgspec.json.encode(msgspec.convert(spec, Config)))


def split_hash(salt: bytes, key: bytes) -> int:
    """fastroute-split-v1: FNV-1a 64 over salt, 0xFF, key; then MurmurHash3 fmix64."""
    h = 0xCBF29CE484222325
    for b in salt + b'\xff' + key:
        h = ((h ^ b) * 0x100000001B3) & MASK
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & MASK
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & MASK
    return h ^ (h >> 33)


def expected_variant(split: str, key: bytes, weights: list[float]) -> int:
    raw = split_hash(split.encode(), key) >> 11
    total = sum(weights)
    acc = 0.0
    for i, w in enumerate(weights):
        acc += w
        bound = (1 << 53) if i == len(weights) - 1 else round(acc / total * (1 << 53))
        if raw < bound:
            return i
    return len(weights) - 1


TENANT_SPEC = {
    'server': {'allow_anonymous': True},
    'models': {
        'base': {'endpoints': ['http://x'], 'upstream_model': 'llama'},
        'lorax': {'endpoints': ['http://y'], 'upstream_model': 'mistral', 'adapter_field': 'adapter_id'},
        'other': {'endpoints': ['http://z'], 'aliases': ['o']},
    },
    'tenants': {
        f't{i}': {
            'keys_sha256': [hashlib.sha256(f'key-{i}'.encode()).hexdigest()],
            'base': 'base',
            'adapter': f'lora-{i}',
        }
        for i in range(TENANTS)
    },
    'splits': {
        'ab': {
            'sticky': ['header:x-user', 'tenant', 'user'],
            'variants': [
                {'name': 'a', 'to': 'base', 'weight': 1},
                {'name': 'b', 'to': 'base', 'weight': 2, 'adapter': 'lora-0'},
                {'name': 'c', 'to': 'other', 'weight': 3},
            ],
        }
    },
    'routes': [
        {'name': 'by-name', 'match': {'path': '/v1/completions'}, 'requested': True},
        {'name': 'lorax', 'match': {'path': '/lorax'}, 'to': 'lorax'},
        {'name': 'ab', 'match': {'path': '/ab'}, 'split': 'ab'},
        {'name': 'short', 'match': {'input_tokens': {'lt': 50}, 'stream': False}, 'to': 'other'},
    ],
    'default': 'base',
}
ROUTER = build(TENANT_SPEC)
PATHS = st.sampled_from(['/', '/v1/completions', '/lorax', '/ab', '/v1/chat/completions'])

json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
known = st.fixed_dictionaries(
    {},
    optional={
        'model': st.text(max_size=16) | st.sampled_from(['base', 'o', 'llama', 'lora-1', 'lora-5']),
        'messages': st.lists(
            st.fixed_dictionaries(
                {
                    'role': st.just('user'),
                    'content': st.text(max_size=40)
                    | st.lists(
                        st.fixed_dictionaries({'type': st.just('text'), 'text': st.text(max_size=20)}), max_size=3
                    ),
                }
            ),
            max_size=3,
        ),
        'stream': st.booleans(),
        'max_tokens': st.integers(min_value=0, max_value=10**6),
        'user': st.text(max_size=10),
        'adapter_id': st.sampled_from(['lora-0', 'lora-3', 'other']),
        'metadata': st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
        'stream_options': st.none()
        | st.fixed_dictionaries({}, optional={'include_usage': st.booleans(), 'continuous_usage_stats': st.booleans()}),
    },
)
KNOWN = {
    'model',
    'messages',
    'prompt',
    'input',
    'stream',
    'max_tokens',
    'max_completion_tokens',
    'user',
    'metadata',
    'adapter_id',
    'stream_options',
}
other_keys = st.text(max_size=10).filter(lambda k: k not in KNOWN)
bodies = st.builds(lambda k, extra: {**extra, **k}, known, st.dictionaries(other_keys, json_values, max_size=4))
auth = st.none() | st.integers(min_value=0, max_value=TENANTS - 1).map(lambda i: f'Bearer key-{i}')


@settings(max_examples=400, deadline=None)
@given(body=st.binary(max_size=300), path=PATHS)
def test_any_bytes_give_a_decision_or_a_request_error(body: bytes, path: str) -> None:
    try:
        d = ROUTER.decide('POST', path, {}, body)
    except RequestError as e:
        assert e.status == 400
        return
    assert d.status in (200, 401, 403, 404)
    assert isinstance(d.reasons, tuple)


@settings(max_examples=300, deadline=None)
@given(body=bodies, path=PATHS, key=auth, ensure_ascii=st.booleans())
def test_rewrite_is_valid_json_changed_only_in_rewritten_fields(
    body: dict[str, Any], path: str, key: str | None, ensure_ascii: bool
) -> None:
    raw = json.dumps(body, ensure_ascii=ensure_ascii).encode()
    headers = {'authorization': key} if key else {}
    try:
        d = ROUTER.decide('POST', path, headers, raw)
    except RequestError:
        # Only duplicate-free, well-typed bodies are generated, so errors mean a `requested` route
        # without a model.
        assert path == '/v1/completions' and 'model' not in body
        return
    if d.body is None:
        return
    out = json.loads(d.body)
    assert isinstance(out, dict)
    if d.adapter is not None and d.pool == 'lorax':
        assert out['adapter_id'] == d.adapter
    if d.upstream_model is not None or d.adapter is not None:
        assert out['model'] in (d.adapter, d.upstream_model)
    # a stream asks the upstream for usage, unless the client did
    asked = isinstance(body.get('stream_options'), dict) and body['stream_options'].get('include_usage') is True
    assert d.usage_injected == (body.get('stream') is True and not asked)
    if d.usage_injected:
        assert out['stream_options']['include_usage'] is True
        out['stream_options'].pop('include_usage')
        opts = body.get('stream_options') or {}
        opts.pop('include_usage', None)
        assert out.pop('stream_options') == opts
        body.pop('stream_options', None)
    for field in ('model', 'adapter_id'):
        out.pop(field, None)
        body.pop(field, None)
    assert out == body


@settings(max_examples=300, deadline=None)
@given(tenant=st.integers(0, TENANTS - 1), asked=st.integers(0, TENANTS - 1), path=PATHS, via_id=st.booleans())
def test_a_tenant_never_gets_another_tenants_adapter(tenant: int, asked: int, path: str, via_id: bool) -> None:
    fields = {'model': 'llama', 'adapter_id': f'lora-{asked}'} if via_id else {'model': f'lora-{asked}'}
    d = ROUTER.decide('POST', path, {'authorization': f'Bearer key-{tenant}'}, json.dumps(fields).encode())
    if asked != tenant:
        assert d.status == 403
    if d.status == 200:
        assert d.adapter in (None, f'lora-{tenant}')
        for other in set(range(TENANTS)) - {tenant}:
            assert f'"lora-{other}"'.encode() not in (d.body or b'')


@settings(max_examples=300, deadline=None)
@given(user=st.text(min_size=1, max_size=30).filter(lambda s: s.isprintable()))
def test_split_is_stable_and_matches_the_documented_hash(user: str) -> None:
    first = ROUTER.decide('POST', '/ab', {'x-user': user}, b'{}')
    second = ROUTER.decide('POST', '/ab', {'x-user': user}, json.dumps({'user': 'x', 'messages': []}).encode())
    assert first.variant == second.variant
    want = 'abc'[expected_variant('ab', user.encode(), [1, 2, 3])]
    assert first.variant == want


def test_split_shares_follow_weights() -> None:
    n = 30_000
    counts = {'a': 0, 'b': 0, 'c': 0}
    for i in range(n):
        d = ROUTER.decide('POST', '/ab', {'x-user': f'user-{i}'}, b'{}')
        counts[d.variant or ''] += 1
    for name, share in (('a', 1 / 6), ('b', 2 / 6), ('c', 3 / 6)):
        # 5 standard deviations of a binomial share at n = 30k is at most 0.0145.
        assert abs(counts[name] / n - share) < 0.015, counts
