#!/usr/bin/env python
"""The README's main command: build the offline demo zoo if missing, search, show the result.

    .venv/bin/python scripts/run_demo.py [extra `evomerge search` options, e.g. --overwrite]

1. ``scripts/build_demo_zoo.py --skip-existing`` when a model of ``configs/demo.yaml`` is
   missing (CPU, offline, a few minutes the first time);
2. ``evomerge search configs/demo.yaml`` (a finished identical run is not searched again);
3. ``evomerge status <run dir>``: the Pareto front, with selection and heldout scores;
4. ``scripts/demo_report.py <run dir>``: the front against the uniform average and each specialist.

Runs from any directory (it works in the repository root) and never touches the network.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "demo.yaml"


def _missing_models(cfg: dict) -> list[str]:
    refs = [cfg["models"].get("base"), *cfg["models"]["sources"]]
    return [r for r in refs if r and not (ROOT / r / "config.json").is_file()]


def main(argv: list[str]) -> int:
    os.chdir(ROOT)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    cfg = yaml.safe_load(CONFIG.read_text())
    missing = _missing_models(cfg)
    if missing:
        print(f"building the demo zoo ({', '.join(missing)} missing) ...", flush=True)
        rc = subprocess.call([sys.executable, "scripts/build_demo_zoo.py", "--skip-existing"], env=env)
        if rc != 0:
            print(f"run_demo: building the zoo failed (exit {rc})", file=sys.stderr)
            return rc
    run_dir = cfg.get("output", {}).get("run_dir") or f"runs/{cfg.get('name', 'demo')}"
    for i, arg in enumerate(argv):
        if arg == "--run-dir" and i + 1 < len(argv):
            run_dir = argv[i + 1]
    evomerge = [sys.executable, "-m", "evomerge.cli"]
    rc = subprocess.call([*evomerge, "search", str(CONFIG.relative_to(ROOT)), *argv], env=env)
    if rc != 0:
        return rc
    rc = subprocess.call([*evomerge, "status", run_dir], env=env)
    if rc != 0:
        return rc
    # The demo's verdict: the front against the uniform average and the specialists, held out.
    subprocess.call([sys.executable, "scripts/demo_report.py", run_dir], env=env)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
