"""The trained complexity classifier inside `decide`: config keys, model files, the decision trace, target_share."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastroute import _core, classifier
from fastroute.classifier import chat_body, default_data_path, default_model_path
from fastroute.config import compile_config, load_config, loads_config
from fastroute.errors import ConfigError

CONFIG = """
server: {allow_anonymous: true}
models:
  small: {endpoints: ["http://127.0.0.1:8001"], price: {input_per_1k: 0.0001, output_per_1k: 0.0002}}
  large: {endpoints: ["http://127.0.0.1:8011"], price: {input_per_1k: 0.003, output_per_1k: 0.006}}
routes:
  - name: code
    match: {path: /v1/code}
    to: large
  - name: ambiguous
    classify: complexity
    to: {simple: small, complex: large}
"""


def write_config(tmp_path: Path, extra: str = '') -> Path:
    file = tmp_path / 'c.yaml'
    file.write_text(CONFIG + ''.join(f'    {line}\n' for line in extra.splitlines() if line))
    return file


def router_for(tmp_path: Path, extra: str = '') -> _core.Router:
    file = write_config(tmp_path, extra)
    return compile_config(load_config(file), file=str(file))


def test_the_shipped_model_scores_in_decide_and_the_trace_shows_score_and_threshold(tmp_path: Path) -> None:
    router = router_for(tmp_path, 'threshold: 0.2')
    assert router.classifier_keys == (str(default_model_path()),)
    d = router.decide('POST', '/v1/chat/completions', {}, chat_body('What is the capital of France?'))
    assert d.route == 'ambiguous' and d.score is not None and d.threshold == pytest.approx(0.2)
    out = d.to_dict()
    assert out['score'] == d.score and out['threshold'] == d.threshold
    line = next(r for r in d.reasons if r.startswith('classify complexity'))
    assert f'score {d.score:.4f}' in line and 'threshold 0.2000' in line and 'trained' in line
    # Rules handle the clear cases: the classifier is not reached.
    assert router.decide('POST', '/v1/code', {}, chat_body('x')).score is None


def test_decide_and_the_classifier_binding_agree(tmp_path: Path) -> None:
    router = router_for(tmp_path)
    model = classifier.load_model(default_model_path())
    bodies = [chat_body(p) for p in ('hi', 'Prove that there are infinitely many primes.', 'caf\u00e9 ' * 300)]
    scores = model.classifier.score_many(bodies)
    for body, s in zip(bodies, scores, strict=True):
        assert router.decide('POST', '/', {}, body).score == pytest.approx(s, abs=1e-6)


def test_target_share_puts_about_that_share_large(tmp_path: Path) -> None:
    router = router_for(tmp_path, 'target_share: 0.3')
    lines = default_data_path().read_text().splitlines()[::7]
    pools = [router.decide('POST', '/', {}, chat_body(json.loads(x)['prompt'])).pool for x in lines]
    share = pools.count('large') / len(pools)
    # The calibration sample is the model's out-of-fold scores (what unseen prompts get); these prompts are its
    # own training prompts, whose in-sample scores spread wider, so a few points more than 30 % go large.
    assert 0.24 <= share <= 0.38, share
    cfg = load_config(write_config(tmp_path, 'target_share: 0.3'))
    assert 0 < cfg.routes[1].threshold < 1 and cfg.routes[1].threshold != 0.5


def test_a_trained_model_file_changes_decisions(tmp_path: Path) -> None:
    examples = classifier.load_examples(default_data_path())[::30]
    model = classifier.train(examples, hash_bits=9, l2s=(1e-3,), folds=2)
    (tmp_path / 'mine.json').write_text(json.dumps(model))
    mine = router_for(tmp_path, 'classifier: mine.json\nthreshold: 0.15')
    default = router_for(tmp_path, 'threshold: 0.15')
    assert mine.classifier_keys == (str(tmp_path / 'mine.json'),)
    bodies = [chat_body(e) for e in ('hi', 'Explain general relativity.', 'Which is a prime? A. 4 B. 9 C. 7 D. 8')]
    assert [mine.decide('POST', '/', {}, b).score for b in bodies] != [
        default.decide('POST', '/', {}, b).score for b in bodies
    ]


def _default_bits() -> int:
    return int(json.loads(default_model_path().read_text())['hash_bits'])


def _model(**changes: object) -> str:
    m = json.loads(default_model_path().read_text())
    m.update(changes)
    return json.dumps(m)


@pytest.mark.parametrize(
    ('content', 'want'),
    [
        (None, 'cannot read model file'),
        ('{not json', 'is not JSON'),
        ('[1, 2]', 'not a JSON object'),
        (_model(version=7), 'model version 7'),
        (_model(hash_bits=_default_bits() + 1), 'expected 2^hash_bits'),
        (_model(features=['ln_tokens']), 'trained on features'),
        (_model(dense=[0.0]), '`dense` has 1 weights'),
        (_model(format='onnx'), '`format` is `onnx`'),
        (_model(calibration=[0.5, 0.1]), '`calibration` must be'),
    ],
)
def test_malformed_model_files_are_config_errors_at_the_key(tmp_path: Path, content: str | None, want: str) -> None:
    if content is not None:
        (tmp_path / 'bad.json').write_text(content)
    file = write_config(tmp_path, 'classifier: bad.json')
    with pytest.raises(ConfigError) as exc:
        load_config(file)
    text = str(exc.value)
    assert str(file) in text and 'routes[1].classifier' in text and want in text, text


def test_the_core_rejects_a_mismatched_model_with_the_key_path() -> None:
    spec = {
        'server': {'allow_anonymous': True},
        'models': {'a': {'endpoints': ['http://x']}},
        'routes': [{'name': 'r', 'classify': 'complexity', 'classifier': 'm', 'to': {'simple': 'a', 'complex': 'a'}}],
    }
    raw = json.dumps(spec).encode()
    with pytest.raises(ConfigError) as exc:
        _core.Router.compile(raw, {'m': _model(hash_bits=_default_bits() + 1).encode()})
    assert exc.value.path == 'routes[0].classifier' and 'hash_bits' in str(exc.value)
    with pytest.raises(ConfigError, match='was not loaded'):
        _core.Router.compile(raw, {})
    # Compiled without a model file (no `classifier`), the built-in weights score.
    del spec['routes'][0]['classifier']
    d = _core.Router.compile(json.dumps(spec).encode()).decide('POST', '/', {}, b'{"prompt": "hi"}')
    assert d.score == pytest.approx(_core.builtin_score(b'{"prompt": "hi"}'))
    assert any('classifier built-in' in r for r in d.reasons)


@pytest.mark.parametrize(
    ('route', 'path', 'want'),
    [
        ('{name: r, to: small, classifier: x.json}', 'routes[0].classifier', 'needs `classify: complexity`'),
        ('{name: r, to: small, target_share: 0.3}', 'routes[0].target_share', 'needs `classify: complexity`'),
        (
            '{name: r, classify: complexity, target_share: 1.5, to: {simple: small, complex: large}}',
            'routes[0].target_share',
            'strictly between 0 and 1',
        ),
    ],
)
def test_classifier_keys_are_checked(route: str, path: str, want: str) -> None:
    text = 'models: {small: {endpoints: ["http://a"]}, large: {endpoints: ["http://b"]}}\nroutes: [' + route + ']\n'
    with pytest.raises(ConfigError) as exc:
        loads_config(text)
    assert path in str(exc.value) and want in str(exc.value), str(exc.value)


def test_features_binding_matches_the_feature_names() -> None:
    names, fmt, version = _core.classifier_feature_names()
    assert (fmt, version) == ('fastroute-classifier', 2) and len(names) == 16
    [(dense, grams)] = _core.classifier_features([chat_body('Explain why 2 + 2 = 4?')], 12)
    assert len(dense) == len(names) and len(grams) == 2 * 5 - 1 and all(0 <= g < 4096 for g in grams)
    with pytest.raises(ValueError, match='hash_bits'):
        _core.classifier_features([b'{}'], 40)
    assert 0 <= _core.builtin_score(chat_body('hi')) <= 1
