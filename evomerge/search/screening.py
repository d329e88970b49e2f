"""The run's screening policy: which items a candidate is screened on, and what a screen estimates.

``evaluation.fidelity`` (see ``fidelity`` for the promotion rule) with one of two estimators:

- ``subset``: a seeded random ``screen_items`` of each objective's selection items
  (``screen_positions``), the same for every candidate; the estimate is its mean.
- ``irt``: the first ``irt.calibration`` candidates are measured in full, with every item's
  result logged. Then, per objective, a 2PL item response model (``evomerge.irt``) is fitted
  on the references' and those candidates' responses, the ``screen_items`` most informative
  items become the anchors, and later candidates are screened on the anchors only; the
  estimate is the IRT model's full-set accuracy for the ability their anchor answers imply.
  The fit and anchors are written once to ``irt.json`` and read back by resume and status.

Positions are indices into an objective's selection items (``0 .. limit - 1``), which are
lm-eval's own doc ids through the evaluator's seeded subsample, so ``lm_eval --samples`` on
an exported model can reproduce an anchor score.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

from evomerge.config import SearchConfig
from evomerge.errors import ConfigError
from evomerge.records import EvaluationRecord, Record, ReferenceRecord, Status
from evomerge.rundir import RunDir
from evomerge.search.fidelity import Estimate, entry_probability, is_binary, subset_estimate

log = logging.getLogger("evomerge.search")


def check_fidelity(cfg: SearchConfig) -> None:
    """One-line ConfigError for objectives a screen cannot estimate (before any Ray work)."""
    fid = cfg.evaluation.fidelity
    if fid is None:
        return
    for i, o in enumerate(cfg.objectives):
        where = f"config field objectives.{i}"
        if o.evaluator != "lm_eval" or o.components:
            raise ConfigError(f"{where}: evaluation.fidelity screens per-item results, which objective {o.name!r} "
                              f"({o.evaluator}{' with components' if o.components else ''}) does not give; use "
                              f"single-metric lm_eval objectives or remove evaluation.fidelity")
        if o.limit is None:
            raise ConfigError(f"{where}.limit: evaluation.fidelity screens a subset of an objective's selection "
                              f"items, so objective {o.name!r} needs a limit (how many items a full evaluation "
                              f"scores); add limit: N")
        if fid.screen_items >= o.limit:
            raise ConfigError(f"config field evaluation.fidelity.screen_items: {fid.screen_items} is not fewer than "
                              f"objective {o.name!r}'s limit {o.limit}, so a screen would cost a full evaluation; "
                              f"lower it (e.g. to {max(1, o.limit // 8)})")


def screen_positions(limit: int | None, k: int, seed: int, name: str) -> list[int]:
    """A seeded random ``k`` of an objective's ``limit`` selection items, sorted: the subset screen.

    Random, not the first ``k``: the selection sample is sorted by doc id, and datasets are
    often ordered (by length, by source), so a prefix would be a biased estimate."""
    import random

    assert limit is not None, "screening needs the objective's limit (check_fidelity)"
    return sorted(random.Random(f"screen|{seed}|{name}").sample(range(limit), k))


class Screener:
    """Items to screen on and estimates from a screen, for one run (see the module docstring)."""

    def __init__(self, cfg: SearchConfig, run: RunDir) -> None:
        fid = cfg.evaluation.fidelity
        assert fid is not None, "a Screener needs evaluation.fidelity"
        self.cfg = cfg
        self.run = run
        self.estimator = cfg.evaluation.estimator
        self.k = int(fid.screen_items)
        self.confidence = float(fid.confidence)
        self.min_probability = float(fid.min_probability)
        self.margin = float(fid.margin)
        self.limits = {o.name: int(o.limit or 0) for o in cfg.objectives}
        self.objectives = [o.name for o in cfg.objectives]
        self.irt: dict[str, Any] | None = None  # objective -> {"model": IrtModel, "anchors": [...]}
        if self.estimator == "irt":
            data = run.load_irt()
            if data is not None:
                self.irt = _parse_irt(data)

    # -- what to screen on --------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """False while an IRT run is still calibrating (candidates are then measured in full)."""
        return self.estimator == "subset" or self.irt is not None

    def items(self) -> dict[str, list[int]]:
        """Per objective, the positions of the selection items a screen scores."""
        if self.estimator == "subset":
            return {o.name: screen_positions(o.limit, self.k, o.seed, o.name) for o in self.cfg.objectives}
        assert self.irt is not None
        return {name: list(self.irt[name]["anchors"]) for name in self.objectives}

    def rest_items(self, screened: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
        """Per objective, the selection items a promoted candidate's screen did not score: all its full
        evaluation still needs when the screen is reused."""
        return {name: sorted(set(range(self.limits[name])) - {int(p) for p in screened[name]})
                for name in self.objectives}

    @staticmethod
    def reusable(scores: Mapping[str, float], values: Mapping[str, Sequence[float]]) -> bool:
        """Whether a screen's items can be part of the candidate's full evaluation: lm-eval's score of every
        screened objective is the plain mean of its per-item values (the metric aggregates by ``mean``), so
        the full-set score is the mean over the screened and the remaining items, as lm-eval would compute
        it on all of them. A metric aggregated otherwise is re-scored on every item."""
        return bool(values) and all(
            name in scores and len(v) > 0 and abs(float(scores[name]) - _mean(v)) <= 1e-12 * max(1.0, abs(_mean(v)))
            for name, v in values.items())

    def with_screen(self, rest: Mapping[str, Any], screen: Mapping[str, Any],
                    rest_items: Mapping[str, Sequence[int]]) -> dict[str, Any]:
        """A promoted candidate's full result from its screen and the rest of its items: per objective, the
        per-item values in item order (as a full evaluation logs them) and lm-eval's mean over all of them."""
        values = rest.get("items") or {}
        scores: dict[str, float] = {}
        items: dict[str, list[float]] = {}
        for name in self.objectives:
            by_position = dict(zip((int(p) for p in screen["positions"][name]), screen["items"][name]))
            got = list(values.get(name) or [])
            if len(got) != len(rest_items[name]):
                return {**rest, "status": Status.FAILED.value, "scores": {},
                        "error": f"evaluation: {len(got)} per-item values for the {len(rest_items[name])} unscreened "
                                 f"items of {name}; the evaluator must report per-item results"}
            by_position.update(zip((int(p) for p in rest_items[name]), got))
            assert sorted(by_position) == list(range(self.limits[name])), "screen and rest must cover every item"
            items[name] = [float(by_position[p]) for p in range(self.limits[name])]
            scores[name] = _mean(items[name])
        timings = dict(rest.get("timings") or {})
        return {**rest, "scores": scores, "items": items, "timings": timings}

    # -- what a screen says --------------------------------------------------------------
    def estimate(self, item_values: Mapping[str, Sequence[float]], seed: int) -> dict[str, Estimate]:
        """Each objective's estimate, interval and draws of its full-set score, from the screen's per-item
        values (``seed``: the candidate's ask index, so a decision is a pure function of its screen)."""
        out = {}
        for j, name in enumerate(self.objectives):
            s = seed * 1009 + j
            if self.estimator == "subset":
                out[name] = subset_estimate(item_values[name], self.confidence, total=self.limits[name], seed=s)
            else:
                from evomerge import irt

                assert self.irt is not None
                fit = self.irt[name]
                out[name] = irt_estimate(irt, fit["model"], fit["anchors"], list(item_values[name]),
                                         self.confidence, s)
        return out

    def entry_probability(self, estimates: Mapping[str, Estimate], front: Mapping[str, Mapping[str, float]],
                          directions: Mapping[str, str]) -> float:
        """P(the candidate's full scores are not dominated by ``front``) (``fidelity.entry_probability``)."""
        return entry_probability(estimates, front, directions, self.margin)

    def promote(self, probability: float) -> bool:
        """The promotion rule: a chance of entering the front of at least ``min_probability``."""
        return probability >= self.min_probability

    # -- IRT calibration -----------------------------------------------------------------
    def calibrate(self, records: Sequence[Record]) -> bool:
        """Fit the IRT model once ``irt.calibration`` candidates are measured with their items; True if fitted now."""
        if self.estimator != "irt" or self.irt is not None:
            return False
        n = int(self.cfg.evaluation.irt.calibration)
        measured = [r for r in records if isinstance(r, EvaluationRecord) and r.ok and r.measured and r.items
                    and not r.cached_from]
        if len(measured) < n:
            return False
        refs = [r for r in records if isinstance(r, ReferenceRecord) and r.ok and r.items]
        rows = [r.items for r in refs] + [r.items for r in measured[:n]]
        for name in self.objectives:  # a 2PL model is of right/wrong answers: say so, not a numpy error
            if not all(is_binary(row.get(name) or [0.0]) for row in rows):
                raise ConfigError(f"config field evaluation.estimator: irt models right/wrong answers, and objective "
                                  f"{name!r} gives per-item values other than 0 and 1; use estimator: subset")
        data = fit_irt(rows, self.objectives, self.k)  # type: ignore[arg-type]
        data["calibrated_on"] = [r.label for r in refs] + [r.id for r in measured[:n]]
        self.run.save_irt(data)
        self.irt = _parse_irt(data)
        log.info("IRT fitted on %d models (%d references, %d candidates); %d anchors per objective",
                 len(rows), len(refs), n, self.k)
        return True


