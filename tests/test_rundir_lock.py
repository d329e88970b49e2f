"""Run-directory integrity: one writer at a time, and a run that found nothing is not a success.

The lock tests hold ``<run_dir>/.lock`` from a *separate process* (a flock held inside
the test process would not show what another ``evomerge`` sees), check that writers
(search, search --overwrite, resume, status --rescore) fail with one line naming that
process before anything is written or Ray starts (``init_ray`` is replaced by a function
that fails the test if called), and that readers (status, plot) do not care. The exit
status of a session whose every candidate failed is checked on the verdict function and
on ``Search.execute`` with its Ray parts stubbed; one slow test runs it on Ray.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

import evomerge.cli.search_commands as commands
import evomerge.search.loop as loop
import evomerge.search.ray_cluster as ray_cluster
from evomerge.cli import main
from evomerge.config import parse_config
from evomerge.errors import RunDirError
from evomerge.fileio import append_jsonl
from evomerge.records import EvaluationRecord, ReferenceRecord, Status
from evomerge.rundir import RunDir
from evomerge.runlock import LOCK, RunLock, hold_run_lock
from search_fixtures import records, search_config, write_config
from synthetic_run import FRONT, write_run

HOLDER = """
import sys
from evomerge.runlock import RunLock
with RunLock(sys.argv[1], "evomerge search"):
    print("held", flush=True)
    sys.stdin.read()  # hold until the test closes stdin (or kills this process)
"""


@contextlib.contextmanager
def held_elsewhere(run_dir: Path) -> Iterator[subprocess.Popen]:
    """Another process holding ``run_dir``'s lock (through RunLock) for the ``with`` body."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        if proc.poll() is None:
            proc.stdin.close()
            proc.wait(30)


def _in_use(run_dir: Path, pid: int) -> str:
    """The exact one-line message a second writer gets, from what the holder recorded."""
    holder = json.loads((run_dir / LOCK).read_text())
    assert holder["pid"] == pid and holder["host"] == socket.gethostname()
    return (f"{run_dir} is in use by evomerge pid {pid} on host {socket.gethostname()} since {holder['started']}; "
            f"wait for it to finish or stop it")


def _locked(run_dir: Path) -> bool:
    """Whether some open file holds the flock (a new open file of this process conflicts like another process)."""
    fd = os.open(run_dir / LOCK, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the probe's own lock, if it got one
    return False


def _no_ray(*args: Any, **kwargs: Any) -> bool:
    raise AssertionError("Ray was started although the run dir is locked")


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.strip()


# -- the lock itself -----------------------------------------------------------------------

def test_second_writer_is_refused_with_the_holders_name(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    t0 = time.time()
    with held_elsewhere(run_dir) as proc:
        holder = json.loads((run_dir / LOCK).read_text())
        assert set(holder) == {"host", "pid", "started_at", "started", "command"}
        assert holder["command"] == "evomerge search"
        assert t0 - 1 <= holder["started_at"] <= time.time()
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", holder["started"])
        assert holder["started"] == time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder["started_at"]))
        with pytest.raises(RunDirError) as err:
            RunLock(run_dir).acquire()
        assert str(err.value) == _in_use(run_dir, proc.pid)
        assert json.loads((run_dir / LOCK).read_text()) == holder  # the refused writer changed nothing
    # the holder exited cleanly: its record is emptied and the lock is free
    assert (run_dir / LOCK).read_text() == ""
    with RunLock(run_dir) as lock:
        assert lock.held and json.loads((run_dir / LOCK).read_text())["pid"] == os.getpid()
    assert not lock.held and (run_dir / LOCK).read_text() == ""


def test_stale_lock_of_a_killed_holder_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_dir = tmp_path / "run"
    with held_elsewhere(run_dir) as proc:
        os.kill(proc.pid, signal.SIGKILL)  # no chance to release: the kernel drops the flock, the record stays
        proc.wait(30)
    assert json.loads((run_dir / LOCK).read_text())["pid"] == proc.pid
    with caplog.at_level(logging.INFO, logger="evomerge.runlock"):
        with RunLock(run_dir, "evomerge resume"):
            holder = json.loads((run_dir / LOCK).read_text())
            assert (holder["pid"], holder["command"]) == (os.getpid(), "evomerge resume")
    stale = [r for r in caplog.records if "stale lock" in r.getMessage()]
    assert len(stale) == 1 and stale[0].levelno == logging.WARNING
    assert stale[0].getMessage().startswith(f"taking over a stale lock of pid {proc.pid} in {run_dir}")


