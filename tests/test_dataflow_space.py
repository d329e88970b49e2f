"""The dataflow genome (Sakana's data-flow space): slots, paths, scales, limits and its config checks."""

from __future__ import annotations

import json
from types import SimpleNamespace as NS
from typing import Any

import numpy as np
import pytest

from evomerge.config import parse_config
from evomerge.errors import ConfigError, RecipeError
from evomerge.merge.path_recipe import PathRecipe, PathStep
from search_spaces import build_space
from search_spaces.dataflow import DataflowSpace

N_LAYERS = 4


def model_set(refs: str = "ab", model_type: str = "llama", base: bool = False) -> Any:
    """Stand-in for evomerge.merge.sources.ModelSet: refs, configs and model types are all the space reads."""
    sources = [NS(ref=r, model_type=model_type, config={"num_hidden_layers": N_LAYERS, "model_type": model_type})
               for r in refs]

    def by_ref(ref: str) -> Any:
        for s in sources:
            if s.ref == ref:
                return s
        raise KeyError(ref)

    return NS(num_layers=N_LAYERS, sources=sources, base=NS(ref="base") if base else None, by_ref=by_ref)


def config(**over: Any) -> Any:
    raw: dict[str, Any] = {
        "models": {"sources": ["a", "b"]},
        "space": {"name": "dataflow"},
        "objectives": [{"name": "x", "task": "t", "metric": "acc"}],
        "budget": {"evaluations": 10},
    }
    return parse_config(raw, [f"{k}={json.dumps(v)}" for k, v in over.items()])


def steps(recipe: PathRecipe) -> list[tuple[str, int, float]]:
    return [(s.model, s.layer, s.scale) for s in recipe.path]


def test_initial_point_is_model_a_own_path_at_scale_one() -> None:
    space = build_space(config(**{"space.repeats": 2}), model_set())
    assert len(space.slots) == 2 * 2 * N_LAYERS  # T = M x repeats
    recipe = space.to_recipe(space.initial_value())
    assert steps(recipe) == [("a", i, 1.0) for i in range(N_LAYERS)]
    assert recipe.embed_from == "a" and recipe.models == ["a", "b"]
    # the nevergrad parameter starts there too: the optimizer's first ask is model A
    assert space.to_recipe(space.parametrization().value) == recipe


def test_a_slot_is_on_when_its_gene_is_positive_in_fixed_slot_order() -> None:
    space = build_space(config(**{"space.repeats": 2, "space.scaling": "slot"}), model_set())
    on = np.full(16, -0.3)
    on[[0, 5, 6, 9, 13]] = [0.1, 0.9, 1e-9, 0.5, 0.2]  # slot 9 = repeat 1, a1; slot 13 = repeat 1, b1
    scale = np.ones(16)
    scale[5], scale[13] = 1.5, 0.7
    recipe = space.to_recipe({"on": on, "scale": scale})
    assert steps(recipe) == [("a", 0, 1.0), ("b", 1, 1.5), ("b", 2, 1.0), ("a", 1, 1.0), ("b", 1, 0.7)]


def test_transition_matrix_scales_a_connection_wherever_the_path_repeats_it() -> None:
    space = build_space(config(**{"space.repeats": 2, "space.scaling": "transition"}), model_set())
    assert space._scale_shape() == (8, 8)
    on = np.full(16, -1.0)
    on[[0, 1, 8, 9]] = 1.0  # a0 a1 a0 a1
    scale = np.ones((8, 8))
    scale[0, 1] = 1.8  # a0 -> a1
    scale[1, 0] = 0.6  # a1 -> a0
    recipe = space.to_recipe({"on": on, "scale": scale})
    assert steps(recipe) == [("a", 0, 1.0), ("a", 1, 1.8), ("a", 0, 0.6), ("a", 1, 1.8)]


def test_auto_scaling_picks_the_matrix_for_few_layers_and_slots_for_many() -> None:
    assert build_space(config(), model_set()).scaling == "transition"
    big = model_set("abcdefghi")  # 9 models x 4 layers = 36 > 32
    cfg = config(**{"models.sources": list("abcdefghi")})
    assert build_space(cfg, big).scaling == "slot"


def test_max_path_length_keeps_the_largest_genes_in_slot_order() -> None:
    space = build_space(config(**{"space.repeats": 2, "space.max_path_length": 5, "space.scaling": "slot"}), model_set())
    on = np.linspace(0.05, 0.8, 16)  # every slot on; larger genes later
    recipe = space.to_recipe({"on": on, "scale": np.ones(16)})
    assert [(m, i) for m, i, _ in steps(recipe)] == [("a", 3), ("b", 0), ("b", 1), ("b", 2), ("b", 3)]


