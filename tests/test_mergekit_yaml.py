"""Recipe <-> mergekit YAML: exact parameters per tensor, round trips, hand-written imports.

The exactness check does not trust our own simulator: it parses the exported YAML with
mergekit's MergeConfiguration and resolves every tensor's parameters with mergekit's own
``resolve_parameters`` (skipped when mergekit is not installed), then compares with what
the recipe's ``group_for`` lookup gives that tensor.
"""

from __future__ import annotations

import json
import random

import pytest
import yaml

from evomerge.errors import RecipeError
from evomerge.merge.groups import LAYOUTS_BY_MODEL_TYPE, classify
from evomerge.merge.groups import leaf_keys as group_keys
from evomerge.merge.mergekit_import import from_mergekit_yaml
from evomerge.merge.mergekit_spec import MERGEKIT_METHODS, resolved_group
from evomerge.merge.mergekit_yaml import to_mergekit_yaml
from evomerge.merge.recipe import MergeRecipe

N_LAYERS = 4
SOURCES = ["org/src-a", "org/src-b", "org/src-c"]
BASE = "org/base"
LLAMA = LAYOUTS_BY_MODEL_TYPE["llama"]

#: every tensor name mergekit's llama architecture plans for a 4-layer model
LLAMA_TENSORS = (
    ["model.embed_tokens.weight"]
    + [
        f"model.layers.{i}.{n}.weight"
        for i in range(N_LAYERS)
        for n in (
            "input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "post_attention_layernorm", "mlp.up_proj", "mlp.gate_proj", "mlp.down_proj",
        )
    ]
    + ["model.norm.weight", "lm_head.weight"]
)


def _n_sources(method: str) -> list[str]:
    if method == "nuslerp":  # mergekit's nuslerp takes exactly two models
        return SOURCES[:2]
    return SOURCES[:1] if method in ("slerp", "arcee_fusion", "nearswap", "passthrough") else SOURCES


def _full_group(method: str, rng: random.Random) -> dict:
    """A group with EVERY mergekit parameter of ``method`` set explicitly (so no defaults involved)."""
    spec = MERGEKIT_METHODS[method]
    params: dict = {}
    for p in spec.shared:
        if p in ("normalize", "rescale", "filter_wise") or isinstance(spec.shared[p], bool):
            params[p] = rng.random() < 0.5
        elif p == "max_iter":  # an int in mergekit
            params[p] = rng.randint(1, 20)
        elif p == "t":
            params[p] = round(rng.uniform(0, 1), 6)
        else:  # lambda
            params[p] = round(rng.uniform(0.5, 1.5), 6)
    sp = {}
    for s in _n_sources(method):
        d = {}
        for p in spec.per_input:
            if p == "weight":
                d[p] = round(rng.uniform(-0.5, 1.5), 6)
            elif p == "density":
                d[p] = round(rng.uniform(0.3, 0.7), 6)
            elif p == "epsilon":
                d[p] = round(rng.uniform(0.01, 0.2), 6)
            else:  # gamma
                d[p] = round(rng.uniform(0.0, 0.05), 6)
        sp[s] = d
    return {"method": method, "params": params, "source_params": sp}


def per_layer_recipe(method: str, seed: int = 0) -> MergeRecipe:
    """Different settings for default, embed, lm_head, every layer, and some layer parts."""
    rng = random.Random(seed)
    groups = {"default": _full_group(method, rng), "embed": _full_group(method, rng),
              "lm_head": _full_group(method, rng)}
    for i in range(N_LAYERS):
        groups[f"layers.{i}"] = _full_group(method, rng)
    groups["layers.1.attn"] = _full_group(method, rng)
    groups["layers.2.mlp"] = _full_group(method, rng)
    groups["layers.3.norm"] = _full_group(method, rng)
    base = None if method == "passthrough" else BASE  # mergekit's passthrough takes one input, no base
    return MergeRecipe.from_dict({"base": base, "sources": _n_sources(method), "groups": groups, "seed": 7})


def assert_equivalent(a: MergeRecipe, b: MergeRecipe, n_layers: int = N_LAYERS) -> None:
    assert a.sources == b.sources and a.base == b.base
    for leaf in group_keys(n_layers):
        assert resolved_group(a, leaf) == resolved_group(b, leaf), leaf


