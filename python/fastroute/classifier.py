"""The trained complexity classifier: model files, routing-quality metrics, training and evaluation.

A model file (JSON, format `fastroute-classifier`, version 2; see docs/classifier.md) holds the weights of
a logistic model over the features `rust/src/classify.rs` computes: 16 dense features and a table of
`2^hash_bits` hashed word unigram/bigram weights. Training reads the features through the same Rust code
that scores live requests (`_core.classifier_features`), and evaluation scores through it too
(`_core.Classifier`), so training and serving cannot disagree.

`fastroute train` fits a model; `fastroute eval` reports the routing-quality figures of
`data/routing/README.md` (decile sweep, APGR, CPT(50%), CPT(80%)) beside random and prompt-length routing.
`fastroute eval --holdout` trains without each held-out group of MMLU subjects and reports those figures on
the group's prompts (prompts of a kind the classifier never saw).
numpy is needed for both; matplotlib (the `plot` extra) only for `eval --plot`.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.resources
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from fastroute import _core

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    import numpy as np

MODEL_FORMAT = 'fastroute-classifier'
MODEL_VERSION = 2
DEFAULT_HASH_BITS = 16
# The shipped model's L2 grid: `fastroute train --dense-exclude-subjects high_school_mathematics` remakes it.
DEFAULT_L2 = (1e-5, 3e-5)
DEFAULT_FOLDS = 5
SEED = 0
# How the L2 strength is picked from the grid: `folds`, the best mean APGR of k-fold CV (random folds, so every
# subject is in every training fold); `category`, leave-one-MMLU-category-out CV (each category scored by a fit
# on the others: what a kind of prompt never seen in training gets), the L2 whose worst category beats prompt
# length by most (`select_l2_by_category`).
SELECT_BY = ('folds', 'category')
# Which dense features a fit uses: `all`; `consistent`, only those whose sign is the same in every MMLU category
# of the training data (`consistent_dense`), the others held at 0.
DENSE = ('all', 'consistent')


class DataError(ValueError):
    """A training/eval/traffic file that cannot be used: names the file and line."""

    def __init__(self, message: str, *, file: str, line: int | None = None) -> None:
        self.file, self.line = file, line
        where = f'{file}:{line}' if line is not None else file
        super().__init__(f'{where}: {message}')


# -- files ----------------------------------------------------------------------------------------


def package_data(*parts: str) -> Path:
    """A file shipped in `fastroute/data/`."""
    return Path(str(importlib.resources.files('fastroute').joinpath('data', *parts)))


def default_model_path() -> Path:
    """The shipped default model (trained on the bundled MMLU file)."""
    return package_data('classifier-default.json')


def default_data_path() -> Path:
    """The bundled training file: 7,007 MMLU prompts with weak/strong correctness (README beside it)."""
    return package_data('routing', 'mmlu-train.jsonl')


@dataclass(frozen=True)
class ModelFile:
    """A model file read and checked: its bytes (what `Router.compile` takes) and its metadata."""

    path: str
    raw: bytes
    meta: dict[str, Any]
    classifier: Any  # _core.Classifier

    @property
    def calibration(self) -> list[float]:
        cal = self.meta.get('calibration') or []
        return [float(v) for v in cal]

    def threshold_for_share(self, share: float) -> float:
        """The threshold that sends `share` of the calibration sample to the complex model."""
        return threshold_for_share(self.calibration, share)


_MODEL_CACHE: dict[str, tuple[tuple[int, int], ModelFile]] = {}


def load_model(path: str | Path) -> ModelFile:
    """Read and check a model file (cached by path, size and mtime).

    Raises:
        ValueError: unreadable, not JSON, or not a model this build can use (the message says what).
    """
    p = Path(path)
    try:
        st = p.stat()
        key = (st.st_mtime_ns, st.st_size)
        hit = _MODEL_CACHE.get(str(p))
        if hit is not None and hit[0] == key:
            return hit[1]
        raw = p.read_bytes()
    except OSError as e:
        raise ValueError(f'cannot read model file {str(p)!r}: {e.strerror or e}') from None
    try:
        meta = msgspec.json.decode(raw)
    except msgspec.DecodeError as e:
        raise ValueError(f'model file {str(p)!r} is not JSON: {e}') from None
    if not isinstance(meta, dict):
        raise ValueError(f'model file {str(p)!r} is not a JSON object')
    try:
        classifier = _core.Classifier.load(raw)
    except ValueError as e:
        raise ValueError(f'model file {str(p)!r}: {e}') from None
    cal = meta.get('calibration')
    if cal is not None and not (
        isinstance(cal, list)
        and len(cal) >= 2
        and all(isinstance(v, int | float) and 0 <= v <= 1 for v in cal)
        and all(a <= b for a, b in zip(cal, cal[1:], strict=False))
    ):
        raise ValueError(f'model file {str(p)!r}: `calibration` must be a non-decreasing list of scores in [0, 1]')
    model = ModelFile(str(p), raw, {k: v for k, v in meta.items() if k not in ('ngrams',)}, classifier)
    _MODEL_CACHE[str(p)] = (key, model)
    return model


def threshold_for_share(calibration: list[float], share: float) -> float:
    """The score quantile at 1 - share of `calibration` (the sorted quantiles 0 %, …, 100 % of a sample's
    scores), linearly interpolated: routing `score >= threshold` to the complex model sends about `share`."""
    if len(calibration) < 2:
        raise ValueError('the model file has no `calibration` sample; set `threshold` instead of `target_share`')
    q = (1.0 - share) * (len(calibration) - 1)
    lo = int(math.floor(q))
    hi = min(lo + 1, len(calibration) - 1)
    return calibration[lo] + (calibration[hi] - calibration[lo]) * (q - lo)


@dataclass
class Example:
    body: bytes
    weak: bool | None
    strong: bool | None
    group: str | None
    length: int  # prompt characters (the length baseline)


def chat_body(prompt: str) -> bytes:
    """The request body a chat client would send for one user prompt."""
    return msgspec.json.encode({'messages': [{'role': 'user', 'content': prompt}]})


def _label(obj: dict[str, Any], key: str, file: str, line: int) -> bool | None:
    v = obj.get(key)
    if v is None:
        return None
    if isinstance(v, bool):
        return v
    if isinstance(v, int | float) and v in (0, 1):
        return bool(v)
    raise DataError(f'`{key}` must be true/false (or 0/1), got {v!r}', file=file, line=line)


def body_of(obj: Any, file: str, line: int) -> bytes | None:
    """The request body of one input line: `prompt` (text), `body`/`request` (a request object), or the line
    itself when it is a request body (has `messages`, `prompt` as a list, or `input`). None: no body."""
    if not isinstance(obj, dict):
        raise DataError('expected a JSON object', file=file, line=line)
    for key in ('body', 'request'):
        if key in obj and obj[key] is not None:
            b = obj[key]
            if isinstance(b, dict):
                return msgspec.json.encode(b)
            if isinstance(b, str):
                return b.encode()
            raise DataError(f'`{key}` must be a request object', file=file, line=line)
    prompt = obj.get('prompt')
    if isinstance(prompt, str) and 'messages' not in obj:
        return chat_body(prompt)
    if 'messages' in obj or 'input' in obj or isinstance(prompt, list):
        return msgspec.json.encode({k: v for k, v in obj.items() if k not in ('weak_correct', 'strong_correct')})
    return None


def _prompt_length(obj: dict[str, Any], body: bytes) -> int:
    p = obj.get('prompt')
    return len(p) if isinstance(p, str) else len(body)


def read_jsonl(path: str | Path) -> list[tuple[int, Any]]:
    """(line number, decoded object) for every non-blank line.

    Raises:
        DataError: unreadable file or a line that is not JSON.
    """
    file = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f'cannot read: {e.strerror or e}', file=file) from None
    out = []
    dec = msgspec.json.Decoder()
    for i, raw in enumerate(data.split(b'\n'), 1):
        if not raw.strip():
            continue
        try:
            out.append((i, dec.decode(raw)))
        except msgspec.DecodeError as e:
            raise DataError(f'not JSON: {e}', file=file, line=i) from None
    return out


def load_examples(path: str | Path, *, need_labels: bool = True) -> list[Example]:
    """Labelled examples from a file shaped like the bundled training file (`prompt`, `weak_correct`,
    `strong_correct`, optional `subject`), or request bodies / access-log lines (`request`) with the two labels.
    Access-log lines without `request` (prompt logging off) are skipped.

    Raises:
        DataError: a line without a prompt, or without labels when `need_labels`.
    """
    file = str(path)
    out = []
    for line, obj in read_jsonl(path):
        body = body_of(obj, file, line)
        if body is None and 'request_id' in obj:
            continue  # an access-log line logged without its prompt (prompt logging off): nothing to learn
        if body is None:
            raise DataError(
                'no prompt: give `prompt` (text) or `request`/`body` (a request object)', file=file, line=line
            )
        weak, strong = _label(obj, 'weak_correct', file, line), _label(obj, 'strong_correct', file, line)
        if need_labels and (weak is None or strong is None):
            raise DataError('needs `weak_correct` and `strong_correct` (true/false)', file=file, line=line)
        group = obj.get('subject')
        out.append(Example(body, weak, strong, group if isinstance(group, str) else None, _prompt_length(obj, body)))
    if not out:
        raise DataError('no examples', file=file)
    return out


# -- metrics (data/routing/README.md) ---------------------------------------------------------------


@dataclass(frozen=True)
class Quality:
    """Routing quality of one score vector: the curve and its summaries."""

    points: list[tuple[float, float]]  # (share of strong calls, accuracy), sorted by share
    weak: float  # W: weak-only accuracy
    strong: float  # S: strong-only accuracy
    apgr: float
    cpt50: float  # share of strong calls to recover 50 % of the gap
    cpt80: float

    def pgr(self) -> list[tuple[float, float]]:
        gap = self.strong - self.weak
        return [(x, (y - self.weak) / gap if gap else 0.0) for x, y in self.points]


def quality(
    scores: list[float] | np.ndarray, weak: list[bool] | np.ndarray, strong: list[bool] | np.ndarray
) -> Quality:
    """The README's figures: a threshold at each of the 11 decile edges of the scores (min, 10 %, …, max;
    strong when score >= edge, and when score > edge at the last), end points (0, W) and (1, S) added,
    APGR = trapezoid area under PGR, CPT(p) = linear interpolation along the non-decreasing PGR curve."""
    import numpy as np

    s = np.asarray(scores, dtype=float)
    w = np.asarray(weak, dtype=float)
    st = np.asarray(strong, dtype=float)
    if not (len(s) == len(w) == len(st)) or len(s) == 0:
        raise ValueError('scores and labels must be non-empty and of the same length')
    wa, sa = float(w.mean()), float(st.mean())
    edges = np.quantile(s, np.linspace(0.0, 1.0, 11))
    pts = set()
    for i, e in enumerate(edges):
        go = s > e if i == len(edges) - 1 else s >= e
        pts.add((float(go.mean()), float(np.where(go, st, w).mean())))
    xs = {x for x, _ in pts}
    if 0.0 not in xs:
        pts.add((0.0, wa))
    if 1.0 not in xs:
        pts.add((1.0, sa))
    points = sorted(pts)
    gap = sa - wa
    x = np.array([p[0] for p in points])
    pgr = np.array([(p[1] - wa) / gap if gap else 0.0 for p in points])
    apgr = float(np.sum((x[1:] - x[:-1]) * (pgr[1:] + pgr[:-1]) / 2.0))
    mono = np.maximum.accumulate(pgr)
    return Quality(points, wa, sa, apgr, _cpt(x, mono, 0.5), _cpt(x, mono, 0.8))


def _cpt(x: np.ndarray, pgr: np.ndarray, p: float) -> float:
    for i in range(len(x)):
        if pgr[i] >= p:
            if i == 0:
                return float(x[0])
            return float(x[i - 1] + (p - pgr[i - 1]) / (pgr[i] - pgr[i - 1]) * (x[i] - x[i - 1]))
    return float('nan')


def random_quality(weak: Any, strong: Any, *, seeds: int = 20) -> tuple[float, float, float]:
    """Mean (APGR, CPT50, CPT80) of seeded random scores."""
    import numpy as np

    qs = [quality(np.random.default_rng(SEED + i).random(len(weak)), weak, strong) for i in range(seeds)]
    return (
        float(np.mean([q.apgr for q in qs])),
        float(np.mean([q.cpt50 for q in qs])),
        float(np.mean([q.cpt80 for q in qs])),
    )


# -- features and fitting ---------------------------------------------------------------------------


@dataclass
class Design:
    """The feature matrix of some examples: dense (n x 16) and sparse n-gram part (COO, row-normalised)."""

    dense: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    vals: np.ndarray
    n: int
    dims: int

    def subset(self, idx: np.ndarray) -> Design:
        import numpy as np

        pos = np.full(self.n, -1)
        pos[idx] = np.arange(len(idx))
        keep = pos[self.rows] >= 0
        order = np.argsort(pos[self.rows[keep]], kind='stable')
        return Design(
            self.dense[idx],
            pos[self.rows[keep]][order],
            self.cols[keep][order],
            self.vals[keep][order],
            len(idx),
            self.dims,
        )


def design(bodies: list[bytes], hash_bits: int) -> Design:
    """Features of each body, computed by the Rust scorer's own code. A body hitting buckets b1..bk (with
    repeats) gets value count(b)/√k in each bucket b: what the scorer's `Σ weights / √hits` computes."""
    import numpy as np

    feats = _core.classifier_features(bodies, hash_bits)
    dense = np.array([f[0] for f in feats], dtype=float).reshape(len(bodies), -1)
    dims = 1 << hash_bits
    lens = np.array([len(f[1]) for f in feats])
    r = np.repeat(np.arange(len(bodies)), lens)
    c = np.concatenate([np.asarray(f[1], dtype=np.int64) for f in feats]) if len(r) else np.zeros(0, np.int64)
    uk, cnt = np.unique(r * dims + c, return_counts=True)
    rows, cols = uk // dims, uk % dims
    vals = cnt / np.sqrt(np.maximum(lens[rows], 1))
    return Design(dense, rows, cols, vals.astype(float), len(bodies), dims)


