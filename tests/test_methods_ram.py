"""RAM and RAM+ (tensor-local): hand-worked tensors, bad input, the epsilon name clash, mergekit.

Each expected value is worked out in the comment next to it from the method's definition
(mergekit 0.1.5's meaning), not by re-running the implementation. The tests that run
mergekit itself skip when it is not installed.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace as NS
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from evomerge.errors import MethodError, RecipeError
from evomerge.merge.groups import TensorGroup, leaf_keys
from evomerge.merge.mergekit_import import from_mergekit_yaml
from evomerge.merge.mergekit_spec import MERGEKIT_METHODS, resolved_group
from evomerge.merge.mergekit_yaml import to_mergekit_yaml
from evomerge.merge.methods import METHODS, check_methods_usable, check_params, merge_tensor
from evomerge.merge.recipe import MergeRecipe

T = torch.tensor
BASE, SOURCES = "org/base", ["org/a", "org/b", "org/c"]
N_LAYERS = 4


def merge(method: str, base: Any, deltas: Any, params: dict | None = None, *, dtype=torch.float32,
          source_params: dict | None = None) -> torch.Tensor:
    b = T(base, dtype=dtype)
    d = T(deltas, dtype=dtype)
    return merge_tensor(method, b, d, source_params or {}, params or {}, seed=0, tensor_name="w")


def exact(actual: torch.Tensor, expected: list) -> None:
    assert actual.tolist() == expected, actual.tolist()


# -- table --------------------------------------------------------------------------------------


def test_parameter_tables_and_base() -> None:
    ram, plus = METHODS["ram"], METHODS["ramplus_tl"]
    assert dict(ram.params) == {"epsilon": 1e-5} and dict(ram.source_params) == {}
    assert dict(plus.params) == {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5} and dict(plus.source_params) == {}
    assert ram.uses_base and plus.uses_base and ram.min_sources == plus.min_sources == 1
    assert MERGEKIT_METHODS["ram"].shared == {"epsilon": 1e-5} and MERGEKIT_METHODS["ram"].per_input == {}
    assert MERGEKIT_METHODS["ramplus_tl"].shared == {"epsilon": 1e-5, "r": 0.1, "alpha": 0.2}


# -- RAM by hand ----------------------------------------------------------------------------------

# positions: 0 changed by s0 only, 1 by s0 and s1, 2 by s1 and s2, 3 by all, 4 by none
RAM_DELTAS = [[2.0, -3.0, 0.0, 6.0, 0.0],
              [0.0, 5.0, 4.0, 3.0, 0.0],
              [0.0, 0.0, 8.0, -6.0, 0.0]]


def test_ram_unique_summed_shared_averaged() -> None:
    # base 1 + [2 (unique: kept whole), (-3+5)/2, (4+8)/2, (6+3-6)/3, nothing]
    exact(merge("ram", [1.0] * 5, RAM_DELTAS), [3.0, 2.0, 7.0, 2.0, 1.0])
    # a plain mean (task arithmetic, normalize) would give position 0 only 2/3: RAM differs there
    ta = merge("task_arithmetic", [1.0] * 5, RAM_DELTAS, {"normalize": True}, source_params={"weight": 1.0})
    assert ta[0].item() == pytest.approx(1 + 2 / 3)


def test_ram_all_zero_task_vectors_give_the_base() -> None:
    base = [0.5, -1.25, 3.0]
    exact(merge("ram", base, [[0.0] * 3] * 3), base)
    exact(merge("ramplus_tl", base, [[0.0] * 3] * 3, {"r": 0.5, "alpha": 1.0}), base)


def test_one_source_drops_only_changes_below_epsilon() -> None:
    # every change is unique: kept whole, except 2e-6 <= epsilon 1e-5, which resets to the base
    deltas = [[0.5, -2e-6, 0.0, 3.0]]
    exact(merge("ram", [1.0] * 4, deltas), [1.5, 1.0, 1.0, 4.0])
    # no shared positions: rho = 0, factor 1, the same as RAM
    exact(merge("ramplus_tl", [1.0] * 4, deltas, {"r": 0.5, "alpha": 1.0}), [1.5, 1.0, 1.0, 4.0])


def test_changes_below_epsilon_do_not_count() -> None:
    # epsilon 0.25 (strictly greater counts): pos 0: s0's 0.125 is no change -> s1's 0.5 alone;
    # pos 1: s1's -0.125 none -> s0's 0.5; pos 2: both -> (0.5 + 1)/2; pos 3: s0's 0.25 == epsilon
    # is no change -> s1's -1 alone; pos 4: neither -> base
    deltas = [[0.125, 0.5, 0.5, 0.25, 0.25], [0.5, -0.125, 1.0, -1.0, -0.0625]]
    exact(merge("ram", [0.0] * 5, deltas, {"epsilon": 0.25}), [0.5, 0.5, 0.75, -1.0, 0.0])
    # at the default epsilon all of them count: pos 0 is (0.125 + 0.5)/2
    assert merge("ram", [0.0] * 5, deltas)[0].item() == 0.3125


# -- RAM+ by hand -------------------------------------------------------------------------------

# p0, p1: s0 only; p2: s0+s1; p3: s1 only; p4: all; p5: s2 only
PLUS_DELTAS = [[1.0, 2.0, 4.0, 0.0, 3.0, 0.0],
               [0.0, 0.0, 2.0, 3.0, 6.0, 0.0],
               [0.0, 0.0, 0.0, 0.0, 9.0, 5.0]]
# s0: unique {p0, p1}, shared {p2, p4} -> rho 1; s1: unique {p3}, shared {p2, p4} -> rho 2;
# s2: unique {p5}, shared {p4} -> rho 1. Shared positions: p2 (4+2)/2 = 3, p4 (3+6+9)/3 = 6.


def test_ramplus_amplifies_unique_changes_below_the_cap() -> None:
    # r 0.5, alpha 10 (no cap hit): factors 1 + 0.5*[1, 2, 1] = [1.5, 2, 1.5]
    out = merge("ramplus_tl", [0.0] * 6, PLUS_DELTAS, {"r": 0.5, "alpha": 10.0})
    exact(out, [1.5, 3.0, 3.0, 6.0, 6.0, 7.5])


def test_ramplus_alpha_caps_the_ratio() -> None:
    # alpha 1.5 caps only s1 (rho 2): its factor 1 + 0.5*1.5 = 1.75 -> p3 = 5.25
    out = merge("ramplus_tl", [0.0] * 6, PLUS_DELTAS, {"r": 0.5, "alpha": 1.5})
    exact(out, [1.5, 3.0, 3.0, 5.25, 6.0, 7.5])
    # alpha 0.5 caps all: factor 1.25 each
    out = merge("ramplus_tl", [0.0] * 6, PLUS_DELTAS, {"r": 0.5, "alpha": 0.5})
    exact(out, [1.25, 2.5, 3.0, 3.75, 6.0, 6.25])
    # the defaults r 0.1, alpha 0.2: every rho >= 0.2, factor 1.02 (in float32)
    out = merge("ramplus_tl", [0.0] * 6, PLUS_DELTAS)
    f = torch.tensor(1.0) + torch.tensor(0.1) * torch.tensor(0.2)
    assert out[0].item() == pytest.approx(f.item() * 1.0, rel=1e-7) and out[2].item() == 3.0


def test_ramplus_with_r_or_alpha_zero_is_ram() -> None:
    ram = merge("ram", [0.0] * 6, PLUS_DELTAS)
    exact(ram, [1.0, 2.0, 3.0, 3.0, 6.0, 5.0])
    exact(merge("ramplus_tl", [0.0] * 6, PLUS_DELTAS, {"r": 0.0, "alpha": 1.0}), ram.tolist())
    exact(merge("ramplus_tl", [0.0] * 6, PLUS_DELTAS, {"r": 0.7, "alpha": 0.0}), ram.tolist())


def test_source_without_unique_changes() -> None:
    # s1 has no unique position: rho = 1 / epsilon, capped, multiplying nothing;
    # s0: unique {p1}, shared {p0} -> rho 1, factor 1.5: p0 = (2+4)/2, p1 = 4 * 1.5
    exact(merge("ramplus_tl", [0.0, 0.0], [[2.0, 4.0], [4.0, 0.0]], {"r": 0.5, "alpha": 10.0}), [3.0, 6.0])
    # epsilon 0 and a source that changed nothing: 0/0 counts as 0 (mergekit: NaN everywhere)
    exact(merge("ramplus_tl", [0.0, 0.0], [[1.0, 2.0], [0.0, 0.0]], {"epsilon": 0.0, "r": 0.5}), [1.0, 2.0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_in_16_bit_out(dtype: torch.dtype) -> None:
    # all values below are exact in both 16-bit formats
    out = merge("ram", [1.0] * 5, RAM_DELTAS, dtype=dtype)
    assert out.dtype == dtype
    exact(out, [3.0, 2.0, 7.0, 2.0, 1.0])
    out = merge("ramplus_tl", [0.0] * 6, PLUS_DELTAS, {"r": 0.5, "alpha": 1.5}, dtype=dtype)
    assert out.dtype == dtype
    exact(out, [1.5, 3.0, 3.0, 5.25, 6.0, 7.5])


def test_inputs_are_not_modified_and_shapes_kept() -> None:
    g = torch.Generator().manual_seed(0)
    base, deltas = torch.randn(3, 4, 5, generator=g), torch.randn(2, 3, 4, 5, generator=g)
    b0, d0 = base.clone(), deltas.clone()
    for name in ("ram", "ramplus_tl"):
        out = merge_tensor(name, base, deltas, {}, {"epsilon": 0.5}, seed=0, tensor_name="w")
        assert out.shape == base.shape
    assert torch.equal(base, b0) and torch.equal(deltas, d0)


# -- bad input, and the two epsilons ------------------------------------------------------------


def test_base_is_required() -> None:
    for name in ("ram", "ramplus_tl"):
        with pytest.raises(MethodError, match=f"{name!r} needs a base model"):
            check_methods_usable([name], n_sources=2, has_base=False, where="merge.methods")


@pytest.mark.parametrize("method,key", [("ram", "epsilon"), ("ramplus_tl", "epsilon"), ("ramplus_tl", "r"),
                                        ("ramplus_tl", "alpha")])
def test_negative_values_are_refused(method: str, key: str) -> None:
    with pytest.raises(MethodError, match=f"{method} parameter '{key}' is -0.1; it must be >= 0"):
        merge(method, [0.0], [[1.0]], {key: -0.1})


def test_epsilon_is_method_level_for_ram_and_per_source_for_della() -> None:
    check_params("ram", {}, {"epsilon": 0.01}, where="g")
    check_params("ramplus_tl", {}, {"epsilon": 0.0, "r": 0.3, "alpha": 0.9}, where="g")
    check_params("della", {"epsilon": [0.1, 0.1], "density": [0.5, 0.5]}, {}, where="g")
    with pytest.raises(MethodError, match="ram parameter 'epsilon' is method-level .*, not per-source"):
        check_params("ram", {"epsilon": [0.01, 0.01]}, {}, where="g")
    with pytest.raises(MethodError, match="della parameter 'epsilon' is per-source .*, not method-level"):
        check_params("della", {}, {"epsilon": 0.1}, where="g")
    # DELLA's rule (density +/- epsilon inside (0, 1)) is not applied to RAM's threshold
    check_params("ram", {}, {"epsilon": 0.9}, where="g")


def _model_set() -> Any:
    groups = {"model.embed_tokens.weight": TensorGroup("embed"), "model.norm.weight": TensorGroup("final_norm"),
              "lm_head.weight": TensorGroup("lm_head")}
    for i in range(N_LAYERS):
        for name, part in (("self_attn.q_proj.weight", "attn"), ("mlp.up_proj.weight", "mlp"),
                           ("input_layernorm.weight", "norm")):
            groups[f"model.layers.{i}.{name}"] = TensorGroup("layer", i, part)  # type: ignore[arg-type]
    srcs = [NS(ref=s) for s in SOURCES]
    base = NS(ref=BASE)
    by = {s.ref: s for s in [*srcs, base]}
    return NS(num_layers=N_LAYERS, sources=srcs, base=base, groups=groups, layout=None, by_ref=lambda r: by[r])


def test_recipe_with_ram_epsilon_validates() -> None:
    from evomerge.merge.validate import validate_recipe

    recipe = MergeRecipe.from_dict({"base": BASE, "sources": SOURCES, "groups": {
        "default": {"method": "ram", "params": {"epsilon": 0.001}},
        "layers.1": {"method": "ramplus_tl", "params": {"epsilon": 0.002, "r": 0.3, "alpha": 0.5}},
        "layers.2": {"method": "della", "source_params": {s: {"weight": 1.0, "density": 0.5, "epsilon": 0.1}
                                                          for s in SOURCES}}}})
    validate_recipe(recipe, _model_set())
    bad = MergeRecipe.from_dict({"base": BASE, "sources": SOURCES, "groups": {
        "default": {"method": "ram", "source_params": {s: {"epsilon": 0.001} for s in SOURCES}}}})
    with pytest.raises(MethodError, match="epsilon' is method-level"):
        validate_recipe(bad, _model_set())
    no_base = MergeRecipe.from_dict({"base": None, "sources": SOURCES, "groups": {"default": {"method": "ram"}}})
    with pytest.raises(MethodError, match="needs a base model"):
        check_methods_usable(["ram"], n_sources=3, has_base=no_base.base is not None, where="x")


def _space_config(**over: Any) -> Any:
    from evomerge.config import parse_config

    raw = {"models": {"base": BASE, "sources": SOURCES}, "objectives": [{"name": "x", "task": "t", "metric": "acc"}],
           "budget": {"evaluations": 10}}
    return parse_config(raw, [f"{k}={json.dumps(v)}" for k, v in over.items()])


def test_layerwise_space_keeps_the_two_epsilons_apart() -> None:
    from search_spaces import build_space

    cfg = _space_config(**{"merge.methods": ["della", "ram", "ramplus_tl"], "merge.method_gene": "per_group"})
    space = build_space(cfg, _model_set())
    assert space.source_genes == ["weight", "density", "epsilon"]  # della's, one per source
    assert space.method_genes == ["r", "alpha"]  # ram's epsilon is not searched
    assert space.initial_value()["epsilon"].shape == (len(space.units), 3)
    value = space.initial_value()
    value["method"] = tuple(["della", "ram", "ramplus_tl"][i % 3] for i in range(space.n_slots))
    value["epsilon"][:] = 0.05
    value["r"][:] = 0.3
    value["alpha"][:] = 0.7
    recipe = space.to_recipe(value)
    methods = {g.method for g in recipe.groups.values()}
    assert methods == {"della", "ram", "ramplus_tl"}
    for key, g in recipe.groups.items():
        if g.method == "della":
            assert all(g.source_params[s]["epsilon"] == 0.05 for s in SOURCES) and "epsilon" not in g.params
        elif g.method == "ram":
            assert g.params == {} and g.source_params == {}  # epsilon stays at its default
        else:
            assert g.params == {"r": 0.3, "alpha": 0.7} and g.source_params == {}
        vals = {p: [g.source_params[s][p] for s in SOURCES] for p in (g.source_params.get(SOURCES[0]) or {})}
        check_params(g.method, vals, g.params, where=key)
    assert space.to_recipe(space.from_recipe(recipe)) == recipe
    # a bound that fixes DELLA's epsilon fixes DELLA's, not RAM's threshold
    cfg = _space_config(**{"merge.methods": ["della", "ram"], "merge.method_gene": "per_group",
                           "space.bounds": {"epsilon": [0.05, 0.05]}})
    space = build_space(cfg, _model_set())
    value = space.initial_value()
    value["method"] = tuple(["della", "ram"][i % 2] for i in range(space.n_slots))
    for g in space.to_recipe(value).groups.values():
        if g.method == "ram":
            assert g.params == {}
        else:
            assert g.source_params[SOURCES[0]]["epsilon"] == 0.05


# -- mergekit YAML both ways --------------------------------------------------------------------


def _recipe() -> MergeRecipe:
    rng = np.random.default_rng(0)

    def plus() -> dict:
        return {"method": "ramplus_tl", "params": {"r": round(float(rng.uniform(0, 0.5)), 4),
                                                   "alpha": round(float(rng.uniform(0, 1)), 4),
                                                   "epsilon": round(float(rng.uniform(0, 0.01)), 5)}}

    della = {"method": "della", "params": {"lambda": 1.1},
             "source_params": {s: {"weight": w, "density": 0.5, "epsilon": e}
                               for s, w, e in zip(SOURCES, (0.5, 0.75, 1.0), (0.1, 0.11, 0.12))}}
    return MergeRecipe.from_dict({"base": BASE, "sources": SOURCES, "seed": 3, "groups": {
        "default": {"method": "ram", "params": {"epsilon": 0.003}}, "embed": {"method": "ram"},
        "layers.0": plus(), "layers.1.attn": plus(), "layers.2": della, "lm_head": plus()}})


def _equivalent(a: MergeRecipe, b: MergeRecipe) -> None:
    assert a.sources == b.sources and a.base == b.base
    for leaf in leaf_keys(N_LAYERS):
        assert resolved_group(a, leaf) == resolved_group(b, leaf), leaf


def test_export_import_round_trip_keeps_the_epsilons_apart() -> None:
    recipe = _recipe()
    text = to_mergekit_yaml(recipe, N_LAYERS, "llama")
    docs = {d.get("name"): d for d in yaml.safe_load_all(text)}
    ram_doc, della_doc = docs["evomerge_ram"], docs["evomerge_della"]
    # RAM's epsilon is a top-level parameter, never a model's; DELLA's is the models' own
    assert "epsilon" in ram_doc["parameters"]
    assert all("parameters" not in s for s in ram_doc["slices"][0]["sources"])
    assert "epsilon" not in della_doc["parameters"]
    assert [s["parameters"]["epsilon"] for s in della_doc["slices"][0]["sources"][:3]] == [0.1, 0.11, 0.12]
    assert set(docs["evomerge_ramplus_tl"]["parameters"]) == {"epsilon", "r", "alpha"}
    back = from_mergekit_yaml(text)
    _equivalent(recipe, back)
    assert from_mergekit_yaml(to_mergekit_yaml(back, N_LAYERS, "llama")).to_dict() == back.to_dict()


def test_handwritten_yaml_imports() -> None:
    text = f"""
