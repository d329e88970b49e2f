#!/usr/bin/env python
"""Memory benchmark: each residency mode's planned vs measured memory and in-place merge time, on CPU.

Why: the memory plan (``evomerge.merge.memory_plan``) decides, before loading anything,
whether an actor keeps task vectors resident or streams them from the files; this checks
its figures against what a process really holds, and prices streaming against resident.

On a random Llama (hidden 2048, intermediate 5632, 24 layers, vocab 32000: ~1.37B
parameters, bfloat16) with 3 sources + base, built once (``--keep DIR`` reuses it) with
``bench_merge.build_models``, it prints every CPU mode's plan and, for each mode whose
plan fits under ``--cap-gb`` (default 12), runs the in-place merge of a per-layer TIES
recipe in a fresh subprocess and reports:

- the plan's estimate (headroom 0: no evaluator runs here);
- peak memory of that subprocess above its baseline (measured after importing torch,
  transformers and evomerge, before loading anything): ``ru_maxrss`` (which also counts the
  pages of the memory-mapped model files it touched: clean page cache, reclaimable) and
  the peak anonymous RSS (``RssAnon``, sampled every 20 ms: what the plan models);
- setup seconds, the first merge (+ magnitude orders in resident_sorted), the best of
  ``--repeats`` further merges, and streaming / resident;
- a digest of the merged weights, which must agree between modes.

    .venv/bin/python scripts/bench_memory.py --keep /tmp/bm15            # ~11 GB of models on disk
    .venv/bin/python scripts/bench_memory.py --keep /tmp/bm08 --layers 12

3 x 1.37B task vectors alone are 8.2 GB in bfloat16, so at 24 layers only streaming fits in
12 GB; ``--layers 12`` (~0.75B) is the size at which resident fits next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import offline_env  # noqa: F401 - sets the offline environment, puts the repo on sys.path

GiB = 1024**3


def shape(layers: int) -> dict:
    return dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=16,
                num_key_value_heads=16, vocab_size=32000)


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakSampler:
    """Samples this process's anonymous RSS in a thread; ``peak`` is the largest seen."""

    def __init__(self, every_s: float = 0.02) -> None:
        self.peak = _rss_anon()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.peak = max(self.peak, _rss_anon())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_anon())
        return self.peak


