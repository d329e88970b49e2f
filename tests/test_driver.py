"""The search driver: replayable bookkeeping, pre-flight errors, and searches on Ray.

Fast tests (no Ray) check the pure parts: the ask/tell log replays into an optimizer
in exactly the state of the original, penalties and losses are what the definitions
say, and every config mistake is one line *before Ray starts*. Slow tests run real
searches on one Ray session (tiny random Llamas, perplexity objectives) and check the
run directory against numbers the test works out itself.
"""

from __future__ import annotations

import argparse
import json
import math
import random

import numpy as np
import pytest

from evomerge.records import EvaluationRecord, Status
from evomerge.search.searchbook import SearchBook, penalty_losses, to_losses
from search_fixtures import canon, records, search_config, write_config

# -- pure bookkeeping ------------------------------------------------------------------


class _VectorSpace:
    """A stand-in search space: the recipe of a value is the value itself."""

    def to_recipe(self, value):
        class _R:
            def __init__(self, d):
                self.d = d

            def to_dict(self):
                return self.d

        return _R({"x": [float(t) for t in value]})

    def value_to_json(self, value):
        return [float(t) for t in value]

    def value_from_json(self, data):
        return np.asarray(data, dtype=float)


def _optimizer(name: str, workers: int):
    import nevergrad as ng

    p = ng.p.Array(shape=(4,), lower=-2.0, upper=2.0)
    p.random_state = np.random.RandomState(3)
    return ng.optimizers.registry[name](parametrization=p, budget=60, num_workers=workers)


def _objective(recipe, n):
    x = np.asarray(recipe["x"])
    losses = [float((x**2).sum()), float(((x - 1.0) ** 2).sum())]
    return losses[:n]


@pytest.mark.parametrize("name, n_obj, workers", [("DE", 2, 3), ("CMA", 1, 2), ("OnePlusOne", 1, 1)])
def test_replay_rebuilds_the_exact_optimizer(name, n_obj, workers):
    """Asks/tells interleaved in a random finish order, then a 'crash' with candidates in flight:
    a fresh optimizer replaying the log has the same pending asks and asks the same next points."""
    objectives = [("a", "minimize"), ("b", "minimize")][:n_obj]
    book = SearchBook(_optimizer(name, workers), _VectorSpace(), objectives)
    log, inflight, rng = [], [], random.Random(7)
    for _ in range(25):
        while len(inflight) < workers:
            inflight.append(book.ask())
        done = inflight.pop(rng.randrange(len(inflight)))
        ok = rng.random() > 0.2
        losses = book.losses_for(dict(zip("ab", _objective(done.recipe, n_obj))) if ok else None, ok)
        log.append(EvaluationRecord(id=done.id, index=done.index, asked=book.n_asked, recipe=done.recipe,
                                    value=done.value, losses=losses, status=Status.OK if ok else Status.FAILED))
        book.tell(done.index, losses, ok)
    crashed_pending = sorted(a.index for a in inflight)
    next_recipes = [canon(book.ask().recipe) for _ in range(4)]

    fresh = SearchBook(_optimizer(name, workers), _VectorSpace(), objectives)
    fresh.replay(log)
    assert fresh.diverged == 0
    assert sorted(fresh.pending) == crashed_pending
    assert [canon(fresh.pending[i].recipe) for i in crashed_pending] == [canon(a.recipe) for a in inflight]
    assert (fresh.n_told, fresh.n_failed) == (book.n_told, book.n_failed)
    assert [canon(fresh.ask().recipe) for _ in range(4)] == next_recipes


def test_losses_and_penalty_numbers():
    objectives = [("acc", "maximize"), ("ppl", "minimize")]
    assert to_losses({"acc": 0.75, "ppl": 12.5}, objectives) == [-0.75, 12.5]
    # worst + max(1, worst - best) per objective
    assert penalty_losses([[1.0, 5.0], [3.0, 2.0]], 2) == [5.0, 8.0]
    assert penalty_losses([[-0.5], [-0.25]], 1) == [0.75]
    assert penalty_losses([], 2) == [1.0, 1.0]


# -- pre-flight: one line, Ray never started ---------------------------------------------

def _bad(cfg, case, tiny):
    if case == "optimizer":
        cfg["optimizer"]["name"] = "NoSuchOptimizer"
    elif case == "space":
        cfg["space"]["name"] = "no_such_space"
    elif case == "budget":
        cfg["budget"] = {"evaluations": 0}
    elif case == "group_size":
        cfg["space"]["layer_group_size"] = 3  # the tiny models have 4 layers
    elif case == "bounds":
        cfg["space"]["bounds"] = {"weight": [1.0, 0.5]}
    elif case == "slerp":
        cfg["models"]["sources"] = tiny.source_refs[:3]
        cfg["merge"]["methods"] = ["slerp"]
    return cfg


