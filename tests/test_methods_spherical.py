"""multislerp, nuslerp and karcher on tiny tensors with expectations worked out by hand.

Each expected value is derived in the comment next to it from the method's definition
(mergekit 0.1.5's meaning), not by re-running the implementation. The last sections run
mergekit's own kernels on the same tensors (skipped without mergekit) and read/write the
methods through mergekit YAML.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch
import yaml

from evomerge.errors import ConfigError, MethodError, RecipeError
from evomerge.merge.methods import check_methods_usable, check_params, get_method, merge_tensor
from evomerge.merge.mergekit_import import from_mergekit_yaml
from evomerge.merge.mergekit_spec import MERGEKIT_METHODS, resolved_group
from evomerge.merge.mergekit_yaml import to_mergekit_yaml
from evomerge.merge.recipe import MergeRecipe

T = torch.tensor
R2 = 1 / math.sqrt(2)


def merge(method, base, deltas, source_params=None, params=None, *, has_base=True, dtype=torch.float32):
    base = base if isinstance(base, torch.Tensor) else T(base, dtype=dtype)
    deltas = deltas if isinstance(deltas, torch.Tensor) else T(deltas, dtype=dtype)
    return merge_tensor(method, base, deltas, source_params or {}, params or {}, seed=0, tensor_name="w",
                        has_base=has_base)


def close(actual, expected, tol=1e-6):
    torch.testing.assert_close(actual, T(expected, dtype=actual.dtype), rtol=tol, atol=tol)


def deg(angle):
    return math.radians(angle)


# -- multislerp ---------------------------------------------------------------------------------


def test_multislerp_orthogonal_unit_vectors():
    # equal weights: mean direction (e1 + e2)/sqrt2 (45 degrees), weighted mean norm 1
    close(merge("multislerp", [0.0, 0.0], [[1.0, 0.0], [0.0, 1.0]], has_base=False), [R2, R2])
    # weights 3:1 -> 0.75/0.25: direction of 3 e1 + e2 (18.43 degrees: the normalised mean,
    # not slerp's 22.5), norm 1
    close(merge("multislerp", [0.0, 0.0], [[1.0, 0.0], [0.0, 1.0]], {"weight": [3.0, 1.0]}, has_base=False),
          [3 / math.sqrt(10), 1 / math.sqrt(10)])
    # normalize_weights off: same direction, norm 3*1 + 1*1 = 4
    close(merge("multislerp", [0.0, 0.0], [[1.0, 0.0], [0.0, 1.0]], {"weight": [3.0, 1.0]},
                {"normalize_weights": False}, has_base=False), [12 / math.sqrt(10), 4 / math.sqrt(10)])


def test_multislerp_with_and_without_base():
    sources = [[2.0, 1.0], [1.0, 2.0]]
    # no base: the models themselves; directions (2,1)/sqrt5 and (1,2)/sqrt5 average to
    # (1,1)/sqrt2, norms sqrt5 each -> sqrt5 * (1,1)/sqrt2
    close(merge("multislerp", [0.0, 0.0], sources, has_base=False), [math.sqrt(2.5)] * 2)
    # base (1,1): task vectors e1, e2 -> base + (1,1)/sqrt2
    close(merge("multislerp", [1.0, 1.0], [[1.0, 0.0], [0.0, 1.0]]), [1 + R2, 1 + R2])


def test_multislerp_parallel_is_lerp_and_antiparallel_falls_back():
    # parallel (1,2) and (2,4): one direction, norm (sqrt5 + 2 sqrt5)/2 -> 1.5 * (1,2), the lerp
    close(merge("multislerp", [0.0, 0.0], [[1.0, 2.0], [2.0, 4.0]], has_base=False), [1.5, 3.0], tol=1e-5)
    # antiparallel, equal weights: the mean direction vanishes -> linear 0.5 v - 0.5 v = 0, plus base
    close(merge("multislerp", [0.5, -1.0], [[1.0, 2.0], [-1.0, -2.0]]), [0.5, -1.0])
    # antiparallel 3:1: mean 0.5 u has direction u; norm 0.75 sqrt5 + 0.25 sqrt5 -> v itself
    close(merge("multislerp", [0.0, 0.0], [[1.0, 2.0], [-1.0, -2.0]], {"weight": [3.0, 1.0]}), [1.0, 2.0], tol=1e-5)


def test_multislerp_zero_inputs():
    # all task vectors zero, three sources (mergekit raises for more than two): the base
    close(merge("multislerp", [0.3, -0.2], torch.zeros(3, 2)), [0.3, -0.2])
    # one zero input: direction (0.6, 0.8) alone, norm (5 + 0)/2 = 2.5 -> (1.5, 2.0)
    close(merge("multislerp", [0.0, 0.0], [[3.0, 4.0], [0.0, 0.0]]), [1.5, 2.0], tol=1e-6)


def test_multislerp_single_input_is_returned_whatever_its_weight():
    close(merge("multislerp", [1.0, 2.0], [[0.5, -0.5]], {"weight": [0.2]}), [1.5, 1.5])


def test_multislerp_weights_summing_to_zero_are_left_undivided():
    # weights [1, -1] with normalize_weights: no division (mergekit: inf/NaN). Directions
    # e1, e2 -> M = e1 - e2, direction (1,-1)/sqrt2; norm 1*2 + (-1)*1 = 1
    out = merge("multislerp", [0.0, 0.0], [[2.0, 0.0], [0.0, 1.0]], {"weight": [1.0, -1.0]})
    close(out, [R2, -R2])


def test_multislerp_eps_enters_as_mergekit_s_does():
    # eps 0.1: units e/1.1, mean direction (1,1)/sqrt2, tangents sum to 0 so the step is eps:
    # result (1,1)/sqrt2 * cos(0.1), times the weighted norm 1
    out = merge("multislerp", [0.0, 0.0], [[1.0, 0.0], [0.0, 1.0]], params={"eps": 0.1})
    close(out, [R2 * math.cos(0.1)] * 2)


# -- nuslerp ------------------------------------------------------------------------------------


def test_nuslerp_orthogonal_unit_vectors():
    # t = 0.5, theta = 90: (sin 45 e1 + sin 45 e2) / sin 90
    close(merge("nuslerp", [0.0, 0.0], [[1.0, 0.0], [0.0, 1.0]], has_base=False), [R2, R2])
    # weights 3:1 -> t = 1/4: 22.5 degrees from e1 (true slerp, unlike multislerp's 18.43)
    close(merge("nuslerp", [0.0, 0.0], [[1.0, 0.0], [0.0, 1.0]], {"weight": [3.0, 1.0]}),
          [math.cos(deg(22.5)), math.sin(deg(22.5))])
    # norms are not restored: (2,0) and (0,1) at t = 0.5 -> (sin45 (2,0) + sin45 (0,1)) / 1
    close(merge("nuslerp", [0.0, 0.0], [[2.0, 0.0], [0.0, 1.0]]), [2 * R2, R2])


def test_nuslerp_base_is_added_back():
    close(merge("nuslerp", [1.0, -1.0], [[1.0, 0.0], [0.0, 1.0]]), [1 + R2, -1 + R2])


def test_nuslerp_colinear_inputs_lerp():
    # parallel: (1-t) v0 + t v1 = 0.5 (1,0,0) + 0.5 (3,0,0)
    close(merge("nuslerp", [0.0] * 3, [[1.0, 0.0, 0.0], [3.0, 0.0, 0.0]]), [2.0, 0.0, 0.0])
    # antiparallel, t = 1/4: 0.75 (2,0) + 0.25 (-1,0)
    close(merge("nuslerp", [0.0, 0.0], [[2.0, 0.0], [-1.0, 0.0]], {"weight": [3.0, 1.0]}), [1.25, 0.0])


def test_nuslerp_zero_inputs():
    # a zero task vector normalises to zero: theta = 90, the other scaled by sin((1-t) 90) (mergekit's arithmetic)
    close(merge("nuslerp", [0.0, 0.0], [[0.0, 3.0], [0.0, 0.0]]), [0.0, 3 * R2])
    # both zero: the base
    close(merge("nuslerp", [0.25, 4.0], torch.zeros(2, 2)), [0.25, 4.0])


def test_nuslerp_weights_summing_to_zero_give_the_midpoint():
    close(merge("nuslerp", [0.0, 0.0], [[1.0, 0.0], [0.0, 1.0]], {"weight": [1.0, -1.0]}), [R2, R2])


def test_nuslerp_flatten_rows_and_columns():
    v0 = [[1.0, 0.0], [1.0, 0.0]]
    v1 = [[0.0, 1.0], [1.0, 0.0]]
    deltas = [v0, v1]
    zero = [[0.0, 0.0], [0.0, 0.0]]
    # flattened (default): cos = 1/2, theta = 60: sin30 (v0 + v1) / sin60 = (v0 + v1)/sqrt3
    s3 = math.sqrt(3)
    close(merge("nuslerp", zero, deltas), [[1 / s3, 1 / s3], [2 / s3, 0.0]])
    # per row (last dim): row 0 orthogonal -> (1,1)/sqrt2; row 1 parallel -> lerp (1,0)
    close(merge("nuslerp", zero, deltas, params={"nuslerp_flatten": False}), [[R2, R2], [1.0, 0.0]])
    # per column (row_wise, mergekit's name): column 0 (1,1) vs (0,1), theta = 45:
    # sin22.5 ((1,1) + (0,1)) / sin45; column 1 (0,0) vs (1,0): zero input -> sin45 (1,0)
    c = math.sin(deg(22.5)) / math.sin(deg(45))
    out = merge("nuslerp", zero, deltas, params={"nuslerp_flatten": False, "nuslerp_row_wise": True})
    close(out, [[c, R2], [2 * c, 0.0]])
    # flatten wins over row_wise
    close(merge("nuslerp", zero, deltas, params={"nuslerp_row_wise": True}), [[1 / s3, 1 / s3], [2 / s3, 0.0]])


def test_nuslerp_takes_exactly_two_sources():
    with pytest.raises(MethodError, match="exactly 2 sources, got 3") as err:
        merge("nuslerp", [0.0, 0.0], torch.eye(3)[:, :2])
    assert "\n" not in str(err.value)
    with pytest.raises(MethodError, match="'nuslerp' merges exactly 2 sources, got 3; change models.sources"):
        check_methods_usable(["nuslerp"], n_sources=3, has_base=True, where="merge.methods")
    with pytest.raises(MethodError, match="got 1"):
        check_methods_usable(["nuslerp"], n_sources=1, has_base=False, where="merge.methods")
    check_methods_usable(["nuslerp", "multislerp", "karcher"], n_sources=2, has_base=False, where="merge.methods")


def test_nuslerp_with_three_sources_is_a_one_line_config_error():
    from search_spaces import check_space
    from test_search_spaces import config, model_set

    with pytest.raises(ConfigError, match="merge.methods: method 'nuslerp' merges exactly 2 sources, got 3") as err:
        check_space(config(**{"merge.methods": ["nuslerp"]}), model_set(n_sources=3))
    assert "\n" not in str(err.value)
    check_space(config(sources=["a", "b"], **{"merge.methods": ["nuslerp"]}), model_set(n_sources=2, base=None))


def test_search_space_has_weight_genes_for_the_slerps():
    from search_spaces import build_space
    from test_search_spaces import config, model_set

    space = build_space(config(**{"merge.methods": ["multislerp", "karcher"]}), model_set())
    assert space.source_genes == ["weight"] and space.method_genes == []
    recipe = space.to_recipe(space.initial_value())
    assert {g.method for g in recipe.groups.values()} == {"multislerp"}
    assert recipe.groups["embed"].source_params["a"] == {"weight": 1 / 3}
    space = build_space(config(sources=["a", "b"], **{"merge.methods": ["nuslerp"]}), model_set(n_sources=2))
    assert space.source_genes == ["weight"] and space.method_genes == []


# -- karcher ------------------------------------------------------------------------------------


def test_karcher_single_input_is_returned():
    close(merge("karcher", [0.0, 0.0], [[3.0, -4.0]], has_base=False), [3.0, -4.0])


def test_karcher_orthogonal_and_geodesic_mean():
    # e1, e2: symmetric, the start (e1 + e2)/sqrt2 is already the mean; mean norm 1
    close(merge("karcher", [0.0, 0.0], [[1.0, 0.0], [0.0, 1.0]], has_base=False), [R2, R2])
    # e1, e1, e2 (0, 0, 90 degrees): the geodesic mean is the mean angle, 30 degrees; the
    # normalised linear mean it starts from is atan(1/2) = 26.57 degrees
    three = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    close(merge("karcher", [0.0, 0.0], three, has_base=False), [math.cos(deg(30)), math.sin(deg(30))], tol=1e-5)
    close(merge("karcher", [0.0, 0.0], three, params={"max_iter": 0}, has_base=False),
          [2 / math.sqrt(5), 1 / math.sqrt(5)])


def test_karcher_scales_by_the_mean_norm():
    # directions e1, e2 -> (1,1)/sqrt2; norms 2 and 4 -> 3
    close(merge("karcher", [0.0, 0.0], [[2.0, 0.0], [0.0, 4.0]], has_base=False), [3 * R2, 3 * R2], tol=1e-5)


def test_karcher_zero_inputs():
    # a zero input has no direction but counts in the mean norm: (3,4) and 0 -> (3,4)/2
    close(merge("karcher", [0.0, 0.0], [[3.0, 4.0], [0.0, 0.0]], has_base=False), [1.5, 2.0])
    # every input shorter than tol: zeros
    close(merge("karcher", [0.0, 0.0], torch.full((3, 2), 1e-7), has_base=False), [0.0, 0.0])


def test_karcher_antiparallel_stays_finite():
    # e1, -e1: the mean direction vanishes, so it starts (and stays) at the first: e1 * mean norm 1
    close(merge("karcher", [0.0, 0.0], [[1.0, 0.0], [-1.0, 0.0]], has_base=False), [1.0, 0.0])


def test_karcher_base_takes_part():
    # base (0,1), one source (1,0) = base + (1,-1): two models at 90 degrees -> (1,1)/sqrt2
    close(merge("karcher", [0.0, 1.0], [[1.0, -1.0]]), [R2, R2])
    # without a base (zeros) the same source alone is returned
    close(merge("karcher", [0.0, 0.0], [[1.0, 0.0]], has_base=False), [1.0, 0.0])


def test_karcher_parameter_checks_are_one_line():
    karcher = get_method("karcher")
    for params, match in (({"max_iter": 2.5}, "whole number"), ({"max_iter": -1}, "whole number"),
                          ({"tol": -1e-3}, ">= 0")):
        with pytest.raises(MethodError, match=match) as err:
            check_params(karcher, {}, params, "recipe group 'default'")
        assert "\n" not in str(err.value)
    with pytest.raises(MethodError, match="'eps'.*>= 0"):
        check_params(get_method("multislerp"), {}, {"eps": -1.0}, "g")


# -- dtypes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["multislerp", "nuslerp", "karcher"])
def test_half_precision_in_and_out(method, dtype):
    g = torch.Generator().manual_seed(zlib.crc32(method.encode()))
    base32 = torch.randn(8, 6, generator=g)
    deltas32 = 0.5 * torch.randn(2, 8, 6, generator=g)
    base, deltas = base32.to(dtype), deltas32.to(dtype)
    sp = {"weight": [0.3, 0.9]} if method != "karcher" else {}
    out = merge(method, base, deltas, sp)
    assert out.dtype == dtype and out.shape == base.shape
    # the math runs in float32: only the final rounding differs from float32 inputs of the same values
    ref = merge(method, base.float(), deltas.float(), sp)
    torch.testing.assert_close(out, ref.to(dtype), rtol=0, atol=0)


def test_float64_stays_float64():
    out = merge("multislerp", T([0.0, 0.0], dtype=torch.float64), T([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
    assert out.dtype == torch.float64 and out.tolist() == pytest.approx([R2, R2], abs=1e-12)


# -- against mergekit's kernels -----------------------------------------------------------------

SHAPES = [(24, 20), (37,), (4, 5, 6)]


def _mergekit(name, tensors, base_index, params):
    pytest.importorskip("mergekit")
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    group = TensorGroup.from_tensors(tensors, base_index=base_index)
    return registry.get(name)([group], parameters=params)[0]


def _compare(name, shape, n, source_params, params, with_base, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    sources = [base + 0.5 * torch.randn(shape, generator=g) for _ in range(n)]
    if with_base:  # the base last, as evomerge's export lists it
        theirs = _mergekit(name, [*sources, base], n, {**source_params, **params})
        ours = merge(name, base, torch.stack([s - base for s in sources]), source_params, params)
    else:
        theirs = _mergekit(name, sources, None, {**source_params, **params})
        ours = merge(name, torch.zeros(shape), torch.stack(sources), source_params, params, has_base=False)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-5 * theirs.abs().max().item()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_matches_mergekit(shape, with_base, normalize):
    _compare("multislerp", shape, 3, {"weight": [0.2, 0.5, 0.9]}, {"normalize_weights": normalize}, with_base, 1)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
def test_nuslerp_matches_mergekit(shape, with_base, flatten, row_wise):
    _compare("nuslerp", shape, 2, {"weight": [0.3, 0.8]}, {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise},
             with_base, 2)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("max_iter", [0, 3, 10])
def test_karcher_matches_mergekit(shape, with_base, max_iter):
    _compare("karcher", shape, 3, {}, {"max_iter": max_iter, "tol": 1e-5}, with_base, 3)


# -- mergekit YAML, both directions -------------------------------------------------------------

SOURCES = ["org/a", "org/b"]


def _recipe(method, base="org/base"):
    sp = {} if method == "karcher" else {"org/a": {"weight": 0.25}, "org/b": {"weight": 1.5}}
    params = {"multislerp": {"normalize_weights": False, "eps": 1e-6},
              "nuslerp": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
              "karcher": {"max_iter": 4, "tol": 1e-4}}[method]
    other = {"multislerp": {"weight": 0.5}, "nuslerp": {"weight": 0.75}, "karcher": {}}[method]
    groups = {"default": {"method": method, "params": params, "source_params": sp},
              "layers.1.mlp": {"method": method, "source_params": {s: other for s in SOURCES} if other else {}}}
    return MergeRecipe.from_dict({"base": base, "sources": SOURCES, "groups": groups, "seed": 5})


@pytest.mark.parametrize("base", ["org/base", None])
@pytest.mark.parametrize("method", ["multislerp", "nuslerp", "karcher"])
def test_recipe_yaml_recipe_round_trip(method, base):
    recipe = _recipe(method, base)
    text = to_mergekit_yaml(recipe, 4, "llama")
    doc = yaml.safe_load(text)
    assert doc["merge_method"] == method
    listed = [s["model"] for s in doc["slices"][0]["sources"]]
    if base:  # named as the base and listed last, with no per-model parameters
        assert doc["base_model"] == base and listed == [*SOURCES, base]
        assert "parameters" not in doc["slices"][0]["sources"][-1]
    else:
        assert "base_model" not in doc and listed == SOURCES
    back = from_mergekit_yaml(text)
    assert back.base == recipe.base and back.sources == recipe.sources
    for leaf in ("embed", "layers.0.attn", "layers.1.mlp", "layers.3.norm", "lm_head"):
        assert resolved_group(back, leaf) == resolved_group(recipe, leaf), leaf
    assert to_mergekit_yaml(back, 4, "llama") == text


HANDWRITTEN = """\
merge_method: multislerp
base_model: org/base
models:
  - model: org/base
  - model: org/a
    parameters: {weight: 0.3}
  - model: org/b
    parameters: {weight: 0.7}
