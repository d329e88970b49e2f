"""Helpers for the driver tests: tiny search configs and reading a run's log.

The objectives are perplexities of the tiny random Llamas on two small word files
(``w4 w17 ...``, in the tiny tokenizer's vocabulary): a forward pass of a 4-layer,
32-wide model, a few milliseconds per candidate, so the tests measure the driver, not
the evaluators.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import yaml


def write_texts(folder: Path, n_words: int = 200) -> list[Path]:
    rng = random.Random(0)
    paths = []
    for name in ("left", "right"):
        p = folder / f"{name}.txt"
        p.write_text(" ".join(f"w{rng.randrange(4, 96)}" for _ in range(n_words)) + "\n")
        paths.append(p)
    return paths


def search_config(tiny: Any, folder: Path, *, run_dir: Path, evaluations: int = 10, actors: int = 1,
                  seed: int = 0, **sections: Any) -> dict[str, Any]:
    """A config dict over the tiny models: 2 perplexity objectives, DE, layerwise space."""
    left, right = write_texts(folder)
    cfg: dict[str, Any] = {
        "name": "tiny",
        "models": {"base": tiny.base_ref, "sources": tiny.source_refs[:2]},
        "merge": {"methods": ["ties", "task_arithmetic"]},
        "space": {"name": "layerwise", "layer_group_size": 2},
        "objectives": [
            {"name": "left", "evaluator": "perplexity", "files": [str(left)]},
            {"name": "right", "evaluator": "perplexity", "files": [str(right)]},
        ],
        "optimizer": {"name": "DE", "seed": seed},
        "budget": {"evaluations": evaluations},
        "ray": {"actors": actors, "num_cpus_per_actor": 0.5},
        "output": {"run_dir": str(run_dir), "checkpoint_every": 50},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def write_config(cfg: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def records(run_dir: Path, kind: str | None = "evaluation") -> list[dict[str, Any]]:
    out = []
    p = Path(run_dir) / "evaluations.jsonl"
    if not p.is_file():
        return out
    for line in p.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn line of a killed writer
        if kind is None or rec.get("kind") == kind:
            out.append(rec)
    return out


def canon(recipe: dict[str, Any]) -> str:
    return json.dumps(recipe, sort_keys=True)
