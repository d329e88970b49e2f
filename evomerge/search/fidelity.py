"""Multi-fidelity promotion: screen each candidate on a few items, measure in full only the promising.

On a real search, scoring is the whole cost, and most candidates of an evolutionary
search are plainly worse than the front. ``evaluation.fidelity`` screens every candidate
on ``screen_items`` items per objective -- the same items for every candidate: a fixed
subset of the selection items (``estimator: subset``), or the anchors an item response
theory model chose (``estimator: irt``, ``evomerge.irt``) -- and turns the screen into an
estimate with a one-sided confidence bound per objective.

The rule (``entry_probability``): a candidate is promoted to a full evaluation when the
probability that its full-fidelity scores would *not* be dominated by the current front is
at least ``min_probability``. The probability is computed from the screen: for a 0/1 metric
the full-set score is the screened hits plus the hits among the ``limit - k`` unscreened
items, whose rate has the Beta(hits + 1, misses + 1) posterior of the screen (a uniform
prior), so the draws are exact about the finite item set; for other per-item values, a
Student-t predictive of the mean; for IRT anchors, the posterior of the ability. Draws are
seeded by the candidate, so a decision is a pure function of the screen.

Why this rule and not "promote unless the optimistic corner of the confidence box is
dominated" (the upper bound of each maximised objective, the lower bound of each
minimised one): with several objectives that corner is almost never dominated, because it
is optimistic on every objective at once. Measured on the demo zoo, it promoted 30 of 30
candidates (8 items, 90% bounds, 2 objectives) and 12 of 12 (6 items, 60%): no saving at
all. The probability asks the question the issue asks -- could this candidate still enter
the front -- and answers it jointly, so ``min_probability`` is the chance of losing a
candidate the user is willing to accept (0.1: a candidate that had a 1-in-10 chance of
entering the front is not measured). Skipping is the only irreversible error: only
measurements enter the front, the front files and the held-out re-scoring. The optimizer
is told the best estimate available: the screen's estimate for a candidate that was not
promoted, the measurement for one that was.

The interval a record shows (``low``/``high``) is the ``confidence`` central quantiles of
the same draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from evomerge import pareto


@dataclass(frozen=True)
class Estimate:
    """One objective's estimate from a screen: the point, an interval, and draws of the full-set score."""

    mean: float
    low: float
    high: float
    draws: tuple[float, ...] = ()  # plausible full-set scores: what the promotion rule integrates over


#: draws per objective: the promotion probability's Monte Carlo error is below 0.01
N_DRAWS = 4000


def is_binary(values: Sequence[float]) -> bool:
    return all(v in (0.0, 1.0) for v in values)


def _interval(draws: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2
    return float(np.quantile(draws, tail)), float(np.quantile(draws, 1.0 - tail))


def subset_estimate(values: Sequence[float], confidence: float, *, total: int, seed: int = 0) -> Estimate:
    """The screen's mean, and draws of the score on all ``total`` selection items (see the module)."""
    k = len(values)
    if k == 0:
        raise ValueError("a screen needs at least one item value")
    if total < k:
        raise ValueError(f"a screen of {k} items out of {total}: the screen cannot be larger than the full set")
    rng = np.random.default_rng(seed)
    mean = float(sum(values) / k)
    rest = total - k
    if is_binary(values):
        hits = int(round(sum(values)))
        rate = rng.beta(hits + 1, k - hits + 1, N_DRAWS)
        draws = (hits + rng.binomial(rest, rate)) / total
    elif k == 1:
        draws = np.full(N_DRAWS, mean)
    else:
        sd = float(np.std(values, ddof=1))
        # the unscreened items' mean ~ mean + sd * sqrt(1/k + 1/rest) * t_{k-1}, weighted by their share
        spread = sd * math.sqrt(1.0 / k + (1.0 / rest if rest else 0.0))
        draws = (k * mean + rest * (mean + spread * rng.standard_t(k - 1, N_DRAWS))) / total
    low, high = _interval(draws, confidence)
    return Estimate(mean, low, high, tuple(float(x) for x in draws))


def entry_probability(estimates: Mapping[str, Estimate], front: Mapping[str, Mapping[str, float]],
                      directions: Mapping[str, str], margin: float = 0.0) -> float:
    """The share of the candidate's joint draws that no front member dominates (objectives independent).

    ``margin`` > 0: a draw counts as entering only if it beats every member by more than ``margin`` on
    some objective (epsilon-dominance): entering the front by less than the selection noise is not
    worth a full evaluation."""
    names = list(directions)
    if not front:
        return 1.0
    signs = np.array([pareto.sign(directions[n]) for n in names])
    cand = np.stack([np.asarray(estimates[n].draws, dtype=float) for n in names], axis=1) * signs  # draws x m
    members = np.array([[scores[n] for n in names] for scores in front.values()], dtype=float) * signs  # f x m
    if margin > 0:  # epsilon-dominated: some member within ``margin`` of the draw (or better) everywhere
        dominated = (members[None, :, :] + margin >= cand[:, None, :]).all(axis=2).any(axis=1)
    else:
        geq = (members[None, :, :] >= cand[:, None, :]).all(axis=2)
        gt = (members[None, :, :] > cand[:, None, :]).any(axis=2)
        dominated = (geq & gt).any(axis=1)
    return float(1.0 - dominated.mean())


def screen_summary(estimator: str, estimates: Mapping[str, Estimate], items: Mapping[str, Sequence[float]],
                   promoted: bool, confidence: float, probability: float,
                   positions: Mapping[str, Sequence[int]] | None = None) -> dict[str, Any]:
    """The ``screen`` field of a log record: what was estimated from which items, and the decision.

    ``positions``: the screened items, as positions among each objective's selection items."""
    return {"estimator": estimator, "confidence": confidence, "promoted": promoted,
            "entry_probability": probability,
            "positions": {k: [int(p) for p in v] for k, v in (positions or {}).items()},
            "scores": {k: e.mean for k, e in estimates.items()},
            "low": {k: e.low for k, e in estimates.items()}, "high": {k: e.high for k, e in estimates.items()},
            "items": {k: list(map(float, v)) for k, v in items.items()},
            "n_items": sum(len(v) for v in items.values())}
