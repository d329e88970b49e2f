"""Two ``evomerge search`` drivers on one run dir at once, then a log cut short on the finished run.

Two real processes (``python -m evomerge.cli search CONFIG``) are started together on the
same run dir: the run dir's lock lets exactly one through (exit 0, the whole budget, each
evaluation id once); the other exits 2 with one line naming the winner's pid, before it
writes anything or starts Ray.

On that finished run, ``evaluations.jsonl`` is then cut at a record boundary (seeded)
strictly before the count of the last checkpoint: ``status`` and ``resume`` both refuse it
with one line about the truncation, and no file of the run dir (``front/`` included) is
removed or changed.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import evomerge.search.ray_cluster as ray_cluster
from evomerge.cli import main
from search_fixtures import records, search_config, write_config

REPO = Path(__file__).resolve().parents[1]
BUDGET = 8
SEED = 20261130


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p))
    return env


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under ``run_dir``."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tiny_models: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two drivers started together on one run dir; their exit codes, pids and stderr, and the run dir."""
    tmp = tmp_path_factory.mktemp("two_drivers")
    run_dir = tmp / "run"
    cfg = search_config(tiny_models, tmp, run_dir=run_dir, evaluations=BUDGET, actors=1,
                        output={"checkpoint_every": 3, "save_front_weights": True},
                        evaluation={"rescore_heldout": False})
    path = write_config(cfg, tmp / "cfg.yaml")
    argv = [sys.executable, "-m", "evomerge.cli", "search", str(path), "--no-progress"]
    procs, errs = [], []
    for i in range(2):
        err = open(tmp / f"stderr{i}.txt", "w")  # files, not pipes: the winner logs a lot
        errs.append(err)
        procs.append(subprocess.Popen(argv, cwd=tmp, env=_env(), stdout=subprocess.DEVNULL, stderr=err))
    t0 = time.monotonic()
    try:
        rcs = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for err in errs:
            err.close()
    return {"run_dir": run_dir, "rcs": rcs, "pids": [p.pid for p in procs], "seconds": time.monotonic() - t0,
            "stderr": [(tmp / f"stderr{i}.txt").read_text() for i in range(2)]}


@pytest.mark.slow
def test_one_of_two_simultaneous_drivers_wins(finished_run: dict[str, Any]) -> None:
    rcs, pids, stderr = finished_run["rcs"], finished_run["pids"], finished_run["stderr"]
    assert sorted(rcs) == [0, 2], (rcs, stderr)
    winner, loser = (0, 1) if rcs[0] == 0 else (1, 0)
    err = stderr[loser]
    assert err.count("\n") == 1, err
    assert err.startswith("evomerge search: error: ") and f"is in use by evomerge pid {pids[winner]} " in err, err
    run_dir = finished_run["run_dir"]
    evals = records(run_dir)
    ids = [r["id"] for r in evals]
    assert len(ids) == len(set(ids)), ids
    assert len(evals) == BUDGET


@pytest.mark.slow
def test_a_log_cut_before_the_last_checkpoint_is_refused_and_nothing_changes(
        finished_run: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert sorted(finished_run["rcs"]) == [0, 2], finished_run["stderr"]
    run_dir = finished_run["run_dir"]

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("Ray was started for a truncated log")

    monkeypatch.setattr(ray_cluster, "init_ray", fail)
    log_path = run_dir / "evaluations.jsonl"
    counted = json.loads((run_dir / "state" / "counters.json").read_text())["log_records"]
    lines = log_path.read_bytes().splitlines(keepends=True)
    assert 1 < counted <= len(lines)
    keep = random.Random(SEED).randrange(1, counted)  # a record boundary strictly before the checkpoint's count
    log_path.write_bytes(b"".join(lines[:keep]))
    before = _snapshot(run_dir)
    front_before = {k: v for k, v in before.items() if k.startswith("front/")}
    assert front_before, "save_front_weights should have written the front's weights"

    for command in ("status", "resume"):
        assert main([command, str(run_dir)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert err.startswith(f"evomerge {command}: error: {log_path} holds {keep} records but "), err
        assert f"counted {counted} (record {keep + 1} onwards is missing)" in err, err
        assert "the log was truncated or replaced" in err, err

    after = _snapshot(run_dir)
    assert {k: v for k, v in after.items() if k.startswith("front/")} == front_before
    assert after == before
