"""The promotion rule of multi-fidelity screening, and the bounds of a screen's estimate (pure)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from evomerge.config import parse_config
from evomerge.errors import ConfigError
from evomerge.search.fidelity import Estimate, entry_probability, subset_estimate
from evomerge.search.screening import check_fidelity

DIRS = {"a": "maximize", "b": "maximize"}


def test_binary_draws_are_the_screened_hits_plus_the_unscreened_items_predictive() -> None:
    est = subset_estimate([1.0, 0.0] * 8, 0.9, total=128, seed=0)
    draws = np.asarray(est.draws)
    assert est.mean == 0.5 and len(draws) == 4000
    assert set(np.round(draws * 128).astype(int)) <= set(range(8, 8 + 113))  # 8 hits seen, 112 unseen
    assert abs(draws.mean() - (8 + 112 * 9 / 18) / 128) < 0.01  # Beta(9, 9) posterior mean 0.5
    # a screen that is the whole set has no uncertainty left
    exact = subset_estimate([1.0, 0.0, 1.0, 1.0], 0.9, total=4, seed=0)
    assert set(exact.draws) == {0.75} and exact.low == exact.high == 0.75
    assert est.low < 0.5 < est.high and subset_estimate([1.0, 0.0] * 8, 0.9, total=128, seed=0) == est


def test_the_draws_cover_the_true_full_set_score_at_their_level() -> None:
    rng = random.Random(0)
    for p in (0.05, 0.3, 0.8):
        misses = 0
        for trial in range(400):
            full = [float(rng.random() < p) for _ in range(128)]
            screen = rng.sample(full, 16)
            est = subset_estimate(screen, 0.9, total=128, seed=trial)
            misses += not est.low <= sum(full) / 128 <= est.high
        assert misses / 400 <= 0.10 + 0.04, (p, misses)


def test_non_binary_values_get_a_student_t_predictive() -> None:
    est = subset_estimate([0.2, 0.4, 0.6, 0.8], 0.95, total=1000, seed=1)
    sd = math.sqrt(sum((v - 0.5) ** 2 for v in (0.2, 0.4, 0.6, 0.8)) / 3)
    assert est.mean == pytest.approx(0.5)
    assert est.high == pytest.approx(0.5 + 3.182 * sd * math.sqrt(1 / 4 + 1 / 996) * 996 / 1000, rel=0.05)


def _point(mean: float, spread: float = 0.0, seed: int = 0) -> Estimate:
    draws = np.random.default_rng(seed).normal(mean, spread, 4000) if spread else np.full(4000, mean)
    return Estimate(mean, mean - spread, mean + spread, tuple(draws))


def test_a_candidate_the_front_dominates_in_every_draw_is_not_promoted() -> None:
    front = {"e1": {"a": 0.8, "b": 0.6}, "e2": {"a": 0.5, "b": 0.9}}
    assert entry_probability({"a": _point(0.3, 0.02), "b": _point(0.4, 0.02)}, front, DIRS) == 0.0
    assert entry_probability({"a": _point(0.9), "b": _point(0.1)}, front, DIRS) == 1.0
    half = entry_probability({"a": _point(0.8, 0.05), "b": _point(0.6)}, front, DIRS)  # ties e1 on b
    assert 0.45 < half < 0.55  # above 0.8 on a half the time
    assert entry_probability({"a": _point(0.1), "b": _point(0.1)}, {}, DIRS) == 1.0  # an empty front takes anyone


def test_minimized_objectives_count_lower_as_better() -> None:
    dirs = {"ppl": "minimize", "acc": "maximize"}
    est = {"ppl": _point(10.0), "acc": _point(0.5)}
    assert entry_probability(est, {"e": {"ppl": 9.0, "acc": 0.7}}, dirs) == 0.0
    assert entry_probability(est, {"e": {"ppl": 11.0, "acc": 0.7}}, dirs) == 1.0


def test_entry_probability_counts_draws_that_escape_every_member_jointly() -> None:
    """Two front members that cover different corners: a draw must escape both at once."""
    front = {"e1": {"a": 0.6, "b": 0.4}, "e2": {"a": 0.4, "b": 0.6}}
    est = {"a": _point(0.45, 0.1, seed=1), "b": _point(0.45, 0.1, seed=2)}
    a, b = np.asarray(est["a"].draws), np.asarray(est["b"].draws)
    by_e1 = (a <= 0.6) & (b <= 0.4) & ((a < 0.6) | (b < 0.4))
    by_e2 = (a <= 0.4) & (b <= 0.6) & ((a < 0.4) | (b < 0.6))
    assert entry_probability(est, front, DIRS) == pytest.approx(1 - (by_e1 | by_e2).mean(), abs=1e-12)


def test_a_margin_counts_only_entries_by_more_than_it() -> None:
    """epsilon-dominance: beating the front by less than ``margin`` on every objective is not entering it."""
    front = {"e1": {"a": 0.5, "b": 0.5}}
    near = {"a": _point(0.52), "b": _point(0.45)}  # enters by 0.02 on a
    assert entry_probability(near, front, DIRS) == 1.0
    assert entry_probability(near, front, DIRS, margin=0.03) == 0.0
    assert entry_probability(near, front, DIRS, margin=0.01) == 1.0


def _cfg(**evaluation) -> dict:
    return {"models": {"sources": ["a"]}, "budget": {"evaluations": 4},
            "objectives": [{"name": "x", "task": "demo_sort", "metric": "exact_match", "limit": 32}],
            "evaluation": evaluation}


@pytest.mark.parametrize("evaluation, objective, fragment", [
    ({"fidelity": {"screen_items": 32}}, None,
     "config field evaluation.fidelity.screen_items: 32 is not fewer than objective 'x''s limit 32"),
    ({"fidelity": {}}, {"name": "p", "evaluator": "perplexity", "files": ["t.txt"]},
     "config field objectives.1: evaluation.fidelity screens per-item results, which objective 'p' (perplexity)"),
    ({"fidelity": {"confidence": 1.0}}, None, "config field evaluation.fidelity.confidence"),
    ({"fidelity": {"min_probability": 0}}, None, "config field evaluation.fidelity.min_probability"),
    ({"estimator": "irt"}, None, "estimator irt scores candidates on anchor items, which is a screen"),
])
def test_bad_fidelity_configs_are_one_line(evaluation, objective, fragment) -> None:
    raw = _cfg(**evaluation)
    if objective:
        raw["objectives"].append(objective)
    with pytest.raises(ConfigError) as err:
        check_fidelity(parse_config(raw))
    assert fragment in str(err.value) and "\n" not in str(err.value)


def _screener(tmp_path, limit: int = 8):
    from evomerge.rundir import RunDir
    from evomerge.search.screening import Screener

    raw = _cfg(fidelity={"screen_items": 3})
    raw["objectives"][0]["limit"] = limit
    return Screener(parse_config(raw), RunDir(tmp_path))


def test_a_screen_is_reused_only_when_lm_evals_score_is_the_mean_of_its_items(tmp_path) -> None:
    s = _screener(tmp_path)
    assert s.reusable({"x": 2 / 3}, {"x": [1.0, 0.0, 1.0]})
    assert s.reusable({"x": 0.1 + 0.2 + 0.3}, {"x": [0.1, 0.2, 0.3]}) is False  # a sum, not a mean
    assert not s.reusable({"x": 0.5}, {"x": [1.0, 0.0, 1.0]})  # e.g. a corpus-level metric: re-score every item
    assert not s.reusable({}, {"x": [1.0]}) and not s.reusable({"x": 1.0}, {})


def test_a_promoted_candidates_full_result_is_its_screen_plus_the_rest_in_item_order(tmp_path) -> None:
    s = _screener(tmp_path)
    screen = {"positions": {"x": [1, 4, 6]}, "items": {"x": [1.0, 0.0, 1.0]}}
    rest_items = s.rest_items(screen["positions"])
    assert rest_items == {"x": [0, 2, 3, 5, 7]}
    rest = {"status": "ok", "scores": {"x": 0.4}, "items": {"x": [0.0, 1.0, 1.0, 0.0, 0.0]}, "timings": {"eval_s": 1}}
    full = s.with_screen(rest, screen, rest_items)
    assert full["items"] == {"x": [0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0]}
    assert full["scores"] == {"x": 4 / 8} and full["status"] == "ok" and full["timings"] == {"eval_s": 1}
    short = s.with_screen({**rest, "items": {"x": [0.0]}}, screen, rest_items)
    assert short["status"] == "failed" and "1 per-item values for the 5 unscreened items of x" in short["error"]


def test_an_irt_calibration_on_non_binary_item_values_is_a_one_line_config_error(tmp_path) -> None:
    from evomerge.records import EvaluationRecord, ReferenceRecord, Status

    raw = _cfg(fidelity={"screen_items": 3}, estimator="irt", irt={"calibration": 2})
    raw["objectives"][0]["limit"] = 8
    from evomerge.rundir import RunDir
    from evomerge.search.screening import Screener

    screener = Screener(parse_config(raw), RunDir(tmp_path))
    binary = {"x": [1.0, 0.0] * 4}
    records = [ReferenceRecord(label="uniform", recipe=None, status=Status.OK, items=binary),
               EvaluationRecord(id="e0", index=0, asked=1, recipe={}, status=Status.OK, items=binary),
               EvaluationRecord(id="e1", index=1, asked=2, recipe={}, status=Status.OK, items={"x": [0.5] * 8})]
    with pytest.raises(ConfigError) as err:
        screener.calibrate(records)
    assert "evaluation.estimator: irt models right/wrong answers" in str(err.value) and "\n" not in str(err.value)
    assert screener.irt is None and not (tmp_path / "irt.json").exists()