def test_a_path_is_never_empty() -> None:
    space = build_space(config(**{"space.scaling": "slot"}), model_set())
    on = np.full(8, -0.5)
    on[6] = -0.1  # the largest gene, although off
    assert steps(space.to_recipe({"on": on, "scale": np.ones(8)})) == [("b", 2, 1.0)]


def test_fixed_ends_pin_the_first_and_last_layers_of_the_embedding_model() -> None:
    space = build_space(config(**{"space.fixed_ends": 1, "space.scaling": "slot", "space.embed_from": "b"}),
                        model_set())
    init = space.to_recipe(space.initial_value())
    assert steps(init) == [("b", i, 1.0) for i in range(N_LAYERS)] and init.embed_from == "b"
    on = np.full(8, -1.0)
    on[[0, 1]] = 1.0
    assert [(m, i) for m, i, _ in steps(space.to_recipe({"on": on, "scale": np.ones(8)}))] == [
        ("b", 0), ("a", 0), ("a", 1), ("b", 3)]


@pytest.mark.parametrize("scaling", ["slot", "transition"])
def test_from_recipe_inverts_to_recipe_on_random_genomes(scaling: str) -> None:
    space = build_space(config(**{"space.repeats": 3, "space.scaling": scaling, "space.max_path_length": 12}),
                        model_set())
    rng = np.random.default_rng(0)
    for _ in range(200):
        value = {"on": rng.uniform(-1, 1, len(space.slots)), "scale": rng.uniform(0.5, 2.0, space._scale_shape())}
        recipe = space.to_recipe(value)
        assert len(recipe.path) <= 12
        assert space.to_recipe(space.from_recipe(recipe)) == recipe
        assert space.to_recipe(space.value_from_json(space.value_to_json(value))) == recipe


def test_from_recipe_refuses_paths_it_cannot_lay_on_its_slots() -> None:
    space = build_space(config(), model_set())  # one repeat: a path cannot go back
    back = PathRecipe(models=["a", "b"], embed_from="a", path=[PathStep(model="a", layer=2), PathStep(model="a", layer=1)])
    with pytest.raises(RecipeError, match="raise space.repeats"):
        space.from_recipe(back)
    other = PathRecipe(models=["a", "c"], embed_from="a", path=[PathStep(model="a", layer=0)])
    with pytest.raises(RecipeError, match="the search uses a, b"):
        space.from_recipe(other)


def test_describe_names_slots_genes_and_scaling() -> None:
    text = build_space(config(**{"space.repeats": 2}), model_set()).describe()
    assert text.startswith("dataflow: 2 models, 8 layers x 2 repeats = 16 slots, genes on[16] scale[8x8] (transition)")


@pytest.mark.parametrize("over, fragment", [
    ({"space.repeats": 0}, "config field space.repeats: repeats must be >= 1 (got 0)"),
    ({"space.repeats": -2}, "config field space.repeats: repeats must be >= 1 (got -2)"),
    ({"space.max_path_length": 0}, "config field space.max_path_length: max_path_length must be >= 1"),
    ({"space.scale_bounds": [1.2, 2.0]}, "config field space.scale_bounds: [1.2, 2] must be finite with 0 < lower <= 1"),
    ({"space.scale_bounds": [0.0, 2.0]}, "config field space.scale_bounds"),
])
def test_bad_dataflow_fields_are_one_line_config_errors(over: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_space(config(**over), model_set())
    assert fragment in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("over, ms, fragment", [
    ({"space.max_path_length": 3}, None,
     "config field space.max_path_length: 3 is shorter than the 4 layers of a, so the search could not start"),
    ({"space.max_path_length": 40}, None, "config field space.max_path_length: 40 is longer than any path can be"),
    ({"space.embed_from": "zz"}, None, "config field space.embed_from: 'zz' is not one of models.sources (a, b)"),
    ({"space.fixed_ends": 3}, None, "config field space.fixed_ends: 3 first and 3 last layers of a overlap"),
    ({"space.layer_group_size": 2}, None, "config field space.layer_group_size: applies to the layerwise space only"),
    ({}, "base", "config field models.base: the dataflow space stacks the layers of models.sources and uses no base"),
    ({}, "gemma2", "config field models.sources:"),
])
def test_configs_the_space_cannot_search_are_one_line_errors(over: dict[str, Any], ms: str | None, fragment: str) -> None:
    models = model_set(base=True) if ms == "base" else model_set(model_type=ms) if ms else model_set()
    with pytest.raises(ConfigError) as err:
        build_space(config(**over), models)
    assert fragment in str(err.value) and "\n" not in str(err.value)
    if ms == "gemma2":
        assert "gemma2" in str(err.value)


def test_the_space_is_registered_and_skips_merge_method_checks() -> None:
    # merge.methods defaults to ties/dare_ties/task_arithmetic, which need a base; a path merges no weights
    space = build_space(config(), model_set())
    assert isinstance(space, DataflowSpace) and space.parameter_space is False