merge_method: ramplus_tl
base_model: {BASE}
models: [{{model: {SOURCES[0]}}}, {{model: {SOURCES[1]}}}, {{model: {BASE}}}]
parameters: {{r: 0.25, epsilon: 0.001}}
dtype: bfloat16
"""
    recipe = from_mergekit_yaml(text)
    assert recipe.sources == SOURCES[:2] and recipe.base == BASE and recipe.dtype == "bfloat16"
    assert recipe.groups["default"].params == {"r": 0.25, "alpha": 0.2, "epsilon": 0.001}
    assert not any(recipe.groups["default"].source_params.values())
    # and back: mergekit's own defaults written out
    doc = yaml.safe_load(to_mergekit_yaml(recipe, N_LAYERS, "llama"))
    assert doc["merge_method"] == "ramplus_tl" and doc["parameters"] == {"epsilon": 0.001, "r": 0.25, "alpha": 0.2}
    with pytest.raises(RecipeError, match="ram needs 'base_model'"):
        from_mergekit_yaml(f"merge_method: ram\nmodels: [{{model: {SOURCES[0]}}}]\n")
    with pytest.raises(RecipeError, match="needs a base model"):
        to_mergekit_yaml(MergeRecipe.from_dict({"base": None, "sources": SOURCES,
                                                "groups": {"default": {"method": "ram"}}}), N_LAYERS, "llama")


# -- against mergekit's own kernels --------------------------------------------------------------


def _mergekit(name: str, base: torch.Tensor, sources: list[torch.Tensor], params: dict) -> torch.Tensor:
    pytest.importorskip("mergekit")
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup as MkGroup

    group = MkGroup.from_tensors([base, *sources], base_index=0)
    return registry.get(name)([group], parameters=params)[0]


def _sparse_models(shape: tuple, n: int, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Sources that change random subsets of the base (about half each): unique and shared mix."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype)
    sources = [(base + 0.1 * torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < 0.45)).to(dtype)
               for _ in range(n)]
    return base, sources


CASES = [("ram", {}), ("ram", {"epsilon": 0.05}), ("ramplus_tl", {}),
         ("ramplus_tl", {"r": 0.4, "alpha": 0.9, "epsilon": 0.02}), ("ramplus_tl", {"r": 0.3, "alpha": 5.0}),
         ("ramplus_tl", {"r": 0.2, "alpha": 0.5, "epsilon": 0.15})]


@pytest.mark.parametrize("shape,n", [((48, 40), 3), ((37,), 1), ((6, 5, 7), 4), ((), 2)])
@pytest.mark.parametrize("name,params", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bits_equal_mergekit(shape: tuple, n: int, name: str, params: dict, dtype: torch.dtype) -> None:
    base, sources = _sparse_models(shape, n, seed=len(shape) + n, dtype=dtype)
    theirs = _mergekit(name, base, sources, params).to(dtype)  # mergekit casts to the output dtype
    deltas = torch.stack([s - base for s in sources])
    ours = merge_tensor(name, base, deltas, {}, params, seed=0, tensor_name="w")
    assert ours.dtype == dtype and ours.shape == theirs.shape
    assert torch.equal(ours, theirs)


def test_mergekit_gives_nan_where_we_do_not() -> None:
    """The one deliberate difference (epsilon 0, a source that changed nothing)."""
    base, sources = torch.zeros(2), [torch.tensor([1.0, 2.0]), torch.zeros(2)]
    assert torch.isnan(_mergekit("ramplus_tl", base, sources, {"epsilon": 0.0})).all()
    assert merge_tensor("ramplus_tl", base, torch.stack(sources), {}, {"epsilon": 0.0}, seed=0,
                        tensor_name="w").tolist() == [1.0, 2.0]


def test_epsilon_above_one_also_bounds_the_ratio_divisor() -> None:
    # mergekit divides by max(unique count, epsilon): epsilon 1.5, s0 has shared {p0} and
    # unique {p1}: rho = 1 / 1.5, factor 1 + 0.3 * 2/3 = 1.2 -> p1 = 2 * 1.2; p0 = (2 + 2)/2
    base, deltas = torch.zeros(3), torch.tensor([[2.0, 2.0, 0.0], [2.0, 0.0, 0.0]])
    out = merge_tensor("ramplus_tl", base, deltas, {}, {"r": 0.3, "alpha": 10.0, "epsilon": 1.5}, seed=0,
                       tensor_name="w")
    assert out[0].item() == 2.0 and out[1].item() == pytest.approx(2.4, rel=1e-6) and out[2].item() == 0.0
    theirs = _mergekit("ramplus_tl", base, list(base + deltas), {"r": 0.3, "alpha": 10.0, "epsilon": 1.5})
    assert torch.equal(out, theirs)


def test_evomerge_merge_reads_a_handwritten_mergekit_yaml(tiny_models: Any, tmp_path: Path) -> None:
    """`evomerge merge` on a hand-written ramplus_tl YAML (a filter, a per-layer value) equals mergekit."""
    pytest.importorskip("mergekit")
    from mergekit_compare import load_folder, max_rel_diff, run_mergekit_inprocess

    from evomerge.cli import main

    srcs = "\n".join(f"  - model: {s}" for s in tiny_models.source_refs)
    text = f"""merge_method: ramplus_tl
base_model: {tiny_models.base_ref}
models:
{srcs}
parameters:
  epsilon: 0.02
  r: [0.1, 0.5]
  alpha:
    - filter: self_attn
      value: 0.15
    - value: 2.0
dtype: float32
"""
    path = tmp_path / "ram.yaml"
    path.write_text(text)
    assert main(["merge", str(path), "--out", str(tmp_path / "ours")]) == 0
    theirs = load_folder(run_mergekit_inprocess(text, tmp_path / "theirs"))
    assert max_rel_diff(load_folder(tmp_path / "ours"), theirs) <= 1e-5
