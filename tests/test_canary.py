"""The canary's sequential test and its state machine, without any server: the statistics (false-rollback
rate on A/A runs, power against a regression, coverage of the confidence sequences) and the operator
actions' rules. Seeded, so every figure here is reproducible; docs/experiments.md reports the same runs."""

from __future__ import annotations

import asyncio
import json
import math
import random

import pytest
from fastroute import _core
from fastroute.canary import Counts, beta_binomial_bounds, evaluate, harm_evidence, simulate
from fastroute.config import loads_config
from fastroute.errors import RequestError
from fastroute.experiments import ActionError, Registry, Ticket
from hypothesis import given, settings
from hypothesis import strategies as st

ALPHA = 0.05


def _slack(p: float, n: int) -> float:
    return 3 * math.sqrt(p * (1 - p) / n)


def test_aa_false_rollback_rate_is_within_alpha():
    # Same bad-request rate on both sides (A/A); the controller looks every 50 requests over 4000 requests.
    out = simulate(runs=150, seed=11, baseline_bad=0.05, candidate_bad=0.05, max_requests=4000, look_every=50)
    assert out['rolled_back'] <= ALPHA + _slack(ALPHA, 150), out


def test_aa_false_rollback_rate_with_rare_errors():
    out = simulate(runs=150, seed=12, baseline_bad=0.01, candidate_bad=0.01, max_requests=4000, look_every=50)
    assert out['rolled_back'] <= ALPHA + _slack(ALPHA, 150), out


def test_power_against_a_regression():
    # Candidate fails 10% of requests where the baseline fails 2%: rolled back in nearly every run.
    out = simulate(runs=60, seed=13, baseline_bad=0.02, candidate_bad=0.10, max_requests=4000, look_every=50)
    assert out['rolled_back'] >= 0.95, out
    assert out['median_requests_to_rollback'] < 4000


def test_a_healthy_candidate_is_promoted_to_the_end():
    out = simulate(
        runs=40, seed=14, baseline_bad=0.0, candidate_bad=0.0, min_samples=100, tolerance=0.05, max_requests=8000
    )
    assert out['promoted'] == 1.0, out
    assert out['rolled_back'] == 0.0


def test_confidence_sequence_covers_the_true_rate_at_every_look():
    rng = random.Random(5)
    p, misses, runs = 0.1, 0, 200
    for _ in range(runs):
        bad = 0
        for n in range(1, 1001):
            bad += rng.random() < p
            if n % 25 == 0:
                lo, hi = beta_binomial_bounds(bad, n, ALPHA / 2)
                if not lo <= p <= hi:
                    misses += 1
                    break
    assert misses / runs <= ALPHA + _slack(ALPHA, runs)


def test_bounds_shrink_and_stay_ordered():
    wide = beta_binomial_bounds(5, 100, 0.01)
    narrow = beta_binomial_bounds(50, 1000, 0.01)
    assert 0 <= wide[0] < 0.05 < wide[1] <= 1
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    assert beta_binomial_bounds(0, 0, 0.01) == (0.0, 1.0)


def test_harm_evidence_grows_only_when_the_candidate_is_worse():
    worse, same = Counts(), Counts()
    for _ in range(200):
        worse.add('errors', 50.0, True, True)
        worse.add('errors', 50.0, False, False)
        same.add('errors', 50.0, True, True)
        same.add('errors', 50.0, False, True)
    assert harm_evidence(worse, 'errors') > math.log(100)
    assert harm_evidence(same, 'errors') < 0
    # no bad request at all: no evidence either way
    quiet = Counts()
    quiet.add('errors', 50.0, True, False, n=500)
    quiet.add('errors', 50.0, False, False, n=500)
    assert harm_evidence(quiet, 'errors') == pytest.approx(0.0)