def test_lock_file_of_another_host_is_taken_over_without_a_stale_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A pid of another host cannot be checked here; the free flock is what counts."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 4242, "started": "x"}))
    with caplog.at_level(logging.INFO, logger="evomerge.runlock"):
        with RunLock(run_dir):
            pass
    assert [r.getMessage() for r in caplog.records] == [
        f"taking over the lock of {run_dir} left by pid 4242 on host elsewhere"]


def test_nested_holds_share_the_lock_and_another_thread_is_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    outcome: dict[str, str] = {}

    def other_thread() -> None:
        try:
            with hold_run_lock(run_dir):
                outcome["got"] = "the lock"
        except RunDirError as err:
            outcome["error"] = str(err)

    with hold_run_lock(run_dir, "evomerge search") as outer:
        with hold_run_lock(run_dir, "evomerge resume") as inner:  # run_search inside search_command
            assert inner is outer
        assert _locked(run_dir)  # leaving the inner hold did not release it
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        assert outcome == {"error": _in_use(run_dir, os.getpid())}
        assert json.loads((run_dir / LOCK).read_text())["command"] == "evomerge search"
    assert not _locked(run_dir)


def test_a_file_in_place_of_the_run_dir_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "run").write_text("x")
    with pytest.raises(RunDirError) as err:
        RunLock(tmp_path / "run").acquire()
    assert str(err.value) == f"run dir {tmp_path / 'run'} is a file; pass another --run-dir"


# -- the commands -------------------------------------------------------------------------

def test_writers_fail_before_ray_and_readers_work_while_a_search_runs(
        tiny_models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(ray_cluster, "init_ray", _no_ray)
    run_dir = tmp_path / "run"
    cfg = search_config(tiny_models, tmp_path, run_dir=run_dir)
    path = write_config(cfg, tmp_path / "cfg.yaml")

    # a new run dir: search fails and writes nothing but the holder's lock file
    with held_elsewhere(run_dir) as proc:
        assert main(["search", str(path), "--no-progress"]) == 2
        assert _one_error_line(capsys) == f"evomerge search: error: {_in_use(run_dir, proc.pid)}"
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK]

    # an existing run: search, search --overwrite of another search, resume: all refused, nothing touched
    RunDir(run_dir).create(parse_config(cfg))
    append_jsonl(RunDir(run_dir).evaluations_path, {"kind": "evaluation", "id": "e000000", "status": "ok"})
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.name != LOCK}
    other = write_config({**cfg, "budget": {"evaluations": 99}}, tmp_path / "other.yaml")
    with held_elsewhere(run_dir) as proc:
        for argv, command in (([str(path)], "search"), ([str(other), "--overwrite"], "search"),
                              ([str(run_dir)], "resume")):
            assert main([command, *argv, "--no-progress"]) == 2
            assert _one_error_line(capsys) == f"evomerge {command}: error: {_in_use(run_dir, proc.pid)}"
        assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.name != LOCK} == before


def test_status_and_plot_read_while_locked_and_rescore_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(ray_cluster, "init_ray", _no_ray)
    run_dir = write_run(tmp_path / "run")
    log_before = (run_dir / "evaluations.jsonl").read_bytes()
    with held_elsewhere(run_dir) as proc:
        assert main(["status", str(run_dir)]) == 0
        out = capsys.readouterr().out
        assert all(eid in out for eid in FRONT)
        assert "evaluations: 7 / 20   failed: 1   front: 4" in " ".join(out.split("\n"))
        png = tmp_path / "report.png"
        assert main(["plot", str(run_dir), "--out", str(png)]) == 0
        assert png.read_bytes()[:4] == b"\x89PNG"
        capsys.readouterr()
        assert main(["status", str(run_dir), "--rescore"]) == 2
        assert _one_error_line(capsys) == f"evomerge status: error: {_in_use(run_dir, proc.pid)}"
        assert _locked(run_dir)  # readers did not disturb the holder
    assert (run_dir / "evaluations.jsonl").read_bytes() == log_before


class _SessionProbe:
    """Stands in for ``search.loop.Search``: records who holds the lock while the session runs."""

    seen: list[dict[str, Any]] = []

    def __init__(self, plan: Any, run: Any, **kw: Any) -> None:
        self.run = run

    def execute(self) -> int:
        holder = json.loads((self.run.path / LOCK).read_text())
        _SessionProbe.seen.append({"locked": _locked(self.run.path), "pid": holder["pid"],
                                   "command": holder["command"]})
        return 0


