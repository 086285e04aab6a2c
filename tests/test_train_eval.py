"""Training and evaluation of the complexity classifier: the README's metrics, `fastroute train` / `eval`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastroute import _core, classifier
from fastroute.classifier import DataError, default_data_path, load_examples, quality, threshold_for_share
from fastroute.cli import main


@pytest.fixture(scope='module')
def mmlu() -> list[classifier.Example]:
    return load_examples(default_data_path())


def test_quality_hand_computed() -> None:
    # W = 0.5, S = 1. Decile edges 0.1, 0.13, ..., 0.4 give the points (1, 1), (.75, 1), (.5, 1), (.25, .75),
    # and (0, .5) at the last edge (score > max): PGR 1, 1, 1, .5, 0.
    q = quality([0.1, 0.2, 0.3, 0.4], [1, 1, 0, 0], [1, 1, 1, 1])
    assert (q.weak, q.strong) == (0.5, 1.0)
    assert q.points == [(0.0, 0.5), (0.25, 0.75), (0.5, 1.0), (0.75, 1.0), (1.0, 1.0)]
    assert q.apgr == pytest.approx(0.25 * 0.25 + 0.25 * 0.75 + 0.25 + 0.25)
    assert q.cpt50 == pytest.approx(0.25)
    assert q.cpt80 == pytest.approx(0.25 + 0.3 / 0.5 * 0.25)


def test_quality_makes_the_curve_non_decreasing_for_cpt() -> None:
    # The best prompt to send strong scores lowest: PGR dips below 0 first, CPT reads the running maximum.
    q = quality([0.9, 0.1, 0.2, 0.3], [1, 0, 0, 1], [0, 1, 1, 1])
    pgr = [g for _, g in q.pgr()]
    assert pgr[0] == 0 and pgr[-1] == 1 and min(pgr) < 0
    assert 0 < q.cpt50 <= q.cpt80 <= 1


def test_the_readme_figures_on_the_bundled_file(mmlu: list[classifier.Example]) -> None:
    weak = [bool(e.weak) for e in mmlu]
    strong = [bool(e.strong) for e in mmlu]
    assert len(mmlu) == 7007
    q = quality([e.length for e in mmlu], weak, strong)
    assert q.weak == pytest.approx(0.675, abs=0.0005) and q.strong == pytest.approx(0.807, abs=0.0005)
    assert q.apgr == pytest.approx(0.57, abs=0.005)
    assert q.cpt50 == pytest.approx(0.38, abs=0.005) and q.cpt80 == pytest.approx(0.74, abs=0.005)
    apgr, cpt50, cpt80 = classifier.random_quality(weak, strong)
    assert apgr == pytest.approx(0.50, abs=0.02) and cpt50 == pytest.approx(0.505, abs=0.03)


def test_threshold_for_share_interpolates_the_calibration_quantiles() -> None:
    cal = [i / 100 for i in range(101)]  # uniform scores
    assert threshold_for_share(cal, 0.3) == pytest.approx(0.7)
    assert threshold_for_share([0.0, 1.0], 0.25) == pytest.approx(0.75)
    with pytest.raises(ValueError, match='calibration'):
        threshold_for_share([], 0.3)


def _rust_and_numpy_scores(model: dict, bodies: list[bytes], tmp_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The scores of `bodies` by the written model file through `_core` (as `decide` scores), and by numpy from the
    weights the training fitted."""
    file = tmp_path / 'm.json'
    file.write_text(json.dumps(model))
    rust = np.array(classifier.load_model(file).classifier.score_many(bodies))
    w = classifier.Weights(model['bias'], np.array(model['dense']), np.array(model['ngrams']))
    return rust, w.scores(classifier.design(bodies, model['hash_bits']))


def test_trained_model_round_trips_and_rust_scores_what_numpy_fitted(
    mmlu: list[classifier.Example], tmp_path: Path
) -> None:
    part = mmlu[::20]  # 351 prompts of every subject
    model = classifier.train(part, hash_bits=10, l2s=(1e-3,), folds=3)
    assert model['features'] == list(_core.classifier_feature_names()[0])
    assert len(model['ngrams']) == 1024 and len(model['calibration']) == 101
    bodies = [e.body for e in mmlu[1::50]]
    rust, fitted = _rust_and_numpy_scores(model, bodies, tmp_path)
    assert np.allclose(rust, fitted, atol=1e-4), np.abs(rust - fitted).max()
    default = np.array(classifier.load_model(classifier.default_model_path()).classifier.score_many(bodies))
    assert not np.allclose(rust, default, atol=1e-3)


