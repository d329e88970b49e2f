"""Hand-made run directories for report/export tests (no search, no Ray).

Scores are chosen so the front, knee, best members and hypervolume can be worked out by
hand (see the numbers in tests/test_report.py and tests/test_export.py). Objectives:
``add`` (maximize) and ``ppl`` (minimize); optionally a third, ``rev`` (maximize).

    id       add   ppl   front?
    e000000  0.2   5.0   no  (dominated by e000001)
    e000001  0.5   4.0   yes  <- knee
    e000002  0.9   6.0   yes  <- best add
    e000003  0.3   3.0   yes
    e000004  failed
    e000005  0.4   4.5   no  (dominated by e000001)
    e000006  0.1   2.5   yes  <- best ppl
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

SCORES: dict[str, tuple[float, float] | None] = {
    "e000000": (0.2, 5.0),
    "e000001": (0.5, 4.0),
    "e000002": (0.9, 6.0),
    "e000003": (0.3, 3.0),
    "e000004": None,
    "e000005": (0.4, 4.5),
    "e000006": (0.1, 2.5),
}
FRONT = ["e000001", "e000002", "e000003", "e000006"]
REV = {"e000000": 0.3, "e000001": 0.6, "e000002": 0.2, "e000003": 0.9, "e000005": 0.1, "e000006": 0.5}
REFERENCES = {"uniform": (0.45, 4.2), "source:src0": (0.6, 5.5), "source:src1": (0.15, 3.5)}


def default_recipe(base: str, sources: list[str], method: str = "ties", seed: int = 0) -> dict[str, Any]:
    return {"base": base, "sources": sources, "seed": seed, "dtype": "float32", "compute_dtype": "float32",
            "groups": {"default": {"method": method, "params": {},
                                   "source_params": {s: {"weight": 0.5, "density": 0.7} for s in sources}}}}


def write_run(root: Path, *, recipes: dict[str, dict[str, Any]] | None = None, base: str = "models/base",
              sources: list[str] | None = None, three: bool = False, references: bool = True,
              front_json: bool = True, t0: float = 1_000_000.0) -> Path:
    """A run dir with config.yaml, evaluations.jsonl (+ heldout, reference records), front.json."""
    sources = sources or ["models/src0", "models/src1"]
    root.mkdir(parents=True, exist_ok=True)
    objectives = [{"name": "add", "evaluator": "lm_eval", "task": "demo_add", "metric": "exact_match"},
                  {"name": "ppl", "evaluator": "perplexity", "files": ["x.txt"], "direction": "minimize"}]
    if three:
        objectives.append({"name": "rev", "evaluator": "lm_eval", "task": "demo_reverse", "metric": "exact_match"})
    config = {"name": "synthetic", "models": {"base": base, "sources": sources},
              "merge": {"methods": ["ties", "dare_ties", "della"]},
              "space": {"name": "layerwise", "layer_group_size": 1}, "objectives": objectives,
              "optimizer": {"name": "DE", "seed": 7}, "budget": {"evaluations": 20}}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    lines = []
    for k, (eid, sc) in enumerate(SCORES.items()):
        recipe = (recipes or {}).get(eid) or default_recipe(base, sources)
        rec: dict[str, Any] = {"kind": "evaluation", "id": eid, "index": k, "asked": k + 1, "recipe": recipe, "value": [k],
                               "actor": 0, "asked_at": t0 + 60 * k, "finished_at": t0 + 60 * k + 50,
                               "timings": {"merge_s": 1.0, "eval_s": 40.0, "wall_s": 50.0}}
        if sc is None:
            rec.update(scores={}, losses=[], status="failed", error="actor died")
        else:
            scores = {"add": sc[0], "ppl": sc[1]}
            if three:
                scores["rev"] = REV[eid]
            rec.update(scores=scores, losses=[-sc[0], sc[1]], status="ok", error=None)
        lines.append(rec)
    # heldout re-scoring of two front members
    lines.append({"kind": "heldout", "id": "e000001", "scores": {"add": 0.45, "ppl": 4.2, "rev": 0.55},
                  "finished_at": t0 + 500})
    lines.append({"kind": "heldout", "id": "e000002", "scores": {"add": 0.8, "ppl": 6.3, "rev": 0.25},
                  "finished_at": t0 + 510})
    if references:
        for label, (a, p) in REFERENCES.items():
            sc = {"add": a, "ppl": p, "rev": 0.4}
            lines.append({"kind": "reference", "label": label, "recipe": None, "scores": sc,
                          "heldout": {"add": a - 0.05, "ppl": p + 0.1, "rev": 0.35}})
    with (root / "evaluations.jsonl").open("w") as fh:
        for rec in lines:
            fh.write(json.dumps(rec) + "\n")
    if front_json:
        objs = [{"name": "add", "direction": "maximize"}, {"name": "ppl", "direction": "minimize"}]
        if three:
            objs.append({"name": "rev", "direction": "maximize"})
        front = FRONT if not three else ["e000001", "e000002", "e000003", "e000006"]
        (root / "front.json").write_text(json.dumps({"objectives": objs, "members": front, "hypervolume": 1.0,
                                                     "evaluations": len(SCORES), "updated_at": t0 + 600}))
    return root
