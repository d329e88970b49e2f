"""Fault tolerance: actors that die or hang mid-evaluation do not cost the search anything.

One search with two CPU actors on one Ray session and three faults, placed far apart
in the ask order so they cannot interfere:

- e000001: the actor process exits (``os._exit``) in the middle of the evaluation, once;
- e000006: the test itself SIGKILLs the actor process while it evaluates e000006;
- e000012: the evaluation hangs past ``ray.eval_timeout_s``; the driver kills the actor.

Ray restarts the actors (``max_restarts``); the candidates of the first two are
evaluated again and succeed; the hung one is logged as failed with a time-out; the
search meets its budget exactly with every ask index once.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time

import pytest

from search_fixtures import records, search_config, write_config

BUDGET = 14


@pytest.mark.slow
def test_dead_and_hung_actors(ray_session, tiny_models, tmp_path, monkeypatch):
    from evomerge.cli.search_commands import search_command

    run_dir, announce = tmp_path / "run", tmp_path / "announce"
    announce.mkdir()
    marker = tmp_path / "died_once"
    faults = {
        "announce": str(announce),
        "die_once": {"e000001": str(marker)},
        "sleep": {**{f"e{i:06d}": 0.2 for i in range(BUDGET)}, "e000006": 4.0, "e000012": 120.0},
    }
    monkeypatch.setenv("EVOMERGE_TEST_FAULTS", json.dumps(faults))
    cfg = search_config(tiny_models, tmp_path, run_dir=run_dir, evaluations=BUDGET, actors=2,
                        ray={"eval_timeout_s": 10.0, "max_restarts": 3},
                        output={"checkpoint_every": 100}, evaluation={"rescore_heldout": False})
    path = write_config(cfg, tmp_path / "cfg.yaml")
    args = argparse.Namespace(config=str(path), run_dir=None, address=None, overrides=[], overwrite=False,
                              no_progress=True)
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["rc"] = search_command(args)
        except BaseException as err:  # noqa: BLE001 - surfaced by the assertion below
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    pidfile = announce / "e000006.pid"
    deadline = time.monotonic() + 240
    while not pidfile.exists():
        assert thread.is_alive(), outcome
        assert time.monotonic() < deadline, "e000006 was never dispatched"
        time.sleep(0.05)
    time.sleep(0.3)  # inside its 4 s evaluation
    killed_pid = int(pidfile.read_text())
    os.kill(killed_pid, signal.SIGKILL)
    thread.join(300)
    assert not thread.is_alive(), "search did not finish"
    assert outcome.get("rc") == 0, outcome

    evals = {r["id"]: r for r in records(run_dir)}
    assert len(records(run_dir)) == BUDGET and len(evals) == BUDGET
    assert sorted(r["index"] for r in evals.values()) == list(range(BUDGET))
    # the actor really died under e000001, and the candidate was evaluated again, successfully
    assert marker.exists()
    assert evals["e000001"]["status"] == "ok" and evals["e000001"]["attempts"] == 2
    # the actor the test killed was evaluating e000006; it was evaluated again by a live actor
    assert evals["e000006"]["status"] == "ok" and evals["e000006"]["attempts"] == 2
    assert int((announce / "e000006.pid").read_text()) != killed_pid
    # the hung evaluation was cut off at the time-out and logged failed; everything else succeeded
    assert evals["e000012"]["status"] == "failed" and "timeout" in evals["e000012"]["error"]
    assert 10.0 <= evals["e000012"]["timings"]["wall_s"] < 60.0
    assert all(r["status"] == "ok" for i, r in evals.items() if i != "e000012")
    log = (run_dir / "driver.log").read_text()
    assert log.count("re-queueing it") == 2
