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
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from evaluators.demo_skills import SPLIT_SIZES  # noqa: E402
from evomerge.fileio import sha256_file  # noqa: E402,F401 - also used by tests as build_demo_zoo.sha256_file

MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
ZOO_VERSION = 5


def _plans(reduced: bool):
    from demo_zoo.train import ModelSize, TrainPlan

    # Base = pre-training on copy/lower/back/rsort (no demo skill), then a short "mid-training"
    # stage where 60% of items are demo skills (training words only), stopped early (250 of a
    # 600-step schedule) while the base is still weak at them (~15-35% exact match; zoo v4
    # stopped at 300 steps and its base reached 45% on shift, too strong to call weak).
    # Specialists are then small, low-lr nudges from a base that has the machinery; a base that
    # knew nothing of the skills made ~40% deltas that cancelled each other in every merge.
    # Specialists replay 30% of a corpus like the base's last one but with only 30% demo items
    # (not 60%): they keep the prompt format and copying and practise the other demo skills a
    # little, so each is a real specialist. Measured on one CPU (held-out, 512 items a skill):
    # replaying the base's own corpus (zoo v4) let the upper specialist gain 23 points on shift,
    # a near-generalist that no merge beat clearly (+0.006 on the mean); replaying no demo item
    # made task vectors that fought (best searched merges 0.36-0.38 against the uniform
    # average's 0.34); 30% gave merges 0.50 against 0.42.
    if reduced:
        return ModelSize(hidden=32, layers=2, heads=2, intermediate=64), TrainPlan(steps=30, lr=3e-3, batch=16, warmup=5), \
            TrainPlan(steps=10, lr=2e-3, batch=16, warmup=2, demo_share=0.6, prompt_loss=False, stage="mid"), \
            TrainPlan(steps=10, lr=4e-4, batch=16, warmup=2, replay=0.3, demo_share=0.3), 8
    return ModelSize(), TrainPlan(steps=1200, lr=3e-3, batch=64, warmup=50), \
        TrainPlan(steps=250, lr=2e-3, batch=64, warmup=10, demo_share=0.6, prompt_loss=False, stage="mid",
                  schedule_steps=600), \
        TrainPlan(steps=150, lr=4e-4, batch=64, warmup=10, replay=0.3, demo_share=0.3), None


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


def verify_zoo(folder: Path) -> list[str]:
    """Files of a zoo that are missing or differ from the hashes its ``zoo.json`` records (empty: intact).

    The demo zoo is shipped in the repository (``models/demo``), so every machine searches the
    very same bits; this is the check that it does.
    """
    folder = Path(folder)
    manifest_path = folder / "zoo.json"
    if not manifest_path.is_file():
        return [f"{manifest_path} (missing)"]
    manifest = json.loads(manifest_path.read_text())
    bad = []
    for name, entry in sorted(manifest.get("models", {}).items()):
        for fname, digest in sorted(entry.get("hashes", {}).items()):
            path = folder / name / fname
            if not path.is_file():
                bad.append(f"{path} (missing)")
            elif sha256_file(path) != digest:
                bad.append(f"{path} (sha256 differs from zoo.json)")
    return bad


def _reusable(folder: Path, entry: dict | None, parent_hash: str | None) -> bool:
    if not entry or not all((folder / n).is_file() for n in MODEL_FILES):
        return False
    if folder_hashes(folder) != entry.get("hashes"):
        return False
    return parent_hash is None or entry.get("parent_weights") == parent_hash


@dataclass(frozen=True)
class ZooProperties:
    """What the demo needs of its zoo, measured on held-out items; the builder trains until they hold.

    Why these: the demo claims a searched merge keeps the specialists' skills better than
    simple merging. That claim is only interesting when each specialist really is the one
    model that has its skill (``own_margin`` over every other model, base included), when
    the uniform average has lost part of each skill (``uniform_gap``: no simple merge is
    already best at everything), and when the base has not got the skills already
    (``base_max``). Float results differ between processors and short training amplifies it,
    so a rebuild on another CPU must *check* these rather than trust the recipe.
    """

    own_margin: float = 0.25  # specialist on its skill minus the best other model (base, other specialists)
    uniform_gap: float = 0.10  # specialist on its skill minus the uniform average on it
    base_max: float = 0.40  # the base's exact match on every demo skill is at most this
    extra_steps: int = 50  # one round of extra specialist training when a property fails
    max_extra_rounds: int = 6  # bound on extra rounds per specialist; then the build fails


REDUCED_PROPERTIES = ZooProperties(own_margin=0.0, uniform_gap=-1.0, base_max=1.0, extra_steps=5, max_extra_rounds=2)


def check_properties(scores: dict[str, dict[str, float]], skills: list[str], props: ZooProperties) -> list[str]:
    """Every property that fails, one line each naming the model, skill and numbers (empty: all hold).

    ``scores``: held-out exact match per model (``base``, each skill's specialist,
    ``uniform_average``) per skill. Pure, so tests break a property by hand.
    """
    failed = []
    for skill in skills:
        own = scores[skill][skill]
        others = {m: scores[m][skill] for m in ["base", *skills] if m != skill}
        rival, rival_score = max(others.items(), key=lambda kv: kv[1])
        if own - rival_score < props.own_margin:
            failed.append(f"own_margin: specialist {skill} scores {own:.3f} on {skill}, only {own - rival_score:+.3f} "
                          f"over {rival} ({rival_score:.3f}); needs +{props.own_margin:.2f}")
        if "uniform_average" in scores:
            uni = scores["uniform_average"][skill]
            if own - uni < props.uniform_gap:
                failed.append(f"uniform_gap: uniform average scores {uni:.3f} on {skill}, specialist {own:.3f}; "
                              f"the gap must be at least {props.uniform_gap:.2f}")
        if scores["base"][skill] > props.base_max:
            failed.append(f"base_max: base scores {scores['base'][skill]:.3f} on {skill}; must be at most {props.base_max:.2f}")
    return failed