def test_commands_hold_the_lock_for_the_session_and_release_it(
        tiny_models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray_cluster, "init_ray", lambda cfg, address: False)
    monkeypatch.setattr(loop, "Search", _SessionProbe)
    _SessionProbe.seen = []
    creates: list[bool] = []
    real_create = RunDir.create

    def create(self: RunDir, cfg: Any, overwrite: bool = False) -> bool:
        creates.append(_locked(self.path))  # --overwrite clears the dir inside this call
        return real_create(self, cfg, overwrite)

    monkeypatch.setattr(RunDir, "create", create)
    run_dir = tmp_path / "run"
    cfg = search_config(tiny_models, tmp_path, run_dir=run_dir)
    assert main(["search", str(write_config(cfg, tmp_path / "cfg.yaml")), "--no-progress"]) == 0
    assert not _locked(run_dir) and (run_dir / LOCK).read_text() == ""
    assert main(["resume", str(run_dir), "--no-progress"]) == 0
    assert not _locked(run_dir)
    # --overwrite replaces a different search: the lock file survives the clearing, and is released after
    append_jsonl(RunDir(run_dir).evaluations_path, {"kind": "evaluation", "id": "e000000", "status": "ok"})
    other = write_config({**cfg, "budget": {"evaluations": 99}}, tmp_path / "other.yaml")
    assert main(["search", str(other), "--overwrite", "--no-progress"]) == 0
    assert not _locked(run_dir) and (run_dir / LOCK).read_text() == ""
    assert not (run_dir / "evaluations.jsonl").exists()
    assert RunDir(run_dir).load_config().budget.evaluations == 99
    me = os.getpid()
    assert _SessionProbe.seen == [{"locked": True, "pid": me, "command": "evomerge search"},
                                  {"locked": True, "pid": me, "command": "evomerge resume"},
                                  {"locked": True, "pid": me, "command": "evomerge search"}]
    assert creates == [True, True]
    # a second, independent acquisition succeeds now
    with RunLock(run_dir) as lock:
        assert lock.held


def test_resume_of_a_missing_run_dir_creates_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["resume", str(tmp_path / "nope")]) == 2
    assert _one_error_line(capsys) == (f"evomerge resume: error: {tmp_path / 'nope'} does not exist; "
                                       f"pass the run dir of an `evomerge search`")
    assert not (tmp_path / "nope").exists()
    (tmp_path / "empty").mkdir()
    assert main(["resume", str(tmp_path / "empty")]) == 2
    assert _one_error_line(capsys) == (f"evomerge resume: error: {tmp_path / 'empty'} is not a run directory "
                                       f"(no config.yaml); pass the run dir of an `evomerge search`")
    assert list((tmp_path / "empty").iterdir()) == []


# -- a run whose every candidate failed ------------------------------------------------------

def _ev(i: int, status: str, error: str | None = None) -> EvaluationRecord:
    return EvaluationRecord(id=f"e{i:06d}", index=i, asked=i + 1, recipe=None, status=Status(status), error=error,
                            scores={"left": 1.0} if status == "ok" else {})


def test_all_failed_line() -> None:
    failed = [_ev(i, "failed", f"evaluation: RuntimeError: boom {i}") for i in range(6)]
    assert loop.all_failed_line(failed) == ("every candidate failed (6 of 6); first error: "
                                              "evaluation: RuntimeError: boom 0")
    assert loop.all_failed_line(failed + [_ev(6, "ok")]) is None
    assert loop.all_failed_line([]) is None  # nothing evaluated is not a failure
    references = [ReferenceRecord(label="uniform", recipe=None, status=Status.OK)]  # only evaluations count
    assert loop.all_failed_line(references + failed[:2]) == ("every candidate failed (2 of 2); first error: "
                                                               "evaluation: RuntimeError: boom 0")
    assert loop.all_failed_line([_ev(0, "failed"), _ev(1, "failed", "merge: OOM")]) == (
        "every candidate failed (2 of 2); first error: merge: OOM")
    assert loop.all_failed_line([_ev(0, "failed")]) == (
        "every candidate failed (1 of 1); first error: no error was recorded")


