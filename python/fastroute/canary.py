"""The canary controller and its sequential test. Pure: no I/O and no clock (the caller passes `now`).

A canary compares a candidate with a baseline on per-request "bad" signals, each a yes/no per request:

    errors        status >= 500 (the gateway's own 502/503/504 included)
    ttft_p95      time to first byte slower than the baseline's current p95 (successful requests)
    latency_p95   total time slower than the baseline's current p95 (successful requests)
    aborts        the upstream stream broke after bytes went out
    empty         a successful answer with no content

Rolling back: is the candidate worse, with confidence? Under "no worse" (H0), a bad request is the
candidate's with probability equal to the candidate's share of requests, whatever the load, the time of
day or the baseline's own rate. Each bad request is a coin flip with a known bias under H0, so
the likelihood ratio of "the candidate's relative risk is r" against H0, averaged over a fixed
grid of r > 1 (`RATIOS`), is a test martingale. By Ville's inequality it ever reaches 1/a with
probability at most a, however often it is looked at. With k gates each gets a = alpha/k, so the chance
that a candidate which is no worse is rolled back is at most alpha over the canary's whole life. The
share is the observed share of requests within each weight (the traffic step), which is what makes
steps, manual weights and several replicas add up: the statistic is a sum over (weight, arm) counters.

Promoting: is the candidate no worse than the baseline plus the gate's tolerance, with confidence?
Each arm's bad-share gets an always-valid confidence sequence (a beta-binomial mixture, again by
Ville); a gate passes when the candidate's upper bound minus the baseline's lower bound is within the
tolerance. A step is left only when every gate passes, the step lasted `min_duration` and the
candidate saw `min_samples` requests in it.

`simulate` runs the controller on synthetic traffic; tests/test_canary.py and docs/experiments.md use
it to measure the false-rollback rate (A/A) and the power against a regression.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = [
    'GATES',
    'RATIOS',
    'Counts',
    'Verdict',
    'beta_binomial_bounds',
    'evaluate',
    'harm_evidence',
    'simulate',
]

GATES = ('errors', 'ttft_p95', 'latency_p95', 'aborts', 'empty')
# The alternatives the rollback test averages over: the candidate's relative risk of a bad request.
RATIOS = (1.25, 1.5, 2.0, 3.0, 5.0, 10.0)
_PRIOR = 0.5  # Beta(1/2, 1/2) mixing prior of the confidence sequences (Jeffreys)


@dataclass(slots=True)
class Counts:
    """Per gate and per weight: requests and bad requests of each arm. Only ever added to."""

    # (gate, weight) -> [baseline requests, candidate requests, baseline bad, candidate bad]
    cells: dict[tuple[str, float], list[int]] = field(default_factory=dict)

    def add(self, gate: str, weight: float, candidate: bool, bad: bool, n: int = 1) -> None:
        cell = self.cells.get((gate, weight))
        if cell is None:
            cell = self.cells[(gate, weight)] = [0, 0, 0, 0]
        i = 1 if candidate else 0
        cell[i] += n
        if bad:
            cell[2 + i] += n

    def merge(self, other: Counts) -> None:
        for (gate, weight), c in other.cells.items():
            cell = self.cells.setdefault((gate, weight), [0, 0, 0, 0])
            for i in range(4):
                cell[i] += c[i]

    def totals(self, gate: str) -> list[int]:
        out = [0, 0, 0, 0]
        for (g, _), c in self.cells.items():
            if g == gate:
                for i in range(4):
                    out[i] += c[i]
        return out

    def to_fields(self) -> dict[str, int]:
        """Flat `gate|weight|i` -> count, the form kept in a Redis hash."""
        return {f'{g}|{w:g}|{i}': v for (g, w), c in self.cells.items() for i, v in enumerate(c) if v}

    @classmethod
    def from_fields(cls, fields: Mapping[str | bytes, str | bytes | int]) -> Counts:
        out = cls()
        for k, v in fields.items():
            key = k.decode() if isinstance(k, bytes) else k
            try:
                g, w, i = key.split('|')
                cell = out.cells.setdefault((g, float(w)), [0, 0, 0, 0])
                cell[int(i)] += int(v)
            except (ValueError, IndexError):
                continue
        return out

    def clear(self) -> None:
        self.cells.clear()


def _logsumexp(xs: Iterable[float]) -> float:
    xs = list(xs)
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def harm_evidence(counts: Counts, gate: str) -> float:
    """The rollback test's martingale for `gate`, as a log: log(mean over r of the likelihood ratio).

    Within each weight, bad requests are attributed to the candidate with probability pi (its share of
    requests there) under H0, and pi*r / (pi*r + 1 - pi) under relative risk r.
    """
    per_ratio = [0.0] * len(RATIOS)
    for (g, _), (nb, nc, eb, ec) in counts.cells.items():
        if g != gate or nb == 0 or nc == 0 or eb + ec == 0:
            continue
        pi = nc / (nb + nc)
        for i, r in enumerate(RATIOS):
            q = pi * r / (pi * r + 1 - pi)
            per_ratio[i] += ec * math.log(q / pi) + eb * math.log((1 - q) / (1 - pi))
    return _logsumexp(per_ratio) - math.log(len(RATIOS))


def _log_mixture(s: int, f: int, p: float) -> float:
    """log of the beta-binomial mixture likelihood ratio against Bernoulli(p), after s bad of s + f."""
    a = b = _PRIOR
    log_beta = math.lgamma(a + s) + math.lgamma(b + f) - math.lgamma(a + b + s + f)
    log_beta -= math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    p = min(max(p, 1e-12), 1 - 1e-12)
    return log_beta - (s * math.log(p) + f * math.log(1 - p))


def beta_binomial_bounds(bad: int, n: int, alpha: float) -> tuple[float, float]:
    """An always-valid (lower, upper) bound on a Bernoulli rate after `bad` of `n`: the p where the
    mixture martingale stays under 1/alpha (one side each at alpha)."""
    if n <= 0:
        return 0.0, 1.0
    s, f = bad, n - bad
    level = math.log(1 / alpha)
    phat = s / n

    def solve(lo: float, hi: float, rising: bool) -> float:
        for _ in range(32):
            mid = (lo + hi) / 2
            inside = _log_mixture(s, f, mid) < level
            if inside == rising:
                lo = mid
            else:
                hi = mid
        return lo if rising else hi

    upper = solve(phat, 1.0, True) if _log_mixture(s, f, 1.0) >= level else 1.0
    lower = solve(0.0, phat, False) if s > 0 and _log_mixture(s, f, 0.0) >= level else 0.0
    return lower, upper


@dataclass(slots=True)
class Verdict:
    """What the controller concluded from the counts at one look."""

    action: str  # 'rollback' | 'promote' | 'hold'
    reason: str
    gates: dict[str, dict[str, float]]


def evaluate(
    counts: Counts,
    gates: Mapping[str, float],
    alpha: float,
    *,
    step_elapsed: float,
    step_samples: int,
    min_duration: float,
    min_samples: int,
) -> Verdict:
    """One look at the evidence: roll back, promote to the next step, or hold."""
    k = max(1, len(gates))
    a = alpha / k
    rollback_at = math.log(1 / a)
    report: dict[str, dict[str, float]] = {}
    worse: list[str] = []
    failing: list[str] = []
    ready = step_elapsed >= min_duration and step_samples >= min_samples
    for gate, tolerance in gates.items():
        nb, nc, eb, ec = counts.totals(gate)
        ev = harm_evidence(counts, gate)
        report[gate] = {
            'baseline_n': nb,
            'candidate_n': nc,
            'baseline_rate': eb / nb if nb else 0.0,
            'candidate_rate': ec / nc if nc else 0.0,
            'evidence_worse': round(math.exp(min(ev, 700.0)), 4),
            'rollback_at': round(1 / a, 2),
            'tolerance': tolerance,
        }
        if ev >= rollback_at:
            worse.append(gate)
        if ready:  # the bounds cost a few hundred lgamma calls: only when a promotion could follow
            _, cand_hi = beta_binomial_bounds(ec, nc, a / 2)
            base_lo, _ = beta_binomial_bounds(eb, nb, a / 2)
            report[gate]['upper_difference'] = round(cand_hi - base_lo, 4)
            if cand_hi - base_lo > tolerance:
                failing.append(gate)
    if worse:
        g = worse[0]
        r = report[g]
        reason = (
            f'candidate worse on {g}: {r["candidate_rate"]:.3f} of {int(r["candidate_n"])} vs baseline '
            f'{r["baseline_rate"]:.3f} of {int(r["baseline_n"])} (evidence {r["evidence_worse"]:g} >= {r["rollback_at"]:g})'
        )
        return Verdict('rollback', reason, report)
    if step_elapsed < min_duration:
        return Verdict('hold', f'step has run {step_elapsed:.1f}s of {min_duration:g}s', report)
    if step_samples < min_samples:
        return Verdict('hold', f'step has {step_samples} of {min_samples} candidate requests', report)
    if failing:
        return Verdict('hold', f'not yet confident the candidate is within tolerance on {", ".join(failing)}', report)
    return Verdict('promote', 'every gate within tolerance with confidence', report)


# ---------------------------------------------------------------------------------------------
# Simulation: the controller on synthetic traffic, for the false-rollback rate and the power.
# ---------------------------------------------------------------------------------------------


def simulate(
    *,
    runs: int,
    seed: int,
    baseline_bad: float,
    candidate_bad: float,
    steps: tuple[float, ...] = (5.0, 25.0, 50.0, 100.0),
    min_samples: int = 200,
    alpha: float = 0.05,
    tolerance: float = 0.05,
    max_requests: int = 20_000,
    look_every: int = 50,
    promote: bool = True,
) -> dict[str, float]:
    """Run `runs` seeded canaries on one gate whose bad-request rate is `baseline_bad` for the baseline
    and `candidate_bad` for the candidate; each request goes to the candidate with the step's share.
    The controller looks every `look_every` requests (min_duration 0); with `promote` False it never leaves
    the first step (the rollback test alone, the longest exposure to a false rollback). Returns the share of runs rolled
    back, promoted to the end, and still undecided after `max_requests`, and the median number of
    requests to a rollback."""
    rng = random.Random(seed)
    gates = {'errors': tolerance}
    rolled = promoted = 0
    to_rollback: list[int] = []
    for _ in range(runs):
        counts = Counts()
        step, step_start_c, cand_total = 0, 0, 0
        outcome = None
        for i in range(1, max_requests + 1):
            w = steps[step]
            cand = rng.random() * 100 < w
            bad = rng.random() < (candidate_bad if cand else baseline_bad)
            counts.add('errors', w, cand, bad)
            cand_total += cand
            if i % look_every:
                continue
            if not promote:
                if harm_evidence(counts, 'errors') >= math.log(1 / alpha):
                    outcome = 'rollback'
                    to_rollback.append(i)
                    break
                continue
            v = evaluate(
                counts,
                gates,
                alpha,
                step_elapsed=0.0,
                step_samples=cand_total - step_start_c,
                min_duration=0.0,
                min_samples=min_samples,
            )
            if v.action == 'rollback':
                outcome = 'rollback'
                to_rollback.append(i)
                break
            if v.action == 'promote':
                step += 1
                step_start_c = cand_total
                if steps[step] >= 100:
                    outcome = 'promoted'
                    break
        rolled += outcome == 'rollback'
        promoted += outcome == 'promoted'
    to_rollback.sort()
    return {
        'runs': runs,
        'rolled_back': rolled / runs,
        'promoted': promoted / runs,
        'undecided': (runs - rolled - promoted) / runs,
        'median_requests_to_rollback': float(to_rollback[len(to_rollback) // 2]) if to_rollback else math.nan,
    }
