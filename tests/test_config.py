"""Config loading, interpolation, resolution and validation: every kind of mistake names its path.

The tests at the end (`test_compile_*`) need the compiled core (`fastroute._core.Router`).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import msgspec
import pytest
from fastroute.config import (
    ClassifyTargets,
    Config,
    ConfigErrors,
    Endpoint,
    Model,
    Route,
    Split,
    Tenant,
    Variant,
    compile_config,
    load_config,
    loads_config,
    parse_size,
    resolve,
    validate,
)
from fastroute.errors import ConfigError

CONFIGS = Path(__file__).parent / 'fixtures' / 'configs'
MODELS = """\
models:
  small: {endpoints: ["http://127.0.0.1:8001"]}
  large: {endpoints: ["http://127.0.0.1:8011"]}
"""
ACME_DIGEST = hashlib.sha256(b'sk-acme-demo').hexdigest()


def fastroute(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name('fastroute')
    argv = [str(script)] if script.exists() else [sys.executable, '-m', 'fastroute.cli']
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=60, env=env)


def errors_of(text: str, fmt: str = 'yaml', environ: dict[str, str] | None = None) -> dict[str, str]:
    """path -> message of every error the config text has (it must have some)."""
    with pytest.raises(ConfigErrors) as info:
        loads_config(textwrap.dedent(text), fmt, 'test.' + fmt, environ=environ or {})
    assert all(e.file == 'test.' + fmt for e in info.value.errors)
    return {e.path or '': e.message for e in info.value.errors}


def assert_error(text: str, path: str, *fragments: str, environ: dict[str, str] | None = None) -> None:
    errors = errors_of(text, environ=environ)
    assert path in errors, f'no error at {path}; got {errors}'
    for fragment in fragments:
        assert fragment in errors[path], f'{fragment!r} not in {errors[path]!r}'


# -- each kind of mistake, with its path and message ----------------------------------------------

CASES = [
    # (id, config text, path, fragments of the message)
    (
        'route-unknown-model',
        MODELS + 'routes: [{name: a, to: larg}]',
        'routes[0].to',
        ["unknown model 'larg' (known: small, large)", "did you mean 'large'?"],
    ),
    ('route-unknown-split', MODELS + 'routes: [{name: a, split: ab}]', 'routes[0].split', ["unknown split 'ab'"]),
    ('route-no-target', MODELS + 'routes: [{name: a, match: {path: /x}}]', 'routes[0]', ['no target']),
    (
        'route-several-targets',
        MODELS + 'routes: [{name: a, to: small, requested: true}]',
        'routes[0]',
        ['several targets (to, requested)', 'keep one'],
    ),
    (
        'classify-without-targets',
        MODELS + 'routes: [{name: a, classify: complexity, to: small}]',
        'routes[0].to',
        ['needs `to: {simple: <model>, complex: <model>}`'],
    ),
    (
        'classify-targets-without-classify',
        MODELS + 'routes: [{name: a, to: {simple: small, complex: large}}]',
        'routes[0].to',
        ['needs `classify: complexity`'],
    ),
    (
        'classify-unknown-target',
        MODELS + 'routes: [{name: a, classify: complexity, to: {simple: small, complex: huge}}]',
        'routes[0].to.complex',
        ["unknown model 'huge'"],
    ),
    (
        'classify-threshold',
        MODELS + 'routes: [{name: a, classify: complexity, threshold: 1.5, to: {simple: small, complex: large}}]',
        'routes[0].threshold',
        ['1.5 is outside [0, 1]'],
    ),
    (
        'duplicate-route-name',
        MODELS + 'routes: [{name: a, to: small, match: {path: /a}}, {name: a, to: large}]',
        'routes[1].name',
        ["duplicate route name 'a' (also routes[0])"],
    ),
    ('default-unknown', MODELS + 'default: medium', 'default', ["unknown model 'medium'"]),
    ('tenant-base-unknown', MODELS + 'tenants: {t: {base: lrge}}', 'tenants.t.base', ["unknown model 'lrge'"]),
    (
        'tenant-allowed-unknown',
        MODELS + 'tenants: {t: {allowed_models: [small, tiny]}}',
        'tenants.t.allowed_models[1]',
        ["unknown model 'tiny'"],
    ),
    (
        'tenant-base-not-allowed',
        MODELS + 'tenants: {t: {base: large, adapter: t-lora, allowed_models: [small]}}',
        'tenants.t.allowed_models',
        ["base model 'large' is not allowed"],
    ),
    ('tenant-adapter-without-base', MODELS + 'tenants: {t: {adapter: t-lora}}', 'tenants.t.adapter', ['needs a base']),
    (
        'tenant-adapter-shared',
        MODELS + 'tenants: {a: {base: small, adapter: x}, b: {base: small, adapter: x}}',
        'tenants.b.adapter',
        ["adapter 'x' already belongs to tenant 'a'"],
    ),
    (
        'tenant-shared-key',
        MODELS + f'tenants: {{a: {{keys_sha256: ["{ACME_DIGEST}"]}}, b: {{keys_sha256: ["{ACME_DIGEST.upper()}"]}}}}',
        'tenants.b.keys_sha256[0]',
        ["also a key of tenant 'a' (tenants.a.keys_sha256[0])"],
    ),
    (
        'keys-sha256-not-hex',
        MODELS + 'tenants: {t: {keys_sha256: ["abc123"]}}',
        'tenants.t.keys_sha256[0]',
        ['not a SHA-256 digest', '64 hex characters', 'sha256sum'],
    ),
    (
        'keys-env-missing',
        MODELS + 'tenants: {t: {keys_env: [ACME_KEY]}}',
        'tenants.t.keys_env[0]',
        ['environment variable ACME_KEY is not set'],
    ),
    (
        'keys-file-unreadable',
        MODELS + 'tenants: {t: {keys_file: /nonexistent/keys.txt}}',
        'tenants.t.keys_file',
        ["cannot read '/nonexistent/keys.txt'", 'No such file'],
    ),
    (
        'split-weights-sum',
        MODELS + 'splits: {ab: {variants: [{name: a, to: small, weight: 60}, {name: b, to: large, weight: 30}]}}\n'
        'routes: [{name: r, split: ab}]',
        'splits.ab.variants',
        ['60 + 30 = 90', 'sum to 100 (or to 1)'],
    ),
    (
        'split-weight-not-positive',
        MODELS + 'splits: {ab: {variants: [{name: a, to: small, weight: 0}, {name: b, to: large, weight: 100}]}}',
        'splits.ab.variants[0].weight',
        ['must be a positive number'],
    ),
    (
        'split-variant-unknown-model',
        MODELS + 'splits: {ab: {variants: [{name: a, to: smal, weight: 1}]}}',
        'splits.ab.variants[0].to',
        ["unknown model 'smal'"],
    ),
    (
        'split-duplicate-variant',
        MODELS + 'splits: {ab: {variants: [{name: a, to: small, weight: 50}, {name: a, to: large, weight: 50}]}}',
        'splits.ab.variants[1].name',
        ["duplicate variant name 'a'"],
    ),
    ('split-no-variants', MODELS + 'splits: {ab: {variants: []}}', 'splits.ab.variants', ['no variants']),
    (
        'sticky-invalid',
        MODELS + 'splits: {ab: {sticky: "cookie:uid", variants: [{name: a, to: small, weight: 1}]}}',
        'splits.ab.sticky',
        ["invalid sticky key 'cookie:uid'", 'header:<name>'],
    ),
    (
        'sticky-list-item-invalid',
        MODELS + 'splits: {ab: {sticky: [tenant, "header:"], variants: [{name: a, to: small, weight: 1}]}}',
        'splits.ab.sticky[1]',
        ["invalid sticky key 'header:'"],
    ),
    (
        'regex-unparseable',
        MODELS + 'routes: [{name: a, to: small, match: {headers: {x-tier: {regex: "(gold"}}}}]',
        'routes[0].match.headers.x-tier.regex',
        ["invalid regex '(gold'", 'missing )'],
    ),
    (
        'regex-lookaround',
        MODELS + 'routes: [{name: a, to: small, match: {headers: {x-tier: {regex: "^(?!free)"}}}}]',
        'routes[0].match.headers.x-tier.regex',
        ['negative lookahead', 'Rust `regex`'],
    ),
    (
        'regex-backreference',
        MODELS + r'routes: [{name: a, to: small, match: {headers: {x-a: {regex: "(a)\\1"}}}}]',
        'routes[0].match.headers.x-a.regex',
        ['backreference'],
    ),
    (
        'header-condition-empty',
        MODELS + 'routes: [{name: a, to: small, match: {headers: {x-a: {}}}}]',
        'routes[0].match.headers.x-a',
        ['no condition'],
    ),
    (
        'fallback-unknown',
        'models:\n  small: {endpoints: ["http://127.0.0.1:8001"], fallback: [big]}\n',
        'models.small.fallback[0]',
        ["unknown model 'big'"],
    ),
    (
        'fallback-self',
        'models:\n  small: {endpoints: ["http://127.0.0.1:8001"], fallback: [small]}\n',
        'models.small.fallback[0]',
        ['falls back to itself'],
    ),
    (
        'endpoint-scheme',
        'models:\n  small: {endpoints: ["tcp://127.0.0.1:8001"]}\n',
        'models.small.endpoints[0]',
        ['not an http(s) URL'],
    ),
    (
        'endpoint-path',
        'models:\n  small: {endpoints: ["http://127.0.0.1:8001/v1"]}\n',
        'models.small.endpoints[0]',
        ['has a path', 'http(s)://host:port'],
    ),
    (
        'endpoint-port',
        'models:\n  small: {endpoints: ["http://127.0.0.1:99999"]}\n',
        'models.small.endpoints[0]',
        ['not a valid URL'],
    ),
    (
        'endpoint-object-weight',
        'models:\n  small: {endpoints: [{url: "http://127.0.0.1:8001", weight: -1}]}\n',
        'models.small.endpoints[0].weight',
        ['positive'],
    ),
    ('model-no-endpoints', 'models:\n  small: {endpoints: []}\n', 'models.small.endpoints', ['no endpoints']),
    ('no-models', 'models: {}\n', 'models', ['no models defined']),
    (
        'alias-collision',
        'models:\n  a: {endpoints: ["http://127.0.0.1:1"]}\n  b: {endpoints: ["http://127.0.0.1:2"], aliases: [a]}\n',
        'models.b.aliases[0]',
        ["'a' is already the name of model 'a'"],
    ),
    ('listen-not-host-port', MODELS + 'server: {listen: "8080"}', 'server.listen', ["'8080' is not host:port"]),
    ('workers', MODELS + 'server: {workers: 0}', 'server.workers', ['at least 1']),
    ('timeout', MODELS + 'server: {timeouts: {connect: 0}}', 'server.timeouts.connect', ['positive']),
    (
        'model-timeout',
        'models:\n  small: {endpoints: ["http://127.0.0.1:8001"], timeouts: {total: -5}}\n',
        'models.small.timeouts.total',
        ['positive'],
    ),
    ('body-size', MODELS + 'server: {max_body_bytes: 4 megs}', 'server.max_body_bytes', ["not a size: '4 megs'"]),
    (
        'range-inverted',
        MODELS + 'routes: [{name: a, to: small, match: {input_tokens: {gt: 2000, lt: 500}}}]',
        'routes[0].match.input_tokens',
        ['empty range (gt: 2000, lt: 500)'],
    ),
    (
        'range-equal-bounds',
        MODELS + 'routes: [{name: a, to: small, match: {max_tokens: {gt: 10, lte: 10}}}]',
        'routes[0].match.max_tokens',
        ['empty range'],
    ),
    (
        'nested-match',
        MODELS + 'routes: [{name: a, to: small, match: {any: [{path: /a}, {not: {input_tokens: {gte: 9, lt: 3}}}]}}]',
        'routes[0].match.any[1].not.input_tokens',
        ['empty range'],
    ),
    (
        'match-path',
        MODELS + 'routes: [{name: a, to: small, match: {path: v1/x}}]',
        'routes[0].match.path',
        ['start with /'],
    ),
    (
        'match-unknown-tenant',
        MODELS + 'routes: [{name: a, to: small, match: {tenant: acme}}]',
        'routes[0].match.tenant',
        ["unknown tenant 'acme'"],
    ),
    (
        'api-key-env-missing',
        'models:\n  small: {endpoints: ["http://127.0.0.1:8001"], api_key_env: SMALL_KEY}\n',
        'models.small.api_key_env',
        ['SMALL_KEY is not set'],
    ),
    # structural mistakes, reported from msgspec with the full path
    (
        'unknown-key',
        MODELS + 'routes: [{name: a, to: small, match: {tokens: {gt: 1}}}]',
        'routes[0].match.tokens',
        ["unknown key 'tokens'", "did you mean 'max_tokens' or 'input_tokens'?", 'allowed here:'],
    ),
    (
        'unknown-key-in-dict-value',
        MODELS + 'routes: [{name: a, to: small, match: {headers: {x-a: ok, x-b: {equal: v}}}}]',
        'routes[0].match.headers.x-b.equal',
        ["unknown key 'equal'", "did you mean 'equals'?"],
    ),
    ('unknown-section', MODELS + 'rotues: []', 'rotues', ["unknown key 'rotues'", "did you mean 'routes'?"]),
    ('missing-required', 'models:\n  small: {upstream_model: x}\n', 'models.small.endpoints', ['missing required key']),
    ('wrong-type', MODELS + 'server: {workers: many}', 'server.workers', ['expected an integer, got a string']),
    ('enum', MODELS + 'server: {token_estimator: exactly}', 'server.token_estimator', ["'exact', 'fast'"]),
    (
        'yaml-bool-as-text',
        MODELS + 'routes: [{name: a, to: small, match: {headers: {x-a: on}}}]',
        'routes[0].match.headers.x-a',
        ['quote it'],
    ),
    (
        'yaml-duplicate-key',
        MODELS + '  small: {endpoints: ["http://127.0.0.1:9"]}\n',
        'models.small',
        ['duplicate key'],
    ),
    ('missing-models', 'routes: []\n', 'models', ["missing required section 'models'"]),
]


@pytest.mark.parametrize(('text', 'path', 'fragments'), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_mistake_names_path_and_problem(text: str, path: str, fragments: list[str]) -> None:
    assert_error(text, path, *fragments)


def test_config_errors_are_config_errors_and_value_errors() -> None:
    with pytest.raises(ValueError) as info:
        loads_config(MODELS + 'default: nope', 'yaml', 'x.yaml')
    err = info.value
    assert isinstance(err, ConfigError)
    assert isinstance(err, ConfigErrors)
    assert (err.file, err.path) == ('x.yaml', 'default')
    assert str(err).startswith('x.yaml:default: unknown model')


def test_all_errors_are_collected_with_lines() -> None:
    with pytest.raises(ConfigErrors) as info:
        load_config(CONFIGS / 'broken.yaml')
    errors = info.value.errors
    found = {(e.path, e.line) for e in errors}
    assert found == {
        ('server.listen', 2),
        ('server.workers', 2),
        ('models.large.fallback[0]', 5),
        ('routes[0].to', 7),
        ('routes[1].name', 8),
        ('default', 9),
    }
    assert [e.line for e in errors] == sorted(e.line or 0 for e in errors)
    message = str(info.value)
    assert message.startswith('6 errors in the config:')
    assert all(f'broken.yaml:{e.path}: ' in message for e in errors)


def test_structural_errors_are_collected_per_item() -> None:
    with pytest.raises(ConfigErrors) as info:
        load_config(CONFIGS / 'broken_structure.yaml')
    assert [(e.path, e.line) for e in info.value.errors] == [
        ('models.small.upstrem_model', 3),
        ('routes[0].match.tokens', 5),
        ('routes[1].match.headers.x-ok', 6),
    ]


def test_toml_error_has_path() -> None:
    with pytest.raises(ConfigErrors) as info:
        load_config(CONFIGS / 'broken.toml')
    (err,) = info.value.errors
    assert (err.path, err.line) == ('routes[0].to', None)
    assert "did you mean 'small'?" in err.message


@pytest.mark.parametrize(
    ('text', 'fmt', 'fragment'),
    [
        ('models: [a, b', 'yaml', 'YAML syntax error'),
        ('[models\n', 'toml', 'TOML syntax error'),
        ('', 'yaml', 'the config is empty'),
        ('- a\n- b\n', 'yaml', 'must be a mapping'),
        ('models: {}', 'json', "unknown config format 'json'"),
    ],
)
def test_unparseable_text(text: str, fmt: str, fragment: str) -> None:
    with pytest.raises(ConfigErrors) as info:
        loads_config(text, fmt)
    assert fragment in str(info.value)


def test_unknown_file_and_suffix(tmp_path: Path) -> None:
    with pytest.raises(ConfigErrors, match='cannot read the config'):
        load_config(tmp_path / 'missing.yaml')
    (tmp_path / 'c.json').write_text('{}')
    with pytest.raises(ConfigErrors, match=r'\.yaml, \.yml or \.toml'):
        load_config(tmp_path / 'c.json')


# -- formats, interpolation, sizes, keys ----------------------------------------------------------


def test_yaml_and_toml_load_the_same_config() -> None:
    from_yaml = load_config(CONFIGS / 'valid.yaml')
    from_toml = load_config(CONFIGS / 'valid.toml')
    assert from_yaml == from_toml
    assert from_yaml.server.max_body_bytes == 512_000
    assert from_yaml.models['large'].endpoints[1] == Endpoint(url='http://127.0.0.1:8012', weight=2)
    assert isinstance(from_yaml.routes[0].match.headers, dict)
    assert load_config(CONFIGS / 'valid.yaml') == loads_config((CONFIGS / 'valid.yaml').read_text(), 'yml')


def test_env_interpolation() -> None:
    text = """\
        server: {listen: "${HOST:-127.0.0.1}:${PORT}", workers: "${WORKERS:-3}"}
        models:
          small:
            endpoints: ["http://${UPSTREAM}"]
            api_key: "${UPSTREAM_KEY}"
            upstream_model: "$${not-a-var}"
    """
    environ = {'PORT': '9000', 'UPSTREAM': '127.0.0.1:8001', 'UPSTREAM_KEY': 'sk-up', 'HOST': ''}
    cfg = loads_config(textwrap.dedent(text), environ=environ)
    assert cfg.server.listen == '127.0.0.1:9000'  # empty HOST takes the default, as in the shell
    assert cfg.server.workers == 3  # interpolated text is converted to the field's type
    assert cfg.models['small'].endpoints == ['http://127.0.0.1:8001']
    assert cfg.models['small'].api_key == 'sk-up'
    assert cfg.models['small'].upstream_model == '${not-a-var}'


def test_env_interpolation_errors_name_the_key() -> None:
    text = """\
        models:
          small: {endpoints: ["http://127.0.0.1:8001"], api_key: "${SMALL_KEY}", upstream_model: "${oops"}
    """
    errors = errors_of(text)
    assert 'environment variable SMALL_KEY is not set' in errors['models.small.api_key']
    assert '${SMALL_KEY:-...}' in errors['models.small.api_key']
    assert "unclosed '${'" in errors['models.small.upstream_model']
    assert 'invalid reference' in errors_of(MODELS + 'default: "${1X}"')['default']


@pytest.mark.parametrize(
    ('value', 'size'),
    [
        (1048576, 1048576),
        ('1048576', 1048576),
        ('4MiB', 4 * 1024 * 1024),
        ('4 mib', 4 * 1024 * 1024),
        ('512KB', 512_000),
        ('1.5KiB', 1536),
        ('2GB', 2_000_000_000),
        ('100B', 100),
    ],
)
def test_size_strings(value: int | str, size: int) -> None:
    assert parse_size(value) == size
    cfg = loads_config(MODELS + f'server: {{max_body_bytes: "{value}"}}')
    assert cfg.server.max_body_bytes == size


@pytest.mark.parametrize('value', ['4 megs', '4M', '-1', '0', 'MiB', ''])
def test_bad_size_strings(value: str) -> None:
    with pytest.raises(ValueError):
        parse_size(value)


def test_keys_are_hashed_from_env_and_file(tmp_path: Path) -> None:
    keys = tmp_path / 'keys' / 'acme.txt'
    keys.parent.mkdir()
    keys.write_text('# acme keys\nsk-file-1\n\n  sk-file-2  \nsk-file-1\n')
    config = tmp_path / 'c.yaml'
    config.write_text(
        MODELS
        + 'tenants:\n'
        + f'  acme: {{keys_sha256: ["{ACME_DIGEST.upper()}"], keys_env: [ACME_KEY], keys_file: keys/acme.txt}}\n'
    )
    cfg = load_config(config, environ={'ACME_KEY': ' sk-env '})
    tenant = cfg.tenants['acme']
    expected = [hashlib.sha256(k.encode()).hexdigest() for k in ('sk-acme-demo', 'sk-env', 'sk-file-1', 'sk-file-2')]
    assert tenant.keys_sha256 == expected  # lowercase, deduplicated, in order
    assert (tenant.keys_env, tenant.keys_file) == ([], None)
    assert 'sk-env' not in msgspec.json.encode(cfg).decode()


def test_key_from_env_shared_with_another_tenant() -> None:
    text = MODELS + f'tenants: {{a: {{keys_sha256: ["{ACME_DIGEST}"]}}, b: {{keys_env: [B_KEY]}}}}'
    errors = errors_of(text, environ={'B_KEY': 'sk-acme-demo'})
    assert errors == {'tenants.b.keys_env[0]': errors['tenants.b.keys_env[0]']}
    assert "also a key of tenant 'a'" in errors['tenants.b.keys_env[0]']
    assert 'sk-acme-demo' not in errors['tenants.b.keys_env[0]']


def test_resolve_reads_upstream_key_and_normalises() -> None:
    text = """\
        server: {max_body_bytes: 1KiB, key_header: X-API-Key}
        models:
          small: {endpoints: ["http://127.0.0.1:8001/"], api_key_env: SMALL_KEY}
        splits:
          ab: {sticky: "header:X-User", variants: [{name: a, to: small, weight: 0.25}, {name: b, to: small, weight: 0.75}]}
        routes:
          - {name: r, match: {method: post, headers: {X-Tier: gold}}, split: ab}
    """
    cfg = loads_config(textwrap.dedent(text), environ={'SMALL_KEY': 'sk-upstream'})
    small = cfg.models['small']
    assert (small.api_key, small.api_key_env, small.endpoints) == ('sk-upstream', None, ['http://127.0.0.1:8001'])
    assert cfg.server.max_body_bytes == 1024
    assert cfg.server.key_header == 'x-api-key'
    assert [v.weight for v in cfg.splits['ab'].variants] == [25.0, 75.0]  # scaled to sum to 100
    assert cfg.splits['ab'].sticky == 'header:x-user'
    assert cfg.routes[0].match.method == 'POST'
    assert cfg.routes[0].match.headers == {'x-tier': 'gold'}
    assert resolve(cfg, environ={}) == cfg  # idempotent, needs nothing from the environment again


def test_api_key_and_api_key_env_conflict() -> None:
    text = 'models:\n  small: {endpoints: ["http://127.0.0.1:8001"], api_key: x, api_key_env: SMALL_KEY}\n'
    assert_error(text, 'models.small.api_key_env', 'both api_key and api_key_env', environ={'SMALL_KEY': 'y'})


def test_weights_summing_to_one_are_accepted() -> None:
    text = MODELS + (
        'splits: {ab: {variants: [{name: a, to: small, weight: 0.3}, {name: b, to: large, weight: 0.7}]}}\n'
        'routes: [{name: r, split: ab}]'
    )
    assert [v.weight for v in loads_config(text).splits['ab'].variants] == pytest.approx([30, 70])


def test_validate_a_config_built_in_code() -> None:
    cfg = Config(
        models={'a': Model(endpoints=['http://127.0.0.1:8001'])},
        tenants={'t': Tenant(base='b')},
        routes=[Route(name='r', classify='complexity', to=ClassifyTargets(simple='a', complex='a'), threshold=-0.1)],
        splits={'s': Split(variants=[Variant(name='v', to='a', weight=100)])},
    )
    with pytest.raises(ConfigErrors) as info:
        validate(cfg)
    assert {e.path for e in info.value.errors} == {'tenants.t.base', 'routes[0].threshold'}
    validate(Config(models={'a': Model(endpoints=['http://127.0.0.1:8001'])}))


def test_quoted_path_for_names_with_dots() -> None:
    text = 'models:\n  llama-3.1-8b: {endpoints: ["http://127.0.0.1:8001"], fallback: [nope]}\n'
    assert_error(text, "models['llama-3.1-8b'].fallback[0]", "unknown model 'nope'")


# -- the command line -----------------------------------------------------------------------------


def test_check_valid_config_prints_summary() -> None:
    result = fastroute('check', '--no-compile', str(CONFIGS / 'valid.yaml'))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert 'valid.yaml: OK' in out
    assert 'small  1 endpoint' in out and 'large  2 endpoints' in out
    assert '$0.0001/1k in' in out
    assert 'tenants  1 (1 key)' in out
    assert '1.  long  x-tier~/^(gold|silver)$/ input_tokens>2000  -> large' in out
    assert 'a -> small 50%, b -> large 50%' in out
    assert 'default  small' in out
    assert ACME_DIGEST not in out


def test_check_never_prints_keys(tmp_path: Path) -> None:
    config = tmp_path / 'c.yaml'
    config.write_text(MODELS + 'tenants: {t: {keys_env: [T_KEY]}}\n')
    result = fastroute('check', '--no-compile', str(config), env={**os.environ, 'T_KEY': 'sk-secret-key'})
    assert result.returncode == 0, result.stderr
    assert 'tenants  1 (1 key)' in result.stdout
    assert 'sk-secret-key' not in result.stdout + result.stderr
    assert hashlib.sha256(b'sk-secret-key').hexdigest() not in result.stdout


def test_check_broken_config_exits_1_with_each_error() -> None:
    result = fastroute('check', str(CONFIGS / 'broken.yaml'))
    assert result.returncode == 1
    assert result.stdout == ''
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 6
    file = str(CONFIGS / 'broken.yaml')
    assert (
        lines[0]
        == f"{file}:server.listen: 'localhost' is not host:port; e.g. '127.0.0.1:8080', '0.0.0.0:8080', '[::1]:8080' (line 2)"
    )
    assert f"{file}:routes[0].to: unknown model 'larg' (known: small, large); did you mean 'large'? (line 7)" in lines


def test_check_several_files_and_warnings(tmp_path: Path) -> None:
    config = tmp_path / 'warn.yaml'
    config.write_text(MODELS + 'tenants: {nokeys: {}}\nroutes: [{name: all, to: small}, {name: never, to: large}]\n')
    result = fastroute('check', '--no-compile', str(config), str(CONFIGS / 'broken.toml'))
    assert result.returncode == 1
    assert 'warn.yaml: OK' in result.stdout
    assert f'{config}:tenants.nokeys: warning: tenant has no keys' in result.stderr
    assert f'{config}:routes[1]: warning: unreachable: routes[0] above matches every request' in result.stderr
    assert 'broken.toml:routes[0].to: unknown model' in result.stderr


def test_schema_prints_json_schema() -> None:
    result = fastroute('schema')
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert schema['$schema'].startswith('https://json-schema.org/')
    defs = schema['$defs']
    sections = {'models', 'server', 'tenants', 'routes', 'default', 'splits', 'admin', 'redis', 'experiments'}
    sections |= {'spend', 'access_log', 'metrics', 'tracing'}
    assert set(defs['Config']['properties']) == sections
    assert 'not' in defs['Match']['properties']
    assert result.stdout.startswith('{\n  ')  # pretty-printed


# -- compile (needs fastroute._core.Router) -------------------------------------------------------


def test_compile_config_returns_router() -> None:
    cfg = load_config(CONFIGS / 'valid.yaml')
    router = compile_config(cfg, file='valid.yaml')
    assert router.route_count == 2
    assert router.tenant_key_count == 1


def test_compile_error_carries_file_name() -> None:
    # Not validated in Python: the core must reject the dangling reference itself.
    cfg = Config(models={'a': Model(endpoints=['http://127.0.0.1:8001'])}, routes=[Route(name='r', to='nope')])
    with pytest.raises(ConfigError) as info:
        compile_config(cfg, file='code.yaml')
    assert info.value.file == 'code.yaml'
    assert (info.value.path or '').startswith('routes')


def test_check_compiles_with_the_core() -> None:
    result = fastroute('check', str(CONFIGS / 'valid.yaml'))
    assert result.returncode == 0, result.stderr
    assert 'compiled 2 routes, 1 tenant keys' in result.stdout
