"""sce, arcee_fusion, nearswap and passthrough: hand-worked tensors, edge cases, errors,
mergekit YAML both ways, the search space, and mergekit 0.1.5's own functions on tensors."""

from __future__ import annotations

import json
import zlib
from types import SimpleNamespace as NS
from typing import Any

import pytest
import torch
import yaml

from evomerge.config import parse_config
from evomerge.errors import ConfigError, MethodError, RecipeError
from evomerge.merge.groups import TensorGroup
from evomerge.merge.methods import METHODS, check_methods_usable, check_params, merge_tensor
from evomerge.merge.mergekit_import import from_mergekit_yaml
from evomerge.merge.mergekit_spec import MERGEKIT_METHODS, resolved_group
from evomerge.merge.mergekit_yaml import to_mergekit_yaml
from evomerge.merge.recipe import MergeRecipe
from search_spaces import build_space, check_space

T = torch.tensor
N_LAYERS = 4


def merge(method: str, base: Any, deltas: Any, source_params: dict | None = None, params: dict | None = None,
          *, has_base: bool = True) -> torch.Tensor:
    base = base if isinstance(base, torch.Tensor) else T(base, dtype=torch.float32)
    deltas = deltas if isinstance(deltas, torch.Tensor) else T(deltas, dtype=torch.float32)
    return merge_tensor(method, base, deltas, source_params or {}, params or {}, seed=0, tensor_name="w",
                        has_base=has_base)


def close(actual: torch.Tensor, expected: Any, tol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, T(expected, dtype=actual.dtype), rtol=tol, atol=tol)


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


# -- sce ------------------------------------------------------------------------------------

# weights: mean squares 14/4 and 6/4 -> 0.7, 0.3; plain sums [2, 0, 2, 0] elect + everywhere
SCE_D = [[1.0, -2.0, 3.0, 0.0], [1.0, 2.0, -1.0, 0.0]]


def test_sce_by_hand_weights_and_sign_consensus():
    out = merge("sce", [10.0] * 4, SCE_D)
    # pos 0: both agree -> (0.7 + 0.3) / 1; pos 1: only source 2 (+2); pos 2: only source 1 (+3);
    # pos 3: nobody -> 0 / 1e-6 = 0
    close(out, [11.0, 12.0, 13.0, 10.0])


def test_sce_weights_decide_nothing_about_the_sign():
    # mean squares 5, 2 -> weights 5/7, 2/7; at pos 0 the weighted sum 5/7 - 4/7 > 0 would
    # elect +, but SCE (as mergekit) elects on the plain sum, -1: only source 2 counts there
    d = [[1.0, 3.0], [-2.0, 0.0]]
    close(merge("sce", [0.0, 0.0], d), [-2.0, 3.0])


def test_sce_select_topk_keeps_highest_variance_positions():
    d = [[1.0, -2.0, 4.0, 0.5], [1.0, 2.0, -1.0, 0.0]]  # variances 0, 4, 6.25, 0.0625: 3 nonzero
    full = merge("sce", [0.0] * 4, d, params={"select_topk": 1.0})
    assert torch.equal(full, merge("sce", [0.0] * 4, d))  # 1.0 is the default
    # int(3 * 0.5) = 1 position: only pos 2 keeps task vectors; source 1 agrees with + there
    close(merge("sce", [0.0] * 4, d, params={"select_topk": 0.5}), [0.0, 0.0, 4.0, 0.0])
    # int(3 * 0.7) = 2: pos 1 and 2
    close(merge("sce", [0.0] * 4, d, params={"select_topk": 0.7}), [0.0, 2.0, 4.0, 0.0])
    # int(3 * 0.2) = 0 positions: the base
    close(merge("sce", [5.0] * 4, d, params={"select_topk": 0.2}), [5.0] * 4)