@dataclass
class Weights:
    bias: float
    dense: np.ndarray
    ngrams: np.ndarray

    def scores(self, d: Design) -> np.ndarray:
        import numpy as np

        z = self.bias + d.dense @ self.dense + np.bincount(d.rows, weights=d.vals * self.ngrams[d.cols], minlength=d.n)
        return 1.0 / (1.0 + np.exp(-z))


def _lbfgs(f: Any, x0: np.ndarray, *, iters: int = 300, memory: int = 10, tol: float = 1e-8) -> np.ndarray:
    """Minimise a smooth convex `f(x) -> (value, gradient)`: L-BFGS with a backtracking (Armijo) line search."""
    x = x0.copy()
    fx, g = f(x)
    hist: list[tuple[np.ndarray, np.ndarray, float]] = []
    for _ in range(iters):
        q = g.copy()
        alphas = []
        for s, y, rho in reversed(hist):
            a = rho * float(s @ q)
            alphas.append(a)
            q -= a * y
        if hist:
            s, y, _ = hist[-1]
            q *= float(s @ y) / float(y @ y)
        for (s, y, rho), a in zip(hist, reversed(alphas), strict=True):
            q += s * (a - rho * float(y @ q))
        d = -q
        gd = float(g @ d)
        if gd >= 0:
            d, gd, hist = -g, -float(g @ g), []
        step = 1.0
        while True:
            xn = x + step * d
            fn, gn = f(xn)
            if fn <= fx + 1e-4 * step * gd or step < 1e-12:
                break
            step *= 0.5
        s, y = xn - x, gn - g
        sy = float(s @ y)
        if sy > 1e-12:
            hist = [*hist[-(memory - 1) :], (s, y, 1.0 / sy)]
        done = abs(fx - fn) <= tol * max(1.0, abs(fx))
        x, fx, g = xn, fn, gn
        if done:
            break
    return x