def mergekit_params(text: str) -> dict[str, tuple[dict, dict]]:
    """tensor name -> (shared params, {model: per-input params}) as mergekit 0.1.5 resolves them."""
    config_mod = pytest.importorskip("mergekit.config")
    from mergekit import merge_methods
    from mergekit.parameter_resolver import resolve_parameters

    cfg = config_mod.MergeConfiguration.model_validate(yaml.safe_load(text))
    spec = merge_methods.get(cfg.merge_method).spec
    (sl,) = cfg.slices
    n = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
    out = {}
    for name in LLAMA_TENSORS:
        g = classify(name, LLAMA)
        # plan.py: layer weights get t = idx / (n - 1); embeddings and post weights t = 0
        t = g.layer / (n - 1) if g.kind == "layer" else 0.0
        reader = config_mod.ConfigReader(config=cfg, slice_out=sl, t=t)
        shared, per = resolve_parameters(
            spec, tensor_name=name, inputs={s.model: name for s in sl.sources},
            sources=reader.parameter_sources, base_model=cfg.base_model, t=t,
        )
        out[name] = (shared, {str(m.model.path): p for m, p in per.items() if p})
    return out


@pytest.mark.parametrize("method", sorted(MERGEKIT_METHODS))
def test_export_gives_mergekit_exact_parameters(method: str) -> None:
    recipe = per_layer_recipe(method)
    resolved = mergekit_params(to_mergekit_yaml(recipe, N_LAYERS, LLAMA))
    spec = MERGEKIT_METHODS[method]
    for name in LLAMA_TENSORS:
        _, grp = recipe.group_for(classify(name, LLAMA))
        shared, per = resolved[name]
        for p in spec.shared:
            assert shared[p] == grp.params[p], (name, p)
        for s in recipe.sources:
            for p in spec.per_input:
                assert per[s][p] == grp.source_params[s][p], (name, s, p)
        if spec.uses_base or spec.base_optional:
            assert BASE not in per or not per[BASE]  # base gets no non-base parameters
        elif recipe.base is not None:  # linear: the base is an input of weight exactly 0
            assert per[BASE] == {"weight": 0.0}


@pytest.mark.parametrize("method", sorted(MERGEKIT_METHODS))
def test_round_trip_each_method(method: str) -> None:
    recipe = per_layer_recipe(method, seed=3)
    text = to_mergekit_yaml(recipe, N_LAYERS, "llama")
    back = from_mergekit_yaml(text)
    assert_equivalent(recipe, back)
    assert back.seed == 7
    doc = yaml.safe_load(text)
    if recipe.base is not None:
        assert doc["base_model"] == BASE and doc["slices"][0]["sources"][-1]["model"] == BASE
    # and again: the YAML of the imported recipe is a fixed point
    assert from_mergekit_yaml(to_mergekit_yaml(back, N_LAYERS, "llama")).to_dict() == back.to_dict()


def test_constant_recipe_exports_scalars_and_refs() -> None:
    recipe = MergeRecipe.from_dict({
        "base": BASE, "sources": SOURCES, "dtype": "bfloat16", "compute_dtype": "float32",
        "groups": {"default": {"method": "ties", "params": {"normalize": True},
                               "source_params": {s: {"weight": 0.5, "density": 0.4} for s in SOURCES}}},
    })
    doc = yaml.safe_load(to_mergekit_yaml(recipe, N_LAYERS, LLAMA))
    assert doc["merge_method"] == "ties" and doc["base_model"] == BASE
    assert doc["dtype"] == "float32" and doc["out_dtype"] == "bfloat16"
    srcs = doc["slices"][0]["sources"]
    assert [s["model"] for s in srcs] == SOURCES + [BASE]
    assert all(s["layer_range"] == [0, N_LAYERS] for s in srcs)
    assert srcs[0]["parameters"] == {"weight": 0.5, "density": 0.4}
    assert doc["parameters"] == {"normalize": True, "rescale": False, "lambda": 1}
    back = from_mergekit_yaml(yaml.safe_dump(doc))
    assert back.dtype == "bfloat16" and back.compute_dtype == "float32"
    assert list(back.groups) == ["default"]