def test_counts_round_trip_through_redis_fields():
    c = Counts()
    c.add('errors', 5.0, True, True, n=3)
    c.add('errors', 25.0, False, False, n=7)
    c.add('ttft_p95', 5.0, False, True)
    again = Counts.from_fields({k.encode(): str(v).encode() for k, v in c.to_fields().items()})
    assert again.cells == c.cells
    merged = Counts()
    merged.merge(c)
    merged.merge(again)
    assert merged.totals('errors') == [14, 6, 0, 6]


def test_evaluate_holds_until_the_step_is_long_and_big_enough():
    c = Counts()
    c.add('errors', 50.0, True, False, n=2000)
    c.add('errors', 50.0, False, False, n=2000)
    kw = {'step_elapsed': 10.0, 'step_samples': 2000, 'min_duration': 5.0, 'min_samples': 100}
    assert evaluate(c, {'errors': 0.02}, ALPHA, **kw).action == 'promote'
    assert evaluate(c, {'errors': 0.02}, ALPHA, **{**kw, 'step_elapsed': 1.0}).action == 'hold'
    assert evaluate(c, {'errors': 0.02}, ALPHA, **{**kw, 'step_samples': 10}).action == 'hold'
    # too few samples to be sure of a tight tolerance
    small = Counts()
    small.add('errors', 50.0, True, False, n=50)
    small.add('errors', 50.0, False, False, n=50)
    v = evaluate(small, {'errors': 0.01}, ALPHA, **{**kw, 'step_samples': 50, 'min_samples': 10})
    assert v.action == 'hold' and 'tolerance' in v.reason


CONFIG = """
models:
  large: {endpoints: ["http://127.0.0.1:9"], adapters: [v3, v4]}
  small: {endpoints: ["http://127.0.0.1:9"]}
routes: [{name: all, requested: true}]
experiments:
  can:
    model: large
    canary: {baseline: {to: large, adapter: v3}, candidate: {to: large, adapter: v4}, steps: [10, 50, 100]}
  ab:
    model: small
    variants: [{name: a, to: small, weight: 50}, {name: b, to: large, weight: 50}]
"""


def test_operator_actions_follow_the_rules():
    reg = Registry()
    reg.configure(loads_config(CONFIG, 'yaml'))

    async def run() -> None:
        st = await reg.act('can', 'promote')
        assert (st.status, st.step, st.weight) == ('running', 1, 50.0)
        st = await reg.act('can', 'rollback', reason='bad answers')
        assert (st.status, st.weight) == ('rolled_back', 0.0)
        with pytest.raises(ActionError, match='resume it first'):
            await reg.act('can', 'promote')
        again = await reg.act('can', 'rollback')  # idempotent: no new transition
        assert again.version == st.version
        st = await reg.act('can', 'resume')
        assert (st.status, st.step, st.weight, st.epoch) == ('running', 0, 10.0, 1)
        st = await reg.act('can', 'set-weight', weight=30)
        assert (st.status, st.weight) == ('paused', 30.0)
        st = await reg.act('can', 'resume')
        assert (st.status, st.weight) == ('running', 10.0)
        await reg.act('can', 'promote')
        st = await reg.act('can', 'promote')
        assert (st.status, st.weight) == ('promoted', 100.0)
        with pytest.raises(ActionError, match='not a canary'):
            await reg.act('ab', 'rollback')
        with pytest.raises(ActionError, match='unknown variant'):
            await reg.act('ab', 'set-weight', weights={'c': 1})
        st = await reg.act('ab', 'set-weight', weights={'a': 0, 'b': 1})
        assert st.weights == {'a': 0.0, 'b': 1.0}
        transitions = [h['transition'] for h in reg.by_name['can'].state.history]
        assert transitions == ['start', 'promote', 'rollback', 'resume', 'set-weight', 'resume', 'promote', 'promote']

    asyncio.run(run())


