#!/usr/bin/env python
"""Search quality, side by side on the shipped demo zoo, at the same evaluation budget.

    .venv/bin/python scripts/bench_quality.py [--seed 0] [--budget 400] [--out runs/bench_quality]

Compared, in one run:

- **evomerge**: the demo's own search (``configs/demo.yaml``): multi-objective (one objective
  per skill), a merge-method gene, per-layer-group genes, DE.
- **mergekit-evolve-style**: what mergekit-evolve does -- CMA-ES over per-layer-group weights
  and densities of one fixed method (``dare_ties``, its README's example), one objective: the
  mean of the skills. Same space, same items, same budget, same actors.
- the **uniform average** of the specialists, and the **best single specialist** (best
  *selection* mean among the specialists: nothing is chosen on held-out items).

For each search the member is chosen on the selection split only (best selection mean). Every
model is then scored on all held-out items (512 per skill) by the same in-process evaluator
(``CandidateEvaluator``, what the Ray actors run). Printed per row: the held-out mean with its
95% bootstrap interval, evomerge's chosen member minus the row (paired 95% interval), and the
held-out hypervolume of the search's final front (reference point: 0 on every skill; a
one-objective search's front is its best member).

Fidelity rows (``--fidelity-rows``, on by default; ``--no-fidelity-rows`` skips them): the same
demo search with ``evaluation.fidelity`` (every candidate screened on ``--screen-items`` items per
objective first, measured in full only when it could still enter the front), once with the
fixed-random-subset estimator (**multi-fidelity**) and once with IRT anchors (**IRT anchors**,
``evaluation.estimator: irt``, the first ``--irt-calibration`` candidates measured in full). Both run
at the *same wall-clock budget* as the default evomerge search: ``budget.wall_clock_s`` = the
default search's wall time, ``budget.evaluations`` = 100000 (never reached). The wall time of a
search (``search_wall_s``) is what ``budget.wall_clock_s`` measures: the session's ``elapsed_s``
(``state/counters.json``, from the session's start: Ray actors, references, the search) minus the
held-out re-scoring of the front that came after the last candidate finished (the last record's
``finished_at`` minus the last candidate's). Held-out re-scoring stays on, as in the demo.

For these three rows a second table gives the cost: item evaluations spent (per candidate: the
screen's items plus, when it was measured in full, every selection item of every objective; a
candidate served from the cache costs 0 and is not counted as a candidate), items per candidate,
candidates per hour of search wall time, the promotion rate, the front size, and again the
held-out mean of the member chosen on selection, its paired difference to the default, and the
held-out hypervolume. A closing line says whether each holds the target: the same held-out
quality as the full-fidelity default (95% intervals overlapping) with at least 3x fewer item
evaluations per candidate on average.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

DEMO = ROOT / "configs" / "demo.yaml"
#: the fixed method of the mergekit-evolve-style search (mergekit-evolve README's example genome)
MKE_METHOD = "dare_ties"


def mergekit_evolve_config(demo: dict[str, Any], seed: int, budget: int, method: str = MKE_METHOD) -> dict[str, Any]:
    """The demo config turned into a mergekit-evolve-style search: one method, one mean objective, CMA-ES."""
    cfg = json.loads(json.dumps(demo))
    objs = demo["objectives"]
    cfg["name"] = "bench-mergekit-evolve"
    cfg["merge"] = {**demo.get("merge", {}), "methods": [method]}
    cfg["objectives"] = [{
        "name": "mean", "evaluator": "lm_eval", "limit": objs[0].get("limit"),
        "components": [{"task": o["task"], "metric": o["metric"], "weight": 1.0 / len(objs)} for o in objs],
    }]
    cfg["optimizer"] = {"name": "CMA", "seed": seed}
    cfg["budget"] = {"evaluations": budget}
    cfg["evaluation"] = {**demo.get("evaluation", {}), "rescore_heldout": False}
    return cfg


def run_search(config: Path | None, args: list[str], env: dict[str, str]) -> None:
    cmd = [sys.executable, "-m", "evomerge.cli", "search", str(config), "--no-progress", *args]
    rc = subprocess.call(cmd, env=env, cwd=ROOT)
    if rc != 0:
        raise SystemExit(f"bench_quality: `{' '.join(cmd)}` failed (exit {rc})")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", type=int, default=None, help="evaluations per search (default: the demo's)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_quality")
    ap.add_argument("--mke-method", default=MKE_METHOD,
                    help="the fixed method of the mergekit-evolve-style search (default: its README's dare_ties)")
    ap.add_argument("--fidelity-rows", action=argparse.BooleanOptionalAction, default=True,
                    help="also run the multi-fidelity and IRT-anchor searches at the default search's wall time")
    ap.add_argument("--screen-items", type=int, default=16, help="evaluation.fidelity.screen_items (default 16)")
    ap.add_argument("--min-probability", type=float, default=None,
                    help="evaluation.fidelity.min_probability (default: the config's default)")
    ap.add_argument("--margin", type=float, default=None,
                    help="evaluation.fidelity.margin (default: the config's default, 0: exact dominance)")
    ap.add_argument("--irt-calibration", type=int, default=32, help="evaluation.irt.calibration (default 32)")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    os.environ.update(env)
    from build_demo_zoo import verify_zoo

    bad = verify_zoo(ROOT / "models" / "demo")
    if bad:
        raise SystemExit(f"bench_quality: the shipped demo zoo is damaged: {bad[0]}; `git checkout -- models/demo`")
    demo = yaml.safe_load(DEMO.read_text())
    budget = args.budget or demo["budget"]["evaluations"]
    out = args.out / f"seed{args.seed}"
    out.mkdir(parents=True, exist_ok=True)

    evo_dir = out / "evomerge"
    mke_dir = out / ("mergekit_evolve" if args.mke_method == MKE_METHOD else f"mergekit_evolve_{args.mke_method}")
    run_search(DEMO, ["--run-dir", str(evo_dir), "--set", f"optimizer.seed={args.seed}",
                      "--set", f"budget.evaluations={budget}"], env)
    mke_cfg = mke_dir.with_suffix(".yaml")
    mke_cfg.write_text(yaml.safe_dump(mergekit_evolve_config(demo, args.seed, budget, args.mke_method), sort_keys=False))
    run_search(mke_cfg, ["--run-dir", str(mke_dir)], env)
    fid_dirs: dict[str, Path] = {}
    wall_budget = None
    if args.fidelity_rows:
        wall_budget = search_wall_s(evo_dir)
        common = ["--set", f"optimizer.seed={args.seed}", "--set", f"budget.wall_clock_s={wall_budget:.3f}",
                  "--set", f"budget.evaluations={FIDELITY_EVALUATIONS}",
                  "--set", f"evaluation.fidelity.screen_items={args.screen_items}"]
        if args.min_probability is not None:
            common += ["--set", f"evaluation.fidelity.min_probability={args.min_probability}"]
        if args.margin is not None:
            common += ["--set", f"evaluation.fidelity.margin={args.margin}"]
        fid_dirs[MF_LABEL] = out / "multi_fidelity"
        fid_dirs[IRT_LABEL] = out / "irt_anchors"
        run_search(DEMO, ["--run-dir", str(fid_dirs[MF_LABEL]), *common], env)
        run_search(DEMO, ["--run-dir", str(fid_dirs[IRT_LABEL]), *common, "--set", "evaluation.estimator=irt",
                          "--set", f"evaluation.irt.calibration={args.irt_calibration}"], env)
    search_s = time.monotonic() - t0

    from evomerge.config import load_config
    from evomerge.paired import mean_interval, paired_difference
    from evomerge.pareto import MAXIMIZE, hypervolume
    from evomerge.records import UNIFORM, Status, is_source_label
    from evomerge.runview import load_run
    from evomerge.verdict import choose_on_selection, selection_mean

    evo, mke = load_run(evo_dir), load_run(mke_dir)
    names = evo.objective_names
    cfg = load_config(DEMO, [f"optimizer.seed={args.seed}"])
    from evomerge.search.actor import CandidateEvaluator

    scorer = CandidateEvaluator(cfg.model_dump(mode="json"), 0, "cpu", str(ROOT))
    cache: dict[str, dict[str, list[float]]] = {}

    def heldout_items(key: str, recipe: dict[str, Any]) -> dict[str, list[float]]:
        if key not in cache:
            res = scorer.evaluate(key, recipe, "heldout")
            if res["status"] != Status.OK or not res.get("items"):
                raise SystemExit(f"bench_quality: held-out scoring of {key} failed: {res.get('error')}")
            cache[key] = res["items"]
        return cache[key]

    # The chosen members (selection only) and the baselines.
    evo_id = choose_on_selection(evo, "mean")
    mke_id = choose_on_selection(mke, "mean")
    rows: dict[str, dict[str, list[float]]] = {
        f"evomerge ({evo_id})": heldout_items(f"evo:{evo_id}", evo.get(evo_id).recipe),
        f"mergekit-evolve-style, {args.mke_method} ({mke_id})": heldout_items(f"mke:{mke_id}", mke.get(mke_id).recipe),
    }
    fid_views = {label: load_run(d) for label, d in fid_dirs.items()}
    fid_ids = {label: choose_on_selection(v, "mean") for label, v in fid_views.items()}
    for label, v in fid_views.items():
        rows[f"{label} ({fid_ids[label]})"] = heldout_items(f"{label}:{fid_ids[label]}",
                                                          v.get(fid_ids[label]).recipe)
    refs = {r.label: r for r in evo.references}
    rows["uniform average"] = heldout_items(f"ref:{UNIFORM}", refs[UNIFORM].recipe)
    sources = [r for r in evo.references if is_source_label(r.label)]
    best_src = max(sources, key=lambda r: selection_mean(r.scores, evo))
    rows[f"best specialist ({best_src.short_label}, on selection)"] = heldout_items(f"ref:{best_src.label}",
                                                                                    best_src.recipe)

    # Held-out hypervolume of each final front (held-out means, larger is better; reference point: 0 on every skill).
    def front_hv(view, prefix: str) -> tuple[float, int]:
        pts = []
        for e in view.front_evaluations():
            # a run that re-scored its front logged each member's held-out items (same evaluator code)
            items = view.heldout_items.get(e.id) or heldout_items(f"{prefix}:{e.id}", e.recipe)
            pts.append({n: sum(items[n]) / len(items[n]) for n in names})
        return hypervolume(pts, {n: MAXIMIZE for n in names}, {n: 0.0 for n in names}), len(pts)

    hv = {f"evomerge ({evo_id})": front_hv(evo, "evo"),
          f"mergekit-evolve-style, {args.mke_method} ({mke_id})": front_hv(mke, "mke")}
    for label, v in fid_views.items():
        hv[f"{label} ({fid_ids[label]})"] = front_hv(v, label)

    lead = next(iter(rows))
    n_items = {n: len(rows[lead][n]) for n in names}
    print(f"\nbench_quality: seed {args.seed}, {budget} evaluations per search, held-out items "
          + ", ".join(f"{n} {k}" for n, k in n_items.items()) + f"; searches {search_s:.0f}s")
    print("row".ljust(44) + "".join(n.rjust(7) for n in names)
          + "   held-out mean [95%]      evomerge − row [95% paired]   held-out HV (front)")
    for label, items in rows.items():
        m, lo, hi = mean_interval(items, names)
        diff = "" if label == lead else paired_difference(rows[lead], items, names).describe()
        hv_txt = f"{hv[label][0]:.4f} ({hv[label][1]})" if label in hv else ""
        print(label.ljust(44) + "".join(f"{sum(items[n]) / len(items[n]):7.3f}" for n in names)
              + f"   {m:.3f} [{lo:.3f}, {hi:.3f}]".ljust(27) + f"{diff:<30}{hv_txt}")
    verdicts = {label: paired_difference(rows[lead], items, names) for label, items in rows.items() if label != lead}
    beats = [label for label, d in verdicts.items() if d.above_zero]
    print(f"evomerge's chosen member beats, with the 95% interval above zero: {', '.join(beats) or 'none'}; "
          f"{time.monotonic() - t0:.0f}s in all")
    if fid_views:
        family = {"evomerge (full fidelity)": (evo, evo_dir, f"evomerge ({evo_id})")}
        family.update({label: (fid_views[label], fid_dirs[label], f"{label} ({fid_ids[label]})")
                       for label in fid_views})
        print(f"\nsame wall clock: budget.wall_clock_s={wall_budget:.1f}s (the default search's), "
              f"screen_items={args.screen_items}, min_probability="
              f"{args.min_probability if args.min_probability is not None else 'default'}, margin="
              f"{args.margin if args.margin is not None else 'default'}, irt.calibration={args.irt_calibration}")
        print("row".ljust(26) + "wall_s  cands  measured  promoted/screened  front  item evals  items/cand  cands/h"
              + "   held-out mean [95%]      default − row [95% paired]   held-out HV")
        stats = {}
        for label, (view, run_dir, row) in family.items():
            st = item_stats(view)
            st["wall_s"] = search_wall_s(run_dir)
            stats[label] = st
            m, lo, hi = mean_interval(rows[row], names)
            st["interval"] = (m, lo, hi)
            diff = "" if row == lead else paired_difference(rows[lead], rows[row], names).describe()
            prom = f"{st['promoted']}/{st['screened']}" if st["screened"] else "-"
            print(label.ljust(26) + f"{st['wall_s']:6.0f}  {st['candidates']:5d}  {st['measured']:8d}  {prom:>17}  "
                  f"{len(view.front):5d}  {st['spent']:10d}  {st['per_candidate']:10.1f}  "
                  f"{3600 * st['candidates'] / st['wall_s']:7.0f}"
                  + f"   {m:.3f} [{lo:.3f}, {hi:.3f}]".ljust(27) + f"{diff:<30}{hv[row][0]:.4f} ({hv[row][1]})")
        base = stats["evomerge (full fidelity)"]
        verdict = []
        for label in fid_views:
            st = stats[label]
            overlap = st["interval"][1] <= base["interval"][2] and base["interval"][1] <= st["interval"][2]
            fewer = base["per_candidate"] / st["per_candidate"] if st["per_candidate"] else float("inf")
            holds = overlap and fewer >= 3.0
            verdict.append(f"{label}: {'HOLDS' if holds else 'does NOT hold'} (held-out intervals "
                           f"{'overlap' if overlap else 'do not overlap'}; {fewer:.2f}x fewer item evaluations per "
                           f"candidate)")
        print("target -- same held-out quality as the full-fidelity default (intervals overlapping), with at least "
              "3x fewer item evaluations per candidate on average: " + "; ".join(verdict))
    return 0


#: the fidelity rows' evaluation budget: never reached, the wall clock stops them
FIDELITY_EVALUATIONS = 100000
MF_LABEL = "multi-fidelity"
IRT_LABEL = "IRT anchors"


def _raw_records(run_dir: Path) -> list[dict[str, Any]]:
    from evomerge.fileio import read_jsonl

    return [rec for _, rec in read_jsonl(run_dir / "evaluations.jsonl")]


def search_wall_s(run_dir: Path) -> float:
    """The search's wall time as ``budget.wall_clock_s`` counts it: the session's ``elapsed_s`` (Ray start,
    references, search) minus the held-out re-scoring after the last candidate finished."""
    counters = json.loads((run_dir / "state" / "counters.json").read_text())
    recs = _raw_records(run_dir)
    last_any = max(float(r["finished_at"]) for r in recs if r.get("finished_at") is not None)
    last_eval = max(float(r["finished_at"]) for r in recs
                    if r.get("kind") == "evaluation" and r.get("finished_at") is not None)
    return float(counters["elapsed_s"]) - max(0.0, last_any - last_eval)


def item_stats(view) -> dict[str, Any]:
    """Item evaluations a run spent (``report.items_spent`` per candidate), and its candidates, measured,
    screened and promoted counts."""
    from evomerge.report import items_spent

    full_items = sum(int(o.get("limit") or 0) for o in (view.config.get("objectives") or []))
    spent = candidates = measured = screened = promoted = 0
    for e in view.evaluations:
        if e.cached_from:
            continue
        candidates += 1
        spent += items_spent(e, full_items)
        if e.screen:
            screened += 1
            promoted += bool(e.screen.get("promoted"))
        if e.ok and e.measured:
            measured += 1
    return {"spent": spent, "candidates": candidates, "measured": measured, "screened": screened,
            "promoted": promoted, "per_candidate": spent / max(1, candidates), "full_items": full_items}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
