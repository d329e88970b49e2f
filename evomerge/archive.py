"""Pareto archive: the non-dominated candidates over all objectives.

The driver adds every finished evaluation; the archive keeps only the candidates no
other candidate beats on every objective (the Pareto front) and answers what the
reports need: the best member per objective, the hypervolume of the front (one number
that grows whenever the front improves), the knee (the balanced compromise) and
crowding distances (how isolated a member is along the front).

Internally every score is turned into "larger is better" (minimized objectives are
negated), so dominance and geometry have one code path. With a single objective the
front is simply the best candidate so far. Ties: a candidate whose scores equal a
member's does not enter (the first one found stays), so repeated evaluations of the
same recipe do not grow the front.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

MAXIMIZE, MINIMIZE = "maximize", "minimize"


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """True if ``a`` is at least as good as ``b`` everywhere and better somewhere (larger is better)."""
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def hypervolume_min(points: Sequence[Sequence[float]], reference: Sequence[float]) -> float:
    """Exact hypervolume dominated by ``points`` (minimisation) and bounded by ``reference``.

    Points that do not strictly beat the reference in every coordinate contribute nothing.
    """
    return hypervolume_max([[-float(x) for x in p] for p in points], [-float(r) for r in reference])


def hypervolume_max(points: Sequence[Sequence[float]], reference: Sequence[float]) -> float:
    """Exact hypervolume of ``points`` ('larger is better' coordinates) above ``reference``.

    Reports redraw at every checkpoint and trace the curve over the whole run, and
    checkpoints rewrite front.json, so it must stay fast on large fronts: a sweep in 2-D
    (O(n log n)) and, above, slicing on the first coordinate with the dominated points
    of each slab dropped before recursing (O(n^2 log n) in 3-D). Same value, exactly
    defined the same way: points not above the reference everywhere add nothing.
    """
    ref = tuple(float(r) for r in reference)
    pts = [tuple(float(v) for v in p) for p in points if all(v > r for v, r in zip(p, ref))]
    return _hv(pts, ref)


def _hv(pts: list[tuple[float, ...]], ref: tuple[float, ...]) -> float:
    if not pts:
        return 0.0
    d = len(ref)
    if d == 1:
        return max(p[0] for p in pts) - ref[0]
    pts = sorted(pts, key=lambda p: p[0], reverse=True)
    if d == 2:
        total, best_y = 0.0, ref[1]
        for i, (x, y) in enumerate(pts):
            best_y = max(best_y, y)
            nxt = pts[i + 1][0] if i + 1 < len(pts) else ref[0]
            total += (x - nxt) * (best_y - ref[1])
        return total
    total = 0.0
    front: list[tuple[float, ...]] = []  # non-dominated tails (d-1 coords) of the points swept so far
    for i, p in enumerate(pts):
        tail = p[1:]
        if not any(all(a >= b for a, b in zip(q, tail)) for q in front):
            front = [q for q in front if not all(a >= b for a, b in zip(tail, q))] + [tail]
        nxt = pts[i + 1][0] if i + 1 < len(pts) else ref[0]
        if p[0] > nxt:
            total += (p[0] - nxt) * _hv(front, ref[1:])
    return total


class ParetoArchive:
    """Non-dominated set over ``directions`` ({objective: "maximize" | "minimize"})."""

    def __init__(self, directions: Mapping[str, str], reference: Mapping[str, float] | None = None) -> None:
        for name, d in directions.items():
            if d not in (MAXIMIZE, MINIMIZE):
                raise ValueError(f"objective {name!r}: direction must be 'maximize' or 'minimize', got {d!r}")
        if not directions:
            raise ValueError("a Pareto archive needs at least one objective")
        self.directions: dict[str, str] = dict(directions)
        self.objectives: list[str] = list(directions)
        self.reference: dict[str, float] | None = dict(reference) if reference is not None else None
        self._members: dict[str, dict[str, float]] = {}
        self._worst: dict[str, float] = {}  # worst score seen per objective (over all adds)
        self.n_added = 0

    # -- helpers ----------------------------------------------------------------------
    def _sign(self, name: str) -> float:
        return 1.0 if self.directions[name] == MAXIMIZE else -1.0

    def _vec(self, scores: Mapping[str, float]) -> tuple[float, ...]:
        return tuple(self._sign(k) * float(scores[k]) for k in self.objectives)

    def _is_worse(self, name: str, a: float, b: float) -> bool:
        return self._sign(name) * a < self._sign(name) * b

    # -- membership -----------------------------------------------------------------
    def add(self, id: str, scores: Mapping[str, float]) -> bool:
        """Offer a candidate; True if it entered the front (members it dominates leave).

        Candidates with a missing or non-finite score never enter (a failed
        evaluation is not a trade-off).
        """
        missing = [k for k in self.objectives if k not in scores]
        if missing:
            raise ValueError(f"candidate {id!r} has no score for objective(s) {', '.join(missing)}")
        values = {k: float(scores[k]) for k in self.objectives}
        if not all(math.isfinite(v) for v in values.values()):
            return False
        self.n_added += 1
        for k, v in values.items():
            if k not in self._worst or self._is_worse(k, v, self._worst[k]):
                self._worst[k] = v
        new = self._vec(values)
        for mid, mscores in self._members.items():
            old = self._vec(mscores)
            if old == new or dominates(old, new):
                return False
        for mid in [m for m, s in self._members.items() if dominates(new, self._vec(s))]:
            del self._members[mid]
        self._members[id] = values
        return True

    def front(self) -> list[str]:
        """Ids of the current front, in the order they entered."""
        return list(self._members)

    def scores(self, id: str) -> dict[str, float]:
        return dict(self._members[id])

    def members(self) -> dict[str, dict[str, float]]:
        return {k: dict(v) for k, v in self._members.items()}

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, id: object) -> bool:
        return id in self._members

    def best(self, objective: str) -> str:
        """The member with the best score on ``objective`` (earliest on ties)."""
        if objective not in self.directions:
            raise KeyError(f"unknown objective {objective!r}; objectives: {', '.join(self.objectives)}")
        if not self._members:
            raise ValueError("the archive is empty")
        s = self._sign(objective)
        return max(self._members, key=lambda m: s * self._members[m][objective])

    # -- geometry -------------------------------------------------------------------
    def reference_point(self) -> dict[str, float]:
        """The hypervolume reference: the one given, else the worst score seen per objective."""
        if self.reference is not None:
            return dict(self.reference)
        return dict(self._worst)

    def hypervolume(self, reference: Mapping[str, float] | None = None) -> float:
        """Exact hypervolume of the front against ``reference`` (default ``reference_point()``).

        Maximized objectives are negated so the region measured is the one each member
        beats the reference by. Members that do not beat the reference on every
        objective add nothing (with the default reference the extreme members add
        nothing along the objective they are worst on).
        """
        if not self._members:
            return 0.0
        ref = dict(reference) if reference is not None else self.reference_point()
        ref_min = [-self._sign(k) * float(ref[k]) for k in self.objectives]
        pts = [[-x for x in self._vec(s)] for s in self._members.values()]
        return hypervolume_min(pts, ref_min)

    def _normalised(self) -> dict[str, list[float]]:
        """Members' scores scaled to [0, 1] per objective over the front, 1 = best."""
        ids = list(self._members)
        out: dict[str, list[float]] = {m: [] for m in ids}
        for k in self.objectives:
            vals = [self._sign(k) * self._members[m][k] for m in ids]
            lo, hi = min(vals), max(vals)
            for m, v in zip(ids, vals):
                out[m].append(1.0 if hi == lo else (v - lo) / (hi - lo))
        return out

    def knee(self) -> str:
        """The member closest (Euclidean, after normalising each objective over the front) to the ideal point."""
        if not self._members:
            raise ValueError("the archive is empty")
        norm = self._normalised()
        return min(norm, key=lambda m: math.fsum((1.0 - x) ** 2 for x in norm[m]))

    def crowding_distances(self) -> dict[str, float]:
        """NSGA-II crowding distance of each member (inf at the ends of each objective)."""
        ids = list(self._members)
        dist = {m: 0.0 for m in ids}
        if len(ids) <= 2:
            return {m: math.inf for m in ids}
        for k in self.objectives:
            order = sorted(ids, key=lambda m: self._members[m][k])
            lo, hi = self._members[order[0]][k], self._members[order[-1]][k]
            dist[order[0]] = dist[order[-1]] = math.inf
            if hi == lo:
                continue
            for i in range(1, len(order) - 1):
                dist[order[i]] += (self._members[order[i + 1]][k] - self._members[order[i - 1]][k]) / (hi - lo)
        return dist

    # -- serialisation --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "directions": dict(self.directions),
            "reference": self.reference,
            "members": self.members(),
            "worst": dict(self._worst),
            "n_added": self.n_added,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ParetoArchive":
        arch = cls(data["directions"], data.get("reference"))
        arch._members = {k: {o: float(v) for o, v in s.items()} for k, s in data.get("members", {}).items()}
        arch._worst = {k: float(v) for k, v in data.get("worst", {}).items()}
        arch.n_added = int(data.get("n_added", len(arch._members)))
        return arch
