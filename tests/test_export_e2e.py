"""End to end: a real search, ``evomerge export --knee``, then lm-eval's own command line.

What a user would do after a search: export the knee of the front and check it with the
stock ``lm_eval`` CLI. The test asserts the CLI's score of the exported folder is *exactly*
the score the search recorded for that member (evaluations.jsonl and front/<id>/scores.json),
on the same doc ids the evaluator's seeded subsample chose (``--samples``).

The actors merge with the compiled one-pass kernel (`merge.fused`), the export with eager
ops: equal scores also show the two write the same weights.

Models and tasks are chosen so scores are not trivially 0 or 1: the base is a tiny random
Llama with a character tokenizer, the sources are the base plus sizeable noise, and the two
generate_until tasks are built from the *base's* greedy outputs (half the items true, half
not). Merges move some greedy outputs away from the base's, so scores differ between
candidates, and the test's own argmax loop gives an independent third value to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import evaluator_fixtures as F
from search_fixtures import records, write_config

pytestmark = pytest.mark.slow

NOISE = 0.005  # greedy outputs are sensitive (x8 weights): merges keep some of the base's, not all
TASKS = {"gen_a": ("e2e_gen_a", 2), "gen_b": ("e2e_gen_b", 5)}  # objective -> (task, task seed)
LIMIT = 8


def _save(model, tok, folder: Path) -> str:
    model.save_pretrained(folder)  # safetensors
    tok.save_pretrained(folder)
    return str(folder)


def _build_models(root: Path, n_sources: int = 2):
    """Base (char tokenizer) and fine-tune-like sources: base + seeded noise on every matrix."""
    import torch

    tok = F.char_tokenizer()
    base = F.tiny_llama(0)
    base_ref = _save(base, tok, root / "base")
    sources = []
    for i in range(n_sources):
        src = F.tiny_llama(0)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in src.parameters():
                if p.dim() == 2:
                    p.add_(torch.randn(p.shape, generator=g) * NOISE)
        sources.append(_save(src, tok, root / f"src{i}"))
    return tok, base, base_ref, sources


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Run the search (Ray, 1 CPU actor: a deterministic DE sequence) and export its knee; shared by the assertions below."""
    import torch

    from evomerge.cli import main
    from evomerge.cli.search_commands import search_command

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("e2e")
    tok, base, base_ref, sources = _build_models(root / "models")
    task_dir = root / "tasks"
    gen = {obj: F.write_gen_task(task_dir, task, base, tok, n_docs=16, seed=s) for obj, (task, s) in TASKS.items()}
    run_dir = root / "run"
    cfg = {
        "name": "e2e",
        "models": {"base": base_ref, "sources": sources},
        "merge": {"methods": ["task_arithmetic", "ties"], "fused": True},  # compiled hot path vs eager export
        "space": {"name": "layerwise", "layer_group_size": 1},
        "objectives": [{"name": obj, "task": task, "metric": "exact_match", "limit": LIMIT, "seed": 1,
                        "batch_size": 8, "heldout_limit": "all"} for obj, (task, _) in TASKS.items()],
        "evaluation": {"include_paths": [str(task_dir)], "rescore_heldout": True},
        "optimizer": {"name": "DE", "seed": 0},
        "budget": {"evaluations": 8},
        "ray": {"actors": 1, "num_cpus_per_actor": 1},
        "output": {"run_dir": str(run_dir), "checkpoint_every": 50},
    }
    path = write_config(cfg, root / "cfg.yaml")
    args = argparse.Namespace(config=str(path), run_dir=None, address=None, overrides=[], overwrite=False,
                              no_progress=True)
    assert search_command(args) == 0
    out = root / "export"
    assert main(["export", str(run_dir), "--knee", "--out", str(out)]) == 0
    return {"cfg": cfg, "run_dir": run_dir, "out": out, "tok": tok, "base": base, "gen": gen,
            "task_dir": task_dir, "root": root}


def _doc_ids(cfg: dict) -> dict[str, list[int]]:
    """The doc ids the search's evaluator scored, per task (as in test_lm_eval_cli)."""
    from evaluators import build_objectives
    from evomerge.config import parse_config

    parsed = parse_config(cfg)
    objs = build_objectives(parsed, cfg["models"]["base"], "cpu")
    ev = objs.evaluators["lm_eval"]
    samples: dict[str, list[int]] = {}
    for o in parsed.objectives:
        samples.update(ev.doc_ids(o))
    return samples


