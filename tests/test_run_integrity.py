"""Run-dir integrity: malformed log records, truncated or edited logs, the frozen identity.

Everything here runs without Ray: each refusal must come before Ray starts and leave the
run dir byte for byte as it was.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evomerge.errors import RunDirError
from evomerge.fileio import append_jsonl
from evomerge.records import validate_record
from evomerge.rundir import RunDir
from search_fixtures import search_config

LOG = "evaluations.jsonl"


def eval_record(i: int, status: str = "ok") -> dict:
    """An evaluation record as the search writes it (``records.EvaluationRecord.to_json``)."""
    ok = status == "ok"
    return {"kind": "evaluation", "id": f"e{i:06d}", "index": i, "asked": i + 1,
            "recipe": {"base": "b", "sources": ["a"], "seed": i}, "value": [0.1 * i], "key": f"k{i}",
            "scores": {"left": 10.0 + i, "right": 20.0 - i} if ok else {}, "losses": [10.0 + i, 20.0 - i],
            "status": status, "error": None if ok else "boom", "timings": {"merge_s": 0.1, "eval_s": 0.2},
            "actor": 0, "attempts": 1, "cached_from": None, "num_workers": 1, "asked_at": 1.0, "finished_at": 2.0}


def write_log(run: Path, recs: list[dict]) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / LOG).write_text("".join(json.dumps(r) + "\n" for r in recs))


def old_log() -> list[dict]:
    return [{"kind": "reference", "label": "uniform", "recipe": None, "scores": {"left": 1.0}, "status": "ok"},
            eval_record(0), eval_record(1, "failed"), eval_record(2),
            {"kind": "heldout", "id": "e000002", "scores": {"left": 1.0}, "status": "ok"},
            {"kind": "heldout", "id": "e000001", "scores": {}, "status": "failed", "error": "x"}]


# -- item 2: records validated on read -----------------------------------------------------
@pytest.mark.parametrize("kind, field", [
    ("evaluation", "id"), ("evaluation", "index"), ("evaluation", "status"), ("evaluation", "recipe"),
    ("evaluation", "asked"), ("evaluation", "losses"), ("heldout", "id"), ("reference", "label"),
])
def test_a_record_missing_a_required_field_names_its_line(tmp_path: Path, kind: str, field: str) -> None:
    recs = old_log()
    bad = next(r for r in recs if r["kind"] == kind)
    del bad[field]
    write_log(tmp_path, recs + [eval_record(3)])
    line = recs.index(bad) + 1
    with pytest.raises(RunDirError) as err:
        RunDir(tmp_path).validated_records()
    assert str(err.value) == (f"{tmp_path / LOG} line {line}: {kind} record lacks {field!r}; "
                              f"restore the log from a backup or delete that line")


@pytest.mark.parametrize("field, value, shown", [
    ("index", "7", "str \"7\", not an integer"),
    ("index", True, "bool true, not an integer"),
    ("index", 7.0, "float 7.0, not an integer"),
    ("id", 17, "int 17, not a string"),
    ("status", None, 'NoneType null, not "ok" or "failed"'),
    ("status", "done", 'str "done", not "ok" or "failed"'),
    ("recipe", [1, 2], "list [1, 2], not an object or null"),
    ("losses", [1.0, "x"], "list [1.0, \"x\"], not a list of numbers"),
])
def test_a_record_with_a_wrong_type_names_its_line_and_field(tmp_path: Path, field, value, shown) -> None:
    recs = old_log()
    recs[3][field] = value  # e000002, line 4
    write_log(tmp_path, recs)
    with pytest.raises(RunDirError) as err:
        RunDir(tmp_path).validated_records()
    assert str(err.value) == (f"{tmp_path / LOG} line 4: evaluation record's {field!r} is {shown}; "
                              f"restore the log from a backup or delete that line")


def test_an_ok_record_without_scores_is_refused(tmp_path: Path) -> None:
    recs = old_log()
    del recs[4]["scores"]  # heldout of e000002, status ok
    write_log(tmp_path, recs)
    with pytest.raises(RunDirError, match=r"line 5: heldout record with status ok lacks 'scores'; restore"):
        RunDir(tmp_path).validated_records()


def test_a_valid_old_log_passes_and_a_torn_last_line_stays_a_warning(tmp_path: Path, caplog) -> None:
    recs = old_log()
    write_log(tmp_path, recs)
    assert RunDir(tmp_path).validated_records() == recs
    with open(tmp_path / LOG, "ab") as f:
        f.write(b'{"kind": "evaluation", "id": "e00')  # torn: no error, a warning, the file untouched
    size = (tmp_path / LOG).stat().st_size
    assert RunDir(tmp_path).validated_records() == recs
    assert "torn last line" in caplog.text
    assert (tmp_path / LOG).stat().st_size == size
    validate_record({"kind": "something_new", "x": 1}, 1, "p")  # unknown kinds are not ours to judge
    validate_record({"id": "no kind"}, 1, "p")


# -- a run dir the commands accept, without Ray ---------------------------------------------
T_CHECKPOINT = 1_790_000_000.0  # 2026-09-21 14:13:20 UTC


def make_run(tiny_models, tmp_path: Path, recs: list[dict] | None = None, *, mark: bool = True) -> Path:
    """A run dir as `evomerge search` leaves it after a checkpoint: config, log, state/counters.json."""
    from evomerge.config import parse_config

    run = tmp_path / "run"
    cfg = search_config(tiny_models, tmp_path, run_dir=run, evaluations=10)
    RunDir(run).create(parse_config(cfg))
    rd = RunDir(run)
    for r in recs if recs is not None else old_log():
        append_jsonl(rd.evaluations_path, r)
    counters = {"status": "interrupted", "evaluations": 3, "failed": 1, "asked": 3, "num_workers": 1,
                "updated_at": T_CHECKPOINT}
    if mark:
        counters.update(rd.log_mark())
    rd.save_counters(counters)
    (run / ".lock").write_bytes(b"")  # as a finished search leaves it
    return run


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    from evomerge.cli import main

    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err.strip()


def assert_refused(capsys, run: Path, command: str, expected: str) -> None:
    import ray

    before = snapshot(run)
    rc, _, err = cli(capsys, command, str(run), *(["--no-progress"] if command == "resume" else []))
    assert rc == 2
    assert err == f"evomerge {command}: error: {expected}"
    assert not ray.is_initialized()
    assert snapshot(run) == before  # nothing in the run dir was written, the lock file included


def test_resume_refuses_a_malformed_record_before_ray(tiny_models, tmp_path: Path, capsys) -> None:
    recs = old_log()
    del recs[2]["index"]
    run = make_run(tiny_models, tmp_path, recs, mark=False)
    assert_refused(capsys, run, "resume", f"{run / LOG} line 3: evaluation record lacks 'index'; "
                                          f"restore the log from a backup or delete that line")


# -- item 3: no silent gaps ----------------------------------------------------------------------
def test_the_checkpoint_mark_counts_records_and_hashes_the_bytes(tmp_path: Path) -> None:
    import hashlib

    write_log(tmp_path, old_log())
    data = (tmp_path / LOG).read_bytes()
    with open(tmp_path / LOG, "ab") as f:
        f.write(b'{"kind": "evalu')  # a torn tail is not counted
    assert RunDir(tmp_path).log_mark() == {"log_records": 6, "log_bytes": len(data),
                                           "log_sha256": hashlib.sha256(data).hexdigest()}
    assert RunDir(tmp_path / "none").log_mark() == {"log_records": 0, "log_bytes": 0,
                                                    "log_sha256": hashlib.sha256(b"").hexdigest()}


def test_the_mark_is_incremental_and_equals_a_full_recount(tmp_path: Path) -> None:
    """One RunDir marking after each append (as the driver's checkpoints do) gives what a fresh RunDir
    computes from the whole file; a torn tail is finished later; a replaced shorter file starts over."""
    recs = old_log()
    rd = RunDir(tmp_path)
    (tmp_path / LOG).write_bytes(b"")
    for k, rec in enumerate(recs):
        append_jsonl(rd.evaluations_path, rec)
        if k % 2:
            assert rd.log_mark() == RunDir(tmp_path).log_mark()
    with open(tmp_path / LOG, "ab") as f:
        f.write(b'{"kind": "heldout", "id": "e0"')  # torn: not counted yet
    mark = rd.log_mark()
    assert mark == RunDir(tmp_path).log_mark() and mark["log_records"] == len(recs)
    with open(tmp_path / LOG, "ab") as f:
        f.write(b', "scores": {}}\n')  # the line completes: now counted
    assert rd.log_mark() == RunDir(tmp_path).log_mark() and rd.log_mark()["log_records"] == len(recs) + 1
    write_log(tmp_path, recs[:2])  # replaced by a shorter file
    assert rd.log_mark() == RunDir(tmp_path).log_mark() and rd.log_mark()["log_records"] == 2


def test_a_truncated_log_is_refused_by_status_and_resume(tiny_models, tmp_path: Path, capsys) -> None:
    run = make_run(tiny_models, tmp_path)
    lines = (run / LOG).read_bytes().splitlines(keepends=True)
    (run / LOG).write_bytes(b"".join(lines[:4]))  # 6 records checkpointed, 4 left
    expected = (f"{run / LOG} holds 4 records but the checkpoint of 2026-09-21 14:13:20 UTC "
                f"({run / 'state' / 'counters.json'}) counted 6 (record 5 onwards is missing); the log was "
                f"truncated or replaced: restore it from a backup (nothing was changed)")
    assert_refused(capsys, run, "status", expected)
    assert_refused(capsys, run, "resume", expected)
    # a log cut inside the last checkpointed record, leaving a torn tail: the same refusal, one record fewer
    (run / LOG).write_bytes(b"".join(lines[:5]) + lines[5][:20])
    assert_refused(capsys, run, "resume", expected.replace("holds 4", "holds 5").replace("record 5", "record 6"))


def test_an_edited_earlier_record_is_refused(tiny_models, tmp_path: Path, capsys) -> None:
    run = make_run(tiny_models, tmp_path)
    data = (run / LOG).read_bytes()
    edited = data.replace(b'"left":12.0', b'"left":13.0', 1)  # e000002's score, line 4
    assert edited != data and len(edited) == len(data)
    (run / LOG).write_bytes(edited)
    expected = (f"{run / LOG}: its first 6 records are not those the checkpoint of 2026-09-21 14:13:20 UTC "
                f"({run / 'state' / 'counters.json'}) counted (sha256 differs); the log was modified or "
                f"replaced: restore it from a backup (nothing was changed)")
    assert_refused(capsys, run, "status", expected)
    assert_refused(capsys, run, "resume", expected)


def test_a_longer_log_and_an_old_run_dir_pass(tiny_models, tmp_path: Path, capsys) -> None:
    from evomerge.search.session import preflight

    run = make_run(tiny_models, tmp_path)
    append_jsonl(RunDir(run).evaluations_path, eval_record(3))  # evaluated after the last checkpoint: normal
    with open(run / LOG, "ab") as f:
        f.write(b'{"kind": "evaluation", "id": "e0000')  # and a torn tail: a warning only
    preflight(RunDir(run))
    rc, out, err = cli(capsys, "status", str(run))
    assert rc == 0 and "evaluations: 4 / 10" in out, out + err
    # an old run dir: counters without log_records/log_bytes/log_sha256 are not checked
    (tmp_path / "old").mkdir()
    old = make_run(tiny_models, tmp_path / "old", mark=False)
    counters = json.loads((old / "state" / "counters.json").read_text())
    assert "log_records" not in counters
    (old / LOG).write_bytes(b"".join((old / LOG).read_bytes().splitlines(keepends=True)[:4]))
    preflight(RunDir(old))
    rc, out, err = cli(capsys, "status", str(old))
    assert rc == 0 and "evaluations: 3 / 10" in out, out + err


# -- item 4: a frozen identity ---------------------------------------------------------------------
TASKS = Path(__file__).resolve().parent.parent / "evaluators" / "tasks"


def task_folder(tmp_path: Path) -> Path:
    """Copies of the demo's shift and upper tasks as tmp_shift / tmp_upper, with their data and utils.py."""
    import shutil

    folder = tmp_path / "tasks"
    (folder / "data").mkdir(parents=True)
    shutil.copy(TASKS / "utils.py", folder / "utils.py")
    for skill in ("shift", "upper"):
        text = (TASKS / f"demo_{skill}.yaml").read_text().replace(f"task: demo_{skill}", f"task: tmp_{skill}")
        (folder / f"tmp_{skill}.yaml").write_text(text)
        for split in ("selection", "heldout"):
            shutil.copy(TASKS / "data" / f"{skill}_{split}.jsonl", folder / "data" / f"{skill}_{split}.jsonl")
    return folder


def identity_run(tiny_models, tmp_path: Path) -> Path:
    """A run started by this evomerge: identity.json recorded, a checkpoint, a copied (editable) source model."""
    import shutil

    from evomerge.config import parse_config
    from evomerge.search.identity import identity_record, write_identity

    run = tmp_path / "run"
    model = tmp_path / "src1"
    shutil.copytree(tiny_models.source_refs[1], model)
    cfg = search_config(tiny_models, tmp_path, run_dir=run, evaluations=10)
    cfg["models"]["sources"] = [tiny_models.source_refs[0], str(model)]
    cfg["objectives"].append({"name": "skill", "evaluator": "lm_eval", "task": "tmp_shift",
                              "metric": "exact_match", "limit": 4})
    cfg["evaluation"] = {"include_paths": [str(task_folder(tmp_path))]}
    frozen = parse_config(cfg)
    RunDir(run).create(frozen)
    write_identity(run, identity_record(frozen))
    rd = RunDir(run)
    for r in old_log():
        append_jsonl(rd.evaluations_path, r)
    rd.save_counters({"status": "interrupted", "evaluations": 3, "updated_at": T_CHECKPOINT, **rd.log_mark()})
    (run / ".lock").write_bytes(b"")
    return run


def edit_config(run: Path, edit) -> None:
    import yaml

    data = yaml.safe_load((run / "config.yaml").read_text())
    edit(data)
    (run / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


FIX = "start a new run dir or pass --overwrite to `evomerge search`"


def test_a_changed_task_is_refused(tiny_models, tmp_path: Path, capsys) -> None:
    run = identity_run(tiny_models, tmp_path)
    edit_config(run, lambda d: d["objectives"][2].update(task="tmp_upper"))
    assert_refused(capsys, run, "resume",
                   f"objectives[2] changed since the run started (task tmp_shift -> tmp_upper); {FIX}")


def test_a_changed_task_data_file_or_function_file_is_refused(tiny_models, tmp_path: Path, capsys) -> None:
    run = identity_run(tiny_models, tmp_path)
    data = tmp_path / "tasks" / "data" / "shift_selection.jsonl"
    original = data.read_bytes()
    data.write_bytes(original.replace(b"\n", b"\n", 1) + b'{"input": "ab", "target": "bc"}\n')
    assert_refused(capsys, run, "resume", f"objectives[2] changed since the run started "
                                          f"(tmp_shift: data/shift_selection.jsonl changed); {FIX}")
    data.write_bytes(original)
    with open(tmp_path / "tasks" / "utils.py", "a") as f:  # the !function hook of the task
        f.write("\n# edited\n")
    assert_refused(capsys, run, "resume", f"objectives[2] changed since the run started "
                                          f"(tmp_shift: utils.py changed); {FIX}")


def test_a_changed_model_file_is_refused(tiny_models, tmp_path: Path, capsys) -> None:
    run = identity_run(tiny_models, tmp_path)
    weights = tmp_path / "src1" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3:] = bytes(b ^ 0xFF for b in data[-3:])  # same size, same header: the values of one tensor
    weights.write_bytes(bytes(data))
    assert_refused(capsys, run, "resume", f"models.sources[1] changed since the run started "
                                          f"({tmp_path / 'src1'}/model.safetensors changed); {FIX}")


def test_operational_keys_may_change_and_budget_is_raised(tiny_models, tmp_path: Path, capsys,
                                                          monkeypatch) -> None:
    import yaml

    import evomerge.cli.search_commands as commands

    run = identity_run(tiny_models, tmp_path)
    identity = (run / "identity.json").read_bytes()
    assert json.loads(identity)["optimizer_budget"] == 10

    def ops(d):
        d["ray"].update(actors=2, num_cpus_per_actor=1.0, eval_timeout_s=30.0)
        d["output"].update(checkpoint_every=3, save_front_weights=True)
        d["merge"]["fused"] = False
    edit_config(run, ops)
    seen = []
    monkeypatch.setattr(commands, "run_search", lambda plan, run_dir, **kw: seen.append(plan.cfg) or 0)
    before = yaml.safe_load((run / "config.yaml").read_text())
    rc, _, err = cli(capsys, "resume", str(run), "--no-progress")
    assert (rc, err) == (0, "") and seen[-1].budget.evaluations == 10 and seen[-1].ray.actors == 2
    # --budget below the current one: refused, nothing written
    files = snapshot(run)
    rc, _, err = cli(capsys, "resume", str(run), "--budget", "5")
    assert rc == 2 and err == ("evomerge resume: error: --budget 5 is below the run's budget of 10 evaluations; "
                               "--budget only raises it")
    assert snapshot(run) == files
    # --budget 25: budget.evaluations of the frozen config, and nothing else, changes
    rc, _, err = cli(capsys, "resume", str(run), "--budget", "25", "--no-progress")
    assert (rc, err) == (0, "") and seen[-1].budget.evaluations == 25
    after = yaml.safe_load((run / "config.yaml").read_text())
    assert after["budget"] == {**before["budget"], "evaluations": 25}
    assert {k: v for k, v in after.items() if k != "budget"} == {k: v for k, v in before.items() if k != "budget"}
    assert (run / "identity.json").read_bytes() == identity  # the optimizer keeps the budget it started with
    assert RunDir(run).load_config().budget.evaluations == 25


def test_an_old_run_dir_gets_its_identity_at_the_next_resume(tiny_models, tmp_path: Path, capsys, caplog,
                                                              monkeypatch) -> None:
    import evomerge.cli.search_commands as commands

    run = identity_run(tiny_models, tmp_path)
    (run / "identity.json").unlink()  # as written by the previous evomerge
    monkeypatch.setattr(commands, "run_search", lambda plan, run_dir, **kw: 0)
    rc, _, err = cli(capsys, "resume", str(run), "--budget", "12", "--no-progress")
    assert (rc, err) == (0, "")
    assert "has no identity.json (written by an older evomerge)" in caplog.text
    stored = json.loads((run / "identity.json").read_text())
    assert stored["recorded_late"] is True and stored["optimizer_budget"] == 10
    assert list(stored["fields"]) == ["models.base", "models.sources[0]", "models.sources[1]", "models",
                                      "objectives[0]", "objectives[1]", "objectives[2]", "merge", "space",
                                      "optimizer", "evaluation"]
    # from then on it is checked
    edit_config(run, lambda d: d["merge"].update(methods=["ties"]))
    assert_refused(capsys, run, "resume", f"merge changed since the run started "
                                          f"(methods ties, task_arithmetic -> ties); {FIX}")
