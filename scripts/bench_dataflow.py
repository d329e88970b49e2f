#!/usr/bin/env python
"""Seconds to materialise a data-flow candidate in place, against seconds to evaluate it.

    .venv/bin/python scripts/bench_dataflow.py [--cases demo 300m] [--candidates 8] [--threads 1]

A data-flow actor holds every source once (``PathModel``); a candidate path becomes a live
model by building per-position views of the shared layers (no weight is copied, no file is
written). This measures, side by side in one process, for random paths drawn from the
``dataflow`` space:

- ``materialise``: ``PathModel.apply(recipe)`` (median over candidates, after one warm-up);
- ``evaluate``: on the demo zoo, the demo's three objectives on their 128 selection items
  each (the in-memory lm-eval evaluator, as the actors run it); on the ~300M random Llama
  of ``scripts/bench_merge.py`` (no task can be scored by a random model), a batched greedy
  generation of 128 prompts x 24 tokens, 16 new tokens -- a generation objective's work.

It prints both, and the ratio materialise / evaluate: the share of an actor's time that the
data-flow space adds to what any search spends on scoring.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _space(sources: list[str], repeats: int, max_len: int | None):
    from evomerge.config import parse_config
    from evomerge.merge.sources import load_model_set
    from search_spaces import build_space

    cfg = parse_config({"models": {"sources": sources}, "budget": {"evaluations": 1},
                        "space": {"name": "dataflow", "repeats": repeats, "max_path_length": max_len},
                        "objectives": [{"name": "x", "task": "demo_sort", "metric": "exact_match"}]})
    ms = load_model_set(None, sources)
    return cfg, ms, build_space(cfg, ms)


def _random_recipes(space, n: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    lo, hi = space.scale_bounds
    return [space.to_recipe({"on": rng.uniform(-1, 1, len(space.slots)),
                             "scale": rng.uniform(lo, hi, space._scale_shape())}) for _ in range(n)]


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_demo(n: int) -> dict:
    import torch

    from evaluators import build_objectives
    from evomerge.config import load_config
    from evomerge.merge.path_model import PathModel

    sources = [str(ROOT / "models" / "demo" / s) for s in ("sort", "upper", "shift")]
    _, ms, space = _space(sources, repeats=2, max_len=12)
    demo = load_config(ROOT / "configs" / "demo.yaml")
    objectives = build_objectives(demo, str(sources[0]), "cpu")
    paths = PathModel(ms)
    recipes = _random_recipes(space, n + 1, seed=0)
    paths.apply(recipes[0])
    mat, ev = [], []
    for r in recipes[1:]:
        box = {}
        mat.append(_time(lambda: box.setdefault("m", paths.apply(r))))
        with torch.inference_mode():
            ev.append(_time(lambda: objectives.evaluate(box["m"])))
    return {"case": "demo zoo (3 x 4 layers, 384 items)", "params": sum(p.numel() for p in paths.models[sources[0]].parameters()),
            "layers": statistics.median(len(r.path) for r in recipes), "mat": mat, "eval": ev}


def bench_300m(n: int) -> dict:
    import torch

    from evomerge.merge.path_model import PathModel
    from scripts.bench_merge import SHAPES, build_models

    with tempfile.TemporaryDirectory() as tmp:
        _, srcs = build_models(Path(tmp), SHAPES["300m"], "float32", n_sources=2)
        sources = [str(s) for s in srcs]
        _, ms, space = _space(sources, repeats=1, max_len=24)
        paths = PathModel(ms)
        recipes = _random_recipes(space, n + 1, seed=0)
        paths.apply(recipes[0])
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, 32000, (128, 24), generator=g)
        mat, ev = [], []
        for r in recipes[1:]:
            box = {}
            mat.append(_time(lambda: box.setdefault("m", paths.apply(r))))
            model = box["m"]
            with torch.inference_mode():
                ev.append(_time(lambda: model.generate(prompts, attention_mask=torch.ones_like(prompts),
                                                       max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                                       pad_token_id=0)))
        params = sum(p.numel() for p in paths.models[sources[0]].parameters())
        return {"case": "~300M random Llama (2 x 18 layers, generate 128x16)", "params": params,
                "layers": statistics.median(len(r.path) for r in recipes), "mat": mat, "eval": ev}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", choices=["demo", "300m"], default=["demo", "300m"])
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for case in args.cases:
        r = bench_demo(args.candidates) if case == "demo" else bench_300m(max(3, args.candidates // 2))
        m, e = statistics.median(r["mat"]), statistics.median(r["eval"])
        rows.append((r["case"], f"{r['params'] / 1e6:.1f}M", f"{r['layers']:.0f}", f"{m * 1e3:.2f} ms",
                     f"{e:.3f} s", f"{m / e:.2e}", len(r["mat"])))
    header = ("case", "params/model", "median path", "materialise", "evaluate", "ratio", "candidates")
    widths = [max(len(str(x[i])) for x in rows + [header]) for i in range(len(header))]
    print(f"torch threads: {args.threads}")
    for row in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
