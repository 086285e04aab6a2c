"""Micro-benchmarks of `_core.estimate_tokens`: the fast estimator against exact BPE counting.

Run: `.venv/bin/python -m pytest benches/bench_tokens.py --benchmark-enable --benchmark-only` after a release
build (`maturin develop --release`); off by default (`--benchmark-disable`).

Input: 1 MiB of mixed text, the token corpus (tests/fixtures/tokens: prose, code, chat, JSON, CJK, other scripts,
numbers, MMLU prompts; half the non-ASCII samples \\u-escaped) concatenated, as raw JSON-string content. Each case
reports its throughput in `extra_info['gb_per_s']` (median) and `extra_info['gb_per_s_best']` (best round).

Last results (devrel build, 2 shared cores at load average 5-9 from parallel builds; wall-clock medians swing
2-3x between runs, so the best round is shown too):

    fast, 1 MiB mixed        median 0.30-0.82 GB/s, best 0.83-0.99 GB/s
    exact o200k_base         ~2 MB/s (about 450x slower)
    exact cl100k_base        ~2 MB/s

The Rust probe (`cargo test --release --lib tokens::tests::throughput -- --ignored --nocapture`) also counts the
thread's on-CPU time: ~0.9 GB/s on the escape-heavy mixed corpus and 1.1-1.4 GB/s on prose. Conclusion: near the
1 GB/s target, not clearly over it on this loaded machine; the escape path (\\u-escaped CJK costs one branchy
decode per 6 bytes) is the slow part, and a SIMD classifier is the next step if the estimate shows in profiles.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fastroute import _core

FIXTURES = Path(__file__).resolve().parents[1] / 'tests' / 'fixtures' / 'tokens'
MIB = 1 << 20


def mixed_text(size: int = MIB) -> bytes:
    samples = []
    for path in sorted(FIXTURES.glob('*.txt')):
        samples.extend(path.read_bytes().splitlines())
    text = b''
    while len(text) < size:
        text += b' '.join(samples) + b' '
    return text[:size]


TEXT = mixed_text()


def record_rate(benchmark, size: int) -> None:
    if benchmark.stats is None:  # --benchmark-disable: the function ran once, untimed
        return
    stats = benchmark.stats.stats
    benchmark.extra_info['bytes'] = size
    benchmark.extra_info['gb_per_s'] = round(size / stats.median / 1e9, 3)
    benchmark.extra_info['gb_per_s_best'] = round(size / stats.min / 1e9, 3)


@pytest.mark.benchmark(group='tokens')
def test_fast_1mib(benchmark) -> None:
    result = benchmark(_core.estimate_tokens, TEXT)
    assert result > 0
    record_rate(benchmark, len(TEXT))


@pytest.mark.benchmark(group='tokens')
@pytest.mark.parametrize('encoding', ['o200k_base', 'cl100k_base'])
def test_exact_1mib(benchmark, encoding: str) -> None:
    _core.estimate_tokens('warm up', exact=True, encoding=encoding)  # builds the BPE once
    result = benchmark.pedantic(_core.estimate_tokens, (TEXT,), {'exact': True, 'encoding': encoding}, rounds=3)
    assert result > 0
    record_rate(benchmark, len(TEXT))
