#!/usr/bin/env python
"""Merge benchmark: in-place re-merge vs folder merges (evomerge, mergekit) vs memory bandwidth.

Why: a search evaluates hundreds of candidates, so the per-candidate merge must cost about
what touching the weights costs, not what a disk-to-disk merge costs. On one random Llama
(~300M parameters by default) with 3 fine-tune-like sources and a per-layer TIES recipe
(``--method`` picks another: dare_ties, breadcrumbs_ties, task_arithmetic, ...),
this times, in one run:

1. ``InPlaceMerger.apply``: re-merge into a live model, task vectors resident (after a warm-up),
   with eager torch ops and with the compiled one-pass kernel (checked bit-identical);
2. ``evomerge merge recipe.json --out DIR``: the streamed merge to a HF folder (CLI, end to end);
3. ``mergekit-yaml`` on the same recipe exported by ``to_mergekit_yaml`` (CLI), when installed;
4. the floor: one elementwise add over the same bytes (base + 3 sources), numpy on CPU or a
   torch add/copy on a GPU, as this machine's memory-bandwidth figure;

and prints times and ratios (target: in-place >= 5x faster than mergekit).

    .venv/bin/python scripts/bench_merge.py                       # CPU, float32, ~300M
    .venv/bin/python scripts/bench_merge.py --device cuda --dtype bfloat16 --shape 7b

Memory: models are built tensor by tensor; the folder merges run before anything large is
held in this process; peak is about live model + base + 3 task vectors (~6 GB at 300M fp32).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from offline_env import BIN, ROOT  # noqa: E402  (sets the offline environment)

SHAPES = {
    # ~297M parameters: 2 x 32.8M embeddings + 18 x 12.85M layers
    "300m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=18, num_attention_heads=16,
                 num_key_value_heads=16, vocab_size=32000),
    # smoke test of this script
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=1000),
    # Llama-2-7B shape (6.7B parameters)
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
}


def build_models(root: Path, shape: dict, dtype: str, n_sources: int, seed: int = 0) -> tuple[Path, list[Path]]:
    """Random base + sources (base + small noise), written one safetensors file per model.

    Tensors are generated one at a time (never a whole model twice in memory).
    """
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from tests.tiny_models import tiny_tokenizer

    tdtype = getattr(torch, dtype)
    cfg = LlamaConfig(**shape, max_position_embeddings=2048, tie_word_embeddings=False, torch_dtype=dtype,
                      architectures=["LlamaForCausalLM"])
    h, i, v, n = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"], shape["num_hidden_layers"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for li in range(n):
        p = f"model.layers.{li}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    tok = tiny_tokenizer(v)
    dirs = [root / "base"] + [root / f"src{k}" for k in range(n_sources)]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(d)
        tok.save_pretrained(d)
    # one model at a time: base, then each source = base + noise (regenerated from its seed)
    for k, d in enumerate(dirs):
        out = {}
        for j, (name, shp) in enumerate(shapes.items()):
            g = torch.Generator().manual_seed(seed * 100003 + j)
            base = torch.randn(shp, generator=g) * 0.02 + (1.0 if name.endswith("norm.weight") else 0.0)
            if k > 0:
                gs = torch.Generator().manual_seed(seed * 100003 + j + 7919 * k)
                base.add_(torch.randn(shp, generator=gs) * 0.002)
            out[name] = base.to(tdtype)
        save_file(out, str(d / "model.safetensors"), metadata={"format": "pt"})
        del out
        gc.collect()
    return dirs[0], dirs[1:]


def layer_recipe(base: str, sources: list[str], n_layers: int, dtype: str, compute_dtype: str,
                 method: str = "ties"):
    """A per-layer recipe of one method (weights and densities vary by layer)."""
    from evomerge.merge.recipe import MergeRecipe

    def group(li: int) -> dict:
        per_source = {s: {"weight": round(0.3 + 0.1 * ((li + k) % 5), 3)} for k, s in enumerate(sources)}
        if method != "task_arithmetic":
            for k, s in enumerate(sources):
                per_source[s]["density"] = round(0.3 + 0.05 * ((li * 3 + k) % 8), 3)
        return {"method": method, "params": {"normalize": True}, "source_params": per_source}

    groups = {"default": group(0)}
    groups.update({f"layers.{li}": group(li + 1) for li in range(n_layers)})
    return MergeRecipe.from_dict({"base": base, "sources": sources, "groups": groups, "dtype": dtype,
                                  "compute_dtype": compute_dtype})


def run_cli(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} failed (exit {proc.returncode}); log: {log}\n"
                           f"{log.read_text()[-1500:]}")
    return dt


def bandwidth_floor(entries, device, repeats: int) -> tuple[float, int]:
    """Time of ``out = base + s1 + s2 + s3`` over every tensor (reads the same bytes a merge reads)."""
    import torch

    nbytes = sum(e.base.numel() * e.base.element_size() + e.deltas.numel() * e.deltas.element_size()
                 for e in entries)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        if device.type == "cpu":
            import numpy as np

            for e in entries:
                if e.base.dtype == torch.bfloat16:  # numpy has no bfloat16: same bytes as int16 adds
                    b, d, o = (x.view(torch.int16).numpy() for x in (e.base, e.deltas, e.target))
                else:
                    b, d, o = e.base.numpy(), e.deltas.numpy(), e.target.numpy()
                np.add(b, d[0], out=o)
                for k in range(1, d.shape[0]):
                    np.add(o, d[k], out=o)
        else:
            with torch.no_grad():
                for e in entries:
                    torch.add(e.base, e.deltas[0], out=e.target)
                    for k in range(1, e.deltas.shape[0]):
                        e.target.add_(e.deltas[k])
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return min(times), nbytes


def copy_floor(entries, device, repeats: int) -> tuple[float, int]:
    """torch copy of every base tensor into the live model: device read+write bandwidth."""
    import torch

    nbytes = 2 * sum(e.base.numel() * e.base.element_size() for e in entries)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            for e in entries:
                if e.target.dtype == e.base.dtype:
                    e.target.copy_(e.base)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return min(times), nbytes


EAGER = "in-place re-merge, eager ops"
FUSED = "in-place re-merge, fused kernel"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i] (in-place merge and bandwidth floor)")
    ap.add_argument("--dtype", default=None, help="weights and compute dtype (default: float32; bfloat16 for 7b)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="300m")
    ap.add_argument("--sources", type=int, default=3)
    ap.add_argument("--method", default="ties", help="merge method of the per-layer recipe (default: ties)")
    ap.add_argument("--repeats", type=int, default=2, help="timed in-place merges (best is reported)")
    ap.add_argument("--skip-folder", action="store_true", help="only the in-place merge and the floor")
    ap.add_argument("--keep", help="work folder to use and keep (models are reused when present)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads inside InPlaceMerger.apply (default: torch's setting)")
    ap.add_argument("--no-presort", action="store_true", help="do not keep task-vector magnitude orders")
    ap.add_argument("--no-fused", action="store_true", help="time only the eager in-place merge")
    args = ap.parse_args(argv)

    import torch

    from evomerge.merge.materialise import InPlaceMerger
    from evomerge.merge.mergekit_yaml import to_mergekit_yaml
    from evomerge.merge.sources import load_model_set

    dtype = args.dtype or ("bfloat16" if args.shape == "7b" else "float32")
    device = torch.device(args.device)
    shape = SHAPES[args.shape]
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="evomerge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        if (work / "models" / "base" / "model.safetensors").exists():
            base = work / "models" / "base"
            sources = sorted((work / "models").glob("src*"))[: args.sources]
        else:
            base, sources = build_models(work / "models", shape, dtype, args.sources)
        n_params = _count_params(base)
        print(f"models: random Llama {args.shape} ({n_params / 1e6:.0f}M params, {dtype}), base + "
              f"{len(sources)} sources in {work / 'models'} (built/found in {time.perf_counter() - t0:.0f}s)")
        recipe = layer_recipe(str(base), [str(s) for s in sources], shape["num_hidden_layers"], dtype, dtype,
                              args.method)
        (work / "recipe.json").write_text(recipe.to_json())
        (work / "mergekit.yaml").write_text(to_mergekit_yaml(recipe, shape["num_hidden_layers"], "llama"))

        if not args.skip_folder:  # folder merges first, while this process holds little memory
            results["evomerge merge (CLI, to folder)"] = run_cli(
                [str(BIN / "evomerge"), "merge", str(work / "recipe.json"), "--out", str(work / "out_evomerge"),
                 "--device", args.device], work / "evomerge.log")
            shutil.rmtree(work / "out_evomerge", ignore_errors=True)
            if (BIN / "mergekit-yaml").exists():
                mk = [str(BIN / "mergekit-yaml"), str(work / "mergekit.yaml"), str(work / "out_mergekit"),
                      "--no-copy-tokenizer", "--no-write-model-card"]
                if device.type == "cuda":
                    mk.append("--cuda")
                results["mergekit-yaml (CLI, to folder)"] = run_cli(mk, work / "mergekit.log")
                shutil.rmtree(work / "out_mergekit", ignore_errors=True)
            else:
                print("mergekit-yaml not installed: skipped (pip install -c constraints.txt -e .[compare])")

        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype)).to(device)
        model_set = load_model_set(str(base), [str(s) for s in sources])
        t0 = time.perf_counter()
        merger = InPlaceMerger(model, model_set, device=device, compute_dtype=dtype,
                               presort=False if args.no_presort else None, threads=args.threads, fused=False)
        results["in-place setup (once per actor)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        merger.apply(recipe)  # warm-up: allocator, kernels, page cache, magnitude orders (presort)
        results["in-place first merge (+ presort)"] = time.perf_counter() - t0
        print(f"presort={merger.presort}: magnitude orders + scratch {merger.prepared_bytes() / 1e9:.2f} GB "
              f"(task vectors {merger.task_vector_bytes() / 1e9:.2f} GB)")
        times = [merger.apply(recipe)["merge_s"] for _ in range(args.repeats)]
        results[EAGER] = min(times)
        if not args.no_fused:
            eager_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            merger.fused = True
            t0 = time.perf_counter()
            merger.apply(recipe)  # compiles the kernel (or loads it from Inductor's disk cache)
            results["in-place first fused merge (+ compile)"] = time.perf_counter() - t0
            runs = [merger.apply(recipe) for _ in range(args.repeats)]
            results[FUSED] = min(r["merge_s"] for r in runs)
            live = model.state_dict()
            same = all(torch.equal(live[k], v) for k, v in eager_state.items())
            del eager_state
            print(f"fused kernel: {runs[0]['fused_tensors']:.0f} of {runs[0]['tensors']:.0f} tensors; "
                  f"result {'IDENTICAL to' if same else 'DIFFERS from'} the eager merge, bit for bit")
            if not same:
                raise SystemExit("fused and eager in-place merges differ")
        entries = merger._entries  # noqa: SLF001 - the resident tensors: measure the floor on the same bytes
        floor_s, nbytes = bandwidth_floor(entries, device, repeats=3)
        label = "numpy add" if device.type == "cpu" else "torch add"
        results[f"floor: {label} base+{len(sources)} sources"] = floor_s
        copy_s, copy_bytes = copy_floor(entries, device, repeats=3)
        results["floor: torch copy of the base"] = copy_s
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    inplace = results.get(FUSED, results[EAGER])
    print(f"\nper-layer {args.method} over {len(sources)} sources, device={args.device}, dtype={dtype}, "
          f"{os.cpu_count()} CPU threads visible, torch threads={torch.get_num_threads()}, "
          f"merge threads={args.threads or torch.get_num_threads()}")
    width = max(len(k) for k in results)
    for k, v in results.items():
        extra = ""
        if k.startswith("floor: numpy") or k.startswith("floor: torch add"):
            extra = f"  {nbytes / v / 1e9:6.1f} GB/s read ({nbytes / 1e9:.2f} GB)"
        elif k.startswith("floor: torch copy"):
            extra = f"  {copy_bytes / v / 1e9:6.1f} GB/s read+write"
        elif k not in ("in-place setup (once per actor)", "in-place first merge (+ presort)",
                       "in-place first fused merge (+ compile)"):
            extra = f"  {v / inplace:6.1f}x the in-place time"
        print(f"  {k:<{width}}  {v:8.2f} s{extra}")
    mk = results.get("mergekit-yaml (CLI, to folder)")
    if mk is not None:
        verdict = "meets" if mk / inplace >= 5 else "MISSES"
        print(f"\nin-place is {mk / inplace:.1f}x faster than mergekit-yaml ({verdict} the >= 5x target)")
    print(f"in-place re-merge reaches {floor_s / inplace:.0%} of the bandwidth figure "
          f"(the floor's time / the merge's time; eager ops: {floor_s / results[EAGER]:.0%})")
    summary = {"shape": args.shape, "method": args.method, "dtype": dtype, "device": args.device,
               "params": n_params, **results}
    print("json: " + json.dumps(summary))
    return 0


def _count_params(folder: Path) -> int:
    import math

    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


if __name__ == "__main__":
    sys.exit(main())