def fit(d: Design, y: np.ndarray, l2: float, offset: np.ndarray | float = 0.0) -> Weights:
    """L2-regularised logistic regression on soft labels `y` in [0, 1] (mean cross-entropy + l2/2·|w|², bias
    unpenalised). Dense features are standardised for the fit and the scaling folded back into the weights.
    `offset`: a fixed part of each example's logit (`fit_on` holds the dense part fixed this way)."""
    import numpy as np

    mu = d.dense.mean(axis=0)
    sd = d.dense.std(axis=0)
    sd[sd == 0] = 1.0
    xs = (d.dense - mu) / sd
    k = xs.shape[1]
    n = d.n

    def f(w: np.ndarray) -> tuple[float, np.ndarray]:
        wd, wg = w[1 : 1 + k], w[1 + k :]
        z = w[0] + xs @ wd + offset + np.bincount(d.rows, weights=d.vals * wg[d.cols], minlength=n)
        p = 1.0 / (1.0 + np.exp(-z))
        loss = float(np.mean(np.logaddexp(0.0, z) - y * z)) + l2 / 2 * float(wd @ wd + wg @ wg)
        e = (p - y) / n
        grad = np.concatenate(
            [[e.sum()], xs.T @ e + l2 * wd, np.bincount(d.cols, weights=d.vals * e[d.rows], minlength=d.dims) + l2 * wg]
        )
        return loss, grad

    w = _lbfgs(f, np.zeros(1 + k + d.dims))
    dense = w[1 : 1 + k] / sd
    return Weights(float(w[0] - dense @ mu), dense, w[1 + k :])


def fit_on(
    examples: list[Example],
    d: Design,
    idx: np.ndarray,
    l2: float,
    *,
    by_group: bool,
    dense: str = 'all',
    dense_without: frozenset[str] = frozenset(),
) -> Weights:
    """One fit of the training recipe on the examples `idx` (rows of `d`). `dense='consistent'`: only the dense
    features of one sign in every MMLU category of `idx` (`consistent_dense`). `dense_without`: the dense weights
    come from a fit without these subjects' examples, and the bias and n-gram weights are then fitted on all of
    `idx` with those dense weights held fixed. The dense features are what carries over to prompts of other
    kinds, so they learn only from labels that can be trusted; the n-grams still learn to recognise the left-out
    subjects' own prompts."""
    import numpy as np

    dtr = d.subset(idx)
    if dense == 'consistent':
        dtr = without_dense(dtr, consistent_dense(examples, d, idx, l2))
    y = targets(examples, idx, by_group=by_group)
    trusted = idx[np.array([examples[i].group not in dense_without for i in idx], dtype=bool)]
    if len(trusted) == len(idx):  # none of those subjects here (or none given): one joint fit
        return fit(dtr, y, l2)
    first = fit(d.subset(trusted), targets(examples, trusted, by_group=by_group), l2)
    ngrams_only = Design(dtr.dense[:, :0], dtr.rows, dtr.cols, dtr.vals, dtr.n, dtr.dims)
    rest = fit(ngrams_only, y, l2, offset=dtr.dense @ first.dense)
    return Weights(rest.bias, first.dense, rest.ngrams)


def targets(examples: list[Example], idx: np.ndarray, *, by_group: bool) -> np.ndarray:
    """The label the score estimates: P(strong right and weak wrong). With `by_group` (the training file's
    `subject`), each example's label is its group's mean in `idx`, which denoises the one-bit outcomes (a
    prompt's own outcome is mostly chance; its kind is not). The group is never a feature: live requests
    have only their text."""
    import numpy as np

    win = np.array([float(bool(examples[i].strong) and not examples[i].weak) for i in idx])
    if not by_group:
        return win
    groups = [examples[i].group for i in idx]
    sums: dict[str | None, list[float]] = {}
    for g, v in zip(groups, win, strict=True):
        acc = sums.setdefault(g, [0.0, 0.0])
        acc[0] += v
        acc[1] += 1
    return np.array([win[j] if g is None else sums[g][0] / sums[g][1] for j, g in enumerate(groups)])


def folds_of(n: int, k: int, seed: int = SEED) -> list[np.ndarray]:
    import numpy as np

    return [np.sort(f) for f in np.array_split(np.random.default_rng(seed).permutation(n), k)]


@dataclass
class CvResult:
    l2: float
    apgr: float
    cpt50: float
    cpt80: float
    oof: np.ndarray  # out-of-fold score of every example


def cross_validate(
    examples: list[Example],
    d: Design,
    l2: float,
    k: int,
    *,
    by_group: bool,
    dense: str = 'all',
    dense_without: frozenset[str] = frozenset(),
    log: Any = None,
) -> CvResult:
    """k-fold CV of the fast classifier: per-fold figures averaged, and the out-of-fold scores. Each training fold
    is fitted by `fit_on` (with `dense='consistent'`, the dense features kept are chosen on it; with
    `dense_without`, the dense weights come from its examples of the other subjects)."""

    def fold(tr: np.ndarray, te: np.ndarray) -> np.ndarray:
        w = fit_on(examples, d, tr, l2, by_group=by_group, dense=dense, dense_without=dense_without)
        return w.scores(d.subset(te))

    return cv_folds(examples, l2, k, fold, log=log)


def cv_folds(
    examples: list[Any], l2: float, k: int, score_fold: Callable[[Any, Any], Any], *, log: Any = None, tag: str = ''
) -> CvResult:
    """The k-fold loop every classifier is measured with (same folds, same figures): `score_fold(train_idx,
    test_idx)` fits on the one and returns the scores of the other."""
    import numpy as np

    weak = np.array([bool(e.weak) for e in examples])
    strong = np.array([bool(e.strong) for e in examples])
    oof = np.zeros(len(examples))
    qs = []
    folds = folds_of(len(examples), k)
    for i, te in enumerate(folds):
        tr = np.concatenate([f for j, f in enumerate(folds) if j != i])
        oof[te] = score_fold(tr, te)
        qs.append(quality(oof[te], weak[te], strong[te]))
        if log:
            log(f'  {tag}l2={l2:g} fold {i + 1}/{k}: APGR {qs[-1].apgr:.3f}')
    return CvResult(
        l2,
        float(np.mean([q.apgr for q in qs])),
        float(np.mean([q.cpt50 for q in qs])),
        float(np.mean([q.cpt80 for q in qs])),
        oof,
    )


def baselines(examples: list[Any], k: int) -> dict[str, dict[str, float]]:
    """The length baseline on the same k folds (per-fold figures averaged) and the random baseline, rounded as
    model files and reports give them."""
    import numpy as np

    weak = np.array([bool(e.weak) for e in examples])
    strong = np.array([bool(e.strong) for e in examples])
    length = [
        quality(np.array([examples[i].length for i in f], float), weak[f], strong[f])
        for f in folds_of(len(examples), k)
    ]
    rnd = random_quality(weak, strong)
    return {
        'length_baseline': {
            'apgr': round(float(np.mean([q.apgr for q in length])), 4),
            'cpt50': round(float(np.mean([q.cpt50 for q in length])), 4),
            'cpt80': round(float(np.mean([q.cpt80 for q in length])), 4),
        },
        'random_baseline': {'apgr': round(rnd[0], 4), 'cpt50': round(rnd[1], 4), 'cpt80': round(rnd[2], 4)},
    }


def data_digest(examples: list[Example]) -> str:
    """The first 16 hex digits of the SHA-256 of the training bodies, so `eval` can tell in-sample data."""
    return hashlib.sha256(b''.join(e.body for e in examples)).hexdigest()[:16]


def figures(r: Any) -> dict[str, float]:
    """APGR, CPT(50%) and CPT(80%) of a CV result (or anything with those attributes), rounded for a model file."""
    return {'apgr': round(r.apgr, 4), 'cpt50': round(r.cpt50, 4), 'cpt80': round(r.cpt80, 4)}