def _lm_eval_cli(model_dir: Path, tasks: list[str], include_path: Path, samples: dict, out: Path) -> dict:
    """lm-eval's own command line on a model folder; its ``results`` section (as in test_lm_eval_cli)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf",
           "--model_args", f"pretrained={model_dir},dtype=float32",
           "--tasks", ",".join(tasks), "--include_path", str(include_path), "--device", "cpu", "--batch_size", "8",
           "--samples", json.dumps(samples), "--output_path", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result_files = sorted(out.rglob("results_*.json"))
    assert result_files, proc.stdout[-2000:]
    return json.loads(result_files[-1].read_text())["results"]


@pytest.mark.timeout(300)
def test_exported_knee_scores_the_same_under_lm_eval_cli(exported):
    import torch
    from transformers import AutoModelForCausalLM

    run_dir, out, cfg = exported["run_dir"], exported["out"], exported["cfg"]
    for name in ("recipe.json", "mergekit.yaml", "README.md", "report.png", "config.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert list(out.glob("*.safetensors"))

    # which member was exported: the recipe in the folder is one front member's recipe
    recipe = json.loads((out / "recipe.json").read_text())
    members = json.loads((run_dir / "front.json").read_text())["members"]
    ok = {r["id"]: r for r in records(run_dir) if r["status"] == "ok"}
    matches = [m for m in members if json.loads((run_dir / "front" / m / "recipe.json").read_text()) == recipe]
    assert len(matches) == 1, (matches, members)
    member = matches[0]
    recorded = ok[member]["scores"]
    saved = json.loads((run_dir / "front" / member / "scores.json").read_text())
    assert saved["selection"] == recorded

    # scores are not trivial: candidates differ among themselves and from the base
    base_scores = next(r["scores"] for r in records(run_dir, "reference") if r["label"] == "base")
    cand = {tuple(r["scores"][o] for o in TASKS) for r in ok.values()}
    assert len(cand) > 1, cand
    assert any(c != tuple(base_scores[o] for o in TASKS) for c in cand), (cand, base_scores)
    assert any(0 < v < 1 for v in recorded.values()), recorded  # the compared number is not a trivial 0/1

    # the same numbers from lm-eval's own CLI on the exported folder, on the evaluator's doc ids
    samples = _doc_ids(cfg)
    tasks = [task for task, _ in TASKS.values()]
    assert all(len(samples[t]) == LIMIT for t in tasks)
    cli = _lm_eval_cli(out, tasks, exported["task_dir"], samples, exported["root"] / "lm_eval_out")
    for obj, (task, _) in TASKS.items():
        assert cli[task]["exact_match,none"] == recorded[obj], (obj, cli[task], recorded)

    # and from the test's own argmax loop on the exported weights (independent of lm-eval)
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    for obj, (task, _) in TASKS.items():
        assert F.expected_exact_match(model, exported["tok"], exported["gen"][obj], samples[task]) == recorded[obj]


def test_heldout_records_carry_per_item_scores_for_the_verdict(exported):
    """The driver logs each held-out item's value (front members and references), so a paired verdict
    can be drawn from the run dir alone: the items' means are the logged scores, on the 8 items outside
    the selection sample (heldout_limit: all of the 16 - 8)."""
    from evomerge.runview import load_run
    from evomerge.verdict import choose_on_selection, heldout_comparisons

    view = load_run(exported["run_dir"])
    assert set(view.heldout_items) == set(view.heldout) == set(view.front)
    for eid, items in view.heldout_items.items():
        for obj in TASKS:
            assert len(items[obj]) == 16 - LIMIT and set(items[obj]) <= {0.0, 1.0}
            assert sum(items[obj]) / len(items[obj]) == view.heldout[eid][obj]
    refs = {r.label: r for r in view.references}
    assert refs["uniform"].heldout_items is not None
    member = choose_on_selection(view)
    comps = {c.baseline: c for c in heldout_comparisons(view, member)}
    assert set(comps) == {r.label for r in view.references}
    for label, c in comps.items():
        mean = lambda s: sum(s.values()) / len(s)  # noqa: E731
        assert c.difference.diff == pytest.approx(mean(view.heldout[member]) - mean(refs[label].heldout))
        assert c.difference.low <= c.difference.diff <= c.difference.high
