#!/usr/bin/env python
"""Evaluator benchmark: seconds per candidate of the in-memory lm-eval evaluator vs the model's own
batched greedy ``generate`` on the very same prompts, side by side in one process.

Why: a search scores hundreds of candidates; everything the evaluator does besides running the
model (building requests, tokenising, collating, metrics) is overhead paid per candidate. The
target is an evaluator at most 1.5x the raw batched generate time on the same items.

Cases (selection split of the demo objectives of ``configs/demo.yaml``: demo_sort, demo_upper,
demo_shift, 128 items each, batch size as configured):

* ``demo``: a demo zoo specialist (``models/demo/sort`` by default);
* ``100m``: a random Llama of ~100M parameters (hidden 768, 12 layers) built in a temp folder
  with the demo tokenizer (so the demo prompts and stop sequences apply unchanged).

Per repeat, in one loop (interleaved, so machine noise hits every column alike), after one
warm-up of each:

* ``raw generate``: the prompts lm-eval builds for those items (taken once from the task
  objects), tokenised once outside the timing, sorted longest first and batched with the
  objective's batch size like lm-eval does, then ``model.generate`` greedy with
  ``max_new_tokens`` = the task's ``max_gen_toks`` and stopping at the task's ``until`` strings;
* ``lm-eval path``: ``ObjectiveSet.evaluate`` with the evaluator's per-call path that runs
  ``lm_eval.evaluator.evaluate`` as-is (what every call did before the request cache);
* ``cached path``: ``ObjectiveSet.evaluate`` as the search runs it (requests, tokenised
  batches and padding built once per actor), when the evaluator has one.

Prints medians and ratios to raw generate; checks the two evaluator paths give the same scores.
Needs no Ray.

    .venv/bin/python scripts/bench_eval.py                      # both cases, 1 thread
    .venv/bin/python scripts/bench_eval.py --case demo --repeats 16
    .venv/bin/python scripts/bench_eval.py --profile cached     # cProfile of the cached path
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval draws progress bars on every call

from offline_env import ROOT  # noqa: E402  (sets the offline environment, puts ROOT on sys.path)


def build_random_llama(folder: Path, tokenizer_dir: Path, hidden: int, layers: int, intermediate: int) -> Path:
    """A random Llama with the demo tokenizer, saved to ``folder`` (config as the demo zoo's, larger)."""
    import json

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    demo = json.loads((tokenizer_dir / "config.json").read_text())
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
        max_position_embeddings=demo.get("max_position_embeddings", 64),
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def demo_config(model_dir: Path):
    from evomerge.config import load_config

    cfg = load_config(ROOT / "configs" / "demo.yaml")
    return cfg.model_copy(update={"models": cfg.models.model_copy(update={"sources": [str(model_dir)]})})


def raw_batches(objs, tokenizer):
    """[(input_ids, attention_mask, generate kwargs)] for the selection items of every lm_eval objective.

    Prompts and generation settings are read from the evaluator's own task objects (what lm-eval
    sends the model); sorted longest first and cut into batches of the objective's batch size.
    """
    import torch

    ev = objs.evaluators["lm_eval"]
    specs = []
    for logical in ev._logical.values():
        if logical.selection not in specs:
            specs.append(logical.selection)
    batches = []
    for spec in specs:
        run = ev._run(spec)
        for task in run.loaded["tasks"].values():
            task.build_all_requests(limit=None, rank=0, world_size=1)
            args = [inst.args for inst in task.instances]
            task._instances = None
            prompts = [a[0] for a in args]
            gk = dict(args[0][1])
            assert all(a[1] == gk for a in args), "one generation setting per task expected"
            until = list(gk.get("until") or []) + [tokenizer.eos_token]
            max_new = int(gk.get("max_gen_toks", 256))
            stop_ids = [tokenizer.convert_tokens_to_ids(s) if s == tokenizer.eos_token else None for s in until]
            single = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in until]
            kwargs = dict(max_new_tokens=max_new, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            if all(len(ids) == 1 for ids in single):
                kwargs["eos_token_id"] = sorted({ids[0] for ids in single} | {i for i in stop_ids if i is not None})
            else:
                kwargs.update(stop_strings=until, tokenizer=tokenizer)
            order = sorted(prompts, key=lambda p: (-len(tokenizer(p, add_special_tokens=False)["input_ids"]), p))
            bs = int(spec.batch_size)
            old = tokenizer.padding_side
            tokenizer.padding_side = "left"
            for i in range(0, len(order), bs):
                enc = tokenizer(order[i:i + bs], padding="longest", return_tensors="pt")
                batches.append((enc["input_ids"], enc["attention_mask"], kwargs))
            tokenizer.padding_side = old
    return batches


def raw_generate(model, batches) -> None:
    for ids, mask, kwargs in batches:
        model.generate(input_ids=ids, attention_mask=mask, **kwargs)


def bench_case(name: str, model_dir: Path, repeats: int, profile: str | None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evaluators import build_objectives

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    n_params = sum(p.numel() for p in model.parameters())
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    cfg = demo_config(model_dir)
    t0 = time.perf_counter()
    objs = build_objectives(cfg, str(model_dir), "cpu")
    build_s = time.perf_counter() - t0
    ev = objs.evaluators["lm_eval"]
    has_cache = hasattr(ev, "use_request_cache")
    batches = raw_batches(objs, tok)
    n_items = sum(int(b[0].shape[0]) for b in batches)

    def run_eval(cached: bool):
        if has_cache:
            ev.use_request_cache = cached
        return objs.evaluate(model, split="selection")

    columns = {"raw generate": lambda: raw_generate(model, batches), "lm-eval path": lambda: run_eval(False)}
    if has_cache:
        columns["cached path"] = lambda: run_eval(True)
    times: dict[str, list[float]] = {k: [] for k in columns}
    scores = {}
    with torch.inference_mode():
        for key, fn in columns.items():  # warm-up (and the cached path's one-off build)
            t = time.perf_counter()
            out = fn()
            if key != "raw generate":
                scores[key] = out
            if key == "cached path":
                print(f"  [{name}] first cached call (builds the request cache, then scores): {time.perf_counter() - t:.3f}s",
                      flush=True)
        for r in range(repeats):
            for key, fn in columns.items():
                t = time.perf_counter()
                out = fn()
                times[key].append(time.perf_counter() - t)
                if key != "raw generate" and out != scores[key]:
                    raise SystemExit(f"{name}: {key} gave {out} on repeat {r}, {scores[key]} before")
        if profile is not None:
            import cProfile
            import pstats

            key = {"cached": "cached path", "lm-eval": "lm-eval path", "raw": "raw generate"}[profile]
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(3):
                columns[key]()
            pr.disable()
            print(f"\n--- cProfile: {name}, {key}, 3 calls ---")
            pstats.Stats(pr).sort_stats("cumulative").print_stats(45)
    if has_cache:
        ev.use_request_cache = True
        if scores["cached path"] != scores["lm-eval path"]:
            raise SystemExit(f"{name}: cached path scores {scores['cached path']} != lm-eval path {scores['lm-eval path']}")
    return dict(name=name, params=n_params, items=n_items, build_s=build_s,
                med={k: statistics.median(v) for k, v in times.items()},
                spread={k: (min(v), max(v)) for k, v in times.items()}, scores=scores, repeats=repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", choices=["demo", "100m", "all"], default="all")
    ap.add_argument("--repeats", type=int, default=9, help="timed repeats per column (after one warm-up)")
    ap.add_argument("--big-repeats", type=int, default=None, help="repeats of the 100m case (default: --repeats)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--demo-model", default=str(ROOT / "models" / "demo" / "sort"))
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--intermediate", type=int, default=2560)
    ap.add_argument("--profile", choices=["cached", "lm-eval", "raw"], default=None,
                    help="also print a cProfile of 3 calls of that column")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)  # lm-eval logs every call
    try:
        import datasets

        datasets.disable_progress_bars()
    except Exception:  # noqa: BLE001
        pass
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        if args.case in ("demo", "all"):
            results.append(bench_case("demo zoo", Path(args.demo_model), args.repeats, args.profile))
        if args.case in ("100m", "all"):
            folder = build_random_llama(Path(tmp) / "llama100m", Path(args.demo_model), args.hidden, args.layers,
                                        args.intermediate)
            results.append(bench_case("random llama", folder, args.big_repeats or args.repeats, args.profile))

    print(f"\nevaluator seconds per candidate vs raw batched generate (selection split of configs/demo.yaml; "
          f"{args.threads} thread(s); medians)")
    cols = ["raw generate", "lm-eval path", "cached path"]
    head = f"{'case':<14}{'params':>8}{'items':>7}{'reps':>5}" + "".join(f"{c:>15}" for c in cols)
    head += f"{'lm-eval/raw':>13}{'cached/raw':>12}"
    print(head)
    print("-" * len(head))
    for r in results:
        med = r["med"]
        line = f"{r['name']:<14}{r['params'] / 1e6:>7.1f}M{r['items']:>7}{r['repeats']:>5}"
        line += "".join(f"{med[c]:>14.3f}s" if c in med else f"{'-':>15}" for c in cols)
        line += f"{med['lm-eval path'] / med['raw generate']:>12.2f}x"
        line += f"{med['cached path'] / med['raw generate']:>11.2f}x" if "cached path" in med else f"{'-':>12}"
        print(line)
    print("\nmin..max per column:")
    for r in results:
        print(f"  {r['name']}: " + ", ".join(f"{k} {a:.3f}..{b:.3f}s" for k, (a, b) in r["spread"].items()))
        print(f"  {r['name']}: scores " + "; ".join(f"{k}: {v}" for k, v in r["scores"].items()))
    print("\ntarget: cached/raw <= 1.5x")


if __name__ == "__main__":
    sys.exit(main())
