#!/usr/bin/env python
"""Compare evomerge's merges with mergekit's, method by method, through both command lines.

Builds tiny random Llama models (a base + 3 fine-tune-like sources, 4 layers), and for every
method runs the same per-layer recipe through

* ``evomerge merge recipe.json``                         (evomerge),
* ``mergekit-yaml`` on ``to_mergekit_yaml(recipe)``      (mergekit 0.1.5; ``mergekit-multi``
  for the mixed-method recipe),
* ``evomerge merge`` on that same mergekit YAML          (our import path),

then prints, per method, the maximum relative difference (deterministic methods) or the kept
fraction and update-norm ratio (DARE/DELLA, whose random masks differ by design). Exits 1
when a deterministic method differs by more than 1e-5.

    .venv/bin/python scripts/compare_with_mergekit.py [--methods ties,slerp] [--keep DIR]

mergekit is installed first when missing (``pip install -c constraints.txt -e .[compare]``).
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from offline_env import BIN, ROOT  # noqa: E402  (sets the offline environment)


def ensure_mergekit() -> None:
    """Install the ``compare`` extra (mergekit pinned) when mergekit is not importable."""
    if importlib.util.find_spec("mergekit") is not None and (BIN / "mergekit-yaml").exists():
        return
    print("mergekit not found: installing the 'compare' extra ...", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt"),
                    "-e", f"{ROOT}[compare]"], check=True)


def _run(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode != 0:
        tail = log.read_text()[-2000:]
        raise RuntimeError(f"{' '.join(cmd[:2])} failed (exit {proc.returncode}):\n{tail}")
    return time.perf_counter() - t0


def mergekit_cli(yaml_path: Path, out: Path, multi: bool, work: Path) -> float:
    flags = ["--no-lazy-unpickle", "--no-copy-tokenizer", "--no-write-model-card"]
    if multi:
        cmd = [str(BIN / "mergekit-multi"), str(yaml_path), "--intermediate-dir", str(work / f"{out.name}.inter"),
               "--out-path", str(out), *flags]
    else:
        cmd = [str(BIN / "mergekit-yaml"), str(yaml_path), str(out), *flags]
    return _run(cmd, work / f"{out.name}.log")


def evomerge_cli(recipe_path: Path, out: Path, work: Path) -> float:
    return _run([str(BIN / "evomerge"), "merge", str(recipe_path), "--out", str(out)], work / f"{out.name}.log")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", help="comma-separated subset (default: all, plus 'mixed')")
    ap.add_argument("--keep", help="work in this folder and keep it (default: a temp dir, removed)")
    ap.add_argument("--no-import-check", action="store_true", help="skip `evomerge merge` on the mergekit YAML")
    args = ap.parse_args(argv)

    ensure_mergekit()
    from rich.console import Console
    from rich.table import Table

    from evomerge.merge.groups import LAYOUTS_BY_MODEL_TYPE
    from evomerge.merge.mergekit_yaml import to_mergekit_yaml
    from tests.mergekit_compare import (
        ALL_METHODS,
        RANDOM_METHODS,
        TOLERANCE,
        delta_stats,
        load_folder,
        max_rel_diff,
        mixed_recipe,
        per_layer_recipe,
    )
    from tests.tiny_models import TINY_LLAMA, build_tiny_llama_set

    methods = args.methods.split(",") if args.methods else [*ALL_METHODS, "mixed"]
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="evomerge-vs-mergekit-"))
    work.mkdir(parents=True, exist_ok=True)
    console = Console(width=max(Console().width, 132))
    try:
        n_layers = TINY_LLAMA["num_hidden_layers"]
        models = build_tiny_llama_set(work / "models", n_sources=3, seed=0)
        base = load_folder(models.base)
        console.print(f"tiny Llama set in {work / 'models'}: base + 3 sources, {n_layers} layers, "
                      f"{sum(t.numel() for t in base.values()):,} parameters each")
        table = Table(title="evomerge vs mergekit 0.1.5 (per-layer recipes, float32)")
        for col in ("method", "kind", "max rel diff", "keep ours / mk", "norm ratio", "yaml->evomerge",
                    "evomerge s", "mergekit s", "verdict"):
            table.add_column(col, justify="left" if col in ("method", "kind", "verdict") else "right")
        failed = False
        for method in methods:
            if method == "mixed":
                recipe = mixed_recipe(models.base_ref, models.source_refs, n_layers)
            else:
                recipe = per_layer_recipe(method, models.base_ref, models.source_refs, n_layers)
            d = work / method
            d.mkdir(exist_ok=True)
            (d / "recipe.json").write_text(recipe.to_json())
            text = to_mergekit_yaml(recipe, n_layers, LAYOUTS_BY_MODEL_TYPE["llama"])
            (d / "mergekit.yaml").write_text(text)
            t_ev = evomerge_cli(d / "recipe.json", d / "evomerge", d)
            t_mk = mergekit_cli(d / "mergekit.yaml", d / "mergekit", method == "mixed", d)
            ours, theirs = load_folder(d / "evomerge"), load_folder(d / "mergekit")
            via_yaml = "-"
            if not args.no_import_check:
                evomerge_cli(d / "mergekit.yaml", d / "evomerge_from_yaml", d)
                diff = max_rel_diff(load_folder(d / "evomerge_from_yaml"), ours)
                via_yaml = "identical" if diff == 0 else f"{diff:.1e}"
                failed |= diff != 0
            if method in RANDOM_METHODS:
                so, st = delta_stats(ours, base), delta_stats(theirs, base)
                ratio = so["norm"] / st["norm"]
                ok = abs(so["keep"] - st["keep"]) < 0.02 and abs(ratio - 1) < 0.05
                table.add_row(method, "random", "-", f"{so['keep']:.4f} / {st['keep']:.4f}", f"{ratio:.4f}",
                              via_yaml, f"{t_ev:.1f}", f"{t_mk:.1f}", "ok" if ok else "[yellow]off[/]")
            else:
                diff = max_rel_diff(ours, theirs)
                ok = diff <= TOLERANCE
                failed |= not ok
                table.add_row(method, "exact", f"{diff:.2e}", "-", "-", via_yaml, f"{t_ev:.1f}", f"{t_mk:.1f}",
                              "ok" if ok else "[red]FAIL[/]")
        console.print(table)
        console.print(f"max rel diff = max over tensors of max|evomerge - mergekit| / max|mergekit|; "
                      f"deterministic methods must be <= {TOLERANCE:g}. keep = fraction of weights moved off the "
                      f"base; norm ratio = ||evomerge - base|| / ||mergekit - base||.")
        return 1 if failed else 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