def training_record(
    examples: list[Example],
    source: str,
    l2: float,
    l2s: tuple[float, ...],
    folds: int,
    by_group: bool,
    select_by: str = 'folds',
    dense_kept: list[str] | None = None,
    dense_without: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """The `label` and `trained` entries of a model file (fast or semantic): what was learnt, from what, how."""
    return {
        'label': 'P(strong model right and weak model wrong)' + (', smoothed by subject' if by_group else ''),
        'trained': {
            'source': source,
            'examples': len(examples),
            'data_sha256_16': data_digest(examples),
            'l2': l2,
            'l2_grid': list(l2s),
            'folds': folds,
            'seed': SEED,
            **({'select_by': select_by} if select_by != 'folds' else {}),
            **({'dense': 'consistent', 'dense_kept': dense_kept} if dense_kept is not None else {}),
            **({'dense_without': sorted(dense_without)} if dense_without else {}),
        },
    }


def _check_recipe(select_by: str, dense: str, dense_without: frozenset[str] = frozenset()) -> None:
    """`train`'s and `holdout_eval`'s choices of L2 selection and dense features.

    Raises:
        ValueError: an unknown one, or both by category (measured apart, never together).
    """
    if select_by not in SELECT_BY:
        raise ValueError(f'unknown select_by {select_by!r}; choose one of: {", ".join(SELECT_BY)}')
    if dense not in DENSE:
        raise ValueError(f'unknown dense {dense!r}; choose one of: {", ".join(DENSE)}')
    if dense != 'all' and select_by != 'folds':
        raise ValueError('dense features by category and the L2 by category are measured apart, not together')
    if dense_without and (dense != 'all' or select_by != 'folds'):
        raise ValueError('dense weights without some subjects are measured apart from --dense and --select-by')


def train(
    examples: list[Example],
    *,
    hash_bits: int = DEFAULT_HASH_BITS,
    l2s: tuple[float, ...] = DEFAULT_L2,
    folds: int = DEFAULT_FOLDS,
    source: str = '',
    select_by: str = 'folds',
    dense: str = 'all',
    dense_without: frozenset[str] = frozenset(),
    log: Any = None,
) -> dict[str, Any]:
    """Pick the L2 strength (by k-fold CV, best mean APGR; with `select_by='category'`, by leave-one-category-out
    CV, `select_l2_by_category`, then k-fold CV at that one strength for the figures), fit on everything, and
    return the model file's contents: weights, the CV figures beside the baselines, and a calibration sample (101
    quantiles of the out-of-fold scores, for `target_share`). With `dense='consistent'` only the dense features
    of one sign in every MMLU category are fitted (`consistent_dense`, chosen within each CV training fold and
    then on all the data); the others' weights are 0. With `dense_without`, every fit takes its dense weights from
    the examples of the other subjects (`fit_on`).

    Raises:
        ValueError: too few examples, an unknown `select_by` or `dense`, or (`category`, `consistent`)
            examples without MMLU subjects.
    """
    import numpy as np

    _check_recipe(select_by, dense, dense_without)
    if len(examples) < 2 * folds:
        raise ValueError(f'{len(examples)} examples are too few for {folds}-fold cross-validation')
    d = design([e.body for e in examples], hash_bits)
    by_group = any(e.group is not None for e in examples)
    by_category = None
    if select_by == 'category':
        l2, by_category = select_l2_by_category(examples, d, l2s, log=log)
        grid: tuple[float, ...] = (l2,)
    else:
        grid = l2s
    results = []
    for l2 in grid:
        r = cross_validate(examples, d, l2, folds, by_group=by_group, dense=dense, dense_without=dense_without, log=log)
        results.append(r)
        if log:
            log(f'l2={l2:g}: CV APGR {r.apgr:.4f}, CPT(50%) {r.cpt50:.1%}, CPT(80%) {r.cpt80:.1%}')
    best = max(results, key=lambda r: r.apgr)
    names = list(_core.classifier_feature_names()[0])
    kept = None
    if dense == 'consistent':
        keep = consistent_dense(examples, d, np.arange(d.n), best.l2)
        kept = [name for name, k in zip(names, keep, strict=True) if k]
        if log:
            log(f'dense features of one sign in every category: {", ".join(kept) or "none"}')
    w = fit_on(examples, d, np.arange(d.n), best.l2, by_group=by_group, dense=dense, dense_without=dense_without)
    cal = np.quantile(best.oof, np.linspace(0, 1, 101))
    return {
        'format': MODEL_FORMAT,
        'version': MODEL_VERSION,
        'features': names,
        'hash_bits': hash_bits,
        'bias': _r(w.bias),
        'dense': [_r(v) for v in w.dense],
        **training_record(examples, source, best.l2, l2s, folds, by_group, select_by, kept, dense_without),
        'cv': {
            **figures(best),
            **(
                {'by_l2': {f'{r.l2:g}': round(r.apgr, 4) for r in results}}
                if by_category is None
                else {'by_category': by_category}
            ),
            **baselines(examples, folds),
        },
        'calibration': [round(float(v), 6) for v in cal],
        'ngrams': [_r(v) for v in w.ngrams],
    }


def _r(v: float) -> float:
    return float(f'{float(v):.6g}')


# -- held-out kinds ---------------------------------------------------------------------------------

# MMLU's four super-categories of its 57 subjects, as the benchmark publishes them (Hendrycks et al., 2021).
MMLU_CATEGORIES: dict[str, tuple[str, ...]] = {
    'stem': (
        'abstract_algebra',
        'astronomy',
        'college_biology',
        'college_chemistry',
        'college_computer_science',
        'college_mathematics',
        'college_physics',
        'computer_security',
        'conceptual_physics',
        'electrical_engineering',
        'elementary_mathematics',
        'high_school_biology',
        'high_school_chemistry',
        'high_school_computer_science',
        'high_school_mathematics',
        'high_school_physics',
        'high_school_statistics',
        'machine_learning',
    ),
    'humanities': (
        'formal_logic',
        'high_school_european_history',
        'high_school_us_history',
        'high_school_world_history',
        'international_law',
        'jurisprudence',
        'logical_fallacies',
        'moral_disputes',
        'moral_scenarios',
        'philosophy',
        'prehistory',
        'professional_law',
        'world_religions',
    ),
    'social_sciences': (
        'econometrics',
        'high_school_geography',
        'high_school_government_and_politics',
        'high_school_macroeconomics',
        'high_school_microeconomics',
        'high_school_psychology',
        'human_sexuality',
        'professional_psychology',
        'public_relations',
        'security_studies',
        'sociology',
        'us_foreign_policy',
    ),
    'other': (
        'anatomy',
        'business_ethics',
        'clinical_knowledge',
        'college_medicine',
        'global_facts',
        'human_aging',
        'management',
        'marketing',
        'medical_genetics',
        'miscellaneous',
        'nutrition',
        'professional_accounting',
        'professional_medicine',
        'virology',
    ),
}
MMLU_SUBJECTS = frozenset(s for group in MMLU_CATEGORIES.values() for s in group)

# The subjects whose questions are mathematics itself (algebra, arithmetic, statistics): the closest kind here
# to grade-school math word problems. The physics, chemistry and econometrics subjects stay in training: their
# questions mix calculations with conceptual ones, and they are what a model trained on all the data has seen.
MATH_SUBJECTS = (
    'abstract_algebra',
    'college_mathematics',
    'elementary_mathematics',
    'high_school_mathematics',
    'high_school_statistics',
)

# grouping name -> held-out group -> its subjects. Each group is evaluated by a model trained on every other
# subject of the data.
HOLDOUTS: dict[str, dict[str, tuple[str, ...]]] = {
    'category': MMLU_CATEGORIES,
    'math': {'math': MATH_SUBJECTS},
}


def holdout_groups(name: str) -> dict[str, tuple[str, ...]]:
    """The held-out groups of a grouping (`HOLDOUTS`).

    Raises:
        ValueError: an unknown grouping (the message lists the known ones).
    """
    groups = HOLDOUTS.get(name)
    if groups is None:
        raise ValueError(f'unknown grouping {name!r}; choose one of: {", ".join(HOLDOUTS)}')
    return groups


def holdout_split(examples: list[Example], held: tuple[str, ...] | frozenset[str]) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, held-out indices): the held-out part is every example of a `held` subject, the
    training part every other one.

    Raises:
        ValueError: an example without a subject, or with one that is not an MMLU subject.
    """
    import numpy as np

    held = frozenset(held)
    for i, e in enumerate(examples):
        if e.group not in MMLU_SUBJECTS:
            what = 'has no `subject`' if e.group is None else f'has subject {e.group!r}, not one of MMLU'
            raise ValueError(f'example {i + 1} {what}: held-out kinds need the MMLU subjects of the bundled file')
    test = np.array([i for i, e in enumerate(examples) if e.group in held], dtype=np.int64)
    train = np.array([i for i, e in enumerate(examples) if e.group not in held], dtype=np.int64)
    return train, test


def check_subjects(examples: list[Example], names: tuple[str, ...], option: str) -> None:
    """That the data has subjects, and an example of each of `names` (a typo would otherwise leave out nothing).

    Raises:
        ValueError: saying which, for `option`.
    """
    if not any(e.group is not None for e in examples):
        raise ValueError(f'{option} needs examples with a `subject`; this data has none')
    present = {e.group for e in examples}
    missing = [n for n in names if n not in present]
    if missing:
        raise ValueError(f'no example has subject {", ".join(map(repr, missing))}; check the spelling')


def exclude_subjects(examples: list[Example], names: tuple[str, ...]) -> tuple[list[Example], list[int]]:
    """The examples whose `subject` is not one of `names`, and their positions in `examples` (1-based). For labels
    known to be wrong: the bundled file's `high_school_mathematics`, where the strong model is scored right on 5 %
    of four-choice questions (below the 25 % of guessing; data/routing/README.md).

    Raises:
        ValueError: data without subjects, a name no example has (a typo would silently exclude nothing), or
            nothing left.
    """
    check_subjects(examples, names, '--exclude-subjects')
    drop = frozenset(names)
    kept = [(i + 1, e) for i, e in enumerate(examples) if e.group not in drop]
    if not kept:
        raise ValueError('every example is excluded')
    return [e for _, e in kept], [i for i, _ in kept]


def select_l2_by_category(
    examples: list[Example], d: Design, l2s: tuple[float, ...], *, log: Any = None
) -> tuple[float, dict[str, dict[str, float]]]:
    """Leave-one-category-out CV: for each MMLU category with prompts here, fit at each L2 of `l2s` on the
    prompts of the other categories (labels smoothed by subject within them, as `train` does) and score the
    category's prompts against their raw outcomes (as `quality` does), beside prompt length on the same prompts.
    Returns the L2 whose *worst* category beats length by most (the largest minimum over the categories of
    classifier APGR - length APGR; the first of the grid on a tie) and the table {l2: {category: APGR, ...,
    'mean': APGR, 'worst_vs_length': APGR difference}, 'length': {category: APGR, ...}}, rounded as model files
    give it. Unlike k-fold CV, a fit here never sees a subject of the kind it is scored on; and the worst
    category, not the mean, decides, because the mean rewards an L2 that does well on the kinds like the
    training ones at the cost of the one unlike them (measured: docs/classifier.md, "Held-out kinds").

    Raises:
        ValueError: examples without MMLU subjects (`holdout_split`), or of fewer than two categories.
    """
    import numpy as np

    weak = np.array([bool(e.weak) for e in examples])
    strong = np.array([bool(e.strong) for e in examples])
    parts = [(name, *holdout_split(examples, subjects)) for name, subjects in MMLU_CATEGORIES.items()]
    parts = [(name, tr, te) for name, tr, te in parts if len(te)]
    if len(parts) < 2:
        raise ValueError('leave-one-category-out needs prompts of at least two MMLU categories')
    length = {
        name: quality(np.array([examples[i].length for i in te], float), weak[te], strong[te]).apgr
        for name, _, te in parts
    }
    worst: dict[float, float] = {}
    table: dict[str, dict[str, float]] = {}
    for l2 in l2s:
        row = {}
        for name, tr, te in parts:
            scores = fit(d.subset(tr), targets(examples, tr, by_group=True), l2).scores(d.subset(te))
            row[name] = quality(scores, weak[te], strong[te]).apgr
        worst[l2] = min(row[name] - length[name] for name in row)
        table[f'{l2:g}'] = {
            **{k: round(v, 4) for k, v in row.items()},
            'mean': round(float(np.mean(list(row.values()))), 4),
            'worst_vs_length': round(worst[l2], 4),
        }
        if log:
            cells = ', '.join(f'{k} {v:.4f} (length {length[k]:.4f})' for k, v in row.items())
            log(f'l2={l2:g}: leave-one-category-out APGR {cells}; worst - length {worst[l2]:+.4f}')
    table['length'] = {k: round(v, 4) for k, v in length.items()}
    return max(l2s, key=lambda v: worst[v]), table


def consistent_dense(examples: list[Example], d: Design, idx: np.ndarray, l2: float) -> np.ndarray:
    """Which dense features have one sign in every MMLU category of the examples `idx` (True: keep): for each
    category with prompts there, a fit of the 16 dense features alone on them (labels smoothed by subject, L2
    `l2`) gives each feature's sign; a feature is kept when it is the same, and not 0, in all. A dense weight
    whose sign turns from one kind of prompt to the next does not carry over to a new kind (measured:
    docs/classifier.md, "Held-out kinds"). Only the examples `idx` are read.

    Raises:
        ValueError: an example of `idx` without an MMLU subject, or prompts of fewer than two categories.
    """
    import numpy as np

    category = {s: c for c, subjects in MMLU_CATEGORIES.items() for s in subjects}
    for i in idx:
        if examples[i].group not in category:
            raise ValueError(f'example {int(i) + 1} has no MMLU `subject`: the dense features by category need them')
    cats = np.array([category[str(examples[i].group)] for i in idx])
    signs = []
    for name in MMLU_CATEGORIES:
        sub = np.asarray(idx)[cats == name]
        if len(sub):
            ds = d.subset(sub)
            alone = Design(ds.dense, ds.rows[:0], ds.cols[:0], ds.vals[:0], ds.n, 1)
            signs.append(np.sign(fit(alone, targets(examples, sub, by_group=True), l2).dense))
    if len(signs) < 2:
        raise ValueError('the dense features by category need prompts of at least two MMLU categories')
    s = np.array(signs)
    return np.all(s > 0, axis=0) | np.all(s < 0, axis=0)


def without_dense(d: Design, keep: np.ndarray) -> Design:
    """`d` with the dense features not kept set to 0 (a fit then gives them weight 0)."""
    dense = d.dense.copy()
    dense[:, ~keep] = 0.0
    return Design(dense, d.rows, d.cols, d.vals, d.n, d.dims)


@dataclass(frozen=True)
class HoldoutResult:
    """One held-out group: the classifier trained without it, and the baselines, on its prompts only."""

    group: str
    subjects: tuple[str, ...]  # the held-out subjects present in the data
    trained_on: int  # training prompts (every other subject)
    l2: float  # picked by inner CV on the training part (or the one given)
    inner_apgr: float | None  # that inner CV's APGR (None: one L2 given, no inner CV)
    classifier: Quality
    length: Quality
    random: tuple[float, float, float]  # mean APGR, CPT50, CPT80 of 20 seeds
    vs_length: tuple[float, float]  # 95 % bootstrap interval of classifier APGR - length APGR
    scores: np.ndarray  # the classifier's score of each held-out prompt
    test: np.ndarray  # their indices in the examples


def apgr_diff_interval(
    a: np.ndarray, b: np.ndarray, weak: np.ndarray, strong: np.ndarray, *, resamples: int = 1000
) -> tuple[float, float]:
    """The 95 % percentile bootstrap interval of APGR(a) - APGR(b), the two score vectors of the same prompts
    resampled together (seeded). With a small weak/strong gap APGR is a ratio of small numbers, and this
    interval shows how little a difference on a few hundred prompts may mean."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    n = len(a)
    diffs = np.empty(resamples)
    for k in range(resamples):
        i = rng.integers(0, n, n)
        diffs[k] = quality(a[i], weak[i], strong[i]).apgr - quality(b[i], weak[i], strong[i]).apgr
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    return float(lo), float(hi)