class _StubSearch(loop.Search):
    """``Search.execute`` with the Ray parts replaced: the log before and the session's results are given."""

    def __init__(self, before: list[EvaluationRecord], session: list[EvaluationRecord]) -> None:
        self.cfg = parse_config({"name": "t", "models": {"sources": ["a", "b"]},
                                 "objectives": [{"name": "left", "task": "x", "metric": "y"}],
                                 "budget": {"evaluations": 6}, "evaluation": {"rescore_heldout": False}})
        self.run = SimpleNamespace(path=Path("runs/t"))
        self.show_progress = False
        self.budget_evals = 6
        self.stop_signal = None
        self.pool = None
        self.busy_s = 0.0
        self.records_by_id: dict[str, EvaluationRecord] = {}
        self.before, self.session, self.statuses = before, session, []

    def _start(self) -> list[EvaluationRecord]:
        from evomerge.pareto import ParetoArchive

        self.elapsed_before = 0.0
        self.archive = ParetoArchive({"left": "minimize"})
        self.book = SimpleNamespace(n_told=len(self.before), n_failed=0)
        self.records_by_id = {r.id: r for r in self.before}
        return list(self.before)

    def _references(self, records: list[EvaluationRecord], progress: Any) -> None:
        pass

    def _search_loop(self, progress: Any) -> None:
        for r in self.session:
            self.records_by_id[r.id] = r
        self.book.n_told += len(self.session)

    def checkpoint(self, status: str = "running") -> None:
        self.statuses.append(status)

    def _show(self, progress: Any, phase: str) -> None:
        pass


@pytest.mark.parametrize("before, session, rc, line", [
    ([], [_ev(i, "failed", f"evaluation: ValueError: bad {i}") for i in range(6)], 1,
     "every candidate failed (6 of 6); first error: evaluation: ValueError: bad 0"),
    ([_ev(0, "ok")], [_ev(i, "failed", "evaluation: x") for i in range(1, 4)], 1,  # judged on this session
     "every candidate failed (3 of 3); first error: evaluation: x"),
    ([], [_ev(0, "failed", "evaluation: x"), _ev(1, "ok")], 0, None),
    ([_ev(i, "failed", "merge: y") for i in range(6)], [], 1,  # a resume with nothing left: the whole log
     "every candidate failed (6 of 6); first error: merge: y"),
    ([_ev(0, "ok"), _ev(1, "failed", "merge: y")], [], 0, None),
])
def test_execute_returns_1_when_every_candidate_failed(before, session, rc, line, caplog) -> None:
    search = _StubSearch(before, session)
    with caplog.at_level(logging.INFO, logger="evomerge.search"):
        assert search.execute() == rc
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ([line] if line else [])
    # "failed" keeps the run from being reported complete, so a resume looks at it again
    assert search.statuses == ["searched", "failed" if line else "done"]


@pytest.mark.slow
def test_search_whose_every_candidate_fails_exits_1_and_keeps_the_run(ray_session, tiny_models, tmp_path,
                                                                      monkeypatch, caplog) -> None:
    run_dir = tmp_path / "run"
    cfg = search_config(tiny_models, tmp_path, run_dir=run_dir, evaluations=4, actors=1,
                        evaluation={"rescore_heldout": False})
    path = write_config(cfg, tmp_path / "cfg.yaml")
    monkeypatch.setenv("EVOMERGE_TEST_FAULTS", json.dumps({"raise": [f"e{i:06d}" for i in range(4)]}))
    args = argparse.Namespace(config=str(path), run_dir=None, address=None, overrides=[], overwrite=False,
                              no_progress=True)
    with caplog.at_level(logging.INFO, logger="evomerge"):
        assert commands.search_command(args) == 1
    expected = ("every candidate failed (4 of 4); first error: evaluation: RuntimeError: injected evaluator "
                "failure for e000000")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [expected]
    evals = records(run_dir)
    assert sorted(r["id"] for r in evals) == [f"e{i:06d}" for i in range(4)]
    assert all(r["status"] == "failed" for r in evals)
    assert json.loads((run_dir / "state" / "counters.json").read_text())["status"] == "failed"
    assert expected in (run_dir / "driver.log").read_text()
    assert not _locked(run_dir)
    # the run dir is intact and resumable: a resume finds nothing left to ask and says the same
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="evomerge"):
        assert commands.resume_command(argparse.Namespace(run_dir=str(run_dir), address=None, no_progress=True)) == 1
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [expected]
    assert len(records(run_dir)) == 4
