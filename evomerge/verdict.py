"""The held-out verdict of a run: pick a member on the selection split, judge it on held-out items.

Why a module: choosing on held-out scores and then reporting held-out scores is optimistic by
construction (the best of N noisy numbers is biased upwards). Here the member is chosen from
the final front using *selection* scores only (the best selection mean, or the knee); only then
are its held-out per-item scores compared, item by item, with each baseline the run scored
(uniform average, each source), as paired bootstrap intervals (``evomerge.paired``).

Reads a ``RunView``; writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

from evomerge.errors import RunDirError
from evomerge.paired import PairedDifference, paired_difference
from evomerge.pareto import knee
from evomerge.runview import RunView

Rule = Literal["mean", "knee"]


def selection_mean(scores: dict[str, float], view: RunView) -> float:
    """Mean over objectives of ``sign * score``: larger is better whatever the directions."""
    return sum(o.sign * scores[o.name] for o in view.objectives) / len(view.objectives)


def choose_on_selection(view: RunView, rule: Rule = "mean") -> str:
    """The front member a user would take, judged on selection scores only.

    ``mean``: the best selection mean (ties: the earliest evaluated). ``knee``: the member
    closest to the ideal point after normalising each objective over the front.
    """
    front = view.front_evaluations()
    if not front:
        raise RunDirError(f"{view.path}: the Pareto front is empty; the search has not finished any candidate")
    if rule == "knee":
        return knee({e.id: e.scores for e in front}, view.directions)
    if rule != "mean":
        raise ValueError(f"rule must be 'mean' or 'knee', got {rule!r}")
    return max(front, key=lambda e: (selection_mean(e.scores, view), -e.index)).id


@dataclass(frozen=True)
class Comparison:
    """The chosen member against one baseline on the held-out items."""

    baseline: str  # reference label (``evomerge.records``): "uniform", "source:<ref>", "base"
    heldout: dict[str, float]  # the baseline's held-out score per objective
    difference: PairedDifference  # member minus baseline, mean over objectives


def heldout_comparisons(view: RunView, member: str, labels: Sequence[str] | None = None, *,
                        confidence: float = 0.95, seed: int = 0) -> list[Comparison]:
    """Paired intervals of ``member`` minus each reference (default: every reference with items)."""
    names = view.objective_names
    mine = view.heldout_items.get(member)
    if not mine or any(n not in mine for n in names):
        raise RunDirError(f"{view.path}: front member {member} has no per-item held-out scores; re-score the "
                          f"front with `evomerge status {view.path} --rescore`")
    signs = {o.name: o.sign for o in view.objectives}
    out = []
    for ref in view.references:
        if labels is not None and ref.label not in labels:
            continue
        if not ref.heldout_items or not ref.heldout:
            continue
        diff = paired_difference(mine, ref.heldout_items, names, signs=signs, confidence=confidence, seed=seed)
        out.append(Comparison(ref.label, dict(ref.heldout), diff))
    return out