def test_sce_single_source_and_zero_task_vectors():
    base = T([1.0, -1.0, 2.0])
    one = T([[0.5, 0.0, -3.0]])
    close(merge("sce", base, one), (base + one[0]).tolist())  # topk 1: the source itself
    # below 1, one source has no variance anywhere: nothing selected, the base
    assert torch.equal(merge("sce", base, one, params={"select_topk": 0.9}), base)
    # all-zero task vectors: equal weights, no agreeing entry, 0 / 1e-6: the base exactly
    assert torch.equal(merge("sce", base, torch.zeros(3, 3)), base)
    assert torch.equal(merge("sce", base, torch.zeros(2, 3), params={"select_topk": 0.5}), base)


def test_sce_accepts_int8_mask_and_ignores_it():
    a = merge("sce", [0.0] * 4, SCE_D, params={"int8_mask": True, "select_topk": 0.6})
    assert torch.equal(a, merge("sce", [0.0] * 4, SCE_D, params={"select_topk": 0.6}))
    assert "int8_mask" in METHODS["sce"].ignored_params
    assert "int8_mask" not in METHODS["nearswap"].ignored_params  # mergekit's nearswap has no such parameter


@pytest.mark.parametrize("bad", [0.0, 1.5, -0.1])
def test_select_topk_outside_0_1_is_one_line(bad):
    with pytest.raises(MethodError, match=r"select_topk is .*\(0, 1\]") as err:
        merge("sce", [0.0] * 4, SCE_D, params={"select_topk": bad})
    one_line(err)
    with pytest.raises(MethodError, match="select_topk"):
        check_params("sce", {}, {"select_topk": bad}, where="recipe group 'default'")


# -- arcee_fusion ---------------------------------------------------------------------------


def test_arcee_fusion_keeps_only_outlier_importance():
    base = torch.arange(8, dtype=torch.float32).reshape(1, 8) * 0.1
    delta = T([[0.1, 0.2, 0.3, -0.4, 0.5, 0.6, 0.7, 5.0]])
    # importance = |delta| * KL (one row: one KL); quartiles at floor(q * 7) = 1, 3, 5 of the
    # sorted importances: 0.2k, 0.4k, 0.6k -> threshold 0.4k + 1.5 * 0.4k = k: only 5.0 passes
    out = merge("arcee_fusion", base, delta.unsqueeze(0))
    expected = base.clone()
    expected[0, 7] += 5.0
    close(out, expected.tolist())


def test_arcee_fusion_weighs_changes_by_how_they_move_the_softmax():
    base = torch.zeros(2, 4)
    # row 1 shifts every entry by 3: the softmax does not change (KL 0), so despite the
    # largest |delta| nothing of it is taken; row 0's 4.0 is the one outlier
    delta = T([[0.1, 0.2, 0.25, 4.0], [3.0, 3.0, 3.0, 3.0]])
    close(merge("arcee_fusion", base, delta.unsqueeze(0)), [[0.0, 0.0, 0.0, 4.0], [0.0] * 4])


def test_arcee_fusion_zero_task_vector_is_the_base_and_1d_works():
    base = T([[0.3, -1.0, 2.0], [1.0, 1.0, 0.5]])
    assert torch.equal(merge("arcee_fusion", base, torch.zeros(1, 2, 3)), base)
    vec = merge("arcee_fusion", T([0.0, 1.0, 2.0, 3.0, 4.0]), T([[0.0, 0.0, 0.0, 0.0, 9.0]]))
    close(vec, [0.0, 1.0, 2.0, 3.0, 13.0])


def test_arcee_fusion_needs_a_base_and_exactly_one_source():
    with pytest.raises(MethodError, match="needs a base model") as err:
        check_methods_usable(["arcee_fusion"], n_sources=1, has_base=False, where="merge.methods")
    one_line(err)
    with pytest.raises(MethodError, match="exactly 1 source, got 2") as err:
        merge("arcee_fusion", [0.0, 1.0], [[1.0, 2.0], [3.0, 4.0]])
    one_line(err)


# -- nearswap -------------------------------------------------------------------------------