parameters:
  normalize_weights: false
dtype: bfloat16
"""


def test_handwritten_yaml_recipe_yaml_is_equivalent():
    recipe = from_mergekit_yaml(HANDWRITTEN)
    # the base listed among the models is still the base, not a weighted source
    assert recipe.base == "org/base" and recipe.sources == SOURCES
    grp = recipe.groups["default"]
    assert grp.method == "multislerp" and grp.params["normalize_weights"] is False
    assert grp.source_params == {"org/a": {"weight": 0.3}, "org/b": {"weight": 0.7}}
    again = from_mergekit_yaml(to_mergekit_yaml(recipe, 1, "llama"))
    assert again.to_dict() == recipe.to_dict()
    doc = yaml.safe_load(to_mergekit_yaml(recipe, 1, "llama"))
    assert doc["parameters"] == {"normalize_weights": False, "eps": 1e-8} and doc["dtype"] == "bfloat16"


def test_yaml_karcher_without_base_and_nuslerp_with_three_models():
    recipe = from_mergekit_yaml("merge_method: karcher\nmodels: [org/a, org/b]\nparameters: {max_iter: 5}\n")
    assert recipe.base is None and recipe.sources == SOURCES
    assert recipe.groups["default"].params["max_iter"] == 5
    text = ("merge_method: nuslerp\nmodels:\n" + "".join(f"  - {{model: org/{s}, parameters: {{weight: 1}}}}\n"
                                                           for s in "abc"))
    three = from_mergekit_yaml(text)  # read; refused where the recipe meets the models
    with pytest.raises(MethodError, match="exactly 2 sources, got 3"):
        check_methods_usable([three.groups["default"].method], len(three.sources), False, "recipe group 'default'")


def test_mergekit_tables_name_mergekit_s_parameters():
    assert dict(MERGEKIT_METHODS["multislerp"].shared) == {"normalize_weights": True, "eps": 1e-8}
    assert set(MERGEKIT_METHODS["multislerp"].per_input) == {"weight"}
    assert dict(MERGEKIT_METHODS["nuslerp"].shared) == {"nuslerp_flatten": True, "nuslerp_row_wise": False}
    assert dict(MERGEKIT_METHODS["karcher"].shared) == {"max_iter": 10, "tol": 1e-5}
    assert all(MERGEKIT_METHODS[m].base_optional and not MERGEKIT_METHODS[m].uses_base
               for m in ("multislerp", "nuslerp", "karcher"))
    # mergekit requires weight: a recipe that leaves it to evomerge's default 1.0 still exports it
    doc = yaml.safe_load(to_mergekit_yaml(MergeRecipe.from_dict(
        {"base": None, "sources": SOURCES, "groups": {"default": {"method": "nuslerp"}}}), 4, "llama"))
    assert [s["parameters"] for s in doc["slices"][0]["sources"]] == [{"weight": 1}, {"weight": 1}]


def test_evomerge_reads_the_yaml_file(tmp_path):
    from evomerge.merge.recipe_files import load_recipe_file

    path = tmp_path / "merge.yaml"
    path.write_text(HANDWRITTEN)
    assert load_recipe_file(path).to_dict() == from_mergekit_yaml(HANDWRITTEN).to_dict()
    with pytest.raises(RecipeError, match="merge_method"):
        from_mergekit_yaml("models: [org/a]\n")
