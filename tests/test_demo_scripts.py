"""The demo's scripts: run-dir resolution of run_demo.py and the mergekit-evolve-style config of bench_quality.py."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

DEMO = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())


def test_run_demo_follows_every_way_of_naming_the_run_dir():
    from run_demo import run_dir_of

    assert run_dir_of(DEMO, [], None) == ("runs/demo", [])
    assert run_dir_of(DEMO, ["--run-dir", "x/r"], None) == ("x/r", ["--run-dir", "x/r"])
    assert run_dir_of(DEMO, ["--run-dir=x/r2"], None)[0] == "x/r2"
    assert run_dir_of(DEMO, ["--set", "output.run_dir=x/r3", "--overwrite"], None)[0] == "x/r3"
    # a seed picks its own run dir unless one is named, and always reaches the optimizer
    assert run_dir_of(DEMO, [], 2) == ("runs/demo-seed2", ["--set", "optimizer.seed=2", "--run-dir", "runs/demo-seed2"])
    assert run_dir_of(DEMO, ["--run-dir", "y"], 1) == ("y", ["--run-dir", "y", "--set", "optimizer.seed=1"])


def test_mergekit_evolve_style_config_is_one_method_one_mean_objective_cma():
    from bench_quality import MKE_METHOD, mergekit_evolve_config

    from evomerge.config import parse_config

    cfg = mergekit_evolve_config(DEMO, seed=3, budget=50)
    assert cfg["merge"]["methods"] == [MKE_METHOD] == ["dare_ties"]
    assert cfg["optimizer"] == {"name": "CMA", "seed": 3} and cfg["budget"] == {"evaluations": 50}
    (obj,) = cfg["objectives"]
    assert obj["name"] == "mean" and obj["limit"] == DEMO["objectives"][0]["limit"]
    assert [c["task"] for c in obj["components"]] == [o["task"] for o in DEMO["objectives"]]
    assert abs(sum(c["weight"] for c in obj["components"]) - 1.0) < 1e-12
    assert cfg["space"] == DEMO["space"] and cfg["models"] == DEMO["models"]
    parsed = parse_config(cfg)  # a valid search config, same space and models as the demo's
    assert parsed.objectives[0].components is not None and len(parsed.objectives[0].components) == 3