def holdout_eval(
    examples: list[Example],
    grouping: str,
    *,
    hash_bits: int = DEFAULT_HASH_BITS,
    l2s: tuple[float, ...] = DEFAULT_L2,
    folds: int = DEFAULT_FOLDS,
    select_by: str = 'folds',
    dense: str = 'all',
    dense_without: frozenset[str] = frozenset(),
    log: Any = None,
) -> list[HoldoutResult]:
    """Leave-kind-out evaluation: for each group of `grouping`, train as `train` does (same features, labels
    smoothed by subject within the training part, L2 picked when `l2s` has several values by `folds`-fold CV
    on the training part, or with `select_by='category'` by leave-one-category-out CV over the MMLU categories
    of the training part, `select_l2_by_category`; each fit by `fit_on`, so with `dense='consistent'` or
    `dense_without` as `train` fits) on every example of the other subjects, and score the group's prompts
    against their raw outcomes (as `quality` does), beside prompt length and random on exactly those prompts
    (`holdout_result`). Groups with no example in the data are left out (`holdout_parts`).

    Raises:
        ValueError: an unknown grouping, examples without MMLU subjects, or a training part too small.
    """
    _check_recipe(select_by, dense, dense_without)
    d = design([e.body for e in examples], hash_bits)
    out = []
    for name, subjects, tr, te in holdout_parts(examples, grouping, folds, log):
        part, dtr = [examples[i] for i in tr], d.subset(tr)
        inner = None
        l2 = l2s[0]
        if len(l2s) > 1 and select_by == 'category':
            l2, table = select_l2_by_category(part, dtr, l2s)
            inner = table[f'{l2:g}']['mean']  # the mean over the training part's categories
        elif len(l2s) > 1:
            results = [
                cross_validate(part, dtr, v, folds, by_group=True, dense=dense, dense_without=dense_without)
                for v in l2s
            ]
            best = max(results, key=lambda r: r.apgr)
            l2, inner = best.l2, best.apgr
        w = fit_on(examples, d, tr, l2, by_group=True, dense=dense, dense_without=dense_without)
        out.append(holdout_result(examples, name, subjects, tr, te, l2, inner, w.scores(d.subset(te)), log))
    return out