def test_nearswap_by_hand():
    base = T([1.0, 1.0, 1.0, 1.0])
    delta = T([[0.001, 0.01, -0.1, 0.0]])
    # w = clamp(0.01 / |delta|) = 1, 1, 0.1, 1 (|delta| floored at 1e-6)
    close(merge("nearswap", base, delta, params={"t": 0.01}), [1.001, 1.01, 0.99, 1.0])


def test_nearswap_t_zero_is_the_base_and_large_t_the_other_model():
    g = torch.Generator().manual_seed(0)
    base, delta = torch.randn(5, 6, generator=g), 0.1 * torch.randn(1, 5, 6, generator=g)
    assert torch.equal(merge("nearswap", base, delta, params={"t": 0.0}), base)
    assert torch.equal(merge("nearswap", base, delta, params={"t": -1.0}), base)  # clamped at 0 too
    assert torch.equal(merge("nearswap", base, delta, params={"t": 1e6}), base + delta[0])


def test_nearswap_t_is_required_by_mergekit_yaml_import():
    with pytest.raises(RecipeError, match="parameter 't' is missing") as err:
        from_mergekit_yaml("merge_method: nearswap\nbase_model: b\nmodels: [{model: a}]\n")
    one_line(err)
    r = from_mergekit_yaml("merge_method: nearswap\nbase_model: b\nmodels: [{model: a}]\nparameters: {t: 0.002}\n")
    assert r.base == "b" and r.sources == ["a"] and r.groups["default"].params == {"t": 0.002}
    assert MERGEKIT_METHODS["nearswap"].uses_base and "t" in METHODS["nearswap"].required


# -- passthrough ----------------------------------------------------------------------------


def test_passthrough_without_a_base_is_the_source_scaled():
    src = T([[0.5, -0.0, 3.0]])
    out = merge("passthrough", torch.zeros(3), src, has_base=False)
    assert torch.equal(out, src[0]) and torch.signbit(out[1])  # bit for bit, -0 kept
    out[0] = 7.0
    assert src[0, 0] == 0.5  # a copy, not the caller's tensor
    close(merge("passthrough", torch.zeros(3), src, {"scale": [2.0]}, has_base=False), [1.0, 0.0, 6.0])
    close(merge("passthrough", torch.zeros(3), src, {"scale": 0.0}, has_base=False), [0.0, 0.0, 0.0])


def test_passthrough_with_a_base_rebuilds_the_source():
    base = T([1.0, 2.0, 3.0])
    close(merge("passthrough", base, T([[0.5, 0.5, -1.0]]), {"scale": [-1.0]}), [-1.5, -2.5, -2.0])


def test_passthrough_takes_one_source_and_no_base_is_needed():
    with pytest.raises(MethodError, match="exactly 1 source, got 2") as err:
        merge("passthrough", [0.0, 0.0], [[1.0, 2.0], [3.0, 4.0]], has_base=False)
    assert "the base" not in one_line(err)
    check_methods_usable(["passthrough"], n_sources=1, has_base=False, where="merge.methods")
    with pytest.raises(MethodError, match="exactly 1 source, got 2"):
        check_methods_usable(["passthrough"], n_sources=2, has_base=False, where="merge.methods")


# -- dtypes ---------------------------------------------------------------------------------

CASES = [
    ("sce", 3, {}, {"select_topk": 0.4}),
    ("sce", 2, {}, {}),
    ("arcee_fusion", 1, {}, {}),
    ("nearswap", 1, {}, {"t": 0.05}),
    ("passthrough", 1, {"scale": [1.3]}, {}),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("name,n,sp,params", CASES)
def test_dtypes_are_returned_as_given(name, n, sp, params, dtype):
    g = torch.Generator().manual_seed(3)
    base, deltas = torch.randn(12, 10, generator=g).to(dtype), (0.1 * torch.randn(n, 12, 10, generator=g)).to(dtype)
    base_copy, deltas_copy = base.clone(), deltas.clone()
    out = merge(name, base, deltas, sp, params)
    assert out.dtype == dtype and out.shape == base.shape and torch.isfinite(out).all()
    assert torch.equal(base, base_copy) and torch.equal(deltas, deltas_copy)


# -- mergekit 0.1.5's functions on the same tensors -----------------------------------------


def _mergekit(name: str, base: torch.Tensor, sources: list[torch.Tensor], params: dict,
              with_base: bool = True) -> torch.Tensor:
    pytest.importorskip("mergekit")
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup as MkGroup

    tensors = [base, *sources] if with_base else list(sources)
    group = MkGroup.from_tensors(tensors, base_index=0 if with_base else None)
    return registry.get(name)([group], parameters=params)[0]


def _models(shape: tuple[int, ...], n: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n)]


