#!/usr/bin/env python
"""Search throughput and driver overhead on the demo, with 1 and with 2 actors.

    .venv/bin/python scripts/bench_search.py [--evaluations 40] [--actors 1 2] [--config configs/demo.yaml]
    .venv/bin/python scripts/bench_search.py --nodes 1 2 [--evaluations 40]

``--nodes``: instead of actors on the embedded local Ray, a real cluster on this machine
(``tests/cluster_fixtures.py``: a head with no CPUs, token auth, and 1-CPU worker nodes
added one by one); each search joins it with ``--address`` and ``ray.actors`` unset, so
it runs one actor per node, and the rows compare 1 node with 2.

For each actor count it runs ``evomerge search`` (a fresh run dir under runs/bench/,
no references' cost counted, heldout re-scoring off) and reads the evaluation log:

- search window: first dispatch (``finished_at - timings.wall_s``) to last finish;
- evaluations per hour: evaluations / window;
- driver overhead: the share of actor-time in the window not spent inside an actor's
  merge or evaluation, ``1 - sum(merge_s + eval_s) / (actors * window)``. It holds
  everything the search adds around the work: Ray dispatch and result transfer,
  ask/tell, the log's fsync, and actors idling while the driver is busy.

Prints one table and a JSON line (for CI logs). Target: overhead < 5%.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evomerge.fileio import read_jsonl  # noqa: E402
from evomerge.records import Kind  # noqa: E402


def measure(run_dir: Path, actors: int) -> dict[str, float]:
    recs = [r for _, r in read_jsonl(run_dir / "evaluations.jsonl")]
    evals = [r for r in recs if r.get("kind") == Kind.EVALUATION]
    real = [r for r in evals if not r.get("cached_from")]
    starts = [r["finished_at"] - r["timings"]["wall_s"] for r in real]
    window = max(r["finished_at"] for r in real) - min(starts)
    busy = sum(r["timings"].get("merge_s", 0.0) + r["timings"].get("eval_s", 0.0) for r in real)
    return {
        "actors": actors,
        "evaluations": len(evals),
        "window_s": round(window, 3),
        "evaluations_per_hour": round(len(evals) / window * 3600, 1),
        "mean_merge_s": round(sum(r["timings"].get("merge_s", 0.0) for r in real) / len(real), 4),
        "mean_eval_s": round(sum(r["timings"].get("eval_s", 0.0) for r in real) / len(real), 4),
        "driver_overhead": round(1.0 - busy / (actors * window), 4),
    }


def run_one(args: argparse.Namespace, env: dict[str, str], name: str, actors: int, sets: list[str],
            address: str | None) -> dict[str, float] | None:
    """One search in a fresh ``runs/bench/<name>``, measured; None (and a line) when it failed."""
    run_dir = ROOT / "runs" / "bench" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "evomerge.cli", "search", args.config, "--run-dir", str(run_dir),
           "--no-progress", "--set", f"budget.evaluations={args.evaluations}",
           "--set", "evaluation.rescore_heldout=false", "--set", "output.checkpoint_every=10"]
    for o in [*sets, *args.overrides]:
        cmd += ["--set", o]
    if address:
        cmd += ["--address", address]
    t0 = time.monotonic()
    rc = subprocess.call(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if rc != 0:
        print(f"search {name} failed (exit {rc}); see {run_dir}/driver.log", file=sys.stderr)
        return None
    row = measure(run_dir, actors)
    row["end_to_end_s"] = round(time.monotonic() - t0, 1)
    return row


def bench_nodes(args: argparse.Namespace, env: dict[str, str]) -> list[dict[str, float]] | None:
    """The same search on a local cluster of 1, then 2, ... worker nodes (one actor each)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from cluster_fixtures import cluster_env, new_cluster

    cluster = new_cluster(head_cpus=0, dashboard=False)
    rows = []
    try:
        cluster.start_head()
        for n in sorted(args.nodes):
            while sum(1 for name in cluster.nodes if name != "head") < n:
                cluster.start_worker()
            row = run_one(args, {**env, **cluster_env()}, f"nodes{n}", n,
                          ["ray.actors=null", "ray.num_cpus_per_actor=1"], cluster.address)
            if row is None:
                return None
            rows.append({"nodes": n, **row})
    finally:
        cluster.stop()
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--evaluations", type=int, default=40)
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    ap.add_argument("--nodes", type=int, nargs="+", help="node counts of a local multi-node cluster (e.g. 1 2)")
    args = ap.parse_args()
    os.chdir(ROOT)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if args.nodes:
        rows = bench_nodes(args, env)
        if rows is None:
            return 1
    else:
        rows = []
        for n in args.actors:
            row = run_one(args, env, f"actors{n}", n, [f"ray.actors={n}"], None)
            if row is None:
                return 1
            rows.append(row)
    cols = ["nodes"] if args.nodes else []
    cols += ["actors", "evaluations", "window_s", "evaluations_per_hour", "mean_merge_s", "mean_eval_s",
            "driver_overhead", "end_to_end_s"]
    print("  ".join(f"{c:>20}" for c in cols))
    for r in rows:
        print("  ".join(f"{r[c]:>20}" for c in cols))
    print(json.dumps({"bench_search": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