def holdout_parts(
    examples: list[Any], grouping: str, folds: int, log: Any = None
) -> Iterator[tuple[str, tuple[str, ...], np.ndarray, np.ndarray]]:
    """(group, its subjects, training indices, held-out indices) of each group of `grouping` that has prompts in
    the data; every classifier's held-out evaluation walks these.

    Raises:
        ValueError: an unknown grouping, examples without MMLU subjects, or a training part too small.
    """
    for name, subjects in holdout_groups(grouping).items():
        tr, te = holdout_split(examples, subjects)
        if len(te) == 0:
            if log:
                log(f'{name}: no prompt of its subjects in the data; left out')
            continue
        if len(tr) < 2 * folds:
            raise ValueError(f'{name}: {len(tr)} training examples are too few for {folds}-fold cross-validation')
        yield name, subjects, tr, te


def holdout_result(
    examples: list[Any],
    name: str,
    subjects: tuple[str, ...],
    tr: np.ndarray,
    te: np.ndarray,
    l2: float,
    inner: float | None,
    scores: np.ndarray,
    log: Any = None,
) -> HoldoutResult:
    """One group's figures from a classifier's scores of its held-out prompts: beside prompt length and random
    on exactly those prompts, with the bootstrap interval of the difference to length."""
    import numpy as np

    weak = np.array([bool(examples[i].weak) for i in te])
    strong = np.array([bool(examples[i].strong) for i in te])
    length = np.array([examples[i].length for i in te], float)
    r = HoldoutResult(
        name,
        tuple(s for s in subjects if any(examples[i].group == s for i in te)),
        len(tr),
        l2,
        inner,
        quality(scores, weak, strong),
        quality(length, weak, strong),
        random_quality(weak, strong),
        apgr_diff_interval(scores, length, weak, strong),
        scores,
        te,
    )
    if log:
        cv = '' if inner is None else f' (inner CV APGR {inner:.4f})'
        log(f'{name}: {len(te)} held-out prompts, {len(tr)} training, l2 {l2:g}{cv}: APGR {r.classifier.apgr:.4f}')
    return r


# -- command line -----------------------------------------------------------------------------------


def _need_numpy() -> bool:
    try:
        import numpy  # noqa: F401
    except ImportError:
        print('fastroute: numpy is needed for this command: pip install numpy', file=sys.stderr)
        return False
    return True


def cli_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        '--data',
        default=None,
        help='JSONL: prompt (or request/body) with weak_correct and strong_correct; default: the bundled MMLU file',
    )
    p.add_argument('-o', '--out', required=True, help='the model file to write (JSON)')
    p.add_argument('--hash-bits', type=int, default=DEFAULT_HASH_BITS, help='n-gram table size, log2 (default 16)')
    p.add_argument(
        '--l2',
        default=','.join(f'{v:g}' for v in DEFAULT_L2),
        help='comma-separated L2 strengths; CV picks one (default %(default)s)',
    )
    p.add_argument('--folds', type=int, default=DEFAULT_FOLDS, help='cross-validation folds (default 5)')
    p.add_argument(
        '--select-by',
        choices=SELECT_BY,
        default='folds',
        help='how the L2 is picked: k-fold CV (default) or leave-one-MMLU-category-out CV (needs MMLU subjects)',
    )
    p.add_argument(
        '--dense',
        choices=DENSE,
        default='all',
        help='dense features fitted: all (default), or only those of one sign in every MMLU category (needs MMLU '
        'subjects)',
    )
    _subject_args(p, '')
    p.add_argument('--limit', type=int, default=None, help='use only the first N examples (quick runs)')
    p.add_argument('-q', '--quiet', action='store_true', help='no progress lines')
    from fastroute.semantic import add_cli_args

    add_cli_args(p)


def _subject_args(p: argparse.ArgumentParser, when: str) -> None:
    """`--exclude-subjects` and `--dense-exclude-subjects`, for `train` and (`when`: with --holdout) `eval`."""
    p.add_argument(
        '--exclude-subjects',
        default=None,
        metavar='S1,S2',
        help=f'{when}leave out the examples of these subjects (labels known to be wrong), in training and '
        'evaluation, e.g. high_school_mathematics',
    )
    p.add_argument(
        '--dense-exclude-subjects',
        default=None,
        metavar='S1,S2',
        help=f'{when}fit the dense weights without these subjects (labels known to be wrong), the n-grams with them',
    )


def _l2_grid(text: str) -> tuple[float, ...] | None:
    """The L2 strengths of a comma-separated `--l2`; None: not a list of positive numbers."""
    try:
        l2s = tuple(float(v) for v in text.split(',') if v.strip())
    except ValueError:
        return None
    if not l2s or any(not (v > 0 and math.isfinite(v)) for v in l2s):
        return None
    return l2s


def _subject_names(text: str | None) -> tuple[str, ...]:
    """The names of a comma-separated `--exclude-subjects` / `--dense-exclude-subjects` (none: nothing given)."""
    return tuple(n.strip() for n in (text or '').split(',') if n.strip())


def _training_data(
    err: str, args: argparse.Namespace, l2s: tuple[float, ...] | None, hash_bits: int, folds: int
) -> tuple[str, list[Example], list[int]] | int:
    """What `train` and `eval --holdout` check and read alike: the L2 grid, the table size and the folds, then the
    examples (`--data`, `--limit`, then `--exclude-subjects`) and their positions among the input's prompts
    (1-based). An exit code, said on stderr, when something is wrong."""
    if l2s is None:
        print(f'{err}: --l2 {args.l2!r}: give positive numbers, e.g. 1e-5,3e-5', file=sys.stderr)
        return 2
    if not 8 <= hash_bits <= 22 or folds < 2:
        print(f'{err}: --hash-bits must be within 8..22 and --folds at least 2', file=sys.stderr)
        return 2
    data = args.data or str(default_data_path())
    try:
        examples = load_examples(data)
    except DataError as e:
        print(f'{err}: {e}', file=sys.stderr)
        return 1
    examples = examples[: args.limit] if args.limit else examples
    names = _subject_option(err, '--exclude-subjects', args.exclude_subjects, data, examples)
    if isinstance(names, int):
        return names
    if not names:
        return data, examples, list(range(1, len(examples) + 1))
    try:
        kept, positions = exclude_subjects(examples, names)
    except ValueError as e:
        print(f'{err}: {data}: {e}', file=sys.stderr)
        return 1
    return data, kept, positions


def _subject_option(err: str, flag: str, text: str | None, data: str, examples: list[Example]) -> tuple[str, ...] | int:
    """The subjects `--exclude-subjects` or `--dense-exclude-subjects` names (none when not given), each checked
    to have examples in the data; an exit code, said on stderr, when something is wrong."""
    if text is None:
        return ()
    names = _subject_names(text)
    if not names:
        print(f'{err}: {flag} {text!r}: give subject names, comma-separated', file=sys.stderr)
        return 2
    try:
        check_subjects(examples, names, flag)
    except ValueError as e:
        print(f'{err}: {data}: {e}', file=sys.stderr)
        return 1
    return names


