"""RunDir: atomic writes, the append-only log and its torn-line recovery, config freezing, front dirs."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import yaml

from evomerge.pareto import ParetoArchive
from evomerge.config import parse_config
from evomerge.errors import RunDirError
from evomerge.fileio import append_jsonl, atomic_write
from evomerge.rundir import RunDir

RAW = {
    "name": "t",
    "models": {"base": "m/base", "sources": ["m/a", "m/b"]},
    "objectives": [{"name": "add", "task": "demo_add", "metric": "exact_match"},
                   {"name": "ppl", "evaluator": "perplexity", "files": ["x.txt"], "direction": "minimize"}],
    "budget": {"evaluations": 10},
}


def _cfg(**over: object) -> object:
    return parse_config(RAW, [f"{k}={v}" for k, v in over.items()])


def _listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "f.json"
    atomic_write(target, "one")
    atomic_write(target, b"two")
    assert target.read_text() == "two"
    assert _listing(tmp_path) == ["sub", "sub/f.json"]


def test_atomic_write_failure_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "f.txt"
    atomic_write(target, "old")

    def boom(*a: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write(target, "new")
    assert target.read_text() == "old"
    assert _listing(tmp_path) == ["f.txt"]


def test_append_and_torn_line_recovery(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    recs = [{"kind": "evaluation", "id": f"e{i:06d}", "index": i, "scores": {"add": i / 10}} for i in range(3)]
    for r in recs[:2]:
        append_jsonl(rd.evaluations_path, r)
    good_size = rd.evaluations_path.stat().st_size
    with open(rd.evaluations_path, "ab") as f:  # a crash in the middle of the third write
        f.write(json.dumps(recs[2]).encode()[:17])
    assert rd.read_records() == recs[:2]
    assert rd.truncate_torn_tail() == 17
    assert rd.evaluations_path.stat().st_size == good_size
    # appending after a crash truncates the torn tail itself
    with open(rd.evaluations_path, "ab") as f:
        f.write(b'{"kind": "evalu')
    append_jsonl(rd.evaluations_path, recs[2])
    assert rd.read_records() == recs
    assert rd.read_records(kind="heldout") == []
    assert rd.evaluations_path.read_bytes().count(b"\n") == 3


def test_complete_last_record_without_newline_is_kept(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    append_jsonl(rd.evaluations_path, {"kind": "evaluation", "id": "a"})
    with open(rd.evaluations_path, "ab") as f:
        f.write(b'{"kind": "heldout", "id": "a"}')
    assert [r["kind"] for r in rd.read_records()] == ["evaluation", "heldout"]
    append_jsonl(rd.evaluations_path, {"kind": "evaluation", "id": "b"})
    assert [r["id"] for r in rd.read_records()] == ["a", "a", "b"]


def test_corrupt_middle_line_is_an_error(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    rd.evaluations_path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(RunDirError, match="line 2 is corrupt"):
        rd.read_records()


def test_create_freezes_config_and_refuses_a_different_search(tmp_path: Path) -> None:
    path = tmp_path / "run"
    cfg = _cfg()
    assert RunDir(path).create(cfg) is True
    frozen = yaml.safe_load((path / "config.yaml").read_text())
    assert frozen == cfg.model_dump(mode="json")
    assert RunDir(path).load_config() == cfg
    # same search (only run_dir differs): accepted, nothing rewritten
    assert RunDir(path).create(_cfg(**{"output.run_dir": "elsewhere"})) is False
    append_jsonl(RunDir(path).evaluations_path, {"kind": "evaluation", "id": "e0"})
    with pytest.raises(RunDirError) as err:
        RunDir(path).create(_cfg(**{"budget.evaluations": 20}))
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "--overwrite" in msg and "budget.evaluations" in msg
    (path / "notes.txt").write_text("mine")
    assert RunDir(path).create(_cfg(**{"budget.evaluations": 20}), overwrite=True) is True
    assert RunDir(path).load_config().budget.evaluations == 20
    assert _listing(path) == ["config.yaml", "notes.txt"]  # the old log is gone, the user's file stays


def test_create_refuses_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "thesis.tex").write_text("x")
    with pytest.raises(RunDirError, match="not a run directory"):
        RunDir(tmp_path).create(_cfg())
    assert RunDir(tmp_path / "missing").create(_cfg()) is True


def _record(i: int, scores: dict[str, float]) -> dict:
    recipe = {"base": "m/base", "sources": ["m/a", "m/b"], "groups": {"default": {"method": "linear"}}, "seed": i}
    return {"kind": "evaluation", "id": f"e{i:06d}", "index": i, "recipe": recipe, "scores": scores, "status": "ok"}


def _write_front(rd: RunDir, arch: ParetoArchive, records: list[dict]) -> None:
    """``RunDir.write_front`` fed from log-shaped records, as the search feeds it from its typed ones."""
    recipes = {r["id"]: r.get("recipe") for r in records if r.get("kind") == "evaluation"}
    heldout = {r["id"]: r["scores"] for r in records if r.get("kind") == "heldout"}
    rd.write_front(arch, recipes, heldout, evaluations=len(recipes))


def test_write_front_maintains_member_dirs(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    arch = ParetoArchive({"add": "maximize", "ppl": "minimize"})
    records = [_record(0, {"add": 0.2, "ppl": 5.0}), _record(1, {"add": 0.5, "ppl": 9.0})]
    for r in records:
        arch.add(r["id"], r["scores"])
    records.append({"kind": "heldout", "id": "e000001", "scores": {"add": 0.4, "ppl": 9.5}})
    _write_front(rd, arch, records)
    front = json.loads(rd.front_json_path.read_text())
    assert front["members"] == ["e000000", "e000001"] and front["evaluations"] == 2
    assert front["objectives"] == [{"name": "add", "direction": "maximize"}, {"name": "ppl", "direction": "minimize"}]
    assert front["hypervolume"] == pytest.approx(arch.hypervolume())
    assert json.loads((rd.member_dir("e000001") / "recipe.json").read_text())["seed"] == 1
    assert json.loads((rd.member_dir("e000001") / "scores.json").read_text()) == {
        "selection": {"add": 0.5, "ppl": 9.0}, "heldout": {"add": 0.4, "ppl": 9.5}}
    assert json.loads((rd.member_dir("e000000") / "scores.json").read_text())["heldout"] is None
    rd.weights_dir("e000000").mkdir()
    (rd.weights_dir("e000000") / "model.safetensors").write_bytes(b"w")
    recipe0 = (rd.member_dir("e000000") / "recipe.json").read_bytes()
    scores0 = (rd.member_dir("e000000") / "scores.json").read_bytes()
    # a new candidate dominates e000000: only its weights go; its recipe and scores stay, byte for byte
    new = _record(2, {"add": 0.3, "ppl": 4.0})
    assert arch.add(new["id"], new["scores"])
    _write_front(rd, arch, records + [new])
    assert sorted(p.name for p in rd.front_dir.iterdir()) == ["e000000", "e000001", "e000002"]
    assert json.loads(rd.front_json_path.read_text())["members"] == ["e000001", "e000002"]
    assert sorted(p.name for p in rd.member_dir("e000000").iterdir()) == ["recipe.json", "scores.json"]
    assert (rd.member_dir("e000000") / "recipe.json").read_bytes() == recipe0
    assert (rd.member_dir("e000000") / "scores.json").read_bytes() == scores0
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]  # no temp files left


def test_counters_roundtrip_and_old_state(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    assert rd.load_counters() == {}
    rd.save_counters({"asked": 12, "told": 10})
    assert rd.load_counters() == {"asked": 12, "told": 10}
    assert sorted(p.name for p in rd.state_dir.iterdir()) == ["counters.json"]  # no optimizer dump any more
    # a run dir of an older version: the optimizer dump and its hash are ignored, the counters read
    (rd.state_dir / "optimizer.pkl").write_bytes(b"old")
    (rd.state_dir / "counters.json").write_text(json.dumps({"asked": 3, "optimizer_sha256": "ab"}))
    assert rd.load_counters() == {"asked": 3}
    (rd.state_dir / "counters.json").write_text("{not json")
    assert rd.load_counters() == {}


def test_log_handler_writes_driver_log(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    logger = logging.getLogger("evomerge.test_rundir")
    logger.setLevel(logging.INFO)
    handler = rd.log_handler()
    logger.addHandler(handler)
    try:
        logger.info("hello %d", 7)
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert "hello 7" in rd.log_path.read_text()


def test_a_member_that_leaves_the_front_keeps_its_recipe_and_scores(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    arch = ParetoArchive({"add": "maximize", "ppl": "minimize"})
    records = [_record(0, {"add": 0.2, "ppl": 5.0})]
    arch.add("e000000", records[0]["scores"])
    records.append({"kind": "heldout", "id": "e000000", "scores": {"add": 0.1, "ppl": 5.5}})
    _write_front(rd, arch, records)
    kept = {name: (rd.member_dir("e000000") / name).read_bytes() for name in ("recipe.json", "scores.json")}
    assert json.loads(kept["scores.json"]) == {"selection": {"add": 0.2, "ppl": 5.0}, "heldout": {"add": 0.1, "ppl": 5.5}}
    # e000001 dominates e000000, then e000002 dominates e000001: two leavers, three checkpoints
    for i, scores in ((1, {"add": 0.3, "ppl": 4.0}), (2, {"add": 0.4, "ppl": 3.0})):
        rec = _record(i, scores)
        assert arch.add(rec["id"], scores)
        records.append(rec)
        _write_front(rd, arch, records)
    assert json.loads(rd.front_json_path.read_text())["members"] == ["e000002"]
    for name, data in kept.items():
        assert (rd.member_dir("e000000") / name).read_bytes() == data
    assert json.loads((rd.member_dir("e000001") / "recipe.json").read_text())["seed"] == 1
    assert json.loads((rd.member_dir("e000001") / "scores.json").read_text()) == {
        "selection": {"add": 0.3, "ppl": 4.0}, "heldout": None}
    assert sorted(p.name for p in rd.front_dir.iterdir()) == ["e000000", "e000001", "e000002"]
