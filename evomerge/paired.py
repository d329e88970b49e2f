"""Paired bootstrap intervals: is model A better than model B on the same items, beyond noise?

Why paired: two merges scored on the same held-out items share each item's difficulty, so the
difference per item varies far less than either score; an interval of the difference is much
tighter than two separate intervals, and a 1-3 item margin shows up as what it is (noise).

Why stratified by objective: a multi-skill verdict compares the *mean over skills* of
per-skill means. Each skill's item differences are resampled on their own (scipy's
multi-sample bootstrap with ``paired=False`` over the per-skill difference vectors), so skills
with different item counts weigh as the mean weighs them, not by their item counts.

The resampling is scipy's (``scipy.stats.bootstrap``, percentile method, seeded), so the numbers
are reproducible and nothing here re-implements it. Pure: lists of numbers in, numbers out.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

#: resamples of every interval; 10 000 puts the percentile noise of a 95% bound near 1e-3
N_RESAMPLES = 10_000


@dataclass(frozen=True)
class PairedDifference:
    """``mean_a - mean_b`` (each a mean over objectives of per-objective item means) and its interval."""

    mean_a: float
    mean_b: float
    low: float
    high: float
    confidence: float
    items: int  # items per model, all objectives together

    @property
    def diff(self) -> float:
        return self.mean_a - self.mean_b

    @property
    def above_zero(self) -> bool:
        """A is better than B: the whole interval of the difference is above zero."""
        return self.low > 0.0

    def describe(self) -> str:
        return f"{self.diff:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def _aligned(a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]],
             objectives: Sequence[str]) -> list[np.ndarray]:
    diffs = []
    for name in objectives:
        if name not in a or name not in b:
            raise ValueError(f"paired bootstrap: objective {name!r} has no per-item values for both models")
        xa, xb = np.asarray(a[name], dtype=float), np.asarray(b[name], dtype=float)
        if xa.shape != xb.shape or xa.ndim != 1 or xa.size == 0:
            raise ValueError(f"paired bootstrap: objective {name!r} has {xa.size} items for one model and "
                             f"{xb.size} for the other; both must be scored on the same items")
        diffs.append(xa - xb)
    return diffs


def _mean_of_means(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean([np.mean(x, axis=axis) for x in samples], axis=0)


def _interval(vectors: Sequence[np.ndarray], confidence: float, n_resamples: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-vector means, each vector resampled on its own."""
    from scipy.stats import bootstrap

    if all(np.all(v == v[0]) for v in vectors):  # no spread at all: every resample is the point estimate
        low = high = float(_mean_of_means(*vectors))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns on near-degenerate data; the interval is still right
            res = bootstrap(tuple(vectors), _mean_of_means, paired=False, vectorized=True, n_resamples=n_resamples,
                            confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed))
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError("bootstrap: the interval is not finite (are the values finite?)")
    return low, high


def mean_interval(values: Mapping[str, Sequence[float]], objectives: Sequence[str] | None = None, *,
                  confidence: float = 0.95, n_resamples: int = N_RESAMPLES, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): one model's mean over objectives of per-item means, with its bootstrap interval."""
    names = list(objectives if objectives is not None else values)
    vectors = [np.asarray(values[n], dtype=float) for n in names]
    if not vectors or any(v.ndim != 1 or v.size == 0 for v in vectors):
        raise ValueError("bootstrap: every objective needs at least one item value")
    low, high = _interval(vectors, confidence, n_resamples, seed)
    return float(_mean_of_means(*vectors)), low, high


def paired_difference(a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]],
                      objectives: Sequence[str] | None = None, *, signs: Mapping[str, float] | None = None,
                      confidence: float = 0.95, n_resamples: int = N_RESAMPLES, seed: int = 0) -> PairedDifference:
    """Interval of A minus B on the mean over ``objectives`` of per-item values, items paired.

    ``a``/``b``: ``{objective: [value of item 0, item 1, ...]}`` in the same item order.
    ``signs``: -1 for an objective where lower is better, so that a positive difference
    always means "A is better". The interval is the percentile bootstrap of the statistic,
    resampling each objective's items separately.
    """
    names = list(objectives if objectives is not None else a)
    if not names:
        raise ValueError("paired bootstrap: no objectives to compare")
    s = {n: float((signs or {}).get(n, 1.0)) for n in names}
    diffs = [s[n] * d for n, d in zip(names, _aligned(a, b, names))]
    point_a = float(np.mean([s[n] * np.mean(a[n]) for n in names]))
    point_b = float(np.mean([s[n] * np.mean(b[n]) for n in names]))
    low, high = _interval(diffs, confidence, n_resamples, seed)
    return PairedDifference(mean_a=point_a, mean_b=point_b, low=low, high=high, confidence=confidence,
                            items=sum(d.size for d in diffs))
