"""The layerwise genome (genome <-> recipe), the space checks and the optimizer helper."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace as NS
from typing import Any

import numpy as np
import pytest

from evomerge.config import parse_config
from evomerge.errors import ConfigError, RecipeError
from evomerge.merge.groups import TensorGroup
from evomerge.merge.methods import check_params
from evomerge.merge.recipe import GroupRecipe, MergeRecipe
from search_spaces import build_space, check_space
from search_spaces.optimizers import make_optimizer, optimizer_name

N_LAYERS = 4
TENSORS = ("self_attn.q_proj.weight", "attn"), ("mlp.up_proj.weight", "mlp"), ("input_layernorm.weight", "norm")


def model_set(n_sources: int = 3, base: str | None = "base", lm_head: bool = True) -> Any:
    """Stand-in for evomerge.merge.sources.ModelSet: refs, layer count and the tensor -> group map."""
    groups = {"model.embed_tokens.weight": TensorGroup("embed")}
    for i in range(N_LAYERS):
        for name, part in TENSORS:
            groups[f"model.layers.{i}.{name}"] = TensorGroup("layer", i, part)  # type: ignore[arg-type]
    groups["model.norm.weight"] = TensorGroup("final_norm")
    if lm_head:
        groups["lm_head.weight"] = TensorGroup("lm_head")
    return NS(num_layers=N_LAYERS, sources=[NS(ref=r) for r in "abcdef"[:n_sources]],
              base=NS(ref=base) if base else None, groups=groups, layout=None)


def config(sources: list[str] | None = None, **over: Any) -> Any:
    raw: dict[str, Any] = {
        "models": {"base": "base", "sources": sources or ["a", "b", "c"]},
        "objectives": [{"name": "x", "task": "t", "metric": "acc"}],
        "budget": {"evaluations": 10},
    }
    return parse_config(raw, [f"{k}={json.dumps(v)}" for k, v in over.items()])


def test_units_follow_groups_with_split_and_group_size_2() -> None:
    cfg = config(**{"space.layer_group_size": 2, "space.split": ["attn", "mlp"],
                    "merge.method_gene": "per_group", "merge.methods": ["ties", "task_arithmetic"]})
    space = build_space(cfg, model_set())
    assert [u.name for u in space.units] == [
        "embed", "layers.0-1.attn", "layers.0-1.mlp", "layers.0-1",
        "layers.2-3.attn", "layers.2-3.mlp", "layers.2-3", "final_norm", "lm_head"]
    value = space.initial_value()
    n_units = len(space.units)
    value["weight"] = np.array([[0.1 * u + 0.01 * j for j in range(3)] for u in range(n_units)])
    # slots: embed, layers 0-1, layers 2-3, final_norm, lm_head
    value["method"] = ("ties", "task_arithmetic", "ties", "task_arithmetic", "ties")
    recipe = space.to_recipe(value)
    assert set(recipe.groups) == {"embed", "final_norm", "lm_head"} | {
        f"layers.{i}{p}" for i in range(N_LAYERS) for p in ("", ".attn", ".mlp")}
    part_index = {"attn": 0, "mlp": 1, "norm": 2}  # norm is not split: it falls in the layer's "rest" unit
    for name, group in model_set().groups.items():
        _, settings = recipe.group_for(group)
        if group.kind == "layer":
            unit, method = 1 + 3 * (group.layer // 2) + part_index[group.part], ["task_arithmetic", "ties"][group.layer // 2]
        else:
            unit, method = {"embed": 0, "final_norm": 7, "lm_head": 8}[group.kind], "ties" if group.kind != "final_norm" else "task_arithmetic"
        assert settings.method == method, name
        assert [settings.source_params[s]["weight"] for s in "abc"] == pytest.approx(
            [0.1 * unit + 0.01 * j for j in range(3)]), name
        # only the chosen method's genes: task_arithmetic has no density
        assert ("density" in settings.source_params["a"]) == (method == "ties")


def test_tied_embeddings_and_full_split_have_no_extra_units() -> None:
    cfg = config(**{"space.split": ["attn", "mlp", "norm"]})
    space = build_space(cfg, model_set(lm_head=False))
    assert [u.name for u in space.units][:4] == ["embed", "layers.0.attn", "layers.0.mlp", "layers.0.norm"]
    assert len(space.units) == 1 + 3 * N_LAYERS + 1
    assert "lm_head" not in space.to_recipe(space.initial_value()).groups


def test_initial_value_is_the_uniform_merge() -> None:
    cfg = config(**{"merge.methods": ["ties", "task_arithmetic"], "merge.seed": 7, "merge.dtype": "bfloat16"})
    space = build_space(cfg, model_set())
    param = space.parametrization()
    assert param.value["method"] == "ties"
    np.testing.assert_array_equal(param.value["weight"], np.full((len(space.units), 3), 1 / 3))
    recipe = space.to_recipe(param.value)
    uniform = GroupRecipe(method="ties", source_params={s: {"weight": 1 / 3, "density": 1.0} for s in "abc"})
    keys = ["embed"] + [f"layers.{i}" for i in range(N_LAYERS)] + ["final_norm", "lm_head"]
    assert recipe == MergeRecipe(base="base", sources=["a", "b", "c"], groups={k: uniform for k in keys},
                                 seed=7, dtype="bfloat16")
    # the optimizer's origin (standardized zero) is the initial value
    assert not np.any(param.get_standardized_data(reference=param))
    # 1/N is clipped into the bounds when they exclude it
    space = build_space(config(**{"space.bounds": {"weight": [0.5, 1.5]}}), model_set())
    assert space.to_recipe(space.initial_value()).groups["embed"].source_params["b"]["weight"] == 0.5


def _hand_recipe(methods: dict[str, str]) -> MergeRecipe:
    groups = {}
    for k, (key, method) in enumerate(methods.items()):
        sp = {s: {"weight": round(0.2 + 0.1 * k + 0.05 * j, 6), "density": round(0.3 + 0.05 * j + 0.02 * k, 6)}
              for j, s in enumerate("abc")}
        if method == "della":
            for j, s in enumerate("abc"):
                sp[s]["epsilon"] = 0.05 + 0.01 * j
        groups[key] = GroupRecipe(method=method, source_params=sp)
    return MergeRecipe(base="base", sources=["a", "b", "c"], groups=groups)


def test_recipe_roundtrip_and_init_from_file(tmp_path: Path) -> None:
    over = {"merge.methods": ["ties", "della"], "merge.method_gene": "per_group"}
    keys = ["embed"] + [f"layers.{i}" for i in range(N_LAYERS)] + ["final_norm", "lm_head"]
    recipe = _hand_recipe({k: ("della" if i % 2 else "ties") for i, k in enumerate(keys)})
    space = build_space(config(**over), model_set())
    value = space.from_recipe(recipe)
    assert value["method"] == tuple("della" if i % 2 else "ties" for i in range(len(keys)))
    assert space.to_recipe(value) == recipe
    path = tmp_path / "start.json"
    path.write_text(recipe.to_json())
    space = build_space(config(**over, **{"space.init": str(path)}), model_set())
    assert space.to_recipe(space.parametrization().value) == recipe


def test_random_genomes_roundtrip_and_stay_valid() -> None:
    cfg = config(**{"merge.methods": ["ties", "della", "task_arithmetic", "breadcrumbs"],
                    "merge.method_gene": "per_group", "space.split": ["attn"],
                    "space.bounds": {"weight": [0.2, 0.9], "density": [0.0, 1.0], "epsilon": [0.0, 0.6]}})
    space = build_space(cfg, model_set())
    opt = make_optimizer(cfg, space.parametrization(), budget=24, num_workers=4)
    seen: set[str] = set()
    for i in range(24):
        cand = opt.ask()
        recipe = space.to_recipe(cand.value)
        assert space.to_recipe(space.from_recipe(recipe)) == recipe
        for key, g in recipe.groups.items():
            seen.add(g.method)
            vals = {p: [g.source_params[s][p] for s in "abc"] for p in g.source_params["a"]}
            check_params(g.method, vals, g.params, where=key)  # the merge code accepts it
            assert all(0.2 <= w <= 0.9 for w in vals["weight"])
            for d in vals.get("density", []):
                assert 0.0 < d <= 1.0
        opt.tell(cand, float(i % 7))
    assert seen <= {"ties", "della", "task_arithmetic", "breadcrumbs"} and len(seen) >= 3
    # out-of-bounds genes are clipped into the bounds
    value = space.initial_value()
    value["weight"][:] = 5.0
    assert space.to_recipe(value).groups["embed"].source_params["a"]["weight"] == 0.9


def test_single_method_genome_is_exactly_invertible() -> None:
    space = build_space(config(**{"merge.methods": ["dare_ties"]}), model_set())
    assert "method" not in space.initial_value()
    rng = np.random.default_rng(0)
    value = {"weight": rng.uniform(0, 1.5, (len(space.units), 3)), "density": rng.uniform(0.1, 1, (len(space.units), 3))}
    back = space.from_recipe(space.to_recipe(value))
    np.testing.assert_array_equal(back["weight"], value["weight"])
    np.testing.assert_array_equal(back["density"], value["density"])
    assert space.value_from_json(json.loads(json.dumps(space.value_to_json(value))))["weight"].tolist() == value["weight"].tolist()


def test_slerp_searches_t() -> None:
    cfg = config(sources=["a"], **{"merge.methods": ["slerp"]})
    space = build_space(cfg, model_set(n_sources=1))
    assert space.source_genes == [] and space.method_genes == ["t"]
    recipe = space.to_recipe(space.initial_value())
    assert recipe.groups["layers.0"] == GroupRecipe(method="slerp", params={"t": 0.5})
    value = {"t": np.linspace(0, 1, len(space.units))}
    np.testing.assert_array_equal(space.from_recipe(space.to_recipe(value))["t"], value["t"])


def test_fixed_params_and_lambda_gene() -> None:
    cfg = config(**{"merge.methods": ["ties"], "merge.params": {"normalize": False, "density": 0.5},
                    "space.bounds": {"weight": [0, 1], "lambda": [0.8, 1.2]}})
    space = build_space(cfg, model_set())
    assert space.source_genes == ["weight"] and space.method_genes == ["lambda"]
    g = space.to_recipe(space.initial_value()).groups["embed"]
    assert g.params == {"normalize": False, "lambda": 1.0}
    assert g.source_params["c"] == {"weight": 1 / 3, "density": 0.5}


def test_from_recipe_rejects_what_the_space_cannot_express() -> None:
    space = build_space(config(**{"merge.methods": ["ties", "della"]}), model_set())
    mixed = _hand_recipe({"default": "ties", "layers.2": "della"})
    with pytest.raises(RecipeError, match="per_group"):
        space.from_recipe(mixed)
    with pytest.raises(RecipeError, match="does not allow"):
        space.from_recipe(_hand_recipe({"default": "breadcrumbs"}))
    other = MergeRecipe(base="base", sources=["a", "b", "z"], groups={"default": GroupRecipe(method="ties")})
    with pytest.raises(RecipeError, match="models.sources"):
        space.from_recipe(other)
    # a coarse recipe (one default group) is expressible: every unit takes it
    coarse = _hand_recipe({"default": "della"})
    assert all(g == coarse.groups["default"] for g in space.to_recipe(space.from_recipe(coarse)).groups.values())


def test_space_options_are_refused_when_the_config_is_read() -> None:
    with pytest.raises(ConfigError, match="space.options: 'foo': no search space takes options"):
        config(**{"space.options": {"foo": 1}})


@pytest.mark.parametrize("over, ms, match", [
    ({"space.name": "layerwize"}, {}, "space.name: unknown search space 'layerwize'; did you mean 'layerwise'"),
    ({"space.layer_group_size": 3}, {}, "use one of 1, 2, 4"),
    ({"merge.methods": ["slerp"]}, {}, "slerp"),
    ({"merge.methods": ["linear"]}, {"base": None}, None),
    ({"merge.methods": ["ties"]}, {"base": None}, "base"),
])
def test_check_space_errors(over: dict, ms: dict, match: str | None) -> None:
    cfg = config(**over)
    if match is None:
        check_space(cfg, model_set(**ms))
        return
    with pytest.raises(ConfigError, match=match) as err:
        check_space(cfg, model_set(**ms))
    assert "\n" not in str(err.value)


def test_bounds_order_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="space.bounds.*lower bound"):
        config(**{"space.bounds": {"weight": [1.0, 0.5]}})


def test_optimizer_names() -> None:
    assert optimizer_name(config()) == "CMA"
    two = config(**{"objectives": [{"name": "x", "task": "t"}, {"name": "y", "task": "u"}]})
    assert optimizer_name(two) == "DE"
    with pytest.raises(ConfigError, match="unknown nevergrad optimizer 'CMAA'; close matches: .*CMA"):
        make_optimizer(config(**{"optimizer.name": "CMAA"}), build_space(config(), model_set()).parametrization())
    opt = make_optimizer(config(**{"optimizer.name": "de", "optimizer.popsize": 6}),
                         build_space(config(), model_set()).parametrization())
    assert opt.llambda == 6
    with pytest.raises(ConfigError, match="popsize"):
        make_optimizer(config(**{"optimizer.name": "OnePlusOne", "optimizer.popsize": 6}),
                       build_space(config(), model_set()).parametrization())


def _drive(opt: Any, steps: int, n_obj: int, record: list) -> None:
    """ask two, tell one (a candidate stays pending), with losses derived from the value."""
    pending = []
    for _ in range(steps):
        pending.append(opt.ask())
        pending.append(opt.ask())
        cand = pending.pop(0)
        w = np.asarray(cand.value["weight"])
        losses = [float(np.sum((w - 0.7) ** 2)), float(np.sum(w))][:n_obj]
        opt.tell(cand, losses if n_obj > 1 else losses[0])
        record.append(cand.get_standardized_data(reference=opt.parametrization).round(12).tolist())
    for cand in pending:
        record.append(cand.get_standardized_data(reference=opt.parametrization).round(12).tolist())


@pytest.mark.parametrize("name, n_obj", [("CMA", 1), ("DE", 2)])
def test_seeded_optimizer_repeats(name: str, n_obj: int) -> None:
    objectives = [{"name": f"o{i}", "task": "t"} for i in range(n_obj)]
    cfg = config(**{"optimizer.name": name, "optimizer.seed": 3, "objectives": objectives,
                    "merge.methods": ["ties", "task_arithmetic"]})
    space = build_space(cfg, model_set())

    def fresh() -> Any:
        return make_optimizer(cfg, space.parametrization(), budget=100, num_workers=2)

    a, b = [], []
    _drive(fresh(), 12, n_obj, a)
    _drive(fresh(), 12, n_obj, b)
    assert a == b  # same seed, same asks
    other = make_optimizer(config(**{"optimizer.name": name, "optimizer.seed": 4, "objectives": objectives,
                                     "merge.methods": ["ties", "task_arithmetic"]}),
                           space.parametrization(), budget=100, num_workers=2)
    c: list = []
    _drive(other, 12, n_obj, c)
    assert c != a


def test_real_model_set_recipes_validate(tiny_models: Any, tmp_path: Path) -> None:
    """Against a loaded ModelSet (tiny Llama files): recipes pass the merge code's own validation,
    and a mergekit YAML whose model paths are written differently still seeds the search."""
    from evomerge.merge.materialise import validate_recipe
    from evomerge.merge.mergekit_yaml import to_mergekit_yaml
    from evomerge.merge.sources import load_model_set

    ms = load_model_set(tiny_models.base_ref, tiny_models.source_refs)
    raw = {"models": {"base": tiny_models.base_ref, "sources": tiny_models.source_refs},
           "merge": {"methods": ["della", "ties"]},  # one global method: mergekit YAML has one merge_method
           "space": {"split": ["attn", "mlp"], "layer_group_size": 2},
           "objectives": [{"name": "x", "task": "t"}], "budget": {"evaluations": 5}}
    cfg = parse_config(raw)
    space = build_space(cfg, ms)
    assert len(space.units) == 1 + 3 * ms.num_layers // 2 + 2
    param = space.parametrization()
    validate_recipe(space.to_recipe(param.value), ms)
    for seed in range(4):
        child = param.spawn_child()
        child.random_state = np.random.RandomState(seed)
        child.mutate()
        recipe = space.to_recipe(child.value)
        validate_recipe(recipe, ms)
        assert space.to_recipe(space.from_recipe(recipe)) == recipe
    yaml_path = tmp_path / "merge.yaml"
    yaml_path.write_text(to_mergekit_yaml(recipe, ms.num_layers, ms.layout))
    cfg = parse_config({**raw, "space": {**raw["space"], "init": str(yaml_path)}})
    assert build_space(cfg, ms).to_recipe(build_space(cfg, ms).initial_value()) == recipe


@pytest.mark.parametrize("method_gene", ["global", "per_group"])
def test_logged_value_replays_to_the_same_recipe(method_gene: str) -> None:
    """The driver logs value_to_json(value) and replays it with spawn_child(new_value=...) on resume."""
    cfg = config(**{"merge.methods": ["ties", "della"], "merge.method_gene": method_gene})
    space = build_space(cfg, model_set())
    opt = make_optimizer(cfg, space.parametrization(), budget=10)
    for i in range(4):
        cand = opt.ask()
        logged = json.loads(json.dumps(space.value_to_json(cand.value)))
        child = opt.parametrization.spawn_child(new_value=space.value_from_json(logged))
        assert space.to_recipe(child.value) == space.to_recipe(cand.value)
        opt.tell(child, float(i))