def _progress(quiet: bool) -> Any:
    """The progress lines of a training command, on stderr (none with -q)."""

    def log(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    return log


def cli_train(args: argparse.Namespace) -> int:
    if not _need_numpy():
        return 2
    l2s = _l2_grid(str(args.l2))
    got = _training_data('fastroute train', args, l2s, args.hash_bits, args.folds)
    if isinstance(got, int):
        return got
    data, examples, _ = got
    log = _progress(args.quiet)
    if getattr(args, 'semantic', False):
        if (
            args.select_by != 'folds'
            or args.dense != 'all'
            or args.exclude_subjects is not None
            or args.dense_exclude_subjects is not None
        ):
            print(
                'fastroute train: --select-by, --dense and --(dense-)exclude-subjects are for the fast classifier, '
                'not --semantic',
                file=sys.stderr,
            )
            return 2
        from fastroute import semantic

        return semantic.cli_train(args, None if args.l2 == ','.join(f'{v:g}' for v in DEFAULT_L2) else l2s, log)

    dense_names = _subject_option(
        'fastroute train', '--dense-exclude-subjects', args.dense_exclude_subjects, data, examples
    )
    if isinstance(dense_names, int):
        return dense_names
    dense_without = frozenset(dense_names)
    try:
        model = train(
            examples,
            hash_bits=args.hash_bits,
            l2s=l2s,
            folds=args.folds,
            source=Path(data).name,
            select_by=args.select_by,
            dense=args.dense,
            dense_without=dense_without,
            log=log,
        )
    except ValueError as e:
        print(f'fastroute train: {e}', file=sys.stderr)
        return 1
    excluded = list(_subject_names(args.exclude_subjects))
    if excluded:
        model['trained']['excluded_subjects'] = excluded
    try:
        Path(args.out).write_bytes(json.dumps(model, separators=(',', ':')).encode() + b'\n')
    except OSError as e:
        print(f'fastroute train: cannot write {args.out}: {e.strerror or e}', file=sys.stderr)
        return 1
    cv = model['cv']
    how = ' (picked by leave-one-category-out CV)' if args.select_by == 'category' else ''
    left_out = f' (left out: {", ".join(excluded)})' if excluded else ''
    print(f'wrote {args.out}: {len(examples)} examples{left_out}, l2 {model["trained"]["l2"]:g}{how}')
    if args.dense == 'consistent':
        print(f'dense features of one sign in every category: {", ".join(model["trained"]["dense_kept"]) or "none"}')
    if dense_without:
        print(f'dense weights fitted without: {", ".join(sorted(dense_without))}')
    print(
        _table([('classifier (CV)', cv), ('prompt length', cv['length_baseline']), ('random', cv['random_baseline'])])
    )
    return 0


def _table(rows: list[tuple[str, dict[str, float]]]) -> str:
    out = [f'{"router":<22} {"APGR":>7} {"CPT(50%)":>9} {"CPT(80%)":>9}']
    for name, q in rows:
        out.append(f'{name:<22} {q["apgr"]:>7.4f} {q["cpt50"]:>9.1%} {q["cpt80"]:>9.1%}')
    return '\n'.join(out)


def cli_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument('--data', default=None, help='JSONL shaped like the training file; default: the bundled MMLU file')
    p.add_argument('--model', default=None, help='model file; default: the shipped default model')
    p.add_argument(
        '--scores-out',
        default=None,
        help="write each prompt's score, one per line, in input order (with --holdout: JSONL of the held-out prompts)",
    )
    p.add_argument('--plot', default=None, help='draw the cost/quality curves to this PNG (needs matplotlib)')
    p.add_argument('--curve', action='store_true', help="also print the classifier's curve points")
    p.add_argument(
        '--holdout',
        default=None,
        metavar='GROUPING',
        help=f'held-out kinds: for each group of MMLU subjects ({" or ".join(HOLDOUTS)}), train without it as '
        '`train` does and evaluate on it, beside length and random (needs the MMLU subjects; no --model)',
    )
    p.add_argument(
        '--l2',
        default=None,
        help='with --holdout: comma-separated L2 strengths, picked by CV on each training part; one value: no CV '
        f'(default {",".join(f"{v:g}" for v in DEFAULT_L2)}, as `train`)',
    )
    p.add_argument('--hash-bits', type=int, default=None, help='with --holdout: n-gram table size, log2 (default 16)')
    p.add_argument('--folds', type=int, default=None, help='with --holdout: folds of the inner CV (default 5)')
    p.add_argument(
        '--select-by',
        choices=SELECT_BY,
        default=None,
        help='with --holdout: pick the L2 of each training part by k-fold CV (default) or by leave-one-category-out '
        'CV over its MMLU categories, as `train --select-by`',
    )
    p.add_argument(
        '--dense',
        choices=DENSE,
        default=None,
        help='with --holdout: dense features fitted, as `train --dense` (chosen on each training part)',
    )
    _subject_args(p, 'with --holdout: ')
    p.add_argument('--limit', type=int, default=None, help='use only the first N examples (quick runs)')
    p.add_argument('-q', '--quiet', action='store_true', help='with --holdout: no progress lines')
    from fastroute.semantic import add_cli_args

    add_cli_args(p)


def cli_eval(args: argparse.Namespace) -> int:
    if not _need_numpy():
        return 2
    import numpy as np

    if args.holdout is not None:
        return cli_holdout(args)
    given = [
        o
        for o, v in (
            ('--l2', args.l2),
            ('--hash-bits', args.hash_bits),
            ('--folds', args.folds),
            ('--select-by', args.select_by),
            ('--dense', args.dense),
            ('--exclude-subjects', args.exclude_subjects),
            ('--dense-exclude-subjects', args.dense_exclude_subjects),
        )
        if v is not None
    ]
    if given:
        print(f'fastroute eval: {", ".join(given)} only apply with --holdout', file=sys.stderr)
        return 2
    if getattr(args, 'semantic', False):
        from fastroute import semantic

        return semantic.cli_eval(args)
    data = args.data or str(default_data_path())
    model_path = args.model or str(default_model_path())
    try:
        model = load_model(model_path)
    except ValueError as e:
        print(f'fastroute eval: {e}', file=sys.stderr)
        return 1
    try:
        examples = load_examples(data)
    except DataError as e:
        print(f'fastroute eval: {e}', file=sys.stderr)
        return 1
    if args.limit:
        examples = examples[: args.limit]
    try:
        scores = np.array(model.classifier.score_many([e.body for e in examples]), dtype=float)
    except ValueError as e:
        print(f'fastroute eval: {data}: a request body does not parse: {e}', file=sys.stderr)
        return 1
    weak = np.array([bool(e.weak) for e in examples])
    strong = np.array([bool(e.strong) for e in examples])
    q = quality(scores, weak, strong)
    ql = quality(np.array([e.length for e in examples], float), weak, strong)
    rnd = random_quality(weak, strong)
    print(f'data {data}: {len(examples)} prompts; weak-only accuracy W {q.weak:.1%}, strong-only S {q.strong:.1%}')
    print(f'model {model_path}')
    trained = model.meta.get('trained', {})
    if isinstance(trained, dict) and trained.get('data_sha256_16'):
        same = trained['data_sha256_16'] == data_digest(examples)
        if same:
            print('note: the model was trained on this very file, so these figures are in-sample (optimistic);')
            print('      the cross-validated figures from training are:')
            print(_table([('classifier (CV)', model.meta.get('cv', {}))]))
    print(
        _table(
            [
                ('classifier', {'apgr': q.apgr, 'cpt50': q.cpt50, 'cpt80': q.cpt80}),
                ('prompt length', {'apgr': ql.apgr, 'cpt50': ql.cpt50, 'cpt80': ql.cpt80}),
                ('random (20 seeds)', {'apgr': rnd[0], 'cpt50': rnd[1], 'cpt80': rnd[2]}),
            ]
        )
    )
    if args.curve:
        print('strong calls  accuracy  PGR')
        for (x, y), (_, g) in zip(q.points, q.pgr(), strict=True):
            print(f'{x:>11.1%} {y:>9.1%} {g:>6.3f}')
    if args.scores_out:
        try:
            Path(args.scores_out).write_text(''.join(f'{s:.6f}\n' for s in scores))
        except OSError as e:
            print(f'fastroute eval: cannot write {args.scores_out}: {e.strerror or e}', file=sys.stderr)
            return 1
        print(f'wrote {len(scores)} scores to {args.scores_out}')
    if args.plot:
        return _plot(args.plot, [('classifier', q), ('prompt length', ql)], q)
    return 0


def cli_holdout(args: argparse.Namespace) -> int:
    """`fastroute eval --holdout GROUPING`: the leave-kind-out table (`holdout_eval`)."""
    import numpy as np

    err = 'fastroute eval --holdout'
    if args.holdout not in HOLDOUTS:
        print(f'{err}: unknown grouping {args.holdout!r}; choose one of: {", ".join(HOLDOUTS)}', file=sys.stderr)
        return 2
    other = [
        o
        for o, v in (
            ('--model', args.model),
            ('--plot', args.plot),
            ('--curve', args.curve),
        )
        if v
    ]
    if other:
        print(f'{err}: not with {", ".join(other)} (it trains its own classifier per group)', file=sys.stderr)
        return 2
    sem = bool(getattr(args, 'semantic', False))
    fast_only = [
        o
        for o, v in (
            ('--hash-bits', args.hash_bits),
            ('--select-by', args.select_by),
            ('--dense', args.dense),
            ('--dense-exclude-subjects', args.dense_exclude_subjects),
        )
        if v is not None
    ]
    if sem and fast_only:
        print(f'{err}: {", ".join(fast_only)} are for the fast classifier, not --semantic', file=sys.stderr)
        return 2
    if sem:
        from fastroute import semantic

        default_l2: tuple[float, ...] = semantic.DEFAULT_L2
    else:
        default_l2 = DEFAULT_L2
    l2s = default_l2 if args.l2 is None else _l2_grid(str(args.l2))
    hash_bits = DEFAULT_HASH_BITS if args.hash_bits is None else args.hash_bits
    folds = DEFAULT_FOLDS if args.folds is None else args.folds
    got = _training_data(err, args, l2s, hash_bits, folds)
    if isinstance(got, int):
        return got
    data, examples, positions = got
    dense_names = _subject_option(err, '--dense-exclude-subjects', args.dense_exclude_subjects, data, examples)
    if isinstance(dense_names, int):
        return dense_names
    dense_without = frozenset(dense_names)
    log = _progress(args.quiet)
    try:
        if sem:
            semantic._one_thread_unless_set()
            results = semantic.holdout_semantic(
                examples,
                args.holdout,
                l2s=l2s,
                folds=folds,
                model_dir=args.model_dir,
                cache_dir=semantic._cache(args),
                log=log,
            )
        else:
            results = holdout_eval(
                examples,
                args.holdout,
                hash_bits=hash_bits,
                l2s=l2s,
                folds=folds,
                select_by=args.select_by or 'folds',
                dense=args.dense or 'all',
                dense_without=dense_without,
                log=log,
            )
    except ValueError as e:
        if sem and isinstance(e, semantic.SemanticError):
            print(f'{err}: {e}', file=sys.stderr)
            return 2
        print(f'{err}: {data}: {e}', file=sys.stderr)
        return 1
    if not results:
        print(f'{err}: {data}: no prompt of any held-out group', file=sys.stderr)
        return 1
    inner_cv = 'leave-one-category-out CV' if args.select_by == 'category' else f'{folds}-fold CV'
    how = f'L2 by {inner_cv} on the training part from {{{", ".join(f"{v:g}" for v in l2s)}}}'
    left_out = f' (left out: {args.exclude_subjects})' if args.exclude_subjects else ''
    print(
        f'data {data}: {len(examples)} prompts{left_out}; held-out kinds `{args.holdout}`, each group scored by a '
        + ('semantic classifier (sentence embeddings)' if sem else 'classifier')
    )
    kept = '; dense features of one sign in every training category only' if args.dense == 'consistent' else ''
    if dense_without:
        kept += f'; dense weights fitted without {", ".join(sorted(dense_without))}'
    print(
        f'trained on the other subjects only (labels smoothed by subject within them, {how if len(l2s) > 1 else f"L2 {l2s[0]:g}"}{kept})'
    )
    rows = [
        (
            r.group,
            len(r.subjects),
            len(r.test),
            r.classifier.weak,
            r.classifier.strong,
            (r.classifier.apgr, r.classifier.cpt50, r.classifier.cpt80),
            (r.length.apgr, r.length.cpt50, r.length.cpt80),
            r.random,
        )
        for r in results
    ]
    if len(results) > 1:
        mean = [tuple(float(np.mean([row[k][j] for row in rows])) for j in range(3)) for k in (5, 6, 7)]
        rows.append(
            (
                'mean of groups',
                sum(len(r.subjects) for r in results),
                sum(len(r.test) for r in results),
                float('nan'),
                float('nan'),
                mean[0],
                mean[1],
                mean[2],
            )
        )
    print(_holdout_table(rows))
    for r in results:
        lo, hi = r.vs_length
        cv = '' if r.inner_apgr is None else f', inner CV APGR {r.inner_apgr:.4f}'
        verdict = 'above' if r.classifier.apgr > r.length.apgr else 'NOT above'
        print(
            f'{r.group}: trained on {r.trained_on} prompts (l2 {r.l2:g}{cv}); classifier {verdict} length by APGR '
            f'{r.classifier.apgr - r.length.apgr:+.4f} (95 % bootstrap interval {lo:+.3f} .. {hi:+.3f})'
        )
    if args.scores_out:
        lines = [
            {
                'example': positions[int(i)],
                'group': r.group,
                'subject': examples[i].group,
                'score': round(float(v), 6),
                'length': examples[i].length,
                'weak_correct': bool(examples[i].weak),
                'strong_correct': bool(examples[i].strong),
            }
            for r in results
            for i, v in zip(r.test, r.scores, strict=True)
        ]
        try:
            Path(args.scores_out).write_bytes(b''.join(msgspec.json.encode(x) + b'\n' for x in lines))
        except OSError as e:
            print(f'{err}: cannot write {args.scores_out}: {e.strerror or e}', file=sys.stderr)
            return 1
        print(f'wrote {len(lines)} held-out scores to {args.scores_out}')
    return 0


def _holdout_table(rows: list[tuple[Any, ...]]) -> str:
    figs = f'{"APGR":>7} {"CPT50":>6} {"CPT80":>6}'
    out = [
        f'{"":<16} {"":>4} {"":>7} {"":>6} {"":>6}   {"classifier":<21}   {"prompt length":<21}   random (20 seeds)',
        f'{"held out":<16} {"subj":>4} {"prompts":>7} {"W":>6} {"S":>6}   {figs}   {figs}   {figs}',
    ]
    for name, subj, n, w, s, *routers in rows:
        ws = f'{"":>6} {"":>6}' if math.isnan(w) else f'{w:>6.1%} {s:>6.1%}'
        cells = '   '.join(f'{a:>7.4f} {c5:>6.1%} {c8:>6.1%}' for a, c5, c8 in routers)
        out.append(f'{name:<16} {subj:>4} {n:>7} {ws}   {cells}')
    return '\n'.join(out)


def _plot(path: str, curves: list[tuple[str, Quality]], ref: Quality) -> int:
    try:
        import matplotlib

        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print('fastroute eval: --plot needs matplotlib: pip install "fastroute[plot]"', file=sys.stderr)
        return 2
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, q in curves:
        ax.plot(
            [x * 100 for x, _ in q.points],
            [y * 100 for _, y in q.points],
            marker='o',
            label=f'{name} (APGR {q.apgr:.3f})',
        )
    ax.plot([0, 100], [ref.weak * 100, ref.strong * 100], linestyle='--', color='grey', label='random (APGR 0.5)')
    ax.set_xlabel('% of requests sent to the strong model')
    ax.set_ylabel('accuracy of the routed answers, %')
    ax.set_title('cost / quality of routing')
    ax.grid(alpha=0.3)
    ax.legend(loc='lower right')
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        print(f'fastroute eval: cannot write {path}: {e.strerror or e}', file=sys.stderr)
        return 1
    finally:
        plt.close(fig)
    print(f'wrote the curve to {path}')
    return 0
