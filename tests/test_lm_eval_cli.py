"""lm-eval's own command line and the in-memory evaluator give the same scores.

The model folder is a tiny random Llama saved here (the demo zoo is not needed); the
tasks are a generation task whose exact-match we also know independently and a
multiple-choice task scored by log-likelihoods. The command line is given the same
doc ids (``--samples``) that the evaluator's seeded subsample chose.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import evaluator_fixtures as F  # noqa: E402

from evomerge.config import parse_config  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.mark.timeout(300)
def test_lm_eval_cli_matches_in_memory(tmp_path):
    import torch

    from evaluators import build_objectives

    torch.set_num_threads(1)
    tok = F.char_tokenizer()
    model = F.tiny_llama(0)
    tasks = tmp_path / "tasks"
    gen = F.write_gen_task(tasks, "cli_gen", model, tok, n_docs=16, seed=2)
    F.write_mc_task(tasks, "cli_mc", n_docs=16, seed=3)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)  # safetensors
    tok.save_pretrained(model_dir)

    cfg = parse_config({
        "models": {"sources": [str(model_dir)]},
        "budget": {"evaluations": 1},
        "evaluation": {"include_paths": [str(tasks)]},
        "objectives": [
            {"name": "gen", "task": "cli_gen", "metric": "exact_match", "limit": 9, "seed": 1, "batch_size": 4},
            {"name": "mc", "task": "cli_mc", "metric": "acc", "limit": 10, "seed": 1, "batch_size": 4},
        ],
    })
    objs = build_objectives(cfg, str(model_dir), "cpu")
    in_memory = objs.evaluate(model)
    ev = objs.evaluators["lm_eval"]
    samples = {**ev.doc_ids(cfg.objectives[0]), **ev.doc_ids(cfg.objectives[1])}
    assert len(samples["cli_gen"]) == 9 and len(samples["cli_mc"]) == 10
    assert in_memory["gen"] == pytest.approx(F.expected_exact_match(model, tok, gen, samples["cli_gen"]))
    assert 0 < in_memory["gen"] < 1  # 9 of 16 alternating true/false items: both kinds present

    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf",
           "--model_args", f"pretrained={model_dir},dtype=float32",
           "--tasks", "cli_gen,cli_mc", "--include_path", str(tasks), "--device", "cpu", "--batch_size", "4",
           "--samples", json.dumps(samples), "--output_path", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result_files = sorted(out.rglob("results_*.json"))
    assert result_files, proc.stdout[-2000:]
    cli = json.loads(result_files[-1].read_text())["results"]
    assert cli["cli_gen"]["exact_match,none"] == pytest.approx(in_memory["gen"], abs=1e-12)
    assert cli["cli_mc"]["acc,none"] == pytest.approx(in_memory["mc"], abs=1e-12)


def _demo_case() -> tuple[Path, str, str] | None:
    """(specialist folder, task, metric) from the shipped demo zoo."""
    import yaml

    root = Path(__file__).resolve().parents[1]
    for y in sorted((root / "evaluators" / "tasks").glob("demo_*.yaml")):
        cfg = yaml.safe_load(y.read_text().replace("!function", "")) or {}
        task = cfg.get("task")
        if not isinstance(task, str) or task.endswith("_heldout"):
            continue
        skill = task.removeprefix("demo_")
        folder = root / "models" / "demo" / skill
        metrics = [m.get("metric") for m in cfg.get("metric_list") or [] if isinstance(m, dict)]
        if (folder / "config.json").is_file() and metrics:
            return folder, task, metrics[0]
    return None


@pytest.mark.timeout(300)
def test_lm_eval_cli_matches_in_memory_on_demo_specialist(tmp_path):
    """Same check on a real demo specialist and demo task (the zoo is shipped in models/demo)."""
    case = _demo_case()
    assert case is not None, "models/demo is missing a specialist; restore it with `git checkout -- models/demo`"
    import torch
    from transformers import AutoModelForCausalLM

    from evaluators import build_objectives

    torch.set_num_threads(1)
    folder, task, metric = case
    root = Path(__file__).resolve().parents[1]
    cfg = parse_config({
        "models": {"sources": [str(folder)]}, "budget": {"evaluations": 1},
        "objectives": [{"name": "skill", "task": task, "metric": metric, "limit": 16, "seed": 0, "batch_size": 8}],
    })
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    objs = build_objectives(cfg, str(folder), "cpu")
    in_memory = objs.evaluate(model)["skill"]
    samples = objs.evaluators["lm_eval"].doc_ids(cfg.objectives[0])
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={folder},dtype=float32",
           "--tasks", task, "--include_path", str(root / "evaluators" / "tasks"), "--device", "cpu",
           "--batch_size", "8", "--samples", json.dumps(samples), "--output_path", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli = json.loads(sorted(out.rglob("results_*.json"))[-1].read_text())["results"][task]
    key = metric if "," in metric else f"{metric},none"
    assert cli[key] == pytest.approx(in_memory, abs=1e-12)
