"""evomerge.irt: 2PL calibration, anchor choice and the p-IRT accuracy estimate on synthetic data.

Synthetic populations mimic ours: abilities of closely related merges are clustered (sd 0.4
around 0.5 on the logit scale), discriminations log-normal, difficulties N(0, 1.5^2).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import spearmanr

from evomerge.irt import Estimate, IrtModel, estimate, fit_2pl, select_anchors


def _items(rng: np.random.Generator, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    return np.exp(rng.normal(0.0, 0.5, n_items)), rng.normal(0.0, 1.5, n_items)


def _draw(rng: np.random.Generator, a: np.ndarray, b: np.ndarray, theta: np.ndarray) -> np.ndarray:
    p = 1.0 / (1.0 + np.exp(-a * (theta[:, None] - b)))
    return (rng.random(p.shape) < p).astype(float)


def test_fit_recovers_the_order_of_abilities() -> None:
    rng = np.random.default_rng(7)
    a, b = _items(rng, 400)
    # 28 subjects 0.1 apart (about the standard error of an ability from 400 items) and the best
    # and the worst 0.5 beyond them, so that those two are identifiable exactly
    theta = np.concatenate([np.linspace(-1.35, 1.35, 28), [-1.85, 1.85]])
    rng.shuffle(theta)
    model = fit_2pl(_draw(rng, a, b, theta))
    rho = spearmanr(model.theta, theta)[0]
    assert rho >= 0.95, f"Spearman of fitted vs true abilities {rho:.3f} < 0.95"
    assert int(np.argmax(model.theta)) == int(np.argmax(theta))
    assert int(np.argmin(model.theta)) == int(np.argmin(theta))
    assert np.corrcoef(model.b, b)[0, 1] > 0.8


def _synthetic_scores(k: int, seeds: range, n_subjects: int = 30, n_items: int = 400, held_out: int = 80):
    """Per held-out subject: |IRT estimate - truth|, |random-subset mean - truth|, covered?"""
    irt_err, rand_err, covered = [], [], []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        a, b = _items(rng, n_items)
        model = fit_2pl(_draw(rng, a, b, rng.normal(0.5, 0.4, n_subjects)))
        anchors = select_anchors(model, k)
        new = _draw(rng, a, b, rng.normal(0.5, 0.4, held_out))
        truth = new.mean(axis=1)
        for row, true in zip(new, truth):
            est = estimate(model, anchors, row[anchors])
            irt_err.append(abs(est.accuracy - true))
            covered.append(est.low <= true <= est.high)
            rand_err.append(abs(row[rng.choice(n_items, k, replace=False)].mean() - true))
    return np.mean(irt_err), np.mean(rand_err), np.mean(covered)


@pytest.mark.parametrize("k", [16, 32])
def test_anchor_estimates_beat_a_random_subset_and_their_interval_covers(k: int) -> None:
    irt_mae, rand_mae, coverage = _synthetic_scores(k, range(3))
    msg = f"k={k}: MAE IRT anchors {irt_mae:.4f}, random subset {rand_mae:.4f}, 95% coverage {coverage:.3f}"
    assert irt_mae < 0.75 * rand_mae, msg
    assert coverage >= 0.90, msg


def test_a_candidate_far_better_than_the_calibration_subjects_is_still_covered() -> None:
    covered, errors = [], []
    for seed in range(2):
        rng = np.random.default_rng(50 + seed)
        a, b = _items(rng, 400)
        model = fit_2pl(_draw(rng, a, b, rng.normal(0.5, 0.4, 30)))
        anchors = select_anchors(model, 16)
        new = _draw(rng, a, b, np.full(60, 0.5 + 3 * 0.4))  # 3 population sds above the mean
        for row in new:
            est = estimate(model, anchors, row[anchors])
            covered.append(est.low <= row.mean() <= est.high)
            errors.append(est.accuracy - row.mean())
    msg = f"coverage {np.mean(covered):.3f}, bias {np.mean(errors):+.4f}"
    assert np.mean(covered) >= 0.88, msg


def test_tiny_calibration_set_still_estimates() -> None:
    irt_mae, rand_mae, coverage = _synthetic_scores(16, range(3), n_subjects=5, n_items=200)
    msg = f"R=5: MAE IRT anchors {irt_mae:.4f}, random subset {rand_mae:.4f}, 95% coverage {coverage:.3f}"
    assert irt_mae < rand_mae, msg
    assert coverage >= 0.85, msg


def test_deterministic_and_json_round_trip_is_exact() -> None:
    rng = np.random.default_rng(3)
    a, b = _items(rng, 150)
    y = _draw(rng, a, b, rng.normal(0.5, 0.4, 12))
    y[2, 5] = np.nan  # missing responses are allowed
    m1, m2 = fit_2pl(y), fit_2pl(y.copy())
    for name in ("a", "b", "cov", "theta", "theta_se"):
        assert np.array_equal(getattr(m1, name), getattr(m2, name)), name
    assert select_anchors(m1, 16) == select_anchors(m2, 16)
    text = m1.to_json()
    json.loads(text)
    back = IrtModel.from_json(text)
    for name in ("a", "b", "cov", "theta", "theta_se"):
        assert np.array_equal(getattr(back, name), getattr(m1, name)), name
    assert (back.prior_mean, back.prior_sd) == (m1.prior_mean, m1.prior_sd)
    assert back.to_json() == text
    anchors = select_anchors(back, 16)
    assert anchors == select_anchors(m1, 16) and anchors == sorted(set(anchors))
    e1, e2 = estimate(m1, anchors, y[0, anchors]), estimate(back, anchors, y[0, anchors])
    assert e1 == e2 and isinstance(e1, Estimate)
    assert 0.0 <= e1.low <= e1.accuracy <= e1.high <= 1.0


def test_degenerate_inputs_give_finite_parameters() -> None:
    rng = np.random.default_rng(5)
    a, b = _items(rng, 60)
    y = _draw(rng, a, b, np.array([0.2, 0.5, 0.8]))
    y[:, 0], y[:, 1] = 1.0, 0.0  # an item all got right, one all got wrong
    y[:, 2] = np.nan  # an item nobody answered
    model = fit_2pl(y)
    for name in ("a", "b", "cov", "theta", "theta_se"):
        assert np.all(np.isfinite(getattr(model, name))), name
    assert np.all(model.a > 0) and np.all(model.a < 20) and np.all(np.abs(model.b) < 50)
    assert model.b[0] < model.b[1]  # the all-correct item is the easier one
    est = estimate(model, [0, 1, 3], [1, 0, np.nan])
    assert all(np.isfinite([est.accuracy, est.low, est.high, est.theta, est.se]))
    everyone_right = fit_2pl(np.ones((4, 10)))
    assert np.all(np.isfinite(everyone_right.b)) and np.all(np.isfinite(everyone_right.theta))


@pytest.mark.parametrize(
    "bad",
    [np.zeros(10), np.zeros((1, 10)), np.zeros((5, 1)), np.full((3, 4), 2.0), [["x", 1], [0, 1]], np.zeros((2, 3, 4))],
)
def test_bad_shapes_and_values_are_one_line_value_errors(bad: object) -> None:
    with pytest.raises(ValueError) as err:
        fit_2pl(bad)  # type: ignore[arg-type]
    assert "\n" not in str(err.value)


def test_bad_anchor_arguments_are_one_line_value_errors() -> None:
    rng = np.random.default_rng(1)
    a, b = _items(rng, 20)
    model = fit_2pl(_draw(rng, a, b, rng.normal(0.5, 0.4, 6)))
    calls = [
        lambda: select_anchors(model, 0),
        lambda: select_anchors(model, 21),
        lambda: estimate(model, [0, 1], [1.0]),
        lambda: estimate(model, [0, 20], [1.0, 0.0]),
        lambda: estimate(model, [0, 0], [1.0, 0.0]),
        lambda: estimate(model, [0, 1], [1.0, 0.5]),
        lambda: estimate(model, [], []),
        lambda: IrtModel.from_json('{"format": "something else"}'),
    ]
    for call in calls:
        with pytest.raises(ValueError) as err:
            call()
        assert "\n" not in str(err.value)