def test_train_is_deterministic(mmlu: list[classifier.Example]) -> None:
    part = mmlu[::40]
    a = classifier.train(part, hash_bits=9, l2s=(1e-3,), folds=2)
    b = classifier.train(part, hash_bits=9, l2s=(1e-3,), folds=2)
    assert a == b


def test_train_and_eval_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / 'train.jsonl'
    lines = default_data_path().read_text().splitlines()[::25]
    data.write_text('\n'.join(lines) + '\n')
    out = tmp_path / 'model.json'
    argv = ['train', '--data', str(data), '-o', str(out), '--hash-bits', '10', '--l2', '1e-3', '--folds', '3', '-q']
    assert main(argv) == 0
    assert 'APGR' in capsys.readouterr().out
    scores = tmp_path / 'scores.txt'
    assert main(['eval', '--data', str(data), '--model', str(out), '--scores-out', str(scores), '--curve']) == 0
    text = capsys.readouterr().out
    for word in ('APGR', 'CPT(50%)', 'CPT(80%)', 'prompt length', 'random', 'in-sample'):
        assert word in text, text
    assert len(scores.read_text().splitlines()) == len(lines)


def test_eval_cli_on_the_bundled_file_with_the_default_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scores = tmp_path / 'scores.txt'
    assert main(['eval', '--scores-out', str(scores)]) == 0
    text = capsys.readouterr().out
    assert '7007 prompts' in text and 'APGR' in text
    values = [float(v) for v in scores.read_text().splitlines()]
    assert len(values) == 7007 and all(0 <= v <= 1 for v in values)


def test_eval_plot_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / 'd.jsonl'
    data.write_text('\n'.join(default_data_path().read_text().splitlines()[::70]) + '\n')
    png = tmp_path / 'curve.png'
    assert main(['eval', '--data', str(data), '--plot', str(png)]) == 0
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.parametrize(
    ('content', 'want'),
    [
        ('{"prompt": "hi", "weak_correct": true, "strong_correct": true}\n{not json\n', ':2: not JSON'),
        ('{"prompt": "hi", "weak_correct": true}\n', ':1: needs `weak_correct` and `strong_correct`'),
        ('{"weak_correct": true, "strong_correct": false}\n', ':1: no prompt'),
        ('[1, 2]\n', ':1: expected a JSON object'),
        ('{"prompt": "x", "weak_correct": "yes", "strong_correct": true}\n', ':1: `weak_correct` must be'),
    ],
)
def test_bad_data_files_name_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, want: str
) -> None:
    data = tmp_path / 'bad.jsonl'
    data.write_text(content)
    with pytest.raises(DataError, match='bad.jsonl'):
        load_examples(data)
    assert main(['eval', '--data', str(data)]) == 1
    err = capsys.readouterr().err
    assert want in err and 'Traceback' not in err, err
    assert main(['train', '--data', str(data), '-o', str(tmp_path / 'm.json')]) == 1


def test_eval_with_a_bad_model_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / 'm.json'
    bad.write_text('{"format": "fastroute-classifier", "version": 99}')
    assert main(['eval', '--model', str(bad)]) == 1
    assert 'm.json' in capsys.readouterr().err


def test_access_log_lines_with_outcomes_train(tmp_path: Path) -> None:
    src = default_data_path().read_text().splitlines()[::60]
    data = tmp_path / 'log.jsonl'
    with data.open('w') as f:
        for i, line in enumerate(src):
            ex = json.loads(line)
            body = {'model': 'x', 'messages': [{'role': 'user', 'content': ex['prompt']}]}
            entry = {'ts': 1.0, 'request_id': f'r{i}', 'path': '/v1/chat/completions', 'request': body}
            f.write(json.dumps({**entry, 'weak_correct': ex['weak_correct'], 'strong_correct': ex['strong_correct']}))
            f.write('\n')
    with data.open('a') as f:  # a line logged without its prompt is skipped
        f.write(json.dumps({'ts': 2.0, 'request_id': 'x', 'path': '/v1/chat/completions'}) + '\n')
    examples = load_examples(data)
    assert len(examples) == len(src) and all(e.group is None for e in examples)
    model = classifier.train(examples, hash_bits=9, l2s=(1e-2,), folds=2)
    assert model['trained']['examples'] == len(src)


# -- held-out kinds (`fastroute eval --holdout`) ----------------------------------------------------


def _per_subject(n: int) -> list[str]:
    """The first `n` lines of every subject of the bundled file (a small slice with all 57 subjects)."""
    seen: dict[str, int] = {}
    out = []
    for line in default_data_path().read_text().splitlines():
        subject = json.loads(line)['subject']
        if seen.get(subject, 0) < n:
            seen[subject] = seen.get(subject, 0) + 1
            out.append(line)
    return out


