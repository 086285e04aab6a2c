"""The `fastroute._core` surface: compile errors, decide with dict and custom headers, tenants
(401/403), 404s, splits, body rewrite, reasons and `to_dict`.

Table-driven cases come from tests/fixtures/specs/*.json, the same files the Rust tests read.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from fastroute import _core
from fastroute.config import Config
from fastroute.errors import ConfigError, RequestError

FIXTURES = Path(__file__).parent / 'fixtures' / 'specs'
DECIDE_FIXTURES = ['basic.json', 'tenants.json', 'splits.json', 'classify.json']


def spec_bytes(spec: dict[str, Any]) -> bytes:
    """Validate a plain dict against the config Structs, then encode it as `Router.compile` expects."""
    return msgspec.json.encode(msgspec.convert(spec, Config))


def compile_spec(spec: dict[str, Any]) -> _core.Router:
    return _core.Router.compile(spec_bytes(spec))


def load(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def chat(text: str = 'hi', **fields: Any) -> bytes:
    return json.dumps({'messages': [{'role': 'user', 'content': text}], **fields}).encode()


CASES = [
    pytest.param(name, case, id=f'{name.removesuffix(".json")}: {case["name"]}')
    for name in DECIDE_FIXTURES
    for case in load(name)['cases']
]


@pytest.fixture(scope='module')
def routers() -> dict[str, _core.Router]:
    return {name: compile_spec(load(name)['spec']) for name in DECIDE_FIXTURES}


@pytest.mark.parametrize(('fixture', 'case'), CASES)
def test_fixture_case(routers: dict[str, _core.Router], fixture: str, case: dict[str, Any]) -> None:
    router = routers[fixture]
    expect = case['expect']
    body = case['body'].encode()
    if 'raises' in expect:
        with pytest.raises(RequestError) as info:
            router.decide(case['method'], case['path'], case['headers'], body)
        assert info.value.param == expect['raises']
        assert info.value.status == 400
        return
    d = router.decide(case['method'], case['path'], case['headers'], body)
    got = d.to_dict()
    for key, want in expect.items():
        assert got[key] == want, (key, got)
    assert got['reasons'] == list(d.reasons)


@pytest.mark.parametrize('case', load('compile_errors.json')['cases'], ids=lambda c: c['name'])
def test_compile_error_names_the_path(case: dict[str, Any]) -> None:
    raw = json.dumps(case['spec']).encode()
    with pytest.raises(ConfigError) as info:
        _core.Router.compile(raw)
    assert info.value.path == case['path']
    assert isinstance(info.value, ValueError)
    assert info.value.message


def test_compile_rejects_non_json() -> None:
    with pytest.raises(ConfigError) as info:
        _core.Router.compile(b'{not json')
    assert info.value.path is None
    assert 'invalid spec' in str(info.value)


def test_router_properties(routers: dict[str, _core.Router]) -> None:
    basic = routers['basic.json']
    assert basic.route_count == 10
    assert basic.tenant_key_count == 0
    assert basic.header_names == ('authorization', 'x-tier', 'x-beta')
    assert routers['tenants.json'].tenant_key_count == 5
    assert 'x-user-id' in routers['splits.json'].header_names


def test_custom_key_header() -> None:
    router = compile_spec(
        {
            'server': {'key_header': 'X-API-Key'},
            'models': {'m': {'endpoints': ['http://x']}},
            'tenants': {'t': {'keys_sha256': [digest('secret')]}},
            'default': 'm',
        }
    )
    assert router.header_names[0] == 'x-api-key'
    assert router.decide('POST', '/', {'x-api-key': 'secret'}, b'{}').tenant == 't'
    assert router.decide('POST', '/', {'x-api-key': 'Bearer secret'}, b'{}').status == 401
    assert router.decide('POST', '/', {'authorization': 'Bearer secret'}, b'{}').status == 401


class LoggingHeaders:
    """A headers object in the RSGI style: only `.get`, and it records every name asked for."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values
        self.asked: list[str] = []

    def get(self, key: str, default: str | None = None) -> str | None:
        self.asked.append(key)
        return self.values.get(key, default)

    def keys(self) -> list[str]:
        raise AssertionError('decide must never list the headers')


def test_reads_only_the_headers_it_needs(routers: dict[str, _core.Router]) -> None:
    router = routers['basic.json']
    headers = LoggingHeaders({'x-tier': 'gold', 'cookie': 'secret', 'x-other': '1'})
    d = router.decide('POST', '/v1/chat/completions', headers, chat())
    assert d.route == 'gold'
    assert sorted(headers.asked) == sorted(router.header_names)


