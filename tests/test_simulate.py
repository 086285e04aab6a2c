"""`fastroute simulate`: offline replay of traffic through a config's compiled router."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastroute.classifier import default_data_path
from fastroute.cli import main

MODELS = """
server: {allow_anonymous: true}
models:
  small: {endpoints: ["http://127.0.0.1:8001"], price: {input_per_1k: 0.0001, output_per_1k: 0.0002}}
  large: {endpoints: ["http://127.0.0.1:8011"], price: {input_per_1k: 0.003, output_per_1k: 0.006}}
tenants:
  acme: {keys_sha256: ["67a30edaae1219dde9e02235b54156b841e54f4365fa03e4b413f19e6fb55152"], adapter: acme-v1, base: small}
"""
CLASSIFY = (
    MODELS
    + """
routes:
  - {name: acme, match: {tenant: acme}, to: small}
  - {name: code, match: {path: /v1/code}, to: large}
  - {name: ambiguous, classify: complexity, target_share: 0.3, to: {simple: small, complex: large}}
"""
)
ALL_SMALL = MODELS + 'routes: [{name: everything, to: small}]\n'


def write(tmp_path: Path, name: str, text: str) -> str:
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


def mmlu_lines(step: int) -> list[dict]:
    return [json.loads(x) for x in default_data_path().read_text().splitlines()[::step]]


def test_replays_bodies_wrapped_requests_and_labelled_prompts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = mmlu_lines(35)  # 201 labelled prompts, training-file shape
    extra = [
        {'messages': [{'role': 'user', 'content': 'hi'}]},
        {'body': {'messages': [{'role': 'user', 'content': 'x'}]}, 'path': '/v1/code'},
        {'request': {'messages': [{'role': 'user', 'content': 'y'}]}, 'tenant': 'acme'},
    ]
    traffic = write(tmp_path, 't.jsonl', '\n'.join(json.dumps(r) for r in rows + extra) + '\n')
    assert main(['simulate', write(tmp_path, 'c.yaml', CLASSIFY), '-t', traffic]) == 0
    out = capsys.readouterr().out
    assert f'{len(rows) + 3} replayable' in out
    assert 'by route' in out and 'by model' in out and 'by adapter' in out and 'acme-v1' in out
    assert 'code' in out and 'saving' in out and 'all on large' in out
    assert f'quality on {len(rows)} labelled requests' in out and 'APGR' in out
    assert 'requests/s' in out


def test_replays_an_access_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = {
        'ts': 1764130000.0,
        'method': 'POST',
        'path': '/v1/chat/completions',
        'tenant': None,
        'route': 'ambiguous',
        'model': 'small',
        'adapter': None,
        'variant': None,
        'status': 200,
        'input_tokens': 12,
        'output_tokens': 40,
        'cost_usd': 0.0,
        'latency_ms': 10.0,
        'overhead_us': 30.0,
        'ttft_ms': 5.0,
        'attempts': 1,
        'fallbacks': 0,
    }
    lines = []
    for i in range(30):
        entry = {**base, 'request_id': f'r{i}'}
        if i % 3:  # prompt logging on for two lines of three
            entry['request'] = {'model': 'gpt-4o', 'messages': [{'role': 'user', 'content': f'question {i}?'}]}
        if i == 5:
            entry['tenant'] = 'acme'
        lines.append(json.dumps(entry))
    traffic = write(tmp_path, 'access.log', '\n'.join(lines) + '\n')
    assert main(['simulate', write(tmp_path, 'c.yaml', CLASSIFY), '-t', traffic]) == 0
    out = capsys.readouterr().out
    assert '30 lines, 20 replayable, 10 without a request body (not replayed)' in out
    assert 'output tokens from the log' in out


def test_two_configs_print_the_decision_diff_and_gate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = mmlu_lines(70)
    traffic = write(tmp_path, 't.jsonl', '\n'.join(json.dumps(r) for r in rows) + '\n')
    a, b = write(tmp_path, 'a.yaml', CLASSIFY), write(tmp_path, 'b.yaml', ALL_SMALL)
    assert main(['simulate', a, b, '-t', traffic, '--examples', '2']) == 0
    out = capsys.readouterr().out
    assert 'decision diff' in out and 'ambiguous -> large  =>  everything -> small' in out
    assert 'ambiguous -> small  =>  everything -> small' in out and '   line ' in out
    assert main(['simulate', a, b, '-t', traffic, '--fail-if-moved', '5']) == 3
    assert 'FAIL' in capsys.readouterr().out
    assert main(['simulate', a, a, '-t', traffic, '--fail-if-moved', '0']) == 0
    assert ': 0 of' in capsys.readouterr().out


@pytest.mark.parametrize(
    ('content', 'want'),
    [('{"prompt": "a"}\n{oops\n', 't.jsonl:2: not JSON'), ('{"prompt": "a"}\n"text"\n', 't.jsonl:2: expected a JSON')],
)
def test_bad_traffic_names_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, want: str
) -> None:
    traffic = write(tmp_path, 't.jsonl', content)
    assert main(['simulate', write(tmp_path, 'c.yaml', CLASSIFY), '-t', traffic]) == 1
    err = capsys.readouterr().err
    assert want in err and 'Traceback' not in err


def test_a_bad_config_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    traffic = write(tmp_path, 't.jsonl', '{"prompt": "a"}\n')
    bad = write(tmp_path, 'bad.yaml', MODELS + 'routes: [{name: r, to: nowhere}]\n')
    assert main(['simulate', bad, '-t', traffic]) == 1
    assert 'bad.yaml' in capsys.readouterr().err


def test_requests_the_router_rejects_are_counted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    traffic = write(tmp_path, 't.jsonl', '{"messages": "not a list"}\n{"prompt": "ok"}\n')
    assert main(['simulate', write(tmp_path, 'c.yaml', CLASSIFY), '-t', traffic]) == 0
    assert '1 x 400' in capsys.readouterr().out
