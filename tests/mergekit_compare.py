"""Helpers shared by tests/test_vs_mergekit.py and scripts/compare_with_mergekit.py.

Why: the comparison against mergekit must use the same per-layer recipes and the same
statistics in the test suite and in the user-facing script, so both live here. Nothing
here imports mergekit; the callers run it (in-process or through its CLI).

Statistics:
* ``max_rel_diff``: over all tensors, ``max |a - b| / max |b|`` (error relative to the
  tensor's scale; elementwise relative error is meaningless where a weight is ~0).
* ``delta_stats``: for random methods (DARE, DELLA) the bits differ by design (evomerge
  draws masks from its own counter-based RNG), so we compare what the masks do:
  ``keep`` = fraction of elements where the merge moved away from the base, and
  ``norm`` = ||merged - base|| over all tensors.
"""

from __future__ import annotations

import random
from pathlib import Path

from evomerge.merge.recipe import MergeRecipe

#: the methods whose masks are random: compared by statistics, not bits
RANDOM_METHODS = ("dare_linear", "dare_ties", "della", "della_linear")
DETERMINISTIC_METHODS = ("linear", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "slerp",
                         "model_stock", "sce", "multislerp", "nuslerp", "karcher", "arcee_fusion", "nearswap",
                         "passthrough", "ram", "ramplus_tl")
ALL_METHODS = DETERMINISTIC_METHODS + RANDOM_METHODS
#: maximum relative difference allowed for deterministic methods
TOLERANCE = 1e-5
#: methods that merge fewer sources than the test models have: how many they take
SOURCES_USED = {"slerp": 1, "nuslerp": 2, "arcee_fusion": 1, "nearswap": 1, "passthrough": 1}
#: methods whose recipes have no base model (mergekit's passthrough takes exactly one input)
NO_BASE = {"passthrough"}


def _u(rng: random.Random, lo: float, hi: float) -> float:
    return round(rng.uniform(lo, hi), 4)


def _source_params(method: str, rng: random.Random) -> dict[str, float]:
    """Per-source parameters of one group: every parameter the method reads, varied."""
    if method in ("ties", "breadcrumbs", "breadcrumbs_ties", "dare_ties", "dare_linear"):
        p = {"weight": _u(rng, 0.2, 1.0), "density": _u(rng, 0.3, 0.8)}
        if method.startswith("breadcrumbs"):
            p["gamma"] = _u(rng, 0.01, 0.05)
        return p
    if method in ("della", "della_linear"):
        return {"weight": _u(rng, 0.2, 1.0), "density": _u(rng, 0.4, 0.6), "epsilon": _u(rng, 0.05, 0.15)}
    if method in ("task_arithmetic", "linear", "multislerp", "nuslerp"):
        return {"weight": _u(rng, 0.2, 1.0)}
    if method == "passthrough":
        return {"scale": _u(rng, 0.5, 1.5)}
    return {}  # slerp, model_stock, sce, karcher, arcee_fusion, nearswap, ram, ramplus_tl


def _params(method: str, rng: random.Random) -> dict[str, float | bool]:
    """Method-level parameters of one group: every parameter the method reads, varied."""
    if method == "slerp":
        return {"t": _u(rng, 0.1, 0.9)}
    if method == "model_stock":
        return {"filter_wise": rng.random() < 0.5}
    if method == "linear":
        return {"normalize": True}
    if method == "sce":
        return {"select_topk": _u(rng, 0.2, 1.0)}
    if method == "multislerp":
        return {"normalize_weights": rng.random() < 0.5}
    if method == "nuslerp":
        return {"nuslerp_flatten": rng.random() < 0.5, "nuslerp_row_wise": rng.random() < 0.5}
    if method == "karcher":
        # 0 steps (the normalised mean) vs converged: 3 steps already converge on these models,
        # so 3 vs 10 would leave the per-layer settings without effect
        return {"max_iter": rng.choice([0, 10]), "tol": 1e-5}
    if method == "nearswap":
        return {"t": _u(rng, 0.001, 0.05)}
    # ram/ramplus_tl: the sources' deltas are dense noise of scale 0.02, so at the default
    # epsilon (1e-5) every position is changed by all sources (no unique changes, r and
    # alpha inert); an epsilon near the noise scale mixes unique and shared positions
    if method == "ramplus_tl":
        return {"r": _u(rng, 0.05, 0.5), "alpha": _u(rng, 0.1, 0.9), "epsilon": _u(rng, 0.01, 0.04)}
    if method == "ram":
        return {"epsilon": _u(rng, 0.01, 0.04)}
    if method in ("arcee_fusion", "passthrough"):
        return {}
    return {"lambda": _u(rng, 0.8, 1.2)}


