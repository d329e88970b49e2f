#!/usr/bin/env python
"""How well do IRT anchors estimate a candidate's full-set accuracy on the demo, against random subsets?

    .venv/bin/python scripts/bench_irt.py [--run-dir RUN] [--anchors 16 32] [--calibration 32]

Without ``--run-dir`` it first runs a full-fidelity demo search (``configs/demo.yaml``, seed
``--seed``) with ``evaluation.record_items=true`` and ``--budget`` evaluations (160: 32 to
calibrate on, at least 100 after them; held-out re-scoring off, nothing here needs it) into
``--out``/search, or reuses that directory when a finished search is already there.

Then, offline, per objective and for each ``k`` of ``--anchors``:

- **IRT**: ``evomerge.search.screening.fit_irt`` -- exactly what a search with
  ``estimator: irt`` fits -- on the references' and the first ``--calibration`` measured
  candidates' per-item selection results (log order, cached duplicates skipped, as
  ``Screener.calibrate`` does), giving a 2PL model and its ``k`` anchors; every later measured
  candidate is estimated from its results on the anchors (``evomerge.irt.estimate``, interval at
  the search's ``evaluation.fidelity.confidence``, by default the config default).
- **fixed subset**: the mean of the candidate's results on the ``k`` items the ``subset``
  estimator screens on (``screening.screen_positions``), the same for every candidate.
- **fresh subsets**: the mean on a seeded random ``k`` items drawn anew for each candidate.

Each is compared with the candidate's full-set accuracy (mean over all ``limit`` selection items,
which include the screened ones). Printed per objective and overall (the overall row: per
candidate the mean over objectives of the absolute error; Spearman on the mean over objectives):
the number of candidates, the mean absolute error of each estimator with a 95% bootstrap interval
over candidates, the IRT interval's coverage, and the Spearman rank correlation of estimate and
truth (a search needs the ranking more than the level).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEMO = ROOT / "configs" / "demo.yaml"
N_BOOT = 2000


def run_search(run_dir: Path, budget: int, seed: int) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "evomerge.cli", "search", str(DEMO), "--no-progress", "--run-dir", str(run_dir),
           "--set", "evaluation.record_items=true", "--set", f"budget.evaluations={budget}",
           "--set", "evaluation.rescore_heldout=false", "--set", f"optimizer.seed={seed}"]
    rc = subprocess.call(cmd, env=env, cwd=ROOT)
    if rc != 0:
        raise SystemExit(f"bench_irt: `{' '.join(cmd)}` failed (exit {rc})")


def boot_mean(values: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """Mean and its 95% percentile-bootstrap interval over the rows (candidates)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(N_BOOT, len(values)))
    means = values[idx].mean(axis=1)
    return float(values.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def analyse(view: Any, cfg: Any, k: int, calibration: int, confidence: float, seed: int,
            min_later: int) -> dict[str, Any]:
    from evomerge import irt
    from evomerge.search.screening import fit_irt, screen_positions

    names = [o.name for o in cfg.objectives]
    limits = {o.name: int(o.limit) for o in cfg.objectives}
    refs = [r for r in view.references if r.ok and r.items]
    measured = [e for e in view.evaluations if e.ok and e.measured and e.items and not e.cached_from]
    if len(measured) < calibration + min_later:
        raise SystemExit(f"bench_irt: {view.path} has {len(measured)} measured candidates with per-item results; "
                         f"need {calibration} to calibrate on and {min_later} after them (raise --budget)")
    rows = [r.items for r in refs] + [e.items for e in measured[:calibration]]
    data = fit_irt(rows, names, k)
    later = measured[calibration:]
    out: dict[str, Any] = {"k": k, "n_refs": len(refs), "n": len(later), "objectives": {}}
    truth_all, est_all = {}, {"irt": {}, "fixed": {}, "fresh": {}}
    for j, name in enumerate(names):
        fit = data["objectives"][name]
        model = irt.IrtModel.from_json(fit["model"])
        anchors = sorted(int(a) for a in fit["anchors"])
        fixed = screen_positions(limits[name], k, next(o.seed for o in cfg.objectives if o.name == name), name)
        truth, e_irt, e_fixed, e_fresh, covered = [], [], [], [], []
        for e in later:
            y = np.asarray(e.items[name], dtype=float)
            if y.size != limits[name]:
                raise SystemExit(f"bench_irt: candidate {e.id} has {y.size} {name} items, expected {limits[name]}")
            t = float(y.mean())
            est = irt.estimate(model, anchors, y[anchors], level=confidence)
            fresh = random.Random(f"fresh|{seed}|{e.id}|{name}").sample(range(limits[name]), k)
            truth.append(t)
            e_irt.append(est.accuracy)
            e_fixed.append(float(y[fixed].mean()))
            e_fresh.append(float(y[fresh].mean()))
            covered.append(est.low <= t <= est.high)
        truth_a = np.asarray(truth)
        ests = {"irt": np.asarray(e_irt), "fixed": np.asarray(e_fixed), "fresh": np.asarray(e_fresh)}
        truth_all[name] = truth_a
        for key, v in ests.items():
            est_all[key][name] = v
        out["objectives"][name] = {
            "n": len(truth), "truth_mean": float(truth_a.mean()), "truth_sd": float(truth_a.std()),
            "coverage": float(np.mean(covered)), "anchors": anchors,
            **{f"mae_{key}": boot_mean(np.abs(v - truth_a), seed=j) for key, v in ests.items()},
            **{f"bias_{key}": float((v - truth_a).mean()) for key, v in ests.items()},
            **{f"rho_{key}": spearman(v, truth_a) for key, v in ests.items()},
        }
    truth_mean = np.mean([truth_all[n] for n in names], axis=0)
    overall: dict[str, Any] = {"n": len(later), "truth_sd": float(truth_mean.std()),
                               "coverage": float(np.mean([out["objectives"][n]["coverage"] for n in names]))}
    for key in est_all:
        err = np.mean([np.abs(est_all[key][n] - truth_all[n]) for n in names], axis=0)
        overall[f"mae_{key}"] = boot_mean(err, seed=99)
        overall[f"rho_{key}"] = spearman(np.mean([est_all[key][n] for n in names], axis=0), truth_mean)
    out["overall"] = overall
    return out


def fmt(ci: tuple[float, float, float]) -> str:
    return f"{ci[0]:.4f} [{ci[1]:.4f}, {ci[2]:.4f}]"


def print_table(res: dict[str, Any], calibration: int, confidence: float) -> None:
    print(f"\nk = {res['k']} items per objective: IRT calibrated on {res['n_refs']} references + {calibration} "
          f"candidates; {res['n']} later measured candidates; IRT interval at {confidence:.0%}")
    print("objective".ljust(10) + "    n   truth sd  MAE IRT [95%]             MAE fixed subset [95%]    "
          "MAE fresh subsets [95%]   IRT cover   Spearman IRT / fixed / fresh")
    for name, r in [*res["objectives"].items(), ("overall", res["overall"])]:
        print(name.ljust(10) + f"{r['n']:5d}   {r['truth_sd']:.4f}  " + fmt(r["mae_irt"]).ljust(26)
              + fmt(r["mae_fixed"]).ljust(26) + fmt(r["mae_fresh"]).ljust(26) + f"{r['coverage']:8.1%}    "
              + f"{r['rho_irt']:.3f} / {r['rho_fixed']:.3f} / {r['rho_fresh']:.3f}")
    bias = "; ".join(f"{n} " + ", ".join(f"{key} {r[f'bias_{key}']:+.4f}" for key in ("irt", "fixed", "fresh"))
                     for n, r in res["objectives"].items())
    print(f"mean signed error (estimate − truth): {bias}")
    print("anchors: " + "; ".join(f"{n} {r['anchors']}" for n, r in res["objectives"].items()))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", type=Path, default=None,
                    help="a finished full-fidelity search with evaluation.record_items (default: run one)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_irt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", type=int, default=160, help="evaluations of the search run here (default 160)")
    ap.add_argument("--calibration", type=int, default=32, help="candidates the IRT model is fitted on (default 32)")
    ap.add_argument("--anchors", type=int, nargs="+", default=[16], help="k: anchors / subset items (default 16)")
    ap.add_argument("--min-later", type=int, default=100, help="measured candidates needed after the calibration")
    ap.add_argument("--confidence", type=float, default=None,
                    help="IRT interval level (default: the run's evaluation.fidelity.confidence, else its default)")
    args = ap.parse_args(argv)

    from evomerge.config import FidelityConfig, parse_config
    from evomerge.runview import load_run

    run_dir = args.run_dir
    if run_dir is None:
        run_dir = args.out / "search"
        done = (run_dir / "state" / "counters.json").is_file() and '"done"' in (
            run_dir / "state" / "counters.json").read_text()
        if not done:
            run_search(run_dir, args.budget, args.seed)
    view = load_run(run_dir)
    cfg = parse_config(view.config)
    confidence = args.confidence or (cfg.evaluation.fidelity.confidence if cfg.evaluation.fidelity
                                     else FidelityConfig().confidence)
    if any(o.limit is None for o in cfg.objectives):
        raise SystemExit("bench_irt: every objective needs a limit (the full selection set)")
    print(f"bench_irt: {run_dir} ({len(view.evaluations)} candidates logged); objectives "
          + ", ".join(f"{o.name} ({o.limit} items)" for o in cfg.objectives))
    for k in args.anchors:
        res = analyse(view, cfg, k, args.calibration, confidence, args.seed, args.min_later)
        print_table(res, args.calibration, confidence)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
