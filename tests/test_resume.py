"""Lossless resume: SIGKILL `evomerge search` mid-search, `evomerge resume`, compare.

One Ray cluster for the module (started here); the drivers are real `evomerge`
subprocesses connected to it with ``--address``. Run A goes uninterrupted; run B (same
config, one actor, same seed) is killed with SIGKILL after a few evaluations, with a
candidate in flight, then resumed. Lossless means: every record B had logged is still
there, unchanged and first; no evaluation appears twice; the budget is met exactly; and
B evaluated the very same recipes in the very same order as A, with the same scores.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from search_fixtures import canon, records, search_config, write_config

BUDGET = 12
KILL_AFTER = 5


@pytest.fixture(scope="module")
def ray_address():
    import ray

    ctx = ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024**2, log_to_driver=False)
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    # every evaluation takes >= 0.3 s, so the kill reliably lands mid-search
    env["EVOMERGE_TEST_FAULTS"] = json.dumps({"sleep": {f"e{i:06d}": 0.3 for i in range(BUDGET)}})
    return env


def _evomerge(*args: str) -> list[str]:
    return [sys.executable, "-m", "evomerge.cli", *args, "--no-progress"]


@pytest.mark.slow
def test_sigkill_then_resume_is_lossless(ray_address, tiny_models, tmp_path):
    cfg_a = search_config(tiny_models, tmp_path, run_dir=tmp_path / "a", evaluations=BUDGET, actors=1, seed=5,
                          output={"checkpoint_every": 3})
    _sigkill_resume_is_lossless(ray_address, cfg_a, tmp_path)


@pytest.mark.slow
def test_sigkill_then_resume_is_lossless_in_the_dataflow_space(ray_address, tiny_models, tmp_path):
    """The same guarantee for layer paths: path recipes replay, and references are each source's own path."""
    cfg_a = search_config(tiny_models, tmp_path, run_dir=tmp_path / "a", evaluations=BUDGET, actors=1, seed=5,
                          output={"checkpoint_every": 3})
    cfg_a["models"] = {"sources": tiny_models.source_refs[:2]}
    cfg_a["space"] = {"name": "dataflow", "repeats": 2, "max_path_length": 6}
    del cfg_a["merge"]
    _sigkill_resume_is_lossless(ray_address, cfg_a, tmp_path)
    logged = records(tmp_path / "b")
    assert all(r["recipe"]["kind"] == "dataflow" for r in logged)
    assert len({canon(r["recipe"]) for r in logged}) > 3  # the search moved off model A's own path
    refs = records(tmp_path / "b", "reference")
    assert sorted(r["label"] for r in refs) == sorted(f"source:{s}" for s in tiny_models.source_refs[:2])


def _promoted_in_flight(run_dir) -> bool:
    """A screen promoted a candidate whose full evaluation has not finished."""
    screened = {r["id"] for r in records(run_dir, "screen")}
    return bool(screened - {r["id"] for r in records(run_dir)})


@pytest.mark.slow
def test_sigkill_with_a_promotion_in_flight_then_resume_is_lossless(ray_address, tmp_path):
    """evaluation.fidelity: killed after a screen promoted a candidate and before its full evaluation
    finished; the resume measures that candidate at once (no second screen), and the run equals an
    uninterrupted one, estimates, promotions and all."""
    root = Path(__file__).resolve().parents[1] / "models" / "demo"
    cfg_a = {
        "name": "fid", "models": {"base": str(root / "base"), "sources": [str(root / "sort"), str(root / "upper")]},
        "merge": {"methods": ["ties"]}, "space": {"name": "layerwise", "layer_group_size": 2},
        "objectives": [{"name": s, "evaluator": "lm_eval", "task": f"demo_{s}", "metric": "exact_match",
                        "limit": 24, "heldout_limit": 24} for s in ("sort", "upper")],
        "evaluation": {"fidelity": {"screen_items": 6, "min_probability": 0.6}},
        "optimizer": {"name": "DE", "seed": 5}, "budget": {"evaluations": BUDGET},
        "ray": {"actors": 1, "num_cpus_per_actor": 0.5},
        "output": {"run_dir": str(tmp_path / "a"), "checkpoint_every": 3},
    }
    _sigkill_resume_is_lossless(ray_address, cfg_a, tmp_path, kill_when=_promoted_in_flight)
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    screens_b = [r["id"] for r in records(run_b, "screen")]
    assert len(screens_b) == len(set(screens_b))  # the in-flight promotion was not screened again
    assert screens_b == [r["id"] for r in records(run_a, "screen")]
    after, uninterrupted = records(run_b), records(run_a)
    def decision(r):  # what the screen saw and decided (its timings differ from run to run)
        return r.get("fidelity"), {k: v for k, v in (r.get("screen") or {}).items() if k != "timings"}

    assert [decision(r) for r in after] == [decision(r) for r in uninterrupted]
    kinds = {r["fidelity"] for r in after}
    assert kinds == {"full", "screen"}, kinds  # some promoted, some told their estimate only
    front = json.loads((run_b / "front.json").read_text())["members"]
    assert all(next(r for r in after if r["id"] == i)["fidelity"] == "full" for i in front)