def _mean(values: Sequence[float]) -> float:
    """lm-eval's ``mean`` aggregation, the same expression (so the same float)."""
    return sum(values) / len(values)


def irt_estimate(irt: Any, model: Any, anchors: Sequence[int], values: Sequence[float], confidence: float,
                 seed: int) -> Estimate:
    """An IRT estimate as a screen ``Estimate``: the full-set accuracy, its interval, and draws of it from the
    ability's posterior (``irt.estimate``)."""
    import numpy as np

    from evomerge.search.fidelity import N_DRAWS

    e = irt.estimate(model, list(anchors), np.asarray(values, dtype=float), level=confidence, draws=N_DRAWS,
                     seed=seed)
    return Estimate(float(e.accuracy), float(e.low), float(e.high), e.draws)


def fit_irt(rows: Sequence[Mapping[str, Sequence[float]]], objectives: Sequence[str], k: int) -> dict[str, Any]:
    """``irt.json``'s content: per objective, a 2PL fit on ``rows`` (one dict of per-item values per model)
    and its ``k`` anchors."""
    import numpy as np

    from evomerge import irt

    out: dict[str, Any] = {"version": 1, "objectives": {}}
    for name in objectives:
        matrix = np.asarray([list(r[name]) for r in rows], dtype=float)
        model = irt.fit_2pl(matrix, seed=0)
        anchors = irt.select_anchors(model, k, seed=0)
        out["objectives"][name] = {"model": model.to_json(), "anchors": [int(a) for a in anchors],
                                   "n_items": int(matrix.shape[1]), "n_models": int(matrix.shape[0])}
    return out


def _parse_irt(data: Mapping[str, Any]) -> dict[str, Any]:
    from evomerge import irt

    return {name: {"model": irt.IrtModel.from_json(v["model"]), "anchors": sorted(int(a) for a in v["anchors"])}
            for name, v in (data.get("objectives") or {}).items()}