def test_a_reload_keeps_the_state_of_an_unchanged_experiment():
    reg = Registry()
    cfg = loads_config(CONFIG, 'yaml')
    reg.configure(cfg)
    asyncio.run(reg.act('can', 'rollback'))
    reg.configure(loads_config(CONFIG, 'yaml'))
    assert reg.by_name['can'].state.status == 'rolled_back'
    reg.configure(loads_config(CONFIG.replace('[10, 50, 100]', '[20, 100]'), 'yaml'))
    assert reg.by_name['can'].state.status == 'running'
    assert reg.by_name['can'].state.weight == 20.0


def test_empty_answers_are_recognised_whole_and_streamed():
    reg = Registry()
    reg.configure(loads_config(CONFIG, 'yaml'))

    def ticket() -> Ticket:
        return Ticket(reg.by_name['can'], 'candidate', True, 10.0, False)

    full = b'{"choices":[{"message":{"role":"assistant","content":"[mock:v4] hi"}}],"usage":{"completion_tokens":3}}'
    blank = b'{"choices":[{"message":{"role":"assistant","content":""}}],"usage":{"completion_tokens":0}}'
    for body, empty in ((full, False), (blank, True), (memoryview(full), False)):
        t = ticket()
        t.seen_body(body)
        assert t.empty is empty
    t = ticket()
    t.seen_chunk(b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n')
    assert not t.content
    t.seen_chunk(b'data: {"choices":[{"delta":{"content":"word"}}]}\n\n')
    assert t.content


# --- the bindings experiments use ------------------------------------------------------------


def _split_hash(salt: bytes, key: bytes) -> int:
    """fastroute-split-v1 as documented in rust/src/split.rs, written independently."""
    mask = (1 << 64) - 1
    h = 0xCBF29CE484222325
    for b in salt + b'\xff' + key:
        h = ((h ^ b) * 0x100000001B3) & mask
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & mask
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & mask
    return h ^ (h >> 33)


@settings(max_examples=300, deadline=None)
@given(salt=st.text(max_size=20), key=st.text(max_size=40))
def test_bucket_is_the_documented_split_hash(salt: str, key: str) -> None:
    assert _core.bucket(salt, key) == (_split_hash(salt.encode(), key.encode()) >> 11) / (1 << 53)


_values = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=10))
# the body fields the core's scan reads and checks
CORE_FIELDS = {'model', 'messages', 'prompt', 'input', 'stream', 'max_tokens', 'max_completion_tokens', 'user'}
CORE_FIELDS |= {'metadata', 'adapter_id', 'stream_options'}


@settings(max_examples=300, deadline=None)
@given(
    body=st.dictionaries(st.text(max_size=8), _values, max_size=6),
    model=st.one_of(st.none(), st.text(max_size=12)),
    adapter=st.one_of(st.none(), st.text(max_size=12)),
    ensure_ascii=st.booleans(),
)
def test_rewrite_body_changes_only_model_and_adapter_id(body, model, adapter, ensure_ascii) -> None:
    raw = json.dumps(body, ensure_ascii=ensure_ascii).encode()
    try:
        rewritten = _core.rewrite_body(raw, model, adapter)
    except RequestError:
        # a field the core reads has the wrong type (e.g. `messages: false`): decide refuses such a body
        # with a 400 before any experiment rewrites it
        assert set(body) & CORE_FIELDS, body
        return
    out = json.loads(rewritten)
    if model is not None:
        assert out['model'] == model
    if adapter is not None:
        assert out['adapter_id'] == adapter
    for field in ('model', 'adapter_id'):
        if (field == 'model' and model is not None) or (field == 'adapter_id' and adapter is not None):
            out.pop(field)
            body.pop(field, None)
    assert out == body


def test_rewrite_body_and_body_user_refuse_what_is_not_a_json_object():
    assert _core.rewrite_body(b'{"a":1}') == b'{"a":1}'
    assert _core.body_user(b'{"user":"u-1","messages":[]}') == 'u-1'
    assert _core.body_user(b'{"messages":[]}') is None
    for bad in (b'[1]', b'{"a":', b'nope'):
        with pytest.raises(RequestError):
            _core.rewrite_body(bad, 'm')
        with pytest.raises(RequestError):
            _core.body_user(bad)