def per_layer_recipe(method: str, base: str, sources: list[str], num_layers: int, *, seed: int = 0,
                     split_layer: int | None = 1) -> MergeRecipe:
    """A recipe with different settings per layer (and per attn/mlp in ``split_layer``)."""
    rng = random.Random(f"{method}-{seed}")
    srcs = list(sources)[: SOURCES_USED.get(method, len(sources))]

    def group() -> dict:
        return {"method": method, "params": _params(method, rng),
                "source_params": {s: _source_params(method, rng) for s in srcs}}

    groups = {"default": group(), "embed": group(), "lm_head": group()}
    for i in range(num_layers):
        groups[f"layers.{i}"] = group()
    if split_layer is not None and split_layer < num_layers:
        groups[f"layers.{split_layer}.attn"] = group()
        groups[f"layers.{split_layer}.mlp"] = group()
    return MergeRecipe.from_dict({"base": None if method in NO_BASE else base, "sources": srcs, "groups": groups,
                                  "seed": seed})


def mixed_recipe(base: str, sources: list[str], num_layers: int) -> MergeRecipe:
    """Several deterministic methods in one recipe (mergekit needs mergekit-multi for it)."""
    ties = per_layer_recipe("ties", base, sources, num_layers).groups
    ta = per_layer_recipe("task_arithmetic", base, sources, num_layers).groups
    groups = dict(ties)
    for i in range(0, num_layers, 2):
        groups[f"layers.{i}"] = ta[f"layers.{i}"]
    groups["lm_head"] = ta["lm_head"]
    return MergeRecipe.from_dict({"base": base, "sources": list(sources), "groups": groups})


def load_folder(path: str | Path) -> dict:
    """All tensors of a HF folder's safetensors files, as float32 CPU tensors."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update({k: v.float() for k, v in load_file(str(f)).items()})
    return out


def max_rel_diff(ours: dict, theirs: dict) -> float:
    """max over tensors of ``max|a-b| / max|b|``; missing or extra tensors are an error."""
    if set(ours) != set(theirs):
        raise AssertionError(f"tensor names differ: only ours {sorted(set(ours) - set(theirs))[:3]}, "
                             f"only theirs {sorted(set(theirs) - set(ours))[:3]}")
    worst = 0.0
    for k, a in ours.items():
        b = theirs[k]
        if a.shape != b.shape:
            raise AssertionError(f"{k}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
        scale = float(b.abs().max()) or 1.0
        worst = max(worst, float((a - b).abs().max()) / scale)
    return worst


def delta_stats(merged: dict, base: dict) -> dict[str, float]:
    """``keep``: fraction of elements that moved off the base; ``norm``: ||merged - base||."""
    moved = total = 0
    sq = 0.0
    for k, m in merged.items():
        d = m - base[k]
        moved += int((d != 0).sum())
        total += d.numel()
        sq += float((d.double() ** 2).sum())
    return {"keep": moved / total, "norm": sq ** 0.5}


def run_mergekit_inprocess(yaml_text: str, out: str | Path) -> Path:
    """Run a mergekit YAML (one document, or evomerge's mergekit-multi set) with mergekit's Python API.

    Intermediate documents (``name:``) are written next to ``out`` and their names replaced
    by those folders, as ``mergekit-multi`` does. CPU, no lazy unpickling, no tokenizer copy.
    """
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    out = Path(out)
    options = MergeOptions(lazy_unpickle=False, copy_tokenizer=False, write_model_card=False, device="cpu",
                           quiet=True)
    folders: dict[str, str] = {}

    def patch(value):
        if isinstance(value, list):
            return [patch(v) for v in value]
        if isinstance(value, dict):
            return {k: (folders.get(v, v) if k in ("model", "base_model") and isinstance(v, str) else patch(v))
                    for k, v in value.items()}
        return value

    for doc in yaml.safe_load_all(yaml_text):
        name = doc.pop("name", None)
        target = out if name is None else out.parent / f"{out.name}.{name}"
        run_merge(MergeConfiguration.model_validate(patch(doc)), str(target), options)
        if name is not None:
            folders[name] = str(target)
    return out