def _failing_specialists(failed: list[str], skills: list[str]) -> list[str]:
    """Specialists more training can mend: own_margin and uniform_gap failures name their skill."""
    out = []
    for line in failed:
        if line.startswith("own_margin: specialist "):
            out.append(line.split()[2])
        elif line.startswith("uniform_gap: "):
            out.append(line.split(" on ")[1].split(",")[0])
    return [s for s in skills if s in out]


def build(out: Path, seed: int = 0, reduced: bool = False, skip_existing: bool = False, threads: int = 1,
          check_merges: bool = True, log=print, properties: ZooProperties | None = None) -> dict:
    """Train and save the zoo under ``out``; returns the manifest written to ``out/zoo.json``.

    After the first training pass the zoo's properties (``ZooProperties``) are measured on
    held-out items; a specialist that misses one is trained ``extra_steps`` more and measured
    again, at most ``max_extra_rounds`` times. A property that still fails raises
    ``ZooPropertyError`` naming it; the folders stay on disk for inspection, but the manifest
    is written only for a zoo whose properties hold.
    """
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
    props = properties or (REDUCED_PROPERTIES if reduced else ZooProperties())
    skills = list(SKILLS)

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

    live: dict[str, Any] = {}
    for skill in skills:
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
        live[skill] = model
        models[skill] = {"skill": skill, "steps": skill_plan.steps, "extra_rounds": 0, **stats, "hashes": hashes,
                         "parent_weights": base_weights}

    def load(name: str):
        return live.get(name) or AutoModelForCausalLM.from_pretrained(out / name, dtype=torch.float32).eval()

    def measure() -> dict[str, dict[str, float]]:
        """Held-out exact match of every model and of the uniform average (and task arithmetic at 1.0)."""
        scores: dict[str, dict[str, float]] = {}
        loaded = {name: load(name) for name in ["base", *skills]}
        for name, model in loaded.items():
            scores[name] = score_all(model, tok, "heldout", n_eval)
            log(f"{name:>8}: " + "  ".join(f"{k} {v:.3f}" for k, v in scores[name].items()))
        base_sd = loaded["base"].state_dict()
        specs = [loaded[s].state_dict() for s in skills]
        probe = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32).eval()
        merges = (("uniform_average", 1.0 / len(skills)),) + ((("task_arithmetic_1.0", 1.0),) if check_merges else ())
        for label, w in merges:
            probe.load_state_dict(task_arithmetic(base_sd, specs, [w] * len(skills)))
            scores[label] = score_all(probe, tok, "heldout", n_eval)
            log(f"{label}: " + "  ".join(f"{k} {v:.3f}" for k, v in scores[label].items()))
        return scores

    scores = measure()
    failed = check_properties(scores, skills, props)
    rounds = 0
    while failed and rounds < props.max_extra_rounds:
        mend = _failing_specialists(failed, skills)
        if not mend:
            break  # the base is too strong: more specialist training cannot mend that
        rounds += 1
        for line in failed:
            log(f"property failed: {line}")
        for skill in mend:
            entry = models[skill]
            log(f"{skill}: extra round {entry.get('extra_rounds', 0) + 1}, {props.extra_steps} steps")
            model = load(skill)
            plan = replace(skill_plan, steps=props.extra_steps, warmup=0, schedule_steps=None,
                           lr=skill_plan.lr * 0.5, stage=f"extra{entry.get('extra_rounds', 0) + 1}")
            stats = train(model, tok, skill, plan, seed, log=log)
            live[skill] = model
            entry.update(steps=entry["steps"] + props.extra_steps, extra_rounds=entry.get("extra_rounds", 0) + 1,
                         final_loss=stats["final_loss"], seconds=entry["seconds"] + stats["seconds"],
                         hashes=save_folder(model, tok, out / skill))
        scores = measure()
        failed = check_properties(scores, skills, props)
    if failed:
        raise ZooPropertyError(f"demo zoo property failed after {rounds} extra round(s): {failed[0]}"
                               + (f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""))

    manifest = {
        "version": ZOO_VERSION, "seed": seed, "reduced": reduced, "threads": threads,
        "torch": torch.__version__, "skills": skills, "tasks": {s: f"demo_{s}" for s in skills},
        "model_size": asdict(size), "base_plan": asdict(base_plan), "mid_plan": asdict(mid_plan), "skill_plan": asdict(skill_plan),
        "properties": {"required": asdict(props), "extra_rounds": rounds, "hold": True},
        "models": models, "heldout_exact_match": scores, "heldout_items": n_eval or SPLIT_SIZES["heldout"],
        "build_seconds": time.perf_counter() - t_start,
    }
    atomic_write_text(out / "zoo.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    log(f"zoo written to {out} in {manifest['build_seconds']:.0f}s")
    return manifest


class ZooPropertyError(RuntimeError):
    """A built zoo misses a property of ``ZooProperties`` even after the extra training rounds."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "models" / "demo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reduced", action="store_true", help="toy sizes and steps (tests)")
    ap.add_argument("--skip-existing", action="store_true", help="keep folders whose hashes match zoo.json")
    ap.add_argument("--threads", type=int, default=1, help="torch threads; part of what fixes the bits")
    ap.add_argument("--no-merge-check", action="store_true", help="skip scoring two simple merges")
    args = ap.parse_args(argv)
    try:
        build(args.out, args.seed, args.reduced, args.skip_existing, args.threads, not args.no_merge_check)
    except ZooPropertyError as err:
        print(f"build_demo_zoo: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
