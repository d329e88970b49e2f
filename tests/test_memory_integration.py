"""The memory plan in a search: chosen before actors start, asked of Ray, recorded, shown, enforced.

Runs real searches on the tiny models (slow: Ray). The engine's plan itself is tested in
tests/test_memory_plan.py; here: the driver refuses a cap nothing fits in one line before
any actor loads a weight, the chosen mode reaches every actor, ``memory_plan.json`` and
``status`` say what was chosen where, and a streaming search scores exactly what a
resident one does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evomerge.cli import main
from search_fixtures import records, search_config, write_config

pytestmark = pytest.mark.slow


def _search(tiny_models, tmp_path: Path, name: str, **ray: object) -> tuple[int, Path]:
    run_dir = tmp_path / name
    cfg = search_config(tiny_models, tmp_path, run_dir=run_dir, evaluations=3,
                        ray={"actors": 1, "num_cpus_per_actor": 0.5, **ray},
                        evaluation={"rescore_heldout": False})
    return main(["search", str(write_config(cfg, tmp_path / f"{name}.yaml")), "--no-progress"]), run_dir


def test_plan_is_recorded_shown_and_a_streaming_search_scores_the_same(ray_session, tiny_models, tmp_path, capsys):
    rc, auto = _search(tiny_models, tmp_path, "auto")
    assert rc == 0
    plan = json.loads((auto / "memory_plan.json").read_text())
    assert plan["device"] == "cpu" and plan["actors"] == 1
    assert plan["chosen"]["mode"] == "resident_sorted"  # tiny models: the fastest mode fits
    assert [o["mode"] for o in plan["options"]] == ["resident_sorted", "resident", "streaming"]
    assert plan["ray_memory_bytes"] == plan["chosen"]["device_bytes"] + plan["chosen"]["host_bytes"] > 0
    assert plan["per_actor"]["0"]["residency"] == "resident_sorted"
    capsys.readouterr()
    assert main(["status", str(auto)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "memory plan (cpu, 1 actor(s)): resident_sorted" in out and "actors: 0 on" in out

    rc, streaming = _search(tiny_models, tmp_path, "streaming", memory_mode="streaming")
    assert rc == 0
    assert json.loads((streaming / "memory_plan.json").read_text())["per_actor"]["0"]["residency"] == "streaming"
    # same seed, same candidates: the streaming merge gives the same bits, hence the same scores
    assert [(r["id"], r["scores"]) for r in records(streaming)] == [(r["id"], r["scores"]) for r in records(auto)]


def test_a_cap_nothing_fits_is_one_line_before_any_actor_loads(ray_session, tiny_models, tmp_path, capsys):
    rc, run_dir = _search(tiny_models, tmp_path, "capped", actor_memory_gb=0.0001)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert err.startswith("evomerge search: error: the smallest memory plan (streaming) needs ")
    assert "but the ray.actor_memory_gb cap allows 0.00 GB" in err
    assert records(run_dir) == []  # no actor started, nothing evaluated
    assert not (run_dir / "memory_plan.json").exists()


def test_an_actor_whose_plan_does_not_fit_refuses_before_loading_and_the_pool_marks_it_dead(
        tiny_models, tmp_path, monkeypatch):
    """The actor's own check (the driver cannot plan a multi-node cluster without a cap):
    no weight is read, ``ready`` carries the one line, and the pool takes the actor out."""
    from evomerge.config import parse_config
    from evomerge.merge.sources import ModelSource
    from evomerge.search.actor import CandidateEvaluator
    from evomerge.search.pool import EvaluatorPool, State

    def no_reads(*a, **k):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(ModelSource, "get_tensor", no_reads)
    cfg = parse_config(search_config(tiny_models, tmp_path, run_dir=tmp_path / "r",
                                     ray={"actors": 1, "actor_memory_gb": 0.0001}))
    actor = CandidateEvaluator(cfg.model_dump(mode="json"), actor_index=3, device="cpu")
    info = actor.ready()
    assert info["error"].startswith("actor 3 on ") and "the smallest memory plan (streaming) needs" in info["error"]
    assert not hasattr(actor, "model")
    pool = EvaluatorPool.__new__(EvaluatorPool)
    pool.state, pool.info, pool.directions, pool.last_error = {3: State.STARTING}, {}, {}, None
    pool.refused, pool.replaced, pool.info_version = set(), {3: 0}, 0
    pool._ready(3, info)
    assert pool.state[3] is State.DEAD and pool.last_error == info["error"] and pool.alive() == 0