def test_multi_method_recipe_is_mergekit_multi_and_round_trips() -> None:
    rng = random.Random(1)
    groups = {"default": _full_group("ties", rng), "layers.1": _full_group("dare_ties", rng),
              "layers.2.attn": _full_group("task_arithmetic", rng), "lm_head": _full_group("dare_ties", rng)}
    recipe = MergeRecipe.from_dict({"base": BASE, "sources": SOURCES, "groups": groups})
    text = to_mergekit_yaml(recipe, N_LAYERS, LLAMA)
    docs = list(yaml.safe_load_all(text))
    assert [d.get("name") for d in docs] == ["evomerge_ties", "evomerge_dare_ties", "evomerge_task_arithmetic", None]
    final = docs[-1]
    assert final["merge_method"] == "linear"
    # the selector gives each tensor weight 1 on exactly its method's intermediate (mergekit's own resolution)
    sel = mergekit_params(yaml.safe_dump(final))
    for name in LLAMA_TENSORS:
        _, grp = recipe.group_for(classify(name, LLAMA))
        weights = {m: p["weight"] for m, p in sel[name][1].items()}
        assert weights == {f"evomerge_{k}": float(k == grp.method) for k in ("ties", "dare_ties", "task_arithmetic")}
    assert_equivalent(recipe, from_mergekit_yaml(text))


def test_multi_method_tokenizer_source_resolves_like_single_documents(tmp_path) -> None:
    """A relative tokenizer_source in a mergekit-multi set is found under the YAML's folder,
    as in a single document - not under the working directory."""
    (tmp_path / "tok").mkdir()
    rng = random.Random(2)
    groups = {"default": _full_group("ties", rng), "layers.1": _full_group("task_arithmetic", rng)}
    recipe = MergeRecipe.from_dict({"base": BASE, "sources": SOURCES, "groups": groups, "tokenizer_source": "tok"})
    text = to_mergekit_yaml(recipe, N_LAYERS, LLAMA)
    assert len(list(yaml.safe_load_all(text))) == 3
    assert from_mergekit_yaml(text, base_dir=tmp_path).tokenizer_source == str(tmp_path / "tok")


SLERP_YAML = """
slices:
  - sources:
      - model: org/a
        layer_range: [0, 5]
      - model: org/b
        layer_range: [0, 5]
merge_method: slerp
base_model: org/a
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
"""


def test_import_handwritten_slerp_gradients() -> None:
    r = from_mergekit_yaml(SLERP_YAML)
    assert r.base == "org/a" and r.sources == ["org/b"] and r.dtype == "bfloat16"
    t = lambda leaf: resolved_group(r, leaf)[1]["t"]  # noqa: E731
    # 5 layers, 5 gradient points: layer i gets exactly point i
    assert [t(f"layers.{i}.attn") for i in range(5)] == [0, 0.5, 0.3, 0.7, 1]
    assert [t(f"layers.{i}.mlp") for i in range(5)] == [1, 0.5, 0.7, 0.3, 0]
    assert {t(f"layers.{i}.norm") for i in range(5)} == {0.5}
    assert t("embed") == t("lm_head") == t("final_norm") == 0.5


def test_import_gradient_interpolates_like_mergekit() -> None:
    text = """
merge_method: task_arithmetic
base_model: base
slices:
  - sources:
      - {model: a, layer_range: [0, 3], parameters: {weight: [0.0, 1.0]}}
      - {model: base, layer_range: [0, 3]}
  - sources:
      - {model: a, layer_range: [3, 6], parameters: {weight: 0.25}}
      - {model: base, layer_range: [3, 6]}
    parameters: {lambda: 2.0}
"""
    r = from_mergekit_yaml(text)
    w = lambda leaf: resolved_group(r, leaf)[2]["a"]["weight"]  # noqa: E731
    lam = lambda leaf: resolved_group(r, leaf)[1]["lambda"]  # noqa: E731
    # slice 0 has 3 layers: t = 0, 0.5, 1 -> weight 0, 0.5, 1; embed planned at t=0 -> 0
    assert [w(f"layers.{i}.mlp") for i in range(3)] == [0.0, 0.5, 1.0]
    assert w("embed") == 0.0
    assert [w(f"layers.{i}.attn") for i in range(3, 6)] == [0.25] * 3
    assert [lam(f"layers.{i}.norm") for i in range(6)] == [1.0] * 3 + [2.0] * 3
    # post weights come from the last slice
    assert w("lm_head") == 0.25 and lam("final_norm") == 2.0
    assert resolved_group(r, "layers.0.attn")[2]["a"]["density"] == 1.0  # mergekit default filled in


