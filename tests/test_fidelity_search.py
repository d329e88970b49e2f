"""Screening searches end to end on the demo zoo: promotion, estimates, the front, status, export, IRT anchors.

One Ray session for the module; each search is a real ``Search`` with one actor, so the order of
screens, promotions and full evaluations is deterministic.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from search_fixtures import records

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_address():
    import ray

    ctx = ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024**2, log_to_driver=False)
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


def _config(run_dir: Path, budget: int, **evaluation) -> dict:
    return {
        "name": "fid", "models": {"base": str(DEMO / "base"), "sources": [str(DEMO / "sort"), str(DEMO / "upper")]},
        "merge": {"methods": ["ties"]}, "space": {"name": "layerwise", "layer_group_size": 2},
        "objectives": [{"name": s, "evaluator": "lm_eval", "task": f"demo_{s}", "metric": "exact_match",
                        "limit": 32, "heldout_limit": 32} for s in ("sort", "upper")],
        "evaluation": {"fidelity": {"screen_items": 8, "min_probability": 0.6}, **evaluation},
        "optimizer": {"name": "DE", "seed": 3}, "budget": {"evaluations": budget},
        "ray": {"actors": 1, "num_cpus_per_actor": 0.5}, "output": {"run_dir": str(run_dir), "checkpoint_every": 5},
    }


def _evomerge(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "evomerge.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _search(tmp_path: Path, name: str, budget: int, address: str, **evaluation) -> Path:
    import yaml

    run = tmp_path / name
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(_config(run, budget, **evaluation)))
    _evomerge("search", str(cfg), "--address", address, "--no-progress")
    return run


@pytest.fixture(scope="module")
def subset_run(ray_address, tmp_path_factory):
    return _search(tmp_path_factory.mktemp("fid"), "subset", 16, ray_address, record_items=True)


def test_promotion_follows_the_entry_probability_and_only_measurements_reach_the_front(subset_run):
    evals = records(subset_run)
    screens = {r["id"]: r["screen"] for r in records(subset_run, "screen")}
    assert len(evals) == 16 and all(r["screen"] for r in evals)
    promoted = [r for r in evals if r["fidelity"] == "full"]
    estimated = [r for r in evals if r["fidelity"] == "screen"]
    assert promoted and estimated, "the test needs both outcomes"
    for r in evals:
        s = r["screen"]
        assert s["promoted"] == (s["entry_probability"] >= 0.6) == (r["fidelity"] == "full")
        assert s["n_items"] == 16 and all(len(v) == 8 for v in s["positions"].values())
    for r in estimated:  # told its estimate: the screen's mean; not logged as a screen record (never promoted)
        assert r["scores"] == r["screen"]["scores"] and r["id"] not in screens
        assert r["losses"] == [-r["scores"]["sort"], -r["scores"]["upper"]]
    for r in promoted:  # promoted: the screen was logged first, then the full measurement
        assert screens[r["id"]]["entry_probability"] == r["screen"]["entry_probability"]
        assert len(r["items"]["sort"]) == 32  # every selection item measured (record_items)
        assert r["screen"]["reuse"] is True  # exact_match aggregates by mean: the screen's items are reused
        assert all(r["scores"][k] == sum(v) / len(v) for k, v in r["items"].items())
    front = json.loads((subset_run / "front.json").read_text())["members"]
    assert front and set(front) <= {r["id"] for r in promoted}
    assert "failed:" not in (subset_run / "driver.log").read_text()  # an estimate is not a failure
    assert {r["id"] for r in records(subset_run, "heldout")} == set(front)


def test_a_screen_scores_exactly_its_items_of_the_full_evaluation(subset_run):
    """The screen's per-item values are the full evaluation's values at the screened positions."""
    for r in records(subset_run):
        if r["fidelity"] != "full":
            continue
        for name, positions in r["screen"]["positions"].items():
            assert r["screen"]["items"][name] == [r["items"][name][p] for p in positions]


def test_a_promoted_candidate_is_charged_its_full_set_once(subset_run):
    """Reusing the screen, a promoted candidate costs its 64 selection items, not 16 + 64: status counts it so."""
    from evomerge.report import fidelity_summary
    from evomerge.runview import load_run

    view = load_run(subset_run)
    evals = records(subset_run)
    promoted = sum(r["fidelity"] == "full" for r in evals)
    summary = fidelity_summary(view)
    assert summary["items_per_candidate"] == pytest.approx((64 * promoted + 16 * (len(evals) - promoted)) / len(evals))


def test_the_same_positions_screen_every_candidate_and_they_are_not_a_prefix(subset_run):
    positions = [r["screen"]["positions"] for r in records(subset_run)]
    assert all(p == positions[0] for p in positions)
    assert positions[0]["sort"] != list(range(8))  # a seeded random subset, not the first items


def test_status_and_export_tell_estimates_from_measurements(subset_run, tmp_path):
    out = _evomerge("status", str(subset_run)).stdout
    assert "screened (subset): 16" in out and "estimates only" in out
    estimated = next(r["id"] for r in records(subset_run) if r["fidelity"] == "screen")
    proc = _evomerge("export", str(subset_run), "--id", estimated, "--out", str(tmp_path / "x"), check=False)
    assert proc.returncode == 2 and "estimates from a 16-item screen" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_irt_anchors_are_fitted_once_and_persist_across_resume(ray_address, tmp_path):
    run = _search(tmp_path, "irt", 10, ray_address, estimator="irt", irt={"calibration": 6})
    fit = (run / "irt.json").read_bytes()
    data = json.loads(fit)
    assert data["calibrated_on"][:4] == ["uniform", f"source:{DEMO / 'sort'}", f"source:{DEMO / 'upper'}", "base"]
    assert len(data["calibrated_on"]) == 4 + 6
    anchors = {k: v["anchors"] for k, v in data["objectives"].items()}
    assert all(len(a) == 8 for a in anchors.values())
    evals = records(run)
    assert all(r["fidelity"] == "full" and not r.get("screen") for r in evals[:6])  # calibration: measured
    screened = [r for r in evals if r.get("screen")]
    assert screened and all(r["screen"]["estimator"] == "irt" and r["screen"]["positions"] == anchors
                            for r in screened)
    _evomerge("resume", str(run), "--budget", "14", "--address", ray_address, "--no-progress")
    assert (run / "irt.json").read_bytes() == fit  # not refitted: the same anchors and parameters
    later = records(run)[10:]
    assert len(later) == 4 and all(r["screen"]["positions"] == anchors for r in later)


@pytest.mark.timeout(560)
def test_lm_eval_cli_with_the_screens_doc_ids_reproduces_the_screen_score(subset_run, tmp_path):
    """The screen is recorded as lm-eval's own doc ids, so `lm_eval --samples` on the export scores it again."""
    member = next(r for r in records(subset_run) if r["fidelity"] == "full")
    folder = tmp_path / "member"
    _evomerge("export", str(subset_run), "--id", member["id"], "--out", str(folder))
    doc_ids = member["screen"]["doc_ids"]
    samples = {f"demo_{name}": ids for name, ids in doc_ids.items()}
    assert all(len(ids) == 8 for ids in samples.values())
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={folder},dtype=float32",
           "--tasks", ",".join(samples), "--include_path", str(ROOT / "evaluators" / "tasks"), "--device", "cpu",
           "--batch_size", "16", "--samples", json.dumps(samples), "--output_path", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli = json.loads(sorted(out.rglob("results_*.json"))[-1].read_text())["results"]
    for name in doc_ids:
        assert cli[f"demo_{name}"]["exact_match,none"] == pytest.approx(member["screen"]["scores"][name], abs=1e-12)
    # the full score, measured as the screen's items plus the unscreened rest, is lm-eval's on every selection item
    from evaluators.lm_eval_evaluator import sample_ids

    selection = {f"demo_{name}": sample_ids(256, 32, 0, f"demo_{name}") for name in doc_ids}
    assert all(set(samples[t]) < set(ids) for t, ids in selection.items())
    out_full = tmp_path / "out_full"
    cmd[cmd.index("--samples") + 1] = json.dumps(selection)
    cmd[cmd.index("--output_path") + 1] = str(out_full)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli = json.loads(sorted(out_full.rglob("results_*.json"))[-1].read_text())["results"]
    for name in doc_ids:
        assert cli[f"demo_{name}"]["exact_match,none"] == member["scores"][name]
