#!/usr/bin/env python
"""The README's main command: search the shipped demo zoo, then judge the result on held-out items.

    .venv/bin/python scripts/run_demo.py [--seed N] [extra `evomerge search` options, e.g. --overwrite]

1. Check the shipped zoo (``models/demo``, committed with its ``zoo.json`` hashes): every
   machine searches the very same models. ``scripts/build_demo_zoo.py`` regenerates it.
2. ``evomerge search configs/demo.yaml`` (a finished identical run is not searched again);
   ``--seed N`` sets ``optimizer.seed`` and, unless a run dir is given, ``runs/demo-seed<N>``.
3. ``evomerge status <run dir>``: the Pareto front, with selection and held-out scores.
4. ``scripts/demo_report.py <run dir>``: the member chosen on the selection split against the
   uniform average and each specialist, with paired bootstrap intervals; its exit status
   (non-zero when the demo's claim fails) is this script's.

Runs from any directory and never touches the network.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "demo.yaml"
sys.path.insert(0, str(Path(__file__).resolve().parent))


def run_dir_of(cfg: dict, argv: list[str], seed: int | None) -> tuple[str, list[str]]:
    """The run dir the search will write (``--run-dir X``, ``--run-dir=X``, ``--set output.run_dir=X``,
    else the config's, suffixed by the seed when one is given) and the search arguments to pass."""
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--run-dir")
    ap.add_argument("--set", action="append", default=[])
    known, _ = ap.parse_known_args(argv)
    run_dir = known.run_dir
    for item in known.set:
        key, _, value = item.partition("=")
        if key.strip() == "output.run_dir":
            run_dir = value.strip()
    extra = list(argv)
    if seed is not None:
        extra += ["--set", f"optimizer.seed={seed}"]
    if run_dir is None:
        run_dir = cfg.get("output", {}).get("run_dir") or f"runs/{cfg.get('name', 'demo')}"
        if seed is not None:
            run_dir = f"{run_dir}-seed{seed}"
            extra += ["--run-dir", run_dir]
    return run_dir, extra


def main(argv: list[str]) -> int:
    t0 = time.monotonic()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=True)
    ap.add_argument("--seed", type=int, default=None, help="optimizer.seed of the search (default: the config's)")
    args, rest = ap.parse_known_args(argv)
    os.chdir(ROOT)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    from build_demo_zoo import verify_zoo

    bad = verify_zoo(ROOT / "models" / "demo")
    if bad:
        print(f"run_demo: the shipped demo zoo is damaged: {bad[0]}"
              + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
              + "; restore it with `git checkout -- models/demo` (or rebuild: scripts/build_demo_zoo.py)",
              file=sys.stderr)
        return 2
    cfg = yaml.safe_load(CONFIG.read_text())
    run_dir, search_args = run_dir_of(cfg, rest, args.seed)
    evomerge = [sys.executable, "-m", "evomerge.cli"]
    rc = subprocess.call([*evomerge, "search", str(CONFIG.relative_to(ROOT)), *search_args], env=env)
    if rc != 0:
        return rc
    rc = subprocess.call([*evomerge, "status", run_dir], env=env)
    if rc != 0:
        return rc
    rc = subprocess.call([sys.executable, "scripts/demo_report.py", run_dir], env=env)
    print(f"run_demo: {time.monotonic() - t0:.0f}s end to end; verdict {'met' if rc == 0 else 'NOT met'}"
          f" (exit {rc})", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