def test_decision_fields_and_rewrite(routers: dict[str, _core.Router]) -> None:
    router = routers['tenants.json']
    body = chat('hello', model='anything', stream=True, max_tokens=64)
    d = router.decide('POST', '/v1/chat/completions', {'authorization': 'Bearer sk-acme-1'}, body)
    assert (d.status, d.error, d.tenant, d.pool, d.adapter) == (200, None, 'acme', 'large', 'acme-lora')
    assert d.requested_model == 'anything'
    assert d.upstream_model == 'llama-3-8b'
    assert d.stream is True and d.max_tokens == 64
    assert d.est_input_tokens > 0
    assert d.score is None and d.variant is None
    assert d.body is not None
    out = json.loads(d.body)
    assert out.pop('model') == 'acme-lora'
    # a stream asks the upstream for usage (the gateway hides that chunk from this client, who did not ask)
    assert d.usage_injected is True
    assert out.pop('stream_options') == {'include_usage': True}
    original = json.loads(body)
    original.pop('model')
    assert out == original
    # Every byte outside the model value and the added stream_options is unchanged.
    added = b',"stream_options":{"include_usage":true}}'
    assert d.body.endswith(added)
    assert d.body[: -len(added)].replace(b'"acme-lora"', b'"anything"') + b'}' == body
    assert 'Decision(status=200' in repr(d)


def test_unchanged_body_is_none(routers: dict[str, _core.Router]) -> None:
    d = routers['basic.json'].decide('POST', '/', {}, chat(model='phi-3-mini'))
    assert d.pool == 'small'
    assert d.body is None


@pytest.mark.parametrize(
    ('headers', 'status', 'error'),
    [
        ({}, 401, 'missing API key'),
        ({'authorization': 'Bearer wrong'}, 401, 'invalid API key'),
        ({'authorization': 'Bearer sk-initech-1'}, 403, 'tenant `initech` may not use model `large`'),
    ],
)
def test_auth_statuses(routers: dict[str, _core.Router], headers: dict[str, str], status: int, error: str) -> None:
    d = routers['tenants.json'].decide('POST', '/v1/chat/completions', headers, chat())
    assert (d.status, d.error) == (status, error)
    assert d.body is None


def test_foreign_adapter_is_403_and_never_in_the_body(routers: dict[str, _core.Router]) -> None:
    d = routers['tenants.json'].decide(
        'POST', '/v1/chat/completions', {'authorization': 'Bearer sk-acme-1'}, chat(model='globex-lora')
    )
    assert d.status == 403
    assert d.adapter is None and d.body is None
    assert 'globex' not in (d.error or '').replace('globex-lora', '')


def test_no_route_is_a_decision() -> None:
    router = compile_spec({'models': {'m': {'endpoints': ['http://x']}}, 'server': {'allow_anonymous': True}})
    d = router.decide('POST', '/', {}, b'{}')
    assert (d.status, d.route, d.pool, d.error) == (404, None, None, 'no route matched this request')
    assert d.reasons[-1] == 'answer 404: no route matched this request'


def test_reasons_trace(routers: dict[str, _core.Router]) -> None:
    router = routers['basic.json']
    d = router.decide('POST', '/v1/chat/completions', {}, chat('x ' * 3000))
    reasons = d.reasons
    assert reasons is d.reasons  # rendered once
    assert reasons[0] == 'no API key: anonymous caller'
    assert any(r.startswith('route classify-path skipped: path') for r in reasons)
    assert 'route long matched' in reasons
    assert reasons[-1].startswith('body rewritten: model → `llama-3-70b`')
    assert d.to_dict()['reasons'] == list(reasons)


def test_split_variant_and_adapter(routers: dict[str, _core.Router]) -> None:
    router = routers['splits.json']
    seen = {}
    for i in range(200):
        d = router.decide('POST', '/v1/chat/completions', {'x-user-id': f'u{i}'}, b'{}')
        seen[d.variant] = d
        again = router.decide('POST', '/v1/chat/completions', {'x-user-id': f'u{i}'}, chat(user='other'))
        assert again.variant == d.variant
    assert set(seen) == {'control', 'treatment'}
    assert (seen['control'].pool, seen['control'].adapter) == ('a', None)
    assert (seen['treatment'].pool, seen['treatment'].adapter) == ('b', 'b-lora-v2')
    assert json.loads(seen['treatment'].body or b'{}')['model'] == 'b-lora-v2'
    assert any('split ab → variant' in r for r in seen['treatment'].reasons)


def test_classify_score(routers: dict[str, _core.Router]) -> None:
    router = routers['classify.json']
    easy = router.decide('POST', '/', {}, chat('thanks!'))
    assert easy.score is not None and 0.0 <= easy.score < 0.55
    assert easy.pool == 'small'
    assert any(r.startswith('classify complexity: score') for r in easy.reasons)


@pytest.mark.parametrize(
    ('body', 'param', 'message'),
    [
        (b'{"stream": "yes"}', 'stream', '`stream` must be a boolean'),
        (b'{"max_tokens": "10"}', 'max_tokens', '`max_tokens` must be an integer'),
        (b'{"messages": "hi"}', 'messages', '`messages` must be an array'),
        (b'{"model": ["a"]}', 'model', '`model` must be a string'),
        (b'{"metadata": 1}', 'metadata', '`metadata` must be an object'),
        (b'[]', None, 'the request body must be a JSON object'),
        (b'', None, 'the request body must be a JSON object'),
        (b'{"a": 1', None, 'malformed JSON body: unexpected end of input at byte 7'),
        (b'{"a": "\xff"}', None, 'the request body holds a string that is not valid UTF-8'),
    ],
)
def test_request_errors(routers: dict[str, _core.Router], body: bytes, param: str | None, message: str) -> None:
    with pytest.raises(RequestError) as info:
        routers['basic.json'].decide('POST', '/', {}, body)
    assert info.value.param == param
    assert info.value.message == message
    assert info.value.status == 400


