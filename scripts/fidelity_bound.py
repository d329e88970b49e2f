"""How much multi-fidelity screening can save on a run's own candidates, and what stops it saving more.

``evaluation.fidelity`` measures in full only the candidates that could still enter the Pareto
front. However good the screen, a candidate that *does* enter the front must be measured, so the
share of candidates that enter bounds the saving: with ``m`` objectives of ``limit`` items each,
a screen of ``k`` items per objective (reused by the full evaluation) and a share ``p`` of
candidates entering, a perfect screen spends ``m*k + p*m*(limit - k)`` items per candidate instead
of ``m*limit``. And a real screen promotes more than ``p``: whether a candidate can be ruled out
depends on how its screen's error compares with how far the candidates lie from the front.

This script replays a screening run's measured candidates (those logged with every per-item value,
``evaluation.record_items``, on by default when screening), in log order, against the front they
built, and prints per run:

* the share entering the front at full fidelity, exactly (margin 0) and by more than each
  ``--margins`` (epsilon-dominance, ``evaluation.fidelity.margin``), and the saving a perfect
  screen of ``k`` items would then reach (and a free one: ``1/p``);
* the run's own estimator (its screen positions or IRT anchors, ``Screener.estimate``) replayed
  with each margin and ``--min-probabilities``: promoted share, items per candidate, the saving,
  and the entrants it would have skipped;
* per objective, the spread of the candidates' full-set scores against the screen estimate's error.

The replay uses the candidates the run measured; a run that promoted nearly all of them (the
demo's do) is nearly its whole population. Usage::

    python scripts/fidelity_bound.py runs/bench_quality/seed0/multi_fidelity [more run dirs]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measured_candidates(run_dir: Path) -> tuple[Any, Any, list[Any]]:
    """The run's config, its view, and its measured candidates with every per-item value, in log order."""
    from evomerge.config import load_config
    from evomerge.runview import load_run

    view = load_run(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    limits = {o.name: int(o.limit or 0) for o in cfg.objectives}
    rows = [e for e in view.evaluations if e.ok and e.measured and not e.cached_from and e.items
            and all(len(e.items.get(n) or []) == limit for n, limit in limits.items())]
    return cfg, view, sorted(rows, key=lambda e: e.index)


def entry_shares(rows: list[Any], directions: dict[str, str], margins: list[float]) -> dict[float, float]:
    """Per margin, the share of ``rows`` that no earlier front member (epsilon-)dominates when measured."""
    from evomerge.pareto import ParetoArchive
    from evomerge.search.fidelity import Estimate, entry_probability

    out = {}
    for margin in margins:
        archive, entered = ParetoArchive(directions), 0
        for e in rows:
            exact = {n: Estimate(v, v, v, (v,)) for n, v in e.scores.items()}  # a clairvoyant screen
            entered += entry_probability(exact, archive.members(), directions, margin) > 0
            archive.add(e.id, e.scores)
        out[margin] = entered / max(1, len(rows))
    return out


def replay(rows: list[Any], screener: Any, directions: dict[str, str], margin: float,
           min_probability: float) -> dict[str, Any]:
    """The run's estimator and promotion rule replayed: only promoted candidates join the front."""
    from evomerge.pareto import ParetoArchive
    from evomerge.search.fidelity import Estimate, entry_probability

    positions = screener.items()
    archive, promoted, skipped_entrants = ParetoArchive(directions), 0, 0
    for e in rows:
        screen = {n: [e.items[n][p] for p in positions[n]] for n in positions}
        estimates = screener.estimate(screen, seed=e.index)
        exact = {n: Estimate(v, v, v, (v,)) for n, v in e.scores.items()}
        enters = entry_probability(exact, archive.members(), directions, margin) > 0
        if entry_probability(estimates, archive.members(), directions, margin) >= min_probability:
            promoted += 1
            archive.add(e.id, e.scores)
        else:
            skipped_entrants += enters
    return {"promoted": promoted / max(1, len(rows)), "skipped_entrants": skipped_entrants}


def main(argv: list[str]) -> int:
    from evomerge.rundir import RunDir
    from evomerge.search.screening import Screener

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="screening run directories")
    ap.add_argument("--margins", type=float, nargs="+", default=[0.0, 0.02, 0.04])
    ap.add_argument("--min-probabilities", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    args = ap.parse_args(argv)
    for run_dir in args.runs:
        cfg, view, rows = measured_candidates(run_dir)
        if cfg.evaluation.fidelity is None or len(rows) < 10:
            print(f"{run_dir}: not a screening run with per-item values ({len(rows)} candidates)")
            continue
        screener = Screener(cfg, RunDir(run_dir))
        if not screener.ready:
            print(f"{run_dir}: its IRT model was never fitted")
            continue
        names, directions = screener.objectives, view.directions
        k = {n: len(v) for n, v in screener.items().items()}
        full = sum(screener.limits.values())
        screen_cost = sum(k.values())
        print(f"\n{run_dir}: {len(rows)} measured candidates, {len(names)} objectives, {full} items in full, "
              f"screen {screen_cost} items ({screener.estimator})")
        print(f"{'margin':>7} {'entering':>9} {'perfect screen':>15} {'free screen':>12}   replayed with min_probability")
        shares = entry_shares(rows, directions, args.margins)
        for margin in args.margins:
            p = shares[margin]
            perfect = full / (screen_cost + p * (full - screen_cost))
            free = math.inf if p == 0 else 1 / p
            cells = []
            for q in args.min_probabilities:
                r = replay(rows, screener, directions, margin, q)
                spent = screen_cost + r["promoted"] * (full - screen_cost)
                cells.append(f"{q:g}: {r['promoted']:.0%} promoted, {full / spent:.2f}x, "
                             f"{r['skipped_entrants']} entrants skipped")
            print(f"{margin:>7.3f} {p:>9.0%} {perfect:>14.2f}x {free:>11.2f}x   " + " | ".join(cells))
        print("objective   candidates' full-set score sd   screen estimate's error (rms)")
        positions = screener.items()
        estimated = [screener.estimate({m: [e.items[m][p] for p in positions[m]] for m in names}, seed=e.index)
                     for e in rows]
        for n in names:
            truth = np.array([e.scores[n] for e in rows])
            est = np.array([x[n].mean for x in estimated])
            print(f"{n:<11} {truth.std(ddof=1):>30.3f}   {math.sqrt(float(np.mean((est - truth) ** 2))):>28.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