@pytest.mark.parametrize("case, fragment", [
    ("optimizer", "optimizer.name"),
    ("space", "space.name"),
    ("budget", "budget.evaluations"),
    ("group_size", "layer_group_size"),
    ("bounds", "bounds"),
    ("slerp", "slerp"),
    ("other_search", "different search"),
])
def test_bad_config_is_one_line_before_ray(case, fragment, tiny_models, tmp_path, capsys):
    import ray

    from evomerge.cli import main

    run_dir = tmp_path / "run"
    if case == "other_search":  # a run dir that holds another search
        from evomerge.config import parse_config
        from evomerge.rundir import RunDir

        other = search_config(tiny_models, tmp_path, run_dir=run_dir)
        other["optimizer"]["seed"] = 99
        RunDir(run_dir).create(parse_config(other))
    cfg = _bad(search_config(tiny_models, tmp_path, run_dir=run_dir), case, tiny_models)
    path = write_config(cfg, tmp_path / "cfg.yaml")
    rc = main(["search", str(path), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert fragment in err, err
    assert not ray.is_initialized()
    if case == "other_search":  # --overwrite is the way out, and the old run is gone afterwards
        assert "--overwrite" in err


# -- searches on Ray ----------------------------------------------------------------------

def _search(path, **kw) -> int:
    from evomerge.cli.search_commands import search_command

    args = argparse.Namespace(config=str(path), run_dir=None, address=None, overrides=[], overwrite=False,
                              no_progress=True, **kw)
    return search_command(args)


def _dominated(a, b):
    """a dominated by b (both minimised)."""
    return all(y <= x for x, y in zip(a, b)) and any(y < x for x, y in zip(a, b))


@pytest.mark.slow
def test_search_failures_references_front_heldout(ray_session, tiny_models, tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evaluators import build_objectives
    from evomerge.config import parse_config

    run_dir = tmp_path / "run"
    cfg = search_config(tiny_models, tmp_path, run_dir=run_dir, evaluations=10, actors=2)
    path = write_config(cfg, tmp_path / "cfg.yaml")
    monkeypatch.setenv("EVOMERGE_TEST_FAULTS", json.dumps({"raise": ["e000002"]}))
    assert _search(path) == 0

    evals = records(run_dir)
    assert len(evals) == 10
    assert sorted(r["index"] for r in evals) == list(range(10))  # nothing asked twice, nothing lost
    failed = [r for r in evals if r["status"] == "failed"]
    assert [r["id"] for r in failed] == ["e000002"]
    assert "injected evaluator failure" in failed[0]["error"] and "\n" not in failed[0]["error"]
    ok = [r for r in evals if r["status"] == "ok"]
    for r in ok:  # losses are the perplexities themselves (minimised), and the penalty is worse than all
        assert r["losses"] == [r["scores"]["left"], r["scores"]["right"]]
    told_before = [r for r in evals[: evals.index(failed[0])] if r["status"] == "ok"]
    for j in range(2):
        assert failed[0]["losses"][j] > max([r["losses"][j] for r in told_before], default=0.0)

    # references: the base recipe really is the base model, a source alone really is that source
    refs = {r["label"]: r for r in records(run_dir, "reference")}
    src0 = tiny_models.source_refs[0]
    assert set(refs) == {"uniform", "base", f"source:{src0}", f"source:{tiny_models.source_refs[1]}"}
    objectives = build_objectives(parse_config(cfg), AutoTokenizer.from_pretrained(tiny_models.base_ref), "cpu")
    for label, ref in (("base", tiny_models.base_ref), (f"source:{src0}", src0)):
        model = AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32).eval()
        expected = objectives.evaluate(model, split="selection")
        for k, v in expected.items():
            assert math.isclose(refs[label]["scores"][k], v, rel_tol=1e-5), (label, k)

    # the front is the non-dominated set of the ok evaluations, worked out here
    points = {r["id"]: [r["scores"]["left"], r["scores"]["right"]] for r in ok}
    expected_front = {i for i, p in points.items() if not any(_dominated(p, q) for j, q in points.items() if j != i)}
    front = json.loads((run_dir / "front.json").read_text())
    assert set(front["members"]) == expected_front
    assert front["evaluations"] == 10
    heldout = {r["id"]: r for r in records(run_dir, "heldout")}
    assert set(heldout) == expected_front
    for m in expected_front:
        saved = json.loads((run_dir / "front" / m / "scores.json").read_text())
        assert saved["selection"] == {"left": points[m][0], "right": points[m][1]}
        assert saved["heldout"] == heldout[m]["scores"]
        recipe = json.loads((run_dir / "front" / m / "recipe.json").read_text())
        assert canon(recipe) == canon(next(r["recipe"] for r in ok if r["id"] == m))
    counters = json.loads((run_dir / "state" / "counters.json").read_text())
    assert counters["status"] == "done" and counters["evaluations"] == 10 and counters["pending"] == []
    assert (run_dir / "report.png").stat().st_size > 0


@pytest.mark.slow
def test_cache_reuses_scores_of_identical_recipes(ray_session, tiny_models, tmp_path):
    """A genome with only a method choice has two recipes: two evaluations, the rest cache hits."""
    run_dir = tmp_path / "run"
    cfg = search_config(tiny_models, tmp_path, run_dir=run_dir, evaluations=8, actors=1,
                        merge={"methods": ["task_arithmetic", "linear"]},
                        space={"bounds": {"weight": [0.7, 0.7]}})
    cfg["evaluation"] = {"rescore_heldout": False}
    cfg["output"]["save_front_weights"] = True
    assert _search(write_config(cfg, tmp_path / "cfg.yaml")) == 0
    evals = records(run_dir)
    assert len(evals) == 8
    real = [r for r in evals if r["cached_from"] is None]
    cached = [r for r in evals if r["cached_from"] is not None]
    assert 1 <= len(real) <= 2 and len({r["key"] for r in real}) == len(real)
    assert len(cached) == 8 - len(real)
    by_id = {r["id"]: r for r in real}
    for r in cached:
        src = by_id[r["cached_from"]]
        assert src["index"] < r["index"] and src["key"] == r["key"] and canon(src["recipe"]) == canon(r["recipe"])
        assert r["scores"] == src["scores"]
    assert records(run_dir, "heldout") == []
    # front members' weights were written as HF folders, equal to the recipe's merge
    members = json.loads((run_dir / "front.json").read_text())["members"]
    assert members
    for m in members:
        weights = run_dir / "front" / m / "weights"
        assert (weights / "config.json").is_file()
        assert list(weights.glob("*.safetensors"))
