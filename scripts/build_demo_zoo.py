#!/usr/bin/env python
"""Build the offline demo zoo: a char tokenizer, a tiny Llama base and one specialist per skill.

Why: the README's demo must run on a fresh CPU machine with no hub access. This trains, in a
few minutes on one core, a base model on a mixed synthetic corpus (copying + random words)
and fine-tunes one specialist per skill of ``evaluators/demo_skills.py`` from that base, with
a modest learning rate and some base-corpus replay so the task vectors stay mergeable. Each
model folder is an ordinary Hugging Face folder (safetensors + tokenizer files).

    python scripts/build_demo_zoo.py --out models/demo [--seed 0] [--reduced] [--skip-existing]

The same seed and thread count give the same bits (``zoo.json`` lists the file hashes).
``--reduced`` builds a toy zoo in seconds, for tests.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
ZOO_VERSION = 4


def _plans(reduced: bool):
    from demo_zoo.train import ModelSize, TrainPlan

    # Base = pre-training on copy/lower/back/rsort (no demo skill), then a short "mid-training"
    # stage where 60% of items are demo skills (training words only), stopped while the base is
    # only partly competent (~30-50% exact match). Specialists are then small, low-lr nudges
    # (||delta||/||W|| ~5%) in the linear regime where task vectors add up; a base that knew
    # nothing of the skills made ~40% deltas that cancelled each other in every merge. Specialists
    # replay 30% of the base's last corpus (which holds all demo skills) to limit forgetting, as
    # instruction-tuned models replay pre-training data; their own skill is the other 70%.
    if reduced:
        return ModelSize(hidden=32, layers=2, heads=2, intermediate=64), TrainPlan(steps=30, lr=3e-3, batch=16, warmup=5), \
            TrainPlan(steps=10, lr=2e-3, batch=16, warmup=2, demo_share=0.6, prompt_loss=False, stage="mid"), \
            TrainPlan(steps=10, lr=4e-4, batch=16, warmup=2, replay=0.3, demo_share=0.6), 8
    return ModelSize(), TrainPlan(steps=1200, lr=3e-3, batch=64, warmup=50), \
        TrainPlan(steps=300, lr=2e-3, batch=64, warmup=10, demo_share=0.6, prompt_loss=False, stage="mid",
                  schedule_steps=600), \
        TrainPlan(steps=150, lr=4e-4, batch=64, warmup=10, replay=0.3, demo_share=0.6), None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_hashes(folder: Path) -> dict[str, str]:
    return {name: sha256_file(folder / name) for name in MODEL_FILES if (folder / name).is_file()}


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_folder(model, tok, folder: Path) -> dict[str, str]:
    """save_pretrained into a temp sibling, then swap it in: a crash never leaves half a model."""
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder_hashes(folder)


def _reusable(folder: Path, entry: dict | None, parent_hash: str | None) -> bool:
    if not entry or not all((folder / n).is_file() for n in MODEL_FILES):
        return False
    if folder_hashes(folder) != entry.get("hashes"):
        return False
    return parent_hash is None or entry.get("parent_weights") == parent_hash


def build(out: Path, seed: int = 0, reduced: bool = False, skip_existing: bool = False, threads: int = 1,
          check_merges: bool = True, log=print) -> dict:
    """Train and save the zoo under ``out``; returns the manifest written to ``out/zoo.json``."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from demo_zoo.score import score_all, task_arithmetic
    from demo_zoo.tokenizer import build_tokenizer
    from demo_zoo.train import make_model, train
    from evaluators.demo_skills import SKILLS, check_data

    hf_logging.disable_progress_bar()
    torch.set_num_threads(threads)  # more threads on a shared CPU is slower and changes bits
    torch.use_deterministic_algorithms(True)
    bad = check_data()
    if bad:
        raise SystemExit(f"evaluators/tasks/data differs from the generator ({', '.join(bad)}); "
                         "run `python -m evaluators.demo_skills` and commit the files")

    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    old = {}
    if skip_existing and (out / "zoo.json").is_file():
        old_manifest = json.loads((out / "zoo.json").read_text())
        if old_manifest.get("seed") == seed and old_manifest.get("reduced") == reduced and old_manifest.get("version") == ZOO_VERSION:
            old = old_manifest.get("models", {})
    size, base_plan, mid_plan, skill_plan, n_eval = _plans(reduced)
    tok = build_tokenizer()
    models: dict[str, dict] = {}

    base_dir = out / "base"
    if skip_existing and _reusable(base_dir, old.get("base"), None):
        log("base: reusing existing folder")
        models["base"] = old["base"]
    else:
        log(f"base: pre-training {base_plan.steps} steps, then {mid_plan.steps} mid-training steps")
        model = make_model(tok, size, seed)
        stats = train(model, tok, None, base_plan, seed, log=log)
        mid_stats = train(model, tok, None, mid_plan, seed, log=log)
        stats = {"seconds": stats["seconds"] + mid_stats["seconds"], "final_loss": mid_stats["final_loss"],
                 "pretrain_final_loss": stats["final_loss"]}
        hashes = save_folder(model, tok, base_dir)
        models["base"] = {"skill": None, "steps": base_plan.steps + mid_plan.steps, **stats, "hashes": hashes,
                          "params": sum(p.numel() for p in model.parameters())}
    base_weights = models["base"]["hashes"]["model.safetensors"]

    for skill in SKILLS:
        folder = out / skill
        if skip_existing and _reusable(folder, old.get(skill), base_weights):
            log(f"{skill}: reusing existing folder")
            models[skill] = old[skill]
            continue
        log(f"{skill}: fine-tuning {skill_plan.steps} steps from base")
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        stats = train(model, tok, skill, skill_plan, seed, log=log)
        hashes = save_folder(model, tok, folder)
        models[skill] = {"skill": skill, "steps": skill_plan.steps, **stats, "hashes": hashes, "parent_weights": base_weights}

    # Heldout exact match of every model on every skill, and of two simple merges.
    scores: dict[str, dict[str, float]] = {}
    loaded = {name: AutoModelForCausalLM.from_pretrained(out / name, dtype=torch.float32).eval() for name in models}
    for name, model in loaded.items():
        scores[name] = score_all(model, tok, "heldout", n_eval)
        log(f"{name:>8}: " + "  ".join(f"{k} {v:.3f}" for k, v in scores[name].items()))
    if check_merges:
        base_sd = loaded["base"].state_dict()
        specs = [loaded[s].state_dict() for s in SKILLS]
        probe = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32).eval()
        for label, w in (("uniform_average", 1.0 / len(SKILLS)), ("task_arithmetic_1.0", 1.0)):
            probe.load_state_dict(task_arithmetic(base_sd, specs, [w] * len(SKILLS)))
            scores[label] = score_all(probe, tok, "heldout", n_eval)
            log(f"{label}: " + "  ".join(f"{k} {v:.3f}" for k, v in scores[label].items()))

    manifest = {
        "version": ZOO_VERSION, "seed": seed, "reduced": reduced, "threads": threads,
        "torch": torch.__version__, "skills": list(SKILLS), "tasks": {s: f"demo_{s}" for s in SKILLS},
        "model_size": asdict(size), "base_plan": asdict(base_plan), "mid_plan": asdict(mid_plan), "skill_plan": asdict(skill_plan),
        "models": models, "heldout_exact_match": scores, "heldout_items": n_eval or "all",
        "build_seconds": time.perf_counter() - t_start,
    }
    atomic_write_text(out / "zoo.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    log(f"zoo written to {out} in {manifest['build_seconds']:.0f}s")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "models" / "demo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reduced", action="store_true", help="toy sizes and steps (tests)")
    ap.add_argument("--skip-existing", action="store_true", help="keep folders whose hashes match zoo.json")
    ap.add_argument("--threads", type=int, default=1, help="torch threads; part of what fixes the bits")
    ap.add_argument("--no-merge-check", action="store_true", help="skip scoring two simple merges")
    args = ap.parse_args(argv)
    build(args.out, args.seed, args.reduced, args.skip_existing, args.threads, not args.no_merge_check)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