def test_import_scalar_models_form_and_base_dir(tmp_path) -> None:
    (tmp_path / "m1").mkdir()
    (tmp_path / "m1" / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 3}))
    text = """
models:
  - model: m1
    parameters: {weight: 0.6, density: 0.5}
  - model: hub/other
    parameters:
      weight: [0.2, 0.4]
      density: 0.7
merge_method: dare_ties
base_model: m1
"""
    r = from_mergekit_yaml(text, base_dir=tmp_path)
    assert r.base == str(tmp_path / "m1") and r.sources == ["hub/other"]  # the base's own params are unused
    assert [resolved_group(r, f"layers.{i}.attn")[2]["hub/other"]["weight"] for i in range(3)] == pytest.approx(
        [0.2, 0.3, 0.4], abs=1e-15)
    # without base_dir the layer count is unknown and the gradient cannot be placed
    with pytest.raises(RecipeError, match="layer count is unknown"):
        from_mergekit_yaml(text)
    # scalars only: fine without any model folder
    r2 = from_mergekit_yaml("models: [{model: x, parameters: {weight: 1}}, {model: y, parameters: {weight: 3}}]\n"
                            "merge_method: linear\n")
    assert list(r2.groups) == ["default"] and r2.base is None
    assert r2.groups["default"].source_params == {"x": {"weight": 1.0}, "y": {"weight": 3.0}}
    assert r2.groups["default"].params == {"normalize": True}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: "
         "[{filter: q_proj, value: 1}, {value: 0.5}]}}]\n", "layer count is unknown"),
        ("merge_method: frankenmerge\nslices: [{sources: [{model: a, layer_range: [0, 2]}]}]\n",
         "no mergekit equivalent"),
        ("merge_method: linear\nslices:\n - sources: [{model: a, layer_range: [0, 2]}]\n"
         " - sources: [{model: a, layer_range: [1, 3]}]\n", "move or repeat layers"),
        ("merge_method: linear\nmodules: {text: {models: [{model: a}]}}\n", "modules"),
        ("merge_method: ties\nmodels: [{model: a, parameters: {weight: 1}}]\n", "needs 'base_model'"),
        ("merge_method: ties\nbase_model: b\nmodels: [{model: a}]\n", "parameter 'weight' is missing"),
        ("merge_method: linear\nmodels: [{model: a+lora/x, parameters: {weight: 1}}]\n", "LoRA"),
        ("merge_method: linear\nfoo: 1\nmodels: [{model: a}]\n", "unknown key 'foo'"),
        ("merge_method: [unclosed\n", "does not parse"),
    ],
)
def test_import_errors_are_one_line(text: str, match: str) -> None:
    with pytest.raises(RecipeError, match=match) as info:
        from_mergekit_yaml(text)
    assert "\n" not in str(info.value)


def test_q_proj_filter_with_layers_known() -> None:
    text = """
merge_method: ties
base_model: b
slices: [{sources: [{model: a, layer_range: [0, 2], parameters: {weight: [{filter: q_proj, value: 1}, {value: 0.5}]}},
                    {model: b, layer_range: [0, 2]}]}]
"""
    with pytest.raises(RecipeError, match="q_proj|different values"):
        from_mergekit_yaml(text)


def test_export_errors() -> None:
    r = MergeRecipe.from_dict({"sources": SOURCES, "groups": {"default": {"method": "ties"}}})
    with pytest.raises(RecipeError, match="needs a base model"):
        to_mergekit_yaml(r, N_LAYERS, LLAMA)
    r = MergeRecipe.from_dict({"base": BASE, "sources": SOURCES, "groups": {
        "default": {"method": "ties"}, "layers.9": {"method": "ties"}}})
    with pytest.raises(RecipeError, match="past the model's 4 layers"):
        to_mergekit_yaml(r, N_LAYERS, LLAMA)
    r = MergeRecipe.from_dict({"base": BASE, "sources": SOURCES, "groups": {
        "default": {"method": "ties", "params": {"t": 0.3}}}})
    with pytest.raises(RecipeError, match="'t' has no meaning"):
        to_mergekit_yaml(r, N_LAYERS, LLAMA)


def test_defaults_agree_with_evomerge_methods() -> None:
    """evomerge's own defaults must equal mergekit's, or omitted parameters would differ."""
    methods = pytest.importorskip("evomerge.merge.methods")
    for name, spec in MERGEKIT_METHODS.items():
        m = methods.get_method(name)
        for p, default in spec.shared.items():
            if p in m.params and isinstance(default, (bool, float)):
                assert m.params[p] == default, (name, p)
        for p, default in spec.per_input.items():
            if p in m.source_params and isinstance(default, float):
                assert m.source_params[p] == default, (name, p)