def _sigkill_resume_is_lossless(ray_address, cfg_a, tmp_path, kill_when=None):
    cfg_b = {**cfg_a, "output": {**cfg_a["output"], "run_dir": str(tmp_path / "b")}}
    path_a, path_b = write_config(cfg_a, tmp_path / "a.yaml"), write_config(cfg_b, tmp_path / "b.yaml")
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    env = _env()
    logs = {k: open(tmp_path / f"{k}.log", "w") for k in ("a", "b", "resume")}

    proc_a = subprocess.Popen(_evomerge("search", str(path_a), "--address", ray_address), env=env,
                              stdout=logs["a"], stderr=subprocess.STDOUT)
    proc_b = subprocess.Popen(_evomerge("search", str(path_b), "--address", ray_address), env=env,
                              stdout=logs["b"], stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    while not (kill_when(run_b) if kill_when else len(records(run_b)) >= KILL_AFTER):
        assert proc_b.poll() is None, (tmp_path / "b.log").read_text()[-2000:]
        assert time.monotonic() < deadline, "search B never got going"
        time.sleep(0.05)
    os.killpg(proc_b.pid, signal.SIGKILL)
    proc_b.wait(30)
    before = records(run_b)
    assert (kill_when(run_b) if kill_when else KILL_AFTER <= len(before)) and len(before) < BUDGET  # mid-search

    rc = subprocess.run(_evomerge("resume", str(run_b), "--address", ray_address), env=env,
                        stdout=logs["resume"], stderr=subprocess.STDOUT, timeout=300).returncode
    assert rc == 0, (tmp_path / "resume.log").read_text()[-3000:]
    assert proc_a.wait(300) == 0, (tmp_path / "a.log").read_text()[-3000:]

    after, uninterrupted = records(run_b), records(run_a)
    # nothing finished is lost or changed: the log before the kill is a prefix of the log after
    assert after[: len(before)] == before
    # budget met exactly, nothing evaluated twice, every ask index once
    assert len(after) == BUDGET
    assert len({r["id"] for r in after}) == BUDGET
    assert sorted(r["index"] for r in after) == list(range(BUDGET))
    # the same recipes in the same order as the uninterrupted run, with the same scores
    assert [canon(r["recipe"]) for r in after] == [canon(r["recipe"]) for r in uninterrupted]
    for x, y in zip(after, uninterrupted):
        assert x["id"] == y["id"] and x["losses"] == pytest.approx(y["losses"], rel=1e-9)
        assert all(math.isclose(x["scores"][k], y["scores"][k], rel_tol=1e-9) for k in y["scores"])
    # the resumed run ends like the uninterrupted one
    front_a = json.loads((run_a / "front.json").read_text())["members"]
    front_b = json.loads((run_b / "front.json").read_text())["members"]
    assert front_b == front_a
    assert {r["id"] for r in records(run_b, "heldout")} == set(front_a)
    assert len(records(run_b, "reference")) == len(records(run_a, "reference"))  # not scored twice
    counters = json.loads((run_b / "state" / "counters.json").read_text())
    assert counters["status"] == "done" and counters["evaluations"] == BUDGET
    assert "resuming" in (run_b / "driver.log").read_text()
    for fh in logs.values():
        fh.close()

    # resuming a finished run, or searching it again, evaluates nothing (and needs no Ray)
    final = (run_b / "evaluations.jsonl").read_bytes()
    for cmd in (_evomerge("resume", str(run_b)), _evomerge("search", str(path_b))):
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "complete" in out.stdout
    assert (run_b / "evaluations.jsonl").read_bytes() == final