def _rel(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max())


SHAPES = [(48, 40), (37,), (6, 5, 7)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("select_topk", [1.0, 0.75, 0.3])
def test_sce_matches_mergekit(shape, n, select_topk):
    base, sources = _models(shape, n, seed=zlib.crc32(f"sce{shape}{n}".encode()))
    theirs = _mergekit("sce", base, sources, {"select_topk": select_topk})
    ours = merge("sce", base, torch.stack([s - base for s in sources]), params={"select_topk": select_topk})
    assert ours.dtype == theirs.dtype and _rel(ours, theirs) <= 1e-5


@pytest.mark.parametrize("shape", SHAPES)
def test_arcee_fusion_matches_mergekit(shape):
    base, (src,) = _models(shape, 1, seed=zlib.crc32(f"fusion{shape}".encode()))
    src = src + (torch.rand(shape, generator=torch.Generator().manual_seed(9)) < 0.05) * 2.0  # some outliers
    theirs = _mergekit("arcee_fusion", base, [src], {})
    ours = merge("arcee_fusion", base, (src - base).unsqueeze(0))
    assert _rel(ours, theirs) <= 1e-5
    assert not torch.equal(ours, base) and not torch.allclose(ours, src)  # something taken, not everything


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.01, 0.08, 10.0])
def test_nearswap_matches_mergekit(shape, t):
    base, (src,) = _models(shape, 1, seed=zlib.crc32(f"nearswap{shape}".encode()))
    theirs = _mergekit("nearswap", base, [src], {"t": t})
    assert _rel(merge("nearswap", base, (src - base).unsqueeze(0), params={"t": t}), theirs) <= 1e-5


@pytest.mark.parametrize("scale", [None, 1.0, 0.4, -2.0])
def test_passthrough_matches_mergekit(scale):
    _, (src,) = _models((9, 4), 1, seed=5)
    theirs = _mergekit("passthrough", src, [src], {} if scale is None else {"scale": [scale]}, with_base=False)
    sp = {} if scale is None else {"scale": [scale]}
    assert torch.equal(merge("passthrough", torch.zeros(9, 4), src.unsqueeze(0), sp, has_base=False), theirs)


@pytest.mark.parametrize("name,n,params", [("sce", 3, {"select_topk": 0.5}), ("nearswap", 1, {"t": 0.05})])
def test_bf16_matches_mergekit(name, n, params):
    base, sources = _models((24, 16), n, seed=11)
    base, sources = base.bfloat16(), [s.bfloat16() for s in sources]
    theirs = _mergekit(name, base, sources, params)
    ours = merge(name, base, torch.stack([s - base for s in sources]), params=params)
    assert ours.dtype == theirs.dtype == torch.bfloat16 and _rel(ours, theirs) <= 1e-2


# -- mergekit YAML both ways -----------------------------------------------------------------


def _recipe(method: str, base: str | None, sources: list[str], params: dict, sp: dict) -> MergeRecipe:
    groups = {"default": {"method": method, "params": params, "source_params": {s: dict(sp) for s in sources}},
              "layers.1.attn": {"method": method, "params": {k: v / 2 for k, v in params.items()},
                                "source_params": {s: {k: v / 2 for k, v in sp.items()} for s in sources}}}
    return MergeRecipe.from_dict({"base": base, "sources": sources, "groups": groups, "seed": 3})


