"""ParetoArchive: dominance, hypervolume, knee and crowding on hand-worked points."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest

from evomerge.pareto import MINIMIZE, ParetoArchive, dominates, hypervolume


def test_two_objectives_dominance_and_removal() -> None:
    arch = ParetoArchive({"x": "maximize", "y": "maximize"})
    assert arch.add("A", {"x": 1, "y": 5})
    assert arch.add("B", {"x": 2, "y": 3})
    assert not arch.add("D", {"x": 1.5, "y": 2.5})  # B dominates D
    assert arch.add("C", {"x": 4, "y": 1})
    assert arch.front() == ["A", "B", "C"]
    assert arch.add("E", {"x": 3, "y": 3})  # dominates B only
    assert arch.front() == ["A", "C", "E"]
    assert not arch.add("A2", {"x": 1, "y": 5})  # equal to a member: first one stays
    assert arch.best("x") == "C" and arch.best("y") == "A"
    # union of [0,1]x[0,5], [0,3]x[0,3], [0,4]x[0,1] = 5 + 2*3 + 1*1
    assert arch.hypervolume({"x": 0, "y": 0}) == pytest.approx(12.0)
    # default reference = worst score seen per objective, dominated adds included
    assert arch.reference_point() == {"x": 1.0, "y": 1.0}
    # against (1,1): only E (3,3) beats it strictly in both -> 2*2
    assert arch.hypervolume() == pytest.approx(4.0)


def test_mixed_directions() -> None:
    arch = ParetoArchive({"acc": "maximize", "loss": "minimize"})
    assert arch.add("P1", {"acc": 0.5, "loss": 2.0})
    assert arch.add("P2", {"acc": 0.7, "loss": 3.0})
    assert arch.add("P3", {"acc": 0.6, "loss": 2.5})
    assert not arch.add("P4", {"acc": 0.4, "loss": 2.2})  # worse on both than P1
    assert arch.add("P5", {"acc": 0.65, "loss": 2.4})  # beats P3 on both
    assert arch.front() == ["P1", "P2", "P5"]
    assert arch.best("loss") == "P1" and arch.best("acc") == "P2"
    # maximize acc, maximize -loss, reference (0, -4): heights 4 - loss
    # 0.5*2 + (0.65-0.5)*1.6 + (0.7-0.65)*1
    assert arch.hypervolume({"acc": 0.0, "loss": 4.0}) == pytest.approx(1.0 + 0.24 + 0.05)


def test_three_objectives_inclusion_exclusion() -> None:
    arch = ParetoArchive({"a": "maximize", "b": "maximize", "c": "maximize"})
    for i, p in enumerate([(1, 1, 1), (2, 0.5, 0.5), (0.5, 2, 0.5), (0.9, 0.9, 0.9)]):
        arch.add(f"p{i}", dict(zip("abc", p)))
    assert arch.front() == ["p0", "p1", "p2"]  # p3 dominated by p0
    # boxes 1 + 0.5 + 0.5, pairwise 0.25 + 0.25 + 0.125, triple 0.125
    assert arch.hypervolume({"a": 0, "b": 0, "c": 0}) == pytest.approx(1.5)


def test_three_objectives_mixed_directions_dominance() -> None:
    arch = ParetoArchive({"a": "maximize", "b": "minimize", "c": "maximize"})
    assert arch.add("x", {"a": 1, "b": 1, "c": 1})
    assert not arch.add("y", {"a": 1, "b": 2, "c": 1})  # worse on b only
    assert arch.add("z", {"a": 0, "b": 0, "c": 1})  # better on b, worse on a
    assert arch.add("w", {"a": 1, "b": 0, "c": 1})  # dominates x and z
    assert arch.front() == ["w"]


def _brute_force_cells(points: list[tuple[int, ...]], ref: tuple[int, ...]) -> int:
    """Count unit cells [c, c+1] inside the region some point dominates (minimisation)."""
    count = 0
    for cell in itertools.product(*[range(r) for r in ref]):
        if any(all(p[k] <= cell[k] for k in range(len(ref))) for p in points):
            count += 1
    return count


@pytest.mark.parametrize("dim", [2, 3, 4])
def test_hypervolume_matches_cell_count(dim: int) -> None:
    rng = random.Random(dim)
    ref = (6,) * dim
    names = [f"o{k}" for k in range(dim)]
    for _ in range(20):
        pts = [tuple(rng.randrange(0, 7) for _ in range(dim)) for _ in range(rng.randrange(1, 7))]
        scores = [dict(zip(names, p)) for p in pts]
        assert hypervolume(scores, {n: MINIMIZE for n in names}, dict(zip(names, ref))) == _brute_force_cells(pts, ref)


def test_knee_and_crowding() -> None:
    arch = ParetoArchive({"x": "maximize", "y": "maximize"})
    for mid, (x, y) in {"A": (0, 10), "B": (6, 6), "D": (8, 3), "C": (10, 0)}.items():
        assert arch.add(mid, {"x": x, "y": y})
    # normalised: A (0,1), B (.6,.6), D (.8,.3), C (1,0); distance to (1,1): B 0.566, D 0.728
    assert arch.knee() == "B"
    cd = arch.crowding_distances()
    assert math.isinf(cd["A"]) and math.isinf(cd["C"])
    assert cd["B"] == pytest.approx((8 - 0) / 10 + (10 - 3) / 10)
    assert cd["D"] == pytest.approx((10 - 6) / 10 + (6 - 0) / 10)


def test_knee_is_scale_invariant_with_minimize() -> None:
    arch = ParetoArchive({"acc": "maximize", "ppl": "minimize"})
    arch.add("A", {"acc": 0.0, "ppl": 100.0})
    arch.add("B", {"acc": 0.6, "ppl": 104.0})
    arch.add("C", {"acc": 1.0, "ppl": 110.0})
    assert arch.knee() == "B"  # normalised (0.6, 0.6)


def test_single_objective_is_best_so_far() -> None:
    arch = ParetoArchive({"loss": "minimize"})
    assert arch.add("a", {"loss": 3.0})
    assert not arch.add("b", {"loss": 4.0})
    assert arch.add("c", {"loss": 1.0})
    assert not arch.add("d", {"loss": 1.0})
    assert arch.front() == ["c"] and arch.best("loss") == "c"
    assert arch.hypervolume({"loss": 5.0}) == pytest.approx(4.0)
    assert arch.knee() == "c"


def test_failed_scores_and_errors() -> None:
    arch = ParetoArchive({"x": "maximize", "y": "minimize"})
    assert not arch.add("nan", {"x": float("nan"), "y": 0.0})
    assert len(arch) == 0 and arch.hypervolume() == 0.0
    with pytest.raises(ValueError, match="no score for objective"):
        arch.add("m", {"x": 1.0})
    with pytest.raises(ValueError, match="direction"):
        ParetoArchive({"x": "up"})


def test_roundtrip_dict() -> None:
    arch = ParetoArchive({"x": "maximize", "y": "minimize"})
    for i, (x, y) in enumerate([(1, 1), (2, 2), (0, 0), (0.5, 3)]):
        arch.add(f"e{i}", {"x": x, "y": y})
    back = ParetoArchive.from_dict(json.loads(json.dumps(arch.to_dict())))
    assert back.front() == arch.front() == ["e0", "e1", "e2"]
    assert back.hypervolume() == arch.hypervolume()
    assert back.reference_point() == arch.reference_point() == {"x": 0.0, "y": 3.0}
    # the restored archive keeps filtering the same way
    assert not back.add("e9", {"x": 0.5, "y": 1.5})
    assert back.add("e10", {"x": 3, "y": 2})
    assert back.front() == ["e0", "e2", "e10"]


def test_dominates() -> None:
    assert dominates((1, 2), (1, 1)) and not dominates((1, 1), (1, 1)) and not dominates((2, 0), (1, 1))