def test_the_category_grouping_covers_the_57_subjects_exactly_once(mmlu: list[classifier.Example]) -> None:
    groups = classifier.holdout_groups('category')
    listed = [s for subjects in groups.values() for s in subjects]
    assert sorted(groups) == ['humanities', 'other', 'social_sciences', 'stem']
    assert len(listed) == len(set(listed)) == 57
    assert set(listed) == {e.group for e in mmlu} == classifier.MMLU_SUBJECTS
    assert [len(groups[g]) for g in ('stem', 'humanities', 'social_sciences', 'other')] == [18, 13, 12, 14]
    (math,) = classifier.holdout_groups('math').values()
    assert set(math) <= set(groups['stem']) and 'elementary_mathematics' in math


@pytest.mark.parametrize('grouping', ['category', 'math'])
def test_the_split_never_trains_on_a_held_out_subject(mmlu: list[classifier.Example], grouping: str) -> None:
    for subjects in classifier.holdout_groups(grouping).values():
        train, test = classifier.holdout_split(mmlu, subjects)
        assert {mmlu[i].group for i in train}.isdisjoint(subjects)
        assert {mmlu[i].group for i in test} == set(subjects)
        assert sorted([*train, *test]) == list(range(len(mmlu)))


def test_holdout_eval_fits_and_smooths_on_the_training_part_only(
    mmlu: list[classifier.Example], monkeypatch: pytest.MonkeyPatch
) -> None:
    part = mmlu[::10]
    held: list[frozenset[str]] = []
    calls = {'targets': 0, 'cv': 0}
    split, targets, cross_validate = classifier.holdout_split, classifier.targets, classifier.cross_validate

    def spy_split(examples: list[classifier.Example], subjects: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        held.append(frozenset(subjects))
        return split(examples, subjects)

    def spy_targets(examples: list[classifier.Example], idx: np.ndarray, *, by_group: bool) -> np.ndarray:
        calls['targets'] += 1
        assert by_group and held and not {examples[i].group for i in idx} & held[-1]
        return targets(examples, idx, by_group=by_group)

    def spy_cv(examples: list[classifier.Example], *args: Any, **kw: Any) -> classifier.CvResult:
        calls['cv'] += 1
        assert held and not {e.group for e in examples} & held[-1]
        return cross_validate(examples, *args, **kw)

    monkeypatch.setattr(classifier, 'holdout_split', spy_split)
    monkeypatch.setattr(classifier, 'targets', spy_targets)
    monkeypatch.setattr(classifier, 'cross_validate', spy_cv)
    results = classifier.holdout_eval(part, 'category', hash_bits=9, l2s=(1e-3, 1e-2), folds=2)
    # per group: 2 inner CVs of 2 folds (a label vector per fold) and the final fit's labels
    assert calls == {'targets': 4 * (2 * 2 + 1), 'cv': 4 * 2}
    assert [r.group for r in results] == ['stem', 'humanities', 'social_sciences', 'other']
    for r in results:
        subjects = set(classifier.MMLU_CATEGORIES[r.group])
        assert set(r.subjects) == subjects and {part[i].group for i in r.test} == subjects
        assert r.trained_on == len(part) - len(r.test) and r.l2 in (1e-3, 1e-2) and r.inner_apgr is not None
        # the routers are measured on exactly the held-out prompts, against their raw outcomes
        weak = [bool(part[i].weak) for i in r.test]
        strong = [bool(part[i].strong) for i in r.test]
        assert r.length.apgr == quality([part[i].length for i in r.test], weak, strong).apgr
        assert r.classifier.apgr == quality(r.scores, weak, strong).apgr
        assert r.random == classifier.random_quality(np.array(weak), np.array(strong))
        assert (r.classifier.weak, r.classifier.strong) == (np.mean(weak), np.mean(strong))
        assert r.vs_length[0] <= r.vs_length[1]


def test_holdout_needs_mmlu_subjects(mmlu: list[classifier.Example]) -> None:
    other = [classifier.Example(e.body, e.weak, e.strong, None, e.length) for e in mmlu[:30]]
    with pytest.raises(ValueError, match='has no `subject`'):
        classifier.holdout_split(other, classifier.MATH_SUBJECTS)
    other[3].group = 'cooking'
    with pytest.raises(ValueError, match="example 1 has subject 'cooking', not one of MMLU"):
        classifier.holdout_split(other[3:], classifier.MATH_SUBJECTS)


def test_eval_holdout_cli_prints_a_row_per_group(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / 'slice.jsonl'
    data.write_text('\n'.join(_per_subject(8)) + '\n')  # 456 prompts, 8 of each subject
    base = ['eval', '--data', str(data), '--hash-bits', '10', '--l2', '1e-3', '-q']
    assert main([*base, '--holdout', 'category']) == 0
    out = capsys.readouterr().out
    assert 'classifier' in out and 'prompt length' in out and 'random (20 seeds)' in out, out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()}
    for group, n_subjects in (('stem', 18), ('humanities', 13), ('social_sciences', 12), ('other', 14)):
        row = rows[group]
        # name, subjects, prompts, W, S, then APGR / CPT(50%) / CPT(80%) of the three routers
        assert row[1:3] == [str(n_subjects), str(8 * n_subjects)], out
        assert len(row) == 5 + 3 * 3, row
        assert all(0 <= float(v.rstrip('%')) for v in row[3:])
        assert f'{group}: trained on {456 - 8 * n_subjects} prompts (l2 0.001)' in out
    assert 'mean of groups' in out
    scores = tmp_path / 'held-out.jsonl'
    assert main([*base, '--holdout', 'math', '--scores-out', str(scores)]) == 0
    out = capsys.readouterr().out
    row = rows_of(out, 'math')
    assert row[1:3] == ['5', '40'], out
    assert 'stem' not in out
    # the file holds each held-out prompt's score and outcomes: the printed figures can be recomputed from it
    held = [json.loads(line) for line in scores.read_text().splitlines()]
    assert len(held) == 40 and {h['subject'] for h in held} == set(classifier.MATH_SUBJECTS)
    source = [json.loads(line) for line in data.read_text().splitlines()]
    assert all(source[h['example'] - 1]['subject'] == h['subject'] for h in held)
    q = quality([h['score'] for h in held], [h['weak_correct'] for h in held], [h['strong_correct'] for h in held])
    assert f'{q.apgr:.4f}' == row[5] and f'{q.cpt50:.1%}' == row[6], (q, row)


def rows_of(out: str, name: str) -> list[str]:
    return next(line.split() for line in out.splitlines() if line.startswith(name + ' '))


@pytest.mark.parametrize(
    ('argv', 'want'),
    [
        (['--holdout', 'subjects'], "unknown grouping 'subjects'; choose one of: category, math"),
        (['--holdout', 'math', '--model', 'm.json'], 'not with --model'),
        (['--holdout', 'math', '--l2', 'x'], "--l2 'x'"),
        (['--l2', '1e-3'], '--l2 only apply with --holdout'),
    ],
)
def test_eval_holdout_bad_arguments(argv: list[str], want: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(['eval', *argv]) == 2
    err = capsys.readouterr().err
    assert want in err and 'Traceback' not in err, err
    with pytest.raises(ValueError, match='unknown grouping'):
        classifier.holdout_groups('subjects')


def _without_subjects(tmp_path: Path) -> Path:
    """20 labelled prompts with no `subject` (as an access log gives them)."""
    data = tmp_path / 'plain.jsonl'
    data.write_text(
        ''.join(
            json.dumps({'prompt': f'q {i}', 'weak_correct': i % 2 == 0, 'strong_correct': True}) + '\n'
            for i in range(20)
        )
    )
    return data


def test_eval_holdout_on_data_without_subjects(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _without_subjects(tmp_path)
    assert main(['eval', '--holdout', 'math', '--data', str(data), '-q']) == 1
    err = capsys.readouterr().err
    assert 'plain.jsonl' in err and 'has no `subject`' in err and 'Traceback' not in err, err


# -- L2 picked by leave-one-category-out CV (`--select-by category`) ---------------------------------


def test_select_l2_by_category_scores_each_category_with_a_fit_on_the_others(
    mmlu: list[classifier.Example], monkeypatch: pytest.MonkeyPatch
) -> None:
    part = mmlu[::12]
    d = classifier.design([e.body for e in part], 9)
    cat = {s: c for c, subjects in classifier.MMLU_CATEGORIES.items() for s in subjects}
    left_out: list[set[str]] = []
    targets = classifier.targets

    def spy_targets(examples: list[classifier.Example], idx: np.ndarray, *, by_group: bool) -> np.ndarray:
        left_out.append(set(classifier.MMLU_CATEGORIES) - {cat[str(examples[i].group)] for i in idx})
        return targets(examples, idx, by_group=by_group)

    monkeypatch.setattr(classifier, 'targets', spy_targets)
    l2, table = classifier.select_l2_by_category(part, d, (1e-3, 1e-1))
    # one fit per category and L2, each on the three other categories
    assert [sorted(s) for s in left_out] == [[c] for c in classifier.MMLU_CATEGORIES] * 2
    assert set(table) == {'0.001', '0.1', 'length'}
    length = table['length']
    for key in ('0.001', '0.1'):
        row = table[key]
        assert set(row) == {*classifier.MMLU_CATEGORIES, 'mean', 'worst_vs_length'}
        assert row['mean'] == pytest.approx(np.mean([row[c] for c in classifier.MMLU_CATEGORIES]), abs=1e-4)
        worst = min(row[c] - length[c] for c in classifier.MMLU_CATEGORIES)
        assert row['worst_vs_length'] == pytest.approx(worst, abs=2e-4)
    # the worst category against length decides, not the mean
    assert l2 == max((1e-3, 1e-1), key=lambda v: table[f'{v:g}']['worst_vs_length'])
    # an entry recomputed by hand: STEM scored by a fit on the other three categories
    tr, te = classifier.holdout_split(part, classifier.MMLU_CATEGORIES['stem'])
    w = classifier.fit(d.subset(tr), targets(part, tr, by_group=True), 1e-1)
    q = quality(w.scores(d.subset(te)), [bool(part[i].weak) for i in te], [bool(part[i].strong) for i in te])
    assert table['0.1']['stem'] == round(q.apgr, 4)
    stem = [part[i] for i in te]
    assert length['stem'] == round(
        quality([e.length for e in stem], [e.weak for e in stem], [e.strong for e in stem]).apgr, 4
    )


def test_select_l2_by_category_needs_mmlu_subjects(mmlu: list[classifier.Example]) -> None:
    plain = [classifier.Example(e.body, e.weak, e.strong, None, e.length) for e in mmlu[:40]]
    d = classifier.design([e.body for e in plain], 9)
    with pytest.raises(ValueError, match='has no `subject`'):
        classifier.select_l2_by_category(plain, d, (1e-3,))
    stem = [e for e in mmlu if e.group == 'astronomy'][:30]
    with pytest.raises(ValueError, match='at least two MMLU categories'):
        classifier.select_l2_by_category(stem, classifier.design([e.body for e in stem], 9), (1e-3,))


def test_train_select_by_category_writes_a_model_rust_scores(mmlu: list[classifier.Example], tmp_path: Path) -> None:
    part = mmlu[::15]
    model = classifier.train(part, hash_bits=10, l2s=(1e-3, 1e-1), folds=3, select_by='category')
    by_category = model['cv']['by_category']
    assert model['trained']['select_by'] == 'category' and 'by_l2' not in model['cv']
    assert model['trained']['l2'] == max((1e-3, 1e-1), key=lambda v: by_category[f'{v:g}']['worst_vs_length'])
    assert model['trained']['l2_grid'] == [1e-3, 1e-1]
    assert np.allclose(*_rust_and_numpy_scores(model, [e.body for e in mmlu[3::70]], tmp_path), atol=1e-4)
    # the default k-fold pick records no `select_by`, and the same L2 fits the same weights
    plain = classifier.train(part, hash_bits=10, l2s=(model['trained']['l2'],), folds=3)
    assert 'select_by' not in plain['trained'] and plain['ngrams'] == model['ngrams']


def test_holdout_select_by_category_picks_within_the_training_part(
    mmlu: list[classifier.Example], monkeypatch: pytest.MonkeyPatch
) -> None:
    part = mmlu[::14]
    held: list[frozenset[str]] = []
    picks: list[set[str | None]] = []
    split, select = classifier.holdout_split, classifier.select_l2_by_category

    def spy_split(examples: list[classifier.Example], subjects: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        if len(examples) == len(part):
            held.append(frozenset(subjects))
        return split(examples, subjects)

    def spy_select(examples: list[classifier.Example], *args: Any, **kw: Any) -> Any:
        picks.append({e.group for e in examples})
        return select(examples, *args, **kw)

    def no_cv(*args: Any, **kw: Any) -> None:
        raise AssertionError('k-fold CV used with select_by="category"')

    monkeypatch.setattr(classifier, 'holdout_split', spy_split)
    monkeypatch.setattr(classifier, 'select_l2_by_category', spy_select)
    monkeypatch.setattr(classifier, 'cross_validate', no_cv)
    results = classifier.holdout_eval(part, 'category', hash_bits=9, l2s=(1e-3, 1e-1), select_by='category')
    assert len(results) == len(picks) == len(held) == 4
    for r, groups, subjects in zip(results, picks, held, strict=True):
        assert groups.isdisjoint(subjects) and groups | subjects == classifier.MMLU_SUBJECTS
        assert r.l2 in (1e-3, 1e-1) and r.inner_apgr is not None


def test_select_by_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / 'slice.jsonl'
    data.write_text('\n'.join(_per_subject(6)) + '\n')
    out = tmp_path / 'm.json'
    argv = ['train', '--data', str(data), '-o', str(out), '--hash-bits', '9', '--l2', '1e-3,1e-1', '--folds', '3']
    assert main([*argv, '--select-by', 'category', '-q']) == 0
    assert 'picked by leave-one-category-out CV' in capsys.readouterr().out
    assert json.loads(out.read_text())['trained']['select_by'] == 'category'
    plain = _without_subjects(tmp_path)
    assert main(['train', '--data', str(plain), '-o', str(out), '--select-by', 'category', '-q']) == 1
    assert 'has no `subject`' in capsys.readouterr().err
    assert main(['eval', '--select-by', 'category']) == 2
    assert '--select-by only apply with --holdout' in capsys.readouterr().err
    base = ['eval', '--data', str(data), '--hash-bits', '9', '--l2', '1e-3,1e-1', '-q', '--holdout', 'category']
    assert main([*base, '--select-by', 'category']) == 0
    assert 'L2 by leave-one-category-out CV on the training part' in capsys.readouterr().out
    # --dense consistent: the kept features are printed and recorded
    assert main([*argv[:-4], '--l2', '1e-3', '--folds', '3', '--dense', 'consistent', '-q']) == 0
    assert 'dense features of one sign in every category:' in capsys.readouterr().out
    assert json.loads(out.read_text())['trained']['dense'] == 'consistent'
    assert main(['eval', '--dense', 'consistent']) == 2
    assert '--dense only apply with --holdout' in capsys.readouterr().err
    assert main([*base, '--dense', 'consistent', '--select-by', 'category']) == 1
    assert 'measured apart' in capsys.readouterr().err


# -- dense features of one sign in every category (`--dense consistent`) ------------------------------


def test_consistent_dense_reads_only_the_given_examples(mmlu: list[classifier.Example]) -> None:
    part = mmlu[::6]
    d = classifier.design([e.body for e in part], 9)
    tr, te = classifier.holdout_split(part, classifier.MMLU_CATEGORIES['stem'])
    keep = classifier.consistent_dense(part, d, tr, 1e-3)
    assert keep.dtype == bool and keep.shape == (16,)
    # by hand: the sign of each dense weight of a dense-only fit per training category
    signs = []
    for name in ('humanities', 'social_sciences', 'other'):
        sub = np.array([i for i in tr if part[i].group in classifier.MMLU_CATEGORIES[name]])
        ds = d.subset(sub)
        alone = classifier.Design(ds.dense, ds.rows[:0], ds.cols[:0], ds.vals[:0], ds.n, 1)
        signs.append(np.sign(classifier.fit(alone, classifier.targets(part, sub, by_group=True), 1e-3).dense))
    s = np.array(signs)
    assert list(keep) == list(np.all(s > 0, axis=0) | np.all(s < 0, axis=0))
    assert 0 < keep.sum() < 16  # some features turn sign between categories, some do not
    # the held-out prompts' outcomes cannot move the choice
    flipped = [
        classifier.Example(e.body, not e.weak, not e.strong, e.group, e.length) if i in set(te) else e
        for i, e in enumerate(part)
    ]
    assert list(classifier.consistent_dense(flipped, d, tr, 1e-3)) == list(keep)
    plain = [classifier.Example(e.body, e.weak, e.strong, None, e.length) for e in part]
    with pytest.raises(ValueError, match='has no MMLU `subject`'):
        classifier.consistent_dense(plain, d, tr, 1e-3)


def test_train_dense_consistent_zeroes_the_dropped_weights_and_rust_scores_it(
    mmlu: list[classifier.Example], tmp_path: Path
) -> None:
    part = mmlu[::10]
    model = classifier.train(part, hash_bits=10, l2s=(1e-3,), folds=3, dense='consistent')
    names = list(_core.classifier_feature_names()[0])
    kept = model['trained']['dense_kept']
    assert model['trained']['dense'] == 'consistent' and set(kept) < set(names)
    d = classifier.design([e.body for e in part], 10)
    keep = classifier.consistent_dense(part, d, np.arange(len(part)), 1e-3)
    assert kept == [n for n, k in zip(names, keep, strict=True) if k]
    assert all((w == 0) == (n not in kept) for n, w in zip(names, model['dense'], strict=True))
    assert np.allclose(*_rust_and_numpy_scores(model, [e.body for e in mmlu[5::60]], tmp_path), atol=1e-4)
    plain = classifier.train(part, hash_bits=10, l2s=(1e-3,), folds=3)
    assert 'dense' not in plain['trained'] and all(v != 0 for v in plain['dense'][:4])
    with pytest.raises(ValueError, match='measured apart'):
        classifier.train(part, hash_bits=10, l2s=(1e-3, 1e-2), folds=3, dense='consistent', select_by='category')


def test_holdout_dense_consistent_chooses_on_the_training_part(
    mmlu: list[classifier.Example], monkeypatch: pytest.MonkeyPatch
) -> None:
    part = mmlu[::14]
    seen: list[set[str | None]] = []
    consistent = classifier.consistent_dense

    def spy(examples: list[classifier.Example], d: Any, idx: np.ndarray, l2: float) -> np.ndarray:
        seen.append({examples[i].group for i in idx})
        return consistent(examples, d, idx, l2)

    monkeypatch.setattr(classifier, 'consistent_dense', spy)
    results = classifier.holdout_eval(part, 'category', hash_bits=9, l2s=(1e-3,), dense='consistent')
    assert len(seen) == len(results) == 4
    for r, groups in zip(results, seen, strict=True):
        assert groups.isdisjoint(classifier.MMLU_CATEGORIES[r.group])
        assert groups | set(classifier.MMLU_CATEGORIES[r.group]) == classifier.MMLU_SUBJECTS


# -- leaving out subjects whose labels are known to be wrong (`--exclude-subjects`) -------------------


def test_exclude_subjects_keeps_the_others_and_their_input_positions(mmlu: list[classifier.Example]) -> None:
    part = mmlu[:400]
    subjects = sorted({e.group for e in part if e.group})
    assert len(subjects) >= 3
    kept, positions = classifier.exclude_subjects(part, (subjects[0], subjects[2]))
    assert len(kept) == len(positions) == sum(e.group not in (subjects[0], subjects[2]) for e in part)
    assert all(part[p - 1] is e for p, e in zip(positions, kept, strict=True))
    assert {e.group for e in kept} == set(subjects) - {subjects[0], subjects[2]}
    with pytest.raises(ValueError, match="no example has subject 'high_school_maths'; check the spelling"):
        classifier.exclude_subjects(part, ('high_school_maths',))
    with pytest.raises(ValueError, match='every example is excluded'):
        classifier.exclude_subjects(part, tuple(subjects))
    plain = [classifier.Example(b'{}', True, True, None, 2)]
    with pytest.raises(ValueError, match='needs examples with a `subject`'):
        classifier.exclude_subjects(plain, ('anatomy',))


def test_exclude_subjects_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / 'slice.jsonl'
    data.write_text('\n'.join(_per_subject(6)) + '\n')  # 342 prompts, 6 of each subject
    out = tmp_path / 'm.json'
    gone = 'high_school_mathematics,virology'
    argv = ['train', '--data', str(data), '-o', str(out), '--hash-bits', '9', '--l2', '1e-3', '--folds', '3', '-q']
    assert main([*argv, '--exclude-subjects', gone]) == 0
    assert f'{342 - 12} examples (left out: high_school_mathematics, virology)' in capsys.readouterr().out
    model = json.loads(out.read_text())
    assert model['trained']['excluded_subjects'] == ['high_school_mathematics', 'virology']
    assert model['trained']['examples'] == 330
    assert main([*argv, '--exclude-subjects', 'virologyy']) == 1
    assert "no example has subject 'virologyy'" in capsys.readouterr().err
    assert main([*argv, '--exclude-subjects', ' , ']) == 2
    assert 'give subject names' in capsys.readouterr().err
    assert main([*argv, '--exclude-subjects', 'virology', '--semantic']) == 2
    assert 'not --semantic' in capsys.readouterr().err
    assert main(['eval', '--exclude-subjects', 'virology']) == 2
    assert '--exclude-subjects only apply with --holdout' in capsys.readouterr().err
    # held-out scores name each prompt by its position in the input, also when subjects before it are left out
    scores = tmp_path / 'held-out.jsonl'
    base = ['eval', '--data', str(data), '--hash-bits', '9', '--l2', '1e-3', '-q', '--holdout', 'math']
    assert main([*base, '--exclude-subjects', 'high_school_mathematics', '--scores-out', str(scores)]) == 0
    printed = capsys.readouterr().out
    assert '(left out: high_school_mathematics)' in printed
    assert rows_of(printed, 'math')[1:3] == ['4', '24'], printed
    held = [json.loads(line) for line in scores.read_text().splitlines()]
    source = [json.loads(line) for line in data.read_text().splitlines()]
    assert len(held) == 24 and 'high_school_mathematics' not in {h['subject'] for h in held}
    for h in held:  # high_school_statistics comes after the excluded subject in the file
        line = source[h['example'] - 1]
        assert (line['subject'], line['weak_correct'], line['strong_correct']) == (
            h['subject'],
            h['weak_correct'],
            h['strong_correct'],
        )


# -- dense weights fitted without some subjects (`--dense-exclude-subjects`) ---------------------------


def test_fit_on_takes_the_dense_weights_from_the_other_subjects_and_fits_the_ngrams_on_all(
    mmlu: list[classifier.Example], tmp_path: Path
) -> None:
    part = mmlu[::15]
    d = classifier.design([e.body for e in part], 9)
    idx = np.arange(len(part))
    gone = frozenset({'high_school_mathematics', 'professional_law'})
    w = classifier.fit_on(part, d, idx, 1e-3, by_group=True, dense_without=gone)
    trusted = np.array([i for i in idx if part[i].group not in gone])
    alone = classifier.fit(d.subset(trusted), classifier.targets(part, trusted, by_group=True), 1e-3)
    assert np.allclose(w.dense, alone.dense)  # the dense weights: the fit without those subjects
    assert not np.allclose(w.ngrams, alone.ngrams, atol=1e-3)  # the n-grams: refitted on every example
    plain = classifier.fit(d, classifier.targets(part, idx, by_group=True), 1e-3)
    assert not np.allclose(w.dense, plain.dense, atol=1e-3)
    # given those dense weights, the bias and n-grams are the best fit on all: nudging them raises the loss
    y = classifier.targets(part, idx, by_group=True)

    def loss(bias: float, ngrams: np.ndarray) -> float:
        p = classifier.Weights(bias, w.dense, ngrams).scores(d)
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)) + 1e-3 / 2 * (ngrams @ ngrams))

    best = loss(w.bias, w.ngrams)
    rng = np.random.default_rng(1)
    assert all(loss(w.bias, w.ngrams + rng.normal(0, 0.05, w.ngrams.shape)) > best for _ in range(3))
    assert loss(w.bias + 0.05, w.ngrams) > best and loss(w.bias - 0.05, w.ngrams) > best
    model = classifier.train(part, hash_bits=9, l2s=(1e-3,), folds=3, dense_without=gone)
    assert model['trained']['dense_without'] == sorted(gone)
    assert np.allclose(model['dense'], w.dense, rtol=1e-4, atol=1e-6)
    rust, fitted = _rust_and_numpy_scores(model, [e.body for e in mmlu[3::70]], tmp_path)
    assert np.allclose(rust, fitted, atol=1e-4)
    with pytest.raises(ValueError, match='measured apart'):
        classifier.train(part, hash_bits=9, l2s=(1e-3,), folds=3, dense='consistent', dense_without=gone)


def test_dense_exclude_subjects_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / 'slice.jsonl'
    data.write_text('\n'.join(_per_subject(6)) + '\n')
    out = tmp_path / 'm.json'
    argv = ['train', '--data', str(data), '-o', str(out), '--hash-bits', '9', '--l2', '1e-3', '--folds', '3', '-q']
    assert main([*argv, '--dense-exclude-subjects', 'high_school_mathematics']) == 0
    printed = capsys.readouterr().out
    assert '342 examples' in printed and 'dense weights fitted without: high_school_mathematics' in printed
    assert json.loads(out.read_text())['trained']['dense_without'] == ['high_school_mathematics']
    assert main([*argv, '--dense-exclude-subjects', 'high_school_maths']) == 1
    assert "no example has subject 'high_school_maths'" in capsys.readouterr().err
    assert main([*argv, '--dense-exclude-subjects', ',']) == 2
    assert 'give subject names' in capsys.readouterr().err
    assert main([*argv, '--dense-exclude-subjects', 'virology', '--dense', 'consistent']) == 1
    assert 'measured apart' in capsys.readouterr().err
    assert main(['eval', '--dense-exclude-subjects', 'virology']) == 2
    assert '--dense-exclude-subjects only apply with --holdout' in capsys.readouterr().err
    base = ['eval', '--data', str(data), '--hash-bits', '9', '--l2', '1e-3', '-q', '--holdout', 'math']
    assert main([*base, '--dense-exclude-subjects', 'virology']) == 0
    assert 'dense weights fitted without virology' in capsys.readouterr().out
