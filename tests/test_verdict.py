"""Paired bootstrap intervals and the demo's held-out verdict, on hand-made numbers and run dirs."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import yaml

from evomerge.paired import paired_difference
from evomerge.runview import load_run
from evomerge.verdict import choose_on_selection, heldout_comparisons

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))


def _bits(n: int, p: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [float(rng.random() < p) for _ in range(n)]


# -- the bootstrap on hand-made cases -----------------------------------------------------------
def test_identical_models_give_an_interval_around_zero():
    a = {"sort": _bits(512, 0.6, 1), "upper": _bits(512, 0.4, 2)}
    d = paired_difference(a, a)
    assert (d.diff, d.low, d.high) == (0.0, 0.0, 0.0)
    assert not d.above_zero
    assert d.items == 1024


def test_model_right_wherever_the_baseline_is_wrong_gives_a_positive_interval():
    base = {"sort": _bits(512, 0.5, 3), "shift": _bits(512, 0.3, 4)}
    better = {k: [1.0] * len(v) for k, v in base.items()}  # right on every item the baseline gets wrong, and the rest
    d = paired_difference(better, base)
    wrong = {k: v.count(0.0) / len(v) for k, v in base.items()}
    assert d.diff == pytest.approx(sum(wrong.values()) / 2)
    assert 0 < d.low < d.diff < d.high
    assert d.above_zero
    # each item difference is 0 or 1 with p = wrong share: the half-width is about 1.96 * sqrt(sum p(1-p)/n) / 2
    se = (sum(p * (1 - p) / 512 for p in wrong.values())) ** 0.5 / 2
    assert (d.high - d.low) / 2 == pytest.approx(1.96 * se, rel=0.1)


def test_noise_level_margin_is_not_above_zero():
    """Two models that disagree on many items but differ by 2 items out of 512 are not told apart."""
    a = _bits(512, 0.5, 5)
    b = list(a)
    flips = [i for i, x in enumerate(a) if x == 1.0][:60]
    for i in flips[:31]:
        b[i] = 0.0
    for i in [i for i, x in enumerate(a) if x == 0.0][:29]:
        b[i] = 1.0
    d = paired_difference({"s": a}, {"s": b})
    assert d.diff == pytest.approx(2 / 512)
    assert d.low < 0 < d.high and not d.above_zero


def test_lower_is_better_objectives_flip_sign_and_mismatched_items_are_refused():
    a, b = {"ppl": [2.0, 2.0, 2.5, 2.0]}, {"ppl": [3.0, 3.5, 3.0, 3.0]}
    assert paired_difference(a, b, signs={"ppl": -1.0}).diff == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same items"):
        paired_difference({"s": [1.0, 0.0]}, {"s": [1.0]})
    with pytest.raises(ValueError, match="'t'"):
        paired_difference({"s": [1.0]}, {"s": [1.0]}, ["s", "t"])


def test_interval_is_seeded():
    a, b = {"s": _bits(300, 0.6, 7)}, {"s": _bits(300, 0.5, 8)}
    assert paired_difference(a, b, seed=3) == paired_difference(a, b, seed=3)


# -- the verdict on a hand-made run dir ----------------------------------------------------------
def _run(tmp_path: Path, member_items: dict[str, list[float]], uniform_items: dict[str, list[float]],
         spec_items: dict[str, dict[str, list[float]]]) -> Path:
    """Two front members: e1 best on selection mean, e2 best on held-out (must NOT be chosen)."""
    root = tmp_path / "run"
    root.mkdir(parents=True)
    objs = [{"name": n, "evaluator": "lm_eval", "task": f"demo_{n}", "metric": "exact_match"} for n in ("a", "b")]
    (root / "config.yaml").write_text(yaml.safe_dump({"name": "t", "objectives": objs}))
    # a search writes front.json, with the objectives' directions, as soon as it starts
    (root / "front.json").write_text(json.dumps({"objectives": [{"name": n, "direction": "maximize"} for n in "ab"]}))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    recs = [
        {"kind": "evaluation", "id": "e1", "index": 0, "asked": 1, "status": "ok", "scores": {"a": 0.9, "b": 0.6},
         "losses": [-0.9, -0.6], "recipe": None},
        {"kind": "evaluation", "id": "e2", "index": 1, "asked": 2, "status": "ok", "scores": {"a": 0.5, "b": 0.8},
         "losses": [-0.5, -0.8], "recipe": None},
        {"kind": "heldout", "id": "e1", "scores": {k: mean(v) for k, v in member_items.items()}, "items": member_items},
        {"kind": "heldout", "id": "e2", "scores": {"a": 1.0, "b": 1.0}, "items": {"a": [1.0] * 64, "b": [1.0] * 64}},
        {"kind": "reference", "label": "uniform", "scores": {"a": 0.5, "b": 0.5},
         "heldout": {k: mean(v) for k, v in uniform_items.items()}, "heldout_items": uniform_items},
    ]
    for name, items in spec_items.items():
        recs.append({"kind": "reference", "label": f"source:models/demo/{name}", "scores": {"a": 0.5, "b": 0.5},
                     "heldout": {k: mean(v) for k, v in items.items()}, "heldout_items": items})
    (root / "evaluations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return root


def test_member_is_chosen_on_selection_scores_never_heldout(tmp_path):
    items = {"a": _bits(64, 0.5, 1), "b": _bits(64, 0.5, 2)}
    view = load_run(_run(tmp_path, items, items, {}))
    assert sorted(view.front) == ["e1", "e2"]
    assert choose_on_selection(view, "mean") == "e1"  # 0.75 > 0.65 on selection; e2 is perfect held out
    assert choose_on_selection(view, "knee") in {"e1", "e2"}


def test_demo_report_claim_met_and_not_met(tmp_path, capsys):
    import demo_report

    uni = {"a": _bits(64, 0.4, 11), "b": _bits(64, 0.4, 12)}
    better = {k: [1.0 if (x or i % 2) else 0.0 for i, x in enumerate(v)] for k, v in uni.items()}
    weak_spec = {"x": {"a": _bits(64, 0.3, 13), "b": _bits(64, 0.1, 14)}}
    assert demo_report.main([str(_run(tmp_path / "ok", better, uni, weak_spec))]) == 0
    out = capsys.readouterr().out
    assert "chosen on the selection split (best selection mean): e1" in out
    assert "verdict: met" in out

    view = load_run(_run(tmp_path / "same", uni, uni, weak_spec))
    comps = {c.baseline: c for c in heldout_comparisons(view, "e1")}
    assert comps["uniform"].difference.diff == 0.0
    assert demo_report.main([str(tmp_path / "same" / "run")]) == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("verdict")]
    assert lines == [lines[0]] and "NOT met" in lines[0] and "uniform average" in lines[0]

    strong_spec = {"x": {k: [1.0] * 64 for k in ("a", "b")}}
    assert demo_report.main([str(_run(tmp_path / "spec", better, uni, strong_spec))]) == 1
    assert "does not beat specialist x" in capsys.readouterr().out


def test_demo_report_without_item_scores_says_how_to_fix(tmp_path, capsys):
    import demo_report

    root = _run(tmp_path, {"a": [1.0], "b": [0.0]}, {"a": [1.0], "b": [0.0]}, {})
    lines = (root / "evaluations.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    for r in recs:
        r.pop("items", None)
    (root / "evaluations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert demo_report.main([str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--rescore" in err


def test_mean_interval_covers_the_mean_and_shrinks_with_items():
    from evomerge.paired import mean_interval

    m, lo, hi = mean_interval({"s": [1.0, 0.0] * 64})
    assert m == 0.5 and lo < 0.5 < hi
    m2, lo2, hi2 = mean_interval({"s": [1.0, 0.0] * 256})
    assert (hi2 - lo2) == pytest.approx((hi - lo) / 2, rel=0.15)
    assert mean_interval({"s": [1.0] * 8}) == (1.0, 1.0, 1.0)