def child(args: argparse.Namespace) -> int:
    """One mode in this (fresh) process; prints one JSON line."""
    import hashlib

    import torch
    from transformers import AutoModelForCausalLM

    from bench_merge import layer_recipe
    from evomerge.merge.inplace import InPlaceMerger
    from evomerge.merge.sources import load_model_set

    base_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    base_anon = _rss_anon()
    sampler = PeakSampler()
    work = Path(args.work)
    base, sources = work / "models" / "base", sorted((work / "models").glob("src*"))[: args.sources]
    recipe = layer_recipe(str(base), [str(s) for s in sources], args.layers, "bfloat16", args.compute_dtype, "ties")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).eval()
    model_set = load_model_set(str(base), [str(s) for s in sources])
    merger = InPlaceMerger(model, model_set, device="cpu", compute_dtype=args.compute_dtype, residency=args.child)
    setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    merger.apply(recipe)
    first_s = time.perf_counter() - t0
    best_s = min(merger.apply(recipe)["merge_s"] for _ in range(args.repeats))
    digest = hashlib.sha256()
    for name, t in model.state_dict().items():
        digest.update(name.encode())
        digest.update(t.detach().contiguous().view(torch.int16).numpy().tobytes())
    peak_anon = sampler.stop()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("json: " + json.dumps({
        "mode": merger.residency, "plan_bytes": merger.plan.device_bytes, "maxrss_bytes": maxrss - base_maxrss,
        "anon_bytes": peak_anon - base_anon, "resident_bytes": merger.resident_bytes(),
        "planned_resident_bytes": merger.planned_resident_bytes(), "setup_s": setup_s, "first_s": first_s,
        "best_s": best_s, "digest": digest.hexdigest()[:16]}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", help="work folder to use and keep (models are reused when present)")
    ap.add_argument("--cap-gb", type=float, default=12.0, help="memory cap (GiB) a mode's plan must fit under")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--sources", type=int, default=3)
    ap.add_argument("--compute-dtype", default="bfloat16", help="merge.compute_dtype (default bfloat16)")
    ap.add_argument("--repeats", type=int, default=2, help="timed merges after the first (best is reported)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)

    from bench_merge import build_models
    from evomerge.merge.memory_plan import ModelSizes, residency_options
    from evomerge.merge.sources import load_model_set

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="evomerge-benchmem-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        models = work / "models"
        if (models / "base" / "model.safetensors").exists():
            found = json.loads((models / "base" / "config.json").read_text())["num_hidden_layers"]
            if found != args.layers:
                raise SystemExit(f"{models} holds {found}-layer models, not {args.layers}; use another --keep")
        else:
            build_models(models, shape(args.layers), "bfloat16", args.sources)
        base, sources = models / "base", sorted(models.glob("src*"))[: args.sources]
        ms = load_model_set(str(base), [str(s) for s in sources])
        sizes = ModelSizes.from_model_set(ms, live_dtype="bfloat16", compute_dtype=args.compute_dtype)
        print(f"models: random Llama, {sizes.elements / 1e9:.2f}B params ({args.layers} layers), bfloat16, base + "
              f"{len(sources)} sources in {models} (built/found in {time.perf_counter() - t0:.0f}s); "
              f"merge.compute_dtype={args.compute_dtype}; per-layer ties; cap {args.cap_gb:g} GiB; "
              f"{os.cpu_count()} CPUs")
        cap = int(args.cap_gb * GiB)
        options = residency_options(sizes, device_type="cpu", headroom_bytes=0)
        results = {}
        for r in options:
            fits = r.device_bytes <= cap
            print(f"  plan {r.describe()}  -> {'runs' if fits else 'over the cap: skipped'}", flush=True)
        for r in options:
            if r.device_bytes > cap:
                continue
            cmd = [sys.executable, __file__, "--child", r.mode, "--work", str(work), "--layers", str(args.layers),
                   "--sources", str(args.sources), "--compute-dtype", args.compute_dtype,
                   "--repeats", str(args.repeats)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("json: ")]
            if proc.returncode != 0 or not line:
                print(f"  {r.mode}: FAILED (exit {proc.returncode})\n{proc.stderr[-2000:]}")
                continue
            results[r.mode] = json.loads(line[0][6:])
        print(f"\n  {'mode':<16} {'plan GiB':>9} {'maxrss GiB':>11} {'anon GiB':>9} {'setup s':>8} "
              f"{'first s':>8} {'merge s':>8}  digest")
        for mode, x in results.items():
            print(f"  {mode:<16} {x['plan_bytes'] / GiB:9.2f} {x['maxrss_bytes'] / GiB:11.2f} "
                  f"{x['anon_bytes'] / GiB:9.2f} {x['setup_s']:8.1f} {x['first_s']:8.1f} {x['best_s']:8.2f}  "
                  f"{x['digest']}")
        if len({x["digest"] for x in results.values()}) > 1:
            print("MODES DIFFER: the merged weights are not the same in every mode")
        resident = results.get("resident") or results.get("resident_sorted")
        if "streaming" in results and resident is not None:
            print(f"\nstreaming / {resident['mode']}: {results['streaming']['best_s'] / resident['best_s']:.2f}x "
                  f"the merge time, {results['streaming']['anon_bytes'] / resident['anon_bytes']:.2f}x the "
                  f"anonymous memory")
        elif len(results) < 2:
            print("\nfewer than two modes fit under the cap: no streaming/resident ratio (try --layers 12)")
        print("json: " + json.dumps({"layers": args.layers, "cap_gb": args.cap_gb,
                                     "compute_dtype": args.compute_dtype, **results}))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
