"""The optimizer's ask/tell bookkeeping, rebuildable exactly from the evaluation log.

Why this exists: resume must be lossless. ``evaluations.jsonl`` is the source of truth,
so every tell is logged *before* it is made, with what is needed to redo it:

- ``index``: the ask number of the candidate (its id is ``e{index:06d}``);
- ``asked``: how many asks had been made when it was told (asks and tells interleave
  differently with more than one actor, and nevergrad's state depends on that order);
- ``value`` / ``recipe``: what was asked; ``losses``: exactly what was told.

The log order is the tell order. ``replay`` feeds a fresh optimizer, seeded as at the
start, the same interleaving of asks and tells, checking that each replayed ask gives
the logged recipe; the result is the optimizer the crashed process had (same random
state, same population), plus the candidates that were asked but never told, which the
driver evaluates again. Everything here is pure Python + nevergrad: no Ray, no torch.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from evomerge.merge.recipe import canonical_json
from evomerge.pareto import sign
from evomerge.records import EvaluationRecord, Record

log = logging.getLogger(__name__)


def eval_id(index: int) -> str:
    return f"e{index:06d}"


def to_losses(scores: Mapping[str, float], objectives: Sequence[tuple[str, str]]) -> list[float]:
    """Scores -> minimisation losses, in objective order (maximised scores are negated)."""
    return [-sign(direction) * float(scores[name]) for name, direction in objectives]


def penalty_losses(seen: Iterable[Sequence[float]], n: int) -> list[float]:
    """Losses for a failed candidate: worse than anything told so far, on every objective.

    Not a huge constant: nevergrad's multi-objective mode sets its hypervolume reference
    point from the first tells, and a 1e9 there would flatten every later comparison.
    """
    seen = [list(s) for s in seen]
    out = []
    for j in range(n):
        col = [s[j] for s in seen if math.isfinite(s[j])]
        if not col:
            out.append(1.0)
            continue
        worst, best = max(col), min(col)
        out.append(worst + max(1.0, worst - best))
    return out


@dataclass
class Asked:
    """A candidate asked from the optimizer and not yet told."""

    index: int
    candidate: Any  # ng.p.Parameter
    recipe: dict[str, Any]
    value: Any  # JSON form

    @property
    def id(self) -> str:
        return eval_id(self.index)


@dataclass
class SearchBook:
    """A seeded optimizer plus the counters the log records.

    ``objectives``: ``[(name, direction)]`` in the order losses are told.
    """

    optimizer: Any
    space: Any
    objectives: list[tuple[str, str]]
    n_asked: int = 0
    n_told: int = 0
    n_failed: int = 0
    pending: dict[int, Asked] = field(default_factory=dict)
    losses_seen: list[list[float]] = field(default_factory=list)
    diverged: int = 0

    # -- live search -------------------------------------------------------------------
    def ask(self) -> Asked:
        cand = self.optimizer.ask()
        recipe = self.space.to_recipe(cand.value).to_dict()
        asked = Asked(self.n_asked, cand, recipe, self.space.value_to_json(cand.value))
        self.n_asked += 1
        self.pending[asked.index] = asked
        return asked

    def losses_for(self, scores: Mapping[str, float] | None, ok: bool) -> list[float]:
        if ok and scores is not None:
            return to_losses(scores, self.objectives)
        return penalty_losses(self.losses_seen, len(self.objectives))

    def tell(self, index: int, losses: Sequence[float], ok: bool = True) -> None:
        asked = self.pending.pop(index)
        self._tell(asked.candidate, losses)
        self.n_told += 1
        self.n_failed += 0 if ok else 1
        if ok:
            self.losses_seen.append([float(x) for x in losses])

    def _tell(self, candidate: Any, losses: Sequence[float]) -> None:
        losses = [float(x) for x in losses]
        self.optimizer.tell(candidate, losses[0] if len(losses) == 1 else losses)

    # -- resume ------------------------------------------------------------------------
    def replay(self, records: Iterable[Record]) -> None:
        """Redo the logged asks and tells, in the logged order, on this fresh optimizer.

        After it, ``pending`` holds the candidates asked (before the last logged tell) but
        never finished: the driver must evaluate them again. Candidates the crashed run
        asked after its last tell are simply asked again; the optimizer, in the same
        state, gives the same ones.
        """
        for rec in records:
            if not isinstance(rec, EvaluationRecord):
                continue
            index, asked_count = rec.index, rec.asked
            while self.n_asked < asked_count:
                self.ask()
            asked = self.pending.get(index)
            if asked is not None and canonical_json(asked.recipe) != canonical_json(rec.recipe):
                self.diverged += 1
                log.warning("replay: ask %d gave another recipe than the log (library version changed?); "
                            "telling the logged one instead", index)
            if asked is None or canonical_json(asked.recipe) != canonical_json(rec.recipe):
                # tell the logged point as not-asked: the log, not this optimizer, is the truth
                cand = self.optimizer.parametrization.spawn_child(
                    new_value=self.space.value_from_json(rec.value))
                self.pending.pop(index, None)
                self._tell(cand, rec.losses)
            else:
                self.pending.pop(index)
                self._tell(asked.candidate, rec.losses)
            self.n_told += 1
            self.n_failed += 0 if rec.ok else 1
            if rec.ok:
                self.losses_seen.append([float(x) for x in rec.losses])