def test_many_tenant_keys() -> None:
    tenants = {f't{i}': {'keys_sha256': [digest(f'key-{i}')]} for i in range(10_000)}
    router = compile_spec({'models': {'m': {'endpoints': ['http://x']}}, 'tenants': tenants, 'default': 'm'})
    assert router.tenant_key_count == 10_000
    for i in (0, 4321, 9999):
        assert router.decide('POST', '/', {'authorization': f'Bearer key-{i}'}, b'{}').tenant == f't{i}'


def test_estimate_tokens() -> None:
    assert _core.estimate_tokens('') == 0
    assert _core.estimate_tokens('hello world, this is a sentence.') > 0
    assert _core.estimate_tokens(b'hello world') == _core.estimate_tokens('hello world')
    with pytest.raises(ValueError, match='unknown encoding'):
        _core.estimate_tokens('x', exact=True, encoding='p50k')
    with pytest.raises(TypeError):
        _core.estimate_tokens(1)  # type: ignore[arg-type]


def test_noop_and_version() -> None:
    assert _core.noop() is None
    assert _core.__version__.count('.') == 2


def test_decision_is_frozen(routers: dict[str, _core.Router]) -> None:
    d = routers['basic.json'].decide('POST', '/', {}, b'{}')
    with pytest.raises(AttributeError):
        d.status = 500  # type: ignore[misc]


def test_names_and_requested_model_are_read_from_the_router_and_body() -> None:
    # Names are kept as indices and `requested_model` as its place in the body: each read makes the same value.
    spec = {
        'models': {'m': {'endpoints': ['http://x']}, 'n': {'endpoints': ['http://y'], 'upstream_model': 'n-up'}},
        'routes': [
            {'name': 'to-n', 'match': {'model': 'n*'}, 'to': 'n', 'upstream_path': '/v2/chat'},
            {'name': 'rest', 'match': {}, 'to': 'm'},
        ],
        'server': {'allow_anonymous': True},
    }
    router = compile_spec(spec)
    body = chat(model='caf\u00e9 "x"\n')
    d = router.decide('POST', '/v1/chat/completions', {}, body)
    assert b'caf\\u00e9 \\"x' in body  # the model text holds escapes
    assert (d.route, d.pool, d.upstream_path, d.tenant, d.adapter, d.variant) == ('rest', 'm', None, None, None, None)
    assert d.requested_model == d.requested_model == 'caf\u00e9 "x"\n'
    assert d.upstream_model == 'caf\u00e9 "x"\n'  # the pool keeps the client's model
    assert d.to_dict()['requested_model'] == d.to_dict()['upstream_model'] == 'caf\u00e9 "x"\n'
    d = router.decide('POST', '/v1/chat/completions', {}, chat(model='nano'))
    assert (d.route, d.pool, d.upstream_model, d.requested_model) == ('to-n', 'n', 'n-up', 'nano')
    assert d.upstream_path == '/v2/chat'
    assert 'route="to-n"' in repr(d) and 'upstream_model="n-up"' in repr(d)
    d = router.decide('POST', '/', {}, b'{"messages": []}')
    assert (d.requested_model, d.upstream_model) == (None, None)
    for name in ('route', 'pool', 'requested_model', 'upstream_model'):
        with pytest.raises(AttributeError):
            setattr(d, name, 'x')


@pytest.mark.parametrize('n', [3, 4, 5, 31])
def test_header_rules_read_every_slot(n: int) -> None:
    # Routers reading a few headers and routers reading many fetch them into differently sized arrays; every slot,
    # the last one included, reaches the rules (and the trace), from a dict or a `.get` object alike.
    routes = [{'name': f'h{i}', 'match': {'headers': {f'x-h{i}': f'v{i}'}}, 'to': 'm'} for i in range(n)]
    router = compile_spec(
        {'models': {'m': {'endpoints': ['http://x']}}, 'routes': routes, 'server': {'allow_anonymous': True}}
    )
    assert len(router.header_names) == n + 1
    for i in (0, n - 1):
        values = {f'x-h{i}': f'v{i}', 'x-h99': 'v99'}
        for headers in (values, LoggingHeaders(values)):
            d = router.decide('POST', '/', headers, b'{}')
            assert (d.status, d.route) == (200, f'h{i}')
            assert f'route h{i} matched' in d.reasons
        if isinstance(headers, LoggingHeaders):
            assert sorted(set(headers.asked)) == sorted(router.header_names)
    assert router.decide('POST', '/', {f'x-h{n - 1}': 'no'}, b'{}').status == 404
