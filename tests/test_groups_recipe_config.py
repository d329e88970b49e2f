"""Tensor grouping, recipe lookup/serialisation and config validation (no torch needed)."""

from __future__ import annotations

import json

import pytest

from evomerge.config import parse_config
from evomerge.errors import ConfigError, RecipeError
from evomerge.merge.groups import TensorGroup, detect_layout, group_tensors, num_layers
from evomerge.merge.recipe import GroupRecipe, MergeRecipe

LLAMA_NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.11.post_attention_layernorm.weight",
    "model.norm.weight",
    "lm_head.weight",
]
GPT2_NAMES = ["wte.weight", "wpe.weight", "h.0.attn.c_attn.weight", "h.3.mlp.c_fc.bias", "h.3.ln_2.weight", "ln_f.bias"]
NEOX_NAMES = [
    "gpt_neox.embed_in.weight",
    "gpt_neox.layers.5.attention.query_key_value.weight",
    "gpt_neox.layers.5.mlp.dense_h_to_4h.weight",
    "gpt_neox.final_layer_norm.weight",
    "embed_out.weight",
]


def test_llama_groups_and_keys():
    layout = detect_layout(LLAMA_NAMES, "llama")
    g = group_tensors(LLAMA_NAMES, layout)
    assert g["model.embed_tokens.weight"] == TensorGroup("embed")
    assert g["model.layers.0.self_attn.q_proj.weight"] == TensorGroup("layer", 0, "attn")
    assert g["model.layers.0.mlp.down_proj.weight"].key(["attn", "mlp"]) == "layers.0.mlp"
    assert g["model.layers.0.mlp.down_proj.weight"].key([]) == "layers.0"
    assert g["model.layers.0.input_layernorm.weight"].key(["attn"]) == "layers.0"
    assert g["model.norm.weight"].kind == "final_norm"
    assert g["lm_head.weight"].kind == "lm_head"
    assert num_layers(g.values()) == 12


@pytest.mark.parametrize("names, model_type, expected", [(GPT2_NAMES, "gpt2", "gpt2"), (NEOX_NAMES, None, "gpt_neox")])
def test_other_layouts(names, model_type, expected):
    layout = detect_layout(names, model_type)
    assert layout.name == expected
    groups = group_tensors(names, layout)
    kinds = sorted({g.kind for g in groups.values()})
    assert "layer" in kinds and "embed" in kinds and "final_norm" in kinds


def test_unknown_layout_is_one_line():
    with pytest.raises(RecipeError) as err:
        detect_layout(LLAMA_NAMES + ["encoder.block.0.weight"], None)
    assert "encoder.block.0.weight" in str(err.value) and "\n" not in str(err.value)


def _recipe(**kw):
    groups = {
        "default": GroupRecipe(method="linear", source_params={"a": {"weight": 1.0}, "b": {"weight": 1.0}}),
        "layers.1": GroupRecipe(method="ties", params={"normalize": True},
                                source_params={"a": {"weight": 0.3, "density": 0.5}}),
        "layers.1.attn": GroupRecipe(method="task_arithmetic", source_params={"b": {"weight": 0.7}}),
    }
    return MergeRecipe(base="base", sources=["a", "b"], groups=groups, **kw)


def test_recipe_lookup_most_specific_first():
    r = _recipe()
    assert r.group_for(TensorGroup("layer", 1, "attn"))[0] == "layers.1.attn"
    assert r.group_for(TensorGroup("layer", 1, "mlp"))[0] == "layers.1"
    assert r.group_for(TensorGroup("layer", 2, "mlp"))[0] == "default"
    assert r.group_for(TensorGroup("embed"))[0] == "default"
    assert r.methods_used() == {"linear", "ties", "task_arithmetic"}


def test_recipe_json_round_trip_and_hash():
    r = _recipe(seed=7)
    again = MergeRecipe.from_json(r.to_json())
    assert again == r and again.content_hash() == r.content_hash()
    assert _recipe(seed=8).content_hash() != r.content_hash()


def test_recipe_naming_unknown_model_is_one_line():
    data = json.loads(_recipe().to_json())
    data["groups"]["default"]["source_params"]["stranger"] = {"weight": 1.0}
    with pytest.raises(RecipeError) as err:
        MergeRecipe.from_dict(data)
    msg = str(err.value)
    assert "stranger" in msg and "not a source" in msg and "\n" not in msg


BASE_CFG = {
    "name": "t",
    "models": {"base": "b", "sources": ["x", "y"]},
    "objectives": [{"name": "o", "task": "demo_add", "metric": "exact_match"}],
    "budget": {"evaluations": 10},
}


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("budget.evaluations=0", "budget.evaluations"),
        ("space.bounds={weight: [1.0, 0.5]}", "lower bound"),
        ("objectives.0.limit=0", "limit must be > 0"),
        ("space.layer_group_size=0", "space.layer_group_size"),
        ("merge.dtype=int8", "merge.dtype"),
        ("models.sources=[x, x]", "listed twice"),
        ("bogus=1", "unknown key"),
    ],
)
def test_config_errors_are_one_line(override, fragment):
    with pytest.raises(ConfigError) as err:
        parse_config(BASE_CFG, [override])
    msg = str(err.value)
    assert fragment in msg and "\n" not in msg


def test_config_defaults_and_overrides():
    cfg = parse_config(BASE_CFG, ["budget.evaluations=25", "ray.actors=2"])
    assert cfg.budget.evaluations == 25 and cfg.ray.actors == 2
    assert cfg.merge.methods == ["ties", "dare_ties", "task_arithmetic"]
    assert str(cfg.resolved_run_dir()) == "runs/t"
