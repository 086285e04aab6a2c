"""Micro-benchmarks of `Router.decide`, the Python→Rust decision on every request.

Run: `make bench` (release build). Off by default in `make test` (`--benchmark-disable`).

Grid: a chat body of 200 B, 2 KB and 100 KB × 5, 50 and 500 routes, with 10,000 tenant keys
(1,000 tenants × 10 keys, each tenant with a LoRA adapter on the base model, so every decision
also rewrites the body). The request matches only the last route, so every route is evaluated.
Baselines in the same run: `_core.noop()` (the bare crossing) and `msgspec.json.decode(body)`
(the fastest Python JSON parse of the same body, which decide replaces).

Targets (issue 2): 2 KB / 50 routes / 10k keys median < 2 µs including the crossing;
100 KB < 100 µs.

Last results (issue 2 performance pass; 2 shared cores under load from other jobs, load average 1-7, so
wall-clock medians swing 1.5-2x between runs; the instruction counts are the stable comparison).

Instructions per decide, callgrind (`python` calling `decide` in a loop, N=1000 minus N=0, release build;
includes the crossing and the loop; SHA-256 runs the soft path under valgrind, SHA-NI natively):

    body     routes   before    after
    200 B       5     17.6k     14.2k
    200 B      50     21.5k     18.3k
    200 B     500     58.4k     54.8k
    2 KB        5     39.2k     25.7k
    2 KB       50     42.8k     28.8k    (-33 %)
    2 KB      500     79.8k     65.9k
    100 KB     50   1323k      701k     (-47 %)
    msgspec.json.decode 2 KB: 17.7k; _core.noop() loop: 0.9k

`make bench` (quietest run, load average 1.1, medians / mins):

    baseline  _core.noop()                    0.064 µs
    body      msgspec.json.decode    decide 5 / 50 / 500 routes (median)     decide 50 routes (min)
    200 B     1.18 µs                2.96 / 3.70 / 5.57 µs                   1.85 µs
    2 KB      1.89 µs                4.21 / 4.84 / 6.24 µs                   2.68 µs
    100 KB    45.5 µs                70.4 / 45.8 / 76.5 µs                   42.2 µs

Before/after in the same window (release builds of both, run alternately, 2 KB / 50 routes, medians with the
msgspec median of the same run): before 6.77 / 7.07 µs = 1.91x / 2.11x msgspec; after 4.96 / 4.48 µs = 1.35x /
1.21x. 100 KB / 50 routes: before 90 / 143 µs, after 72 / 75 µs.

Conclusions: 100 KB meets its target (~45-75 µs < 100 µs, about one msgspec parse). 2 KB / 50 routes / 10k keys
does not yet meet < 2 µs: the best rounds are 2.7 µs and the median is ~1.2-1.35x a bare msgspec parse (it was
~2x). Where the 2 KB decide goes now (callgrind, per decide): token estimate 7.3k (3.7 instructions per text
byte), route evaluation 3.5k (~70 per route), SHA-256 of the key 3.5k under valgrind (SHA-NI natively), string
scan and validation 2.8k, zeroing the new body inside `PyBytes::new_with` 2.1k (`rep stosb`, counted per byte by
valgrind, cheap natively), key/field matching 1.6k, the rest crossing, header lookups and `Decision` building.
Next steps: an index of routes by path/tenant so most are never evaluated, and a SIMD pass (runtime-detected
SSSE3/AVX2) if the estimator must go below ~1 cycle per byte.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import msgspec
import pytest
from fastroute import _core
from fastroute.config import Config

TENANTS = 1_000
KEYS_PER_TENANT = 10
ROUTE_COUNTS = [5, 50, 500]
SIZES = {'200B': 200, '2KB': 2 * 1024, '100KB': 100 * 1024}


def make_spec(n_routes: int) -> dict[str, Any]:
    tenants = {
        f'tenant-{t}': {
            'keys_sha256': [hashlib.sha256(f'sk-{t}-{k}'.encode()).hexdigest() for k in range(KEYS_PER_TENANT)],
            'base': 'large',
            'adapter': f'lora-{t}',
        }
        for t in range(TENANTS)
    }
    kinds = [
        lambda i: {'path': f'/v1/custom-{i}'},
        lambda i: {'headers': {'x-tier': f'tier-{i}'}},
        lambda i: {'model': [f'model-{i}-*', f'other-{i}']},
        lambda i: {'input_tokens': {'gt': 1_000_000 + i}},
        lambda i: {'metadata': {'team': f'team-{i}'}, 'stream': True},
    ]
    routes = [{'name': f'r{i}', 'match': kinds[i % len(kinds)](i), 'to': 'small'} for i in range(n_routes - 1)]
    routes.append({'name': 'catch-all', 'match': {'path': {'prefix': '/v1/'}}, 'to': 'large'})
    return {
        'models': {
            'small': {'endpoints': ['http://127.0.0.1:8001'], 'upstream_model': 'phi-3-mini'},
            'large': {'endpoints': ['http://127.0.0.1:8011'], 'upstream_model': 'llama-3-8b'},
        },
        'tenants': tenants,
        'routes': routes,
    }


def make_body(size: int) -> bytes:
    """A chat body of about `size` bytes: a system prompt and alternating turns of English text."""
    sentence = 'The quick brown fox jumps over the lazy dog, and then explains why it did so. '
    messages = [{'role': 'system', 'content': 'You are a helpful assistant.'}]
    body = {'model': 'gpt-4o-mini', 'messages': messages, 'max_tokens': 256, 'stream': True, 'user': 'u-42'}
    while len(json.dumps(body)) < size:
        room = size - len(json.dumps(body)) - 40
        text = (sentence * (1 + min(room, 2000) // len(sentence)))[: max(room, 8)][:2000]
        messages.append({'role': 'user' if len(messages) % 2 else 'assistant', 'content': text})
    return json.dumps(body).encode()


@pytest.fixture(scope='module', params=ROUTE_COUNTS, ids=lambda n: f'{n}routes')
def router(request: pytest.FixtureRequest) -> _core.Router:
    return _core.Router.compile(msgspec.json.encode(msgspec.convert(make_spec(request.param), Config)))


HEADERS = {'authorization': 'Bearer sk-123-7', 'content-type': 'application/json', 'x-tier': 'none'}


@pytest.mark.parametrize('size', list(SIZES), ids=str)
def test_decide(benchmark: Any, router: _core.Router, size: str) -> None:
    body = make_body(SIZES[size])
    d = router.decide('POST', '/v1/chat/completions', HEADERS, body)
    assert (d.status, d.route, d.tenant, d.adapter) == (200, 'catch-all', 'tenant-123', 'lora-123')
    assert d.body is not None
    benchmark.group = f'decide {size}'
    benchmark.extra_info.update(routes=router.route_count, body_bytes=len(body), tenant_keys=router.tenant_key_count)
    benchmark(router.decide, 'POST', '/v1/chat/completions', HEADERS, body)


def test_noop(benchmark: Any) -> None:
    benchmark.group = 'baseline'
    benchmark(_core.noop)


@pytest.mark.parametrize('size', list(SIZES), ids=str)
def test_msgspec_decode(benchmark: Any, size: str) -> None:
    body = make_body(SIZES[size])
    benchmark.group = f'decide {size}'
    benchmark.extra_info.update(body_bytes=len(body))
    benchmark(msgspec.json.decode, body)