@pytest.mark.parametrize("method,base,sources,params,sp", [
    ("sce", "b", ["x", "y", "z"], {"select_topk": 0.6}, {}),
    ("arcee_fusion", "b", ["x"], {}, {}),
    ("nearswap", "b", ["x"], {"t": 0.004}, {}),
    ("passthrough", None, ["x"], {}, {"scale": 1.5}),
])
def test_yaml_round_trip(method, base, sources, params, sp):
    recipe = _recipe(method, base, sources, params, sp)
    text = to_mergekit_yaml(recipe, N_LAYERS, "llama")
    doc = yaml.safe_load(text)
    assert doc["merge_method"] == method and doc.get("base_model") == base
    back = from_mergekit_yaml(text)
    assert back.base == recipe.base and back.sources == recipe.sources
    for leaf in ("embed", "layers.1.attn", "layers.1.mlp", "lm_head"):
        assert resolved_group(back, leaf) == resolved_group(recipe, leaf), leaf
    assert from_mergekit_yaml(to_mergekit_yaml(back, N_LAYERS, "llama")).to_dict() == back.to_dict()


def test_handwritten_yaml_imports():
    sce = from_mergekit_yaml("merge_method: sce\nbase_model: b\nmodels: [{model: x}, {model: y}]\n"
                             "parameters: {select_topk: 0.5, int8_mask: true}\ndtype: bfloat16\n")
    assert sce.groups["default"].params == {"select_topk": 0.5} and sce.compute_dtype == "bfloat16"
    fusion = from_mergekit_yaml("merge_method: arcee_fusion\nbase_model: b\nmodels: [{model: x}]\n")
    assert fusion.base == "b" and fusion.sources == ["x"] and fusion.groups["default"].params == {}
    # mergekit's passthrough accepts the one model named as base_model too: it stays the source
    p = from_mergekit_yaml("merge_method: passthrough\nbase_model: x\nmodels: [{model: x, parameters: {scale: 2}}]\n")
    assert p.base == "x" and p.sources == ["x"] and p.groups["default"].source_params == {"x": {"scale": 2.0}}
    with pytest.raises(RecipeError, match="needs 'base_model'") as err:
        from_mergekit_yaml("merge_method: arcee_fusion\nmodels: [{model: x}]\n")
    one_line(err)


def test_passthrough_export_leaves_a_recipe_base_out():
    # mergekit's passthrough takes one input; a base would be a second one (it is unused anyway)
    r = _recipe("passthrough", "b", ["x"], {}, {"scale": 0.5})
    doc = yaml.safe_load(to_mergekit_yaml(r, N_LAYERS, "llama"))
    assert "base_model" not in doc and [s["model"] for s in doc["slices"][0]["sources"]] == ["x"]


# -- the search space -----------------------------------------------------------------------


def _model_set(n_sources: int, base: str | None = "base") -> Any:
    groups = {"model.embed_tokens.weight": TensorGroup("embed")}
    for i in range(N_LAYERS):
        groups[f"model.layers.{i}.self_attn.q_proj.weight"] = TensorGroup("layer", i, "attn")
        groups[f"model.layers.{i}.mlp.up_proj.weight"] = TensorGroup("layer", i, "mlp")
        groups[f"model.layers.{i}.input_layernorm.weight"] = TensorGroup("layer", i, "norm")
    groups["model.norm.weight"] = TensorGroup("final_norm")
    groups["lm_head.weight"] = TensorGroup("lm_head")
    return NS(num_layers=N_LAYERS, sources=[NS(ref=r) for r in "abc"[:n_sources]],
              base=NS(ref=base) if base else None, groups=groups, layout=None)


def _config(methods: list[str], sources: list[str], **over: Any) -> Any:
    raw = {"models": {"base": "base", "sources": sources},
           "objectives": [{"name": "x", "task": "t", "metric": "acc"}], "budget": {"evaluations": 10}}
    over["merge.methods"] = methods
    return parse_config(raw, [f"{k}={json.dumps(v)}" for k, v in over.items()])


