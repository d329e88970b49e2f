"""A run directory written by evomerge 0.1.0 before the #14 restructuring still reads, exports and resumes.

``tests/fixtures/run_v0_1`` was made by that code (``run_v0_1.expected.json`` says how),
with what the same code then printed, exported and appended on resume. Today's code
must give the same: the same status numbers, the same exported weights byte for byte,
and on ``resume --budget 16`` the same four new candidates with the same scores, asked
by an optimizer that replays the old log without a single divergence.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from evomerge.cli import main

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "run_v0_1"
EXPECTED = json.loads((ROOT / "tests" / "fixtures" / "run_v0_1.expected.json").read_text())


@pytest.fixture
def old_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(ROOT)  # the run's config names the shipped zoo by relative paths (models/demo/...)
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    return run


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_status_and_export_of_an_old_run_dir(old_run: Path, tmp_path: Path, capsys) -> None:
    assert main(["status", str(old_run)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "evaluations: 12 / 12 failed: 0 front: 4 hypervolume: 0.009277" in out
    knee = EXPECTED["export_knee"]
    assert main(["export", str(old_run), "--knee", "--out", str(tmp_path / "out")]) == 0
    assert f"exported {knee['id']}" in capsys.readouterr().out
    weights = (tmp_path / "out" / "model.safetensors").read_bytes()
    assert hashlib.sha256(weights).hexdigest() == knee["model_safetensors_sha256"]


@pytest.mark.slow
def test_an_old_run_dir_resumes_exactly_as_it_would_have(old_run: Path, ray_session) -> None:
    before = _lines(old_run / "evaluations.jsonl")
    assert main(["resume", str(old_run), "--budget", "16", "--no-progress"]) == 0
    after = _lines(old_run / "evaluations.jsonl")
    assert after[: len(before)] == before  # nothing logged was touched
    new = [json.loads(line) for line in after[len(before):]]
    got = []
    for rec in new:
        row = {k: rec.get(k) for k in ("kind", "id", "index", "asked", "scores", "status", "losses", "cached_from")}
        if rec["kind"] == "evaluation":
            row["recipe_sha"] = hashlib.sha256(json.dumps(rec["recipe"], sort_keys=True).encode()).hexdigest()[:16]
        got.append(row)
    assert got == EXPECTED["resume_budget_16_records"]
    log = (old_run / "driver.log").read_text()
    assert "differed from this optimizer's" not in log  # the replay followed the old log ask for ask
    counters = json.loads((old_run / "state" / "counters.json").read_text())
    assert (counters["status"], counters["evaluations"]) == ("done", 16)
