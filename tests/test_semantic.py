"""The semantic classifier (fastroute.semantic): the numpy encoder against reference embeddings made once with
sentence-transformers (tests/fixtures/semantic-reference.json), `train --semantic` / `eval --semantic` on a
slice of the bundled data, config checks, and a real fastroute in front of real `fastroute mock` upstreams
deciding with the semantic score within its budget and falling back to the fast classifier past it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import REPO, fastroute_cmd, subprocess_env
from fastroute import classifier, semantic
from fastroute.classifier import default_data_path, load_examples
from fastroute.config import load_config, loads_config
from fastroute.errors import ConfigError
from obs_support import KEYS, start_observed, total, wait_for

FIXTURE = REPO / 'tests' / 'fixtures' / 'semantic-reference.json'


def test_the_encoder_matches_the_reference_embeddings() -> None:
    ref = json.loads(FIXTURE.read_text())
    enc = semantic.encoder()
    ours = enc.embed(ref['sentences'])
    want = np.asarray(ref['vectors'], dtype=np.float32)
    assert ours.shape == want.shape == (len(ref['sentences']), semantic.DIM)
    cos = (ours * want).sum(axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.999, list(zip(ref['sentences'], cos.round(5), strict=True))
    # one at a time (the live path: no padding) gives the same vectors as the padded batch
    for i in (0, len(ref['sentences']) - 1):
        assert float(enc.embed_one(ref['sentences'][i]) @ ours[i]) > 0.99999


def test_prompt_text_takes_every_message_and_the_completion_prompt() -> None:
    body = {
        'messages': [
            {'role': 'system', 'content': 'be brief'},
            {'role': 'user', 'content': [{'type': 'text', 'text': 'what is 2+2?'}, {'type': 'image_url'}]},
        ]
    }
    assert semantic.prompt_text(json.dumps(body).encode()) == 'be brief\nwhat is 2+2?'
    assert semantic.prompt_text(b'{"prompt": "complete this"}') == 'complete this'
    assert semantic.prompt_text(b'{"input": [{"role": "user", "content": "hi"}]}') == 'hi'


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # one BLAS thread: on 2 shared cores, OpenBLAS's spinning threads make these small problems several times slower
    env = subprocess_env({'OPENBLAS_NUM_THREADS': '1'})
    return subprocess.run(fastroute_cmd(*args), capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def _cached(cache: Path, texts: list[str]) -> np.ndarray:
    """The embeddings of `texts` as the cache's one shard holds them (read here, not through the code under test)."""
    import hashlib

    (shard,) = cache.glob('sem-*.npz')
    with np.load(shard) as z:
        rows = {k.tobytes(): e for k, e in zip(z['keys'], z['emb'], strict=True)}
    return np.array([rows[hashlib.sha256(t.encode()).digest()[:16]] for t in texts])


def test_the_embedding_cache_embeds_only_texts_it_has_not_seen(tmp_path: Path) -> None:
    enc = semantic.encoder()
    cache = tmp_path / 'cache'
    texts = ['What is the capital of France?', 'Solve for x: 3x + 5 = 20.', 'Write a haiku about autumn.']
    said: list[str] = []
    first = semantic._embeddings_cached(enc, texts, cache, said.append)
    assert said[0] == 'embeddings: 0 of 3 from the cache', said
    again = semantic._embeddings_cached(enc, [texts[2], 'A new prompt.', texts[0], texts[2]], cache, said.append)
    assert 'embeddings: 3 of 4 from the cache' in said, said  # the repeated text counts twice, is embedded once
    assert len(list(cache.glob('sem-*.npz'))) == 2
    assert np.array_equal(again[[0, 2, 3]], first[[2, 0, 2]])
    assert np.allclose(again[1], enc.embed_one('A new prompt.'), atol=1e-6)
    tag = next(cache.glob('sem-*.npz')).name.split('-')[1]
    (cache / f'sem-{tag}-0000.npz').write_bytes(b'not a zip')  # a shard that does not read is skipped
    said.clear()
    assert np.array_equal(semantic._embeddings_cached(enc, texts, cache, said.append), first)
    assert said == ['embeddings: 3 of 3 from the cache'], said