def test_space_genes_for_each_method():
    sce = build_space(_config(["sce"], ["a", "b", "c"]), _model_set(3))
    assert sce.method_genes == ["select_topk"] and sce.source_genes == []
    assert sce.to_recipe(sce.initial_value()).groups["embed"].params == {"select_topk": 1.0}
    near = build_space(_config(["nearswap"], ["a"]), _model_set(1))
    assert near.method_genes == ["t"]
    assert near.to_recipe(near.initial_value()).groups["lm_head"].params == {"t": 0.0001}
    passthrough = build_space(_config(["passthrough"], ["a"]), _model_set(1, base=None))
    assert passthrough.source_genes == ["scale"] and passthrough.method_genes == []
    assert passthrough.to_recipe(passthrough.initial_value()).groups["embed"].source_params == {"a": {"scale": 1.0}}
    fusion = build_space(_config(["arcee_fusion"], ["a"]), _model_set(1))
    assert fusion.method_genes == [] and fusion.source_genes == []


def test_space_select_topk_bound_at_zero_still_gives_valid_recipes():
    space = build_space(_config(["sce"], ["a", "b"], **{"space.bounds": {"select_topk": [0.0, 1.0]}}), _model_set(2))
    value = space.initial_value()
    value["select_topk"][:] = 0.0
    recipe = space.to_recipe(value)
    for g in recipe.groups.values():
        assert 0 < g.params["select_topk"] <= 1
        check_params("sce", {}, g.params, where="test")


@pytest.mark.parametrize("methods,n,base,match", [
    (["arcee_fusion"], 2, "base", "'arcee_fusion' merges the base with exactly 1 source, got 2"),
    (["arcee_fusion"], 1, None, "'arcee_fusion' needs a base model"),
    (["nearswap"], 3, "base", "'nearswap' merges the base with exactly 1 source, got 3"),
    (["nearswap"], 1, None, "'nearswap' needs a base model"),
    (["passthrough"], 2, None, "'passthrough' merges exactly 1 source, got 2"),
    (["sce"], 2, None, "'sce' needs a base model"),
    (["passthrough"], 1, None, None),
    (["passthrough"], 1, "base", None),
    (["nearswap", "arcee_fusion"], 1, "base", None),
    (["sce"], 1, "base", None),
])
def test_check_space_restricted_methods(methods, n, base, match):
    cfg = _config(methods, ["a", "b", "c"][:n])
    if match is None:
        check_space(cfg, _model_set(n, base))
        return
    with pytest.raises(ConfigError, match=match) as err:
        check_space(cfg, _model_set(n, base))
    one_line(err)


def test_a_mixed_recipe_with_passthrough_round_trips_through_mergekit_multi():
    """passthrough's per-method document carries no base_model (mergekit's passthrough takes one
    input); the import takes the base from the other documents, so the recipe comes back equal."""
    from evomerge.merge.groups import LAYOUTS_BY_MODEL_TYPE
    from evomerge.merge.mergekit_import import from_mergekit_yaml
    from evomerge.merge.mergekit_yaml import to_mergekit_yaml
    from evomerge.merge.recipe import MergeRecipe

    recipe = MergeRecipe.from_dict({
        "base": "/m/base", "sources": ["/m/a"],
        "groups": {"default": {"method": "slerp", "params": {"t": 0.25}},
                   "layers.1": {"method": "passthrough", "source_params": {"/m/a": {"scale": 0.5}}},
                   "lm_head": {"method": "nearswap", "params": {"t": 0.01}}}})
    text = to_mergekit_yaml(recipe, 4, LAYOUTS_BY_MODEL_TYPE["llama"])
    from evomerge.merge.groups import leaf_keys
    from evomerge.merge.mergekit_spec import resolved_group

    back = from_mergekit_yaml(text)
    assert back.base == "/m/base" and back.sources == ["/m/a"]
    # the same settings on every leaf group (the group keys may be compressed differently)
    assert [resolved_group(back, k) for k in leaf_keys(4)] == [resolved_group(recipe, k) for k in leaf_keys(4)]