def test_train_and_eval_semantic_on_a_slice(tmp_path: Path) -> None:
    lines = default_data_path().read_text().splitlines()[:60]
    data = tmp_path / 'slice.jsonl'
    data.write_text('\n'.join(lines) + '\n')
    cache = tmp_path / 'cache'
    out = tmp_path / 'sem.json'
    r = _run('train', '--semantic', '--data', str(data), '-o', str(out), '--folds', '3', '--cache-dir', str(cache),
             cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    for row in ('semantic (CV)', 'fast classifier (CV)', 'prompt length', 'random'):
        assert row in r.stdout, r.stdout
    model = json.loads(out.read_text())
    assert model['format'] == 'fastroute-semantic-classifier' and model['version'] == 1
    assert model['embedding']['model'] == 'all-MiniLM-L6-v2' and model['embedding']['dim'] == 384
    assert len(model['weights']) == 384 and len(model['calibration']) == 101
    assert model['trained']['examples'] == 60
    for key in ('apgr', 'cpt50', 'cpt80'):
        assert 0 <= model['cv'][key] <= 1 and 0 <= model['cv']['fast_classifier'][key] <= 1
    assert len(list(cache.glob('sem-*.npz'))) == 1  # the embeddings are cached ...

    scores = tmp_path / 'scores.txt'
    r = _run('eval', '--semantic', '--data', str(data), '--model', str(out), '--cache-dir', str(cache),
             '--scores-out', str(scores), cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert 'in-sample' in r.stdout and 'semantic' in r.stdout and 'fast classifier' in r.stdout, r.stdout
    assert len(list(cache.glob('sem-*.npz'))) == 1  # ... and reused by eval (same prompts, same model)
    got = np.array([float(v) for v in scores.read_text().split()])
    assert got.shape == (60,) and ((got > 0) & (got < 1)).all()
    # the file's weights reproduce the written scores from the cached embeddings
    emb = _cached(cache, semantic.texts_of(load_examples(data)))
    want = 1 / (1 + np.exp(-(emb @ np.array(model['weights']) + model['bias'])))
    assert np.allclose(got, want, atol=2e-6)


def test_eval_holdout_semantic_trains_each_group_without_it(tmp_path: Path) -> None:
    seen: set[str] = set()
    lines = []
    for line in default_data_path().read_text().splitlines():  # the first prompt of each of the 57 subjects
        subject = json.loads(line)['subject']
        if subject not in seen:
            seen.add(subject)
            lines.append(line)
    data = tmp_path / 'slice.jsonl'
    data.write_text('\n'.join(lines) + '\n')
    cache, held = tmp_path / 'cache', tmp_path / 'held-out.jsonl'
    r = _run('eval', '--holdout', 'category', '--semantic', '--data', str(data), '--l2', '1e-3', '-q',
             '--cache-dir', str(cache), '--scores-out', str(held), cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert 'semantic classifier' in r.stdout, r.stdout
    for group, n in (('stem', 18), ('humanities', 13), ('social_sciences', 12), ('other', 14)):
        row = next(line.split() for line in r.stdout.splitlines() if line.startswith(group + ' '))
        assert row[1:3] == [str(n), str(n)], r.stdout
        assert f'{group}: trained on {57 - n} prompts (l2 0.001)' in r.stdout
    # each held-out score is the semantic fit on the other groups' embeddings only
    examples = load_examples(data)
    emb = _cached(cache, semantic.texts_of(examples))
    rows = [json.loads(line) for line in held.read_text().splitlines()]
    assert len(rows) == 57
    stem = [h for h in rows if h['group'] == 'stem']
    te = np.array([h['example'] - 1 for h in stem])
    tr = np.array([i for i in range(57) if i not in set(te)])
    b, w = semantic.fit_semantic(emb[tr], classifier.targets(examples, tr, by_group=True), 1e-3)
    assert np.allclose([h['score'] for h in stem], 1 / (1 + np.exp(-(emb[te] @ w + b))), atol=2e-6)
    r = _run('eval', '--holdout', 'math', '--semantic', '--dense', 'consistent', '--data', str(data), cwd=tmp_path)
    assert r.returncode == 2 and '--dense are for the fast classifier, not --semantic' in r.stderr, r.stderr


BASE = """
models:
  small: {endpoints: ["http://127.0.0.1:9"]}
  large: {endpoints: ["http://127.0.0.1:9"]}
routes:
  - name: ambiguous
    classify: complexity
    to: {simple: small, complex: large}
"""


@pytest.mark.parametrize(
    ('semantic_key', 'path', 'want'),
    [
        ('{classifier: missing.json}', 'routes[0].semantic.classifier', 'cannot read semantic model file'),
        ('{classifier: fast.json}', 'routes[0].semantic.classifier', 'not a semantic model file'),
        ('{classifier: dim.json}', 'routes[0].semantic.classifier', 'trained on embeddings'),
        ('{budget_ms: 0}', 'routes[0].semantic.budget_ms', 'time budget'),
        ('{threshold: 2}', 'routes[0].semantic.threshold', 'outside [0, 1]'),
        ('{model_dir: nowhere}', 'routes[0].semantic.model_dir', 'has no model.safetensors'),
    ],
)
def test_bad_semantic_settings_are_config_errors_naming_the_key(
    tmp_path: Path, semantic_key: str, path: str, want: str
) -> None:
    (tmp_path / 'fast.json').write_text('{"format": "fastroute-classifier", "version": 1}')
    good = json.loads(semantic.default_semantic_path().read_text())
    (tmp_path / 'dim.json').write_text(json.dumps({**good, 'embedding': {'model': 'other-model', 'dim': 768}}))
    file = tmp_path / 'c.yaml'
    file.write_text(BASE + f'    semantic: {semantic_key}\n')
    with pytest.raises(ConfigError) as exc:
        load_config(file)
    assert path in str(exc.value) and want in str(exc.value), str(exc.value)


def test_semantic_needs_classify() -> None:
    text = 'models: {small: {endpoints: ["http://a"]}}\nroutes: [{name: r, to: small, semantic: {}}]\n'
    with pytest.raises(ConfigError) as exc:
        loads_config(text)
    assert 'routes[0].semantic' in str(exc.value) and 'needs `classify: complexity`' in str(exc.value)


def _sem_config(endpoints: dict[str, str], admin_port: int) -> str:
    # The fast classifier sends everything to `small` (threshold 1: a score is always below it); the semantic one
    # sends everything to `large` (threshold 0). So the model that answers says which classifier decided.
    route = (
        '  - {{name: {name}, match: {{headers: {{x-sem: {name}}}}}, classify: complexity, threshold: 1.0,'
        ' to: {{simple: small, complex: large}}, semantic: {{threshold: 0.0, budget_ms: {budget}}}}}\n'
    )
    return (
        f'admin:\n  listen: 127.0.0.1:{admin_port}\n  token_env: FR_OBS_ADMIN\n'
        'models:\n'
        f'  small: {{endpoints: ["{endpoints["small"]}"], upstream_model: phi-3-mini}}\n'
        f'  large: {{endpoints: ["{endpoints["large"]}"], upstream_model: llama-3-13b}}\n'
        'tenants:\n'
        f'  acme: {{keys_sha256: ["{__import__("hashlib").sha256(KEYS["acme"].encode()).hexdigest()}"]}}\n'
        'routes:\n'
        + route.format(name='roomy', budget=20000)  # in budget even on a loaded machine
        + route.format(name='tiny', budget=0.001)  # never in budget
        + '  - {name: by-model, requested: true}\n'
    )


def test_gateway_decides_with_the_semantic_score_in_budget_and_falls_back_past_it(
    start_mock, procs, tmp_path: Path
) -> None:
    small = start_mock(model='phi-3-mini', name='small-1')
    large = start_mock(model='llama-3-13b', name='large-1')
    fr = start_observed(procs, lambda p: _sem_config({'small': small.url, 'large': large.url}, p), tmp_path)
    auth = {'authorization': f'Bearer {KEYS["acme"]}'}
    body = {'model': 'small', 'messages': [{'role': 'user', 'content': 'Prove that sqrt(2) is irrational.'}]}

    r = httpx.post(fr.url + '/v1/chat/completions', json=body, headers={**auth, 'x-sem': 'roomy'}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers['x-fastroute-classifier'] == 'semantic'
    assert r.headers['x-fastroute-model'] == 'large'
    assert r.json()['choices'][0]['message']['content'].startswith('[mock:llama-3-13b]')
    assert large.recorded()[-1]['body']['model'] == 'llama-3-13b'

    r = httpx.post(fr.url + '/v1/route/explain', json=body, headers={**auth, 'x-sem': 'roomy'}, timeout=30)
    d = r.json()
    assert d['classifier'] == 'semantic' and d['pool'] == 'large'
    assert d['semantic']['outcome'] == 'in_budget' and 0 < d['semantic']['score'] < 1
    assert d['score'] == pytest.approx(d['semantic']['score'], abs=1e-6) and d['threshold'] == 0.0
    assert d['semantic']['fast_model'] == 'small' and d['semantic']['fast_threshold'] == 1.0
    assert any('semantic score' in line for line in d['reasons']), d['reasons']

    for _ in range(3):
        r = httpx.post(fr.url + '/v1/chat/completions', json=body, headers={**auth, 'x-sem': 'tiny'}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.headers['x-fastroute-classifier'] == 'fast'
        assert r.headers['x-fastroute-model'] == 'small'
    d = httpx.post(fr.url + '/v1/route/explain', json=body, headers={**auth, 'x-sem': 'tiny'}, timeout=30).json()
    assert d['classifier'] == 'fast' and d['pool'] == 'small' and d['semantic']['outcome'] == 'over_budget'
    assert 'over its budget' in d['reasons'][-1]

    # other routes carry no classifier header
    r = httpx.post(fr.url + '/v1/chat/completions', json=body, headers=auth, timeout=30)
    assert r.status_code == 200 and 'x-fastroute-classifier' not in r.headers

    m = wait_for(
        lambda: (
            (m := fr.metrics()) and total(m, 'fastroute_semantic_total', route='tiny', outcome='over_budget') >= 4 and m
        )
    )
    assert total(m, 'fastroute_semantic_total', route='tiny', outcome='over_budget') == 4
    assert total(m, 'fastroute_semantic_total', route='roomy', outcome='in_budget') == 2


def test_the_worker_answers_busy_at_once_when_its_queue_is_full() -> None:
    import asyncio
    import time

    route = semantic.SemanticRoute(
        'r', semantic.load_semantic(semantic.default_semantic_path()), 0.5, 30.0, None
    )  # a roomy budget: only `busy` may stop a job here
    worker = semantic.Worker(depth=1)
    body = json.dumps({'messages': [{'role': 'user', 'content': 'a long question about history ' * 300}]}).encode()

    async def main() -> list[tuple[str, float]]:
        async def one() -> tuple[str, float]:
            t = time.monotonic()
            outcome, score, err = await worker.score(route, body)
            assert err is None
            assert (score is not None) == (outcome == semantic.Outcome.IN_BUDGET)
            return outcome, time.monotonic() - t

        return await asyncio.gather(*(one() for _ in range(4)))

    got = asyncio.run(main())
    outcomes = [o for o, _ in got]
    assert outcomes.count(semantic.Outcome.IN_BUDGET) >= 1 and outcomes.count(semantic.Outcome.BUSY) >= 2, got
    slowest_ok = max(dt for o, dt in got if o == semantic.Outcome.IN_BUDGET)
    assert all(dt < slowest_ok for o, dt in got if o == semantic.Outcome.BUSY), got  # busy did not wait
