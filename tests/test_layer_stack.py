"""Layer stacks: a data-flow path written as a plain HF model, and its mergekit passthrough YAML.

Two tiny random Llamas A and B (4 layers each). A path's residual scales are folded into
o_proj/down_proj; the folded folder must load with plain transformers and give the
logits of the path run by hand (layers in path order, hidden state times c_p before each).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.cli import main
from evomerge.errors import ConfigError, RecipeError, SourceError
from evomerge.merge.layer_stack import LayerStack, check_foldable, stack_from_path, write_stack
from evomerge.merge.layer_stack_yaml import stack_from_mergekit_yaml, stack_to_mergekit_yaml
from evomerge.merge.recipe_files import load_recipe_file
from evomerge.merge.path_recipe import PathRecipe
from evomerge.merge.recipe import MergeRecipe
from tiny_models import build_tiny_llama

IDS = torch.tensor([[1, 5, 17, 42, 9, 77, 3, 60, 11, 2]])
#: the mixed path of the tests: (model, layer, scale)
MIXED = [("A", 0, 1.0), ("B", 1, 1.5), ("A", 1, 0.8), ("B", 3, 1.2)]


@pytest.fixture(scope="module")
def ab(tmp_path_factory) -> dict[str, str]:
    """Two unrelated tiny Llamas. initializer_range 0.3 gives residual streams of a real model's
    size (mean x^2 from 0.1 to ~70): at the default 0.02 it is ~4e-4, and RMSNorm's eps (1e-5)
    would be 2.5% of it, which no real model sees (see test_folded_mixed_path...)."""
    root = tmp_path_factory.mktemp("stack_models")
    return {"A": str(build_tiny_llama(root / "A", seed=1, initializer_range=0.3)),
            "B": str(build_tiny_llama(root / "B", seed=2, initializer_range=0.3)), "root": str(root)}


def _path(ab, steps, dtype="float32") -> PathRecipe:
    return PathRecipe(models=[ab["A"], ab["B"]], embed_from=ab["A"], dtype=dtype,
                      path=[{"model": ab[m], "layer": layer, "scale": c} for m, layer, c in steps])


def _state(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _load(folder, eps: float | None = None, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    if eps is not None:  # every RMSNorm's eps
        for mod in model.modules():
            if hasattr(mod, "variance_epsilon"):
                mod.variance_epsilon = eps
    return model


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS, use_cache=False).logits


def _reference_logits(ab, steps, eps: float | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The path run by hand: A's embeddings, each step's *original* layer entered with the
    hidden state times c_p (a forward pre-hook), then A's final norm and head."""
    models = {k: _load(ab[k], eps, dtype) for k in ("A", "B")}
    ref = copy.deepcopy(models["A"])
    layers = []
    for p, (m, layer, c) in enumerate(steps):
        lay = copy.deepcopy(models[m].model.layers[layer])
        lay.self_attn.layer_idx = p

        def scale_input(module, args, kwargs, c=c):
            if args:
                return (args[0] * c, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * c}

        lay.register_forward_pre_hook(scale_input, with_kwargs=True)
        layers.append(lay)
    ref.model.layers = torch.nn.ModuleList(layers)
    ref.config.num_hidden_layers = len(layers)
    return _logits(ref)


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


# -- writing -----------------------------------------------------------------------------------
def test_identity_path_is_model_a_bit_for_bit(ab, tmp_path):
    out = write_stack(stack_from_path(_path(ab, [("A", i, 1.0) for i in range(4)])), tmp_path / "id")
    got, want = _state(out), _state(Path(ab["A"]))
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 4 and cfg["model_type"] == "llama"
    assert {"tokenizer.json", "generation_config.json"} <= {p.name for p in out.iterdir()}
    assert torch.equal(_logits(_load(out)), _logits(_load(ab["A"])))


def test_folded_mixed_path_equals_the_scaled_path(ab, tmp_path):
    recipe = _path(ab, MIXED)
    stack = stack_from_path(recipe)
    assert [x.out_scale for x in stack.layers] == recipe.fold_factors()
    out = write_stack(stack, tmp_path / "mixed", max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").is_file()  # sharded like stream_merge
    # folded tensors are the source's times the fold factor; everything else is copied
    state, b = _state(out), _state(Path(ab["B"]))
    f1 = recipe.fold_factors()[1]
    assert torch.equal(state["model.layers.1.mlp.down_proj.weight"], b["model.layers.1.mlp.down_proj.weight"] * f1)
    assert torch.equal(state["model.layers.1.self_attn.q_proj.weight"], b["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(state["model.layers.3.input_layernorm.weight"], b["model.layers.3.input_layernorm.weight"])

    folded = _logits(_load(out))
    want = _reference_logits(ab, MIXED)
    # not bit-exact: RMSNorm divides by sqrt(mean(x^2) + eps) and eps does not scale with x,
    # so norm(s*x) and norm(x) differ by O(eps / mean(x^2)), plus float32 rounding (measured:
    # max |diff| ~3e-6 on logits up to ~7)
    torch.testing.assert_close(folded, want, rtol=1e-4, atol=1e-5)
    # without eps and in float64 arithmetic, what is left is the one float32 rounding of the
    # folded o_proj/down_proj weights (measured max |diff| ~9e-7; the reference applies c_p in float64)
    exact = _logits(_load(out, eps=0.0, dtype=torch.float64))
    torch.testing.assert_close(exact, _reference_logits(ab, MIXED, eps=0.0, dtype=torch.float64),
                               rtol=1e-5, atol=2e-6)
    # and the scales matter: the same layers unscaled are far from it
    plain = _reference_logits(ab, [(m, layer, 1.0) for m, layer, _ in MIXED])
    assert (plain - want).abs().max() > 1000 * (folded - want).abs().max()


def test_layer_types_are_rebuilt_per_position(ab, tmp_path):
    src = tmp_path / "A_types"
    shutil.copytree(ab["A"], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["layer_types"] = ["t0", "t1", "t2", "t3"]
    (src / "config.json").write_text(json.dumps(cfg))
    stack = LayerStack(models=[str(src)], embed_from=str(src),
                       layers=[{"model": str(src), "layer": 3}, {"model": str(src), "layer": 0}])
    out = write_stack(stack, tmp_path / "types")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["layer_types"] == ["t3", "t0"]


# -- mergekit YAML ----------------------------------------------------------------------------
def test_yaml_round_trips_and_merges_byte_identical(ab, tmp_path, capsys):
    stack = stack_from_path(_path(ab, MIXED + [("B", 0, 1.0), ("B", 1, 1.0), ("A", 3, 1 / 3)]))
    text = stack_to_mergekit_yaml(stack)
    doc = yaml.safe_load(text)
    assert doc["merge_method"] == "passthrough"
    # zero-length slices of A first and last (embeddings / head); B0-B1 share one slice
    assert [s["sources"][0]["layer_range"] for s in doc["slices"]] == [[0, 0], [0, 1], [1, 2], [1, 2], [3, 4],
                                                                        [0, 2], [3, 4], [4, 4]]
    assert stack_from_mergekit_yaml(doc, None) == stack  # floats exactly (repr)
    # model paths relative to the YAML's folder, through load_recipe_file and the CLI
    root = Path(ab["root"])
    y = root / "stack.yaml"
    y.write_text(text.replace(f'"{root}/', '"'))
    assert str(root) not in y.read_text()
    assert load_recipe_file(y) == stack
    direct = write_stack(stack, tmp_path / "direct", max_shard_size="20KB")
    assert main(["merge", str(y), "--out", str(tmp_path / "cli"), "--max-shard-size", "20KB"]) == 0
    assert "stacked 7 layer(s) from 2 model(s)" in capsys.readouterr().out
    files = sorted(p.name for p in direct.iterdir())
    assert files == sorted(p.name for p in (tmp_path / "cli").iterdir())
    for f in files:
        assert (direct / f).read_bytes() == (tmp_path / "cli" / f).read_bytes(), f


def test_mergekit_cli_gives_the_same_tensors(ab, tmp_path):
    exe = Path(sys.executable).parent / "mergekit-yaml"
    if not exe.is_file():
        exe = shutil.which("mergekit-yaml")
        if exe is None:
            pytest.skip("mergekit-yaml CLI is not installed")
    stack = stack_from_path(_path(ab, MIXED, dtype="bfloat16"))
    (tmp_path / "m.yaml").write_text(stack_to_mergekit_yaml(stack))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run([str(exe), str(tmp_path / "m.yaml"), str(tmp_path / "mk"), "--no-lazy-unpickle",
                          "--out-shard-size", "1B", "--copy-tokenizer", "--no-write-model-card", "--quiet"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    ours = _state(write_stack(stack, tmp_path / "ours"))
    theirs = _state(tmp_path / "mk")
    assert set(ours) == set(theirs)
    for name, t in ours.items():  # bfloat16: both scale in float32 and round once
        assert theirs[name].dtype == t.dtype == torch.bfloat16, name
        assert torch.equal(theirs[name], t), (name, (theirs[name].float() - t.float()).abs().max())
    mk_cfg = json.loads((tmp_path / "mk" / "config.json").read_text())
    assert mk_cfg["num_hidden_layers"] == 4


def test_path_recipe_json_through_evomerge_merge(ab, tmp_path, capsys):
    recipe = _path(ab, MIXED)
    path = tmp_path / "path.json"
    path.write_text(recipe.to_json())
    assert isinstance(load_recipe_file(path), PathRecipe)
    assert main(["merge", str(path), "--out", str(tmp_path / "cli"), "--dtype", "bfloat16"]) == 0
    assert "stacked 4 layer(s)" in capsys.readouterr().out
    want = _state(write_stack(stack_from_path(recipe), tmp_path / "direct", dtype="bfloat16"))
    got = _state(tmp_path / "cli")
    assert set(got) == set(want)
    for name, t in want.items():
        assert t.dtype == torch.bfloat16 and torch.equal(got[name], t), name


def test_identity_passthrough_yaml_routing(ab, tmp_path):
    """One model's layers in order stays a MergeRecipe; with an o_proj/down_proj scale it is a stack."""
    plain = tmp_path / "plain.yaml"
    plain.write_text(f"merge_method: passthrough\ndtype: float32\nslices:\n"
                     f"  - sources: [{{model: {ab['A']}, layer_range: [0, 4]}}]\n")
    assert isinstance(load_recipe_file(plain), MergeRecipe)
    scaled = tmp_path / "scaled.yaml"
    scaled.write_text(plain.read_text() + "    parameters: {scale: [{filter: o_proj, value: 0.5}, "
                                          "{filter: down_proj, value: 0.5}, {value: 1.0}]}\n")
    stack = load_recipe_file(scaled)
    assert isinstance(stack, LayerStack)
    assert [(x.layer, x.out_scale) for x in stack.layers] == [(i, 0.5) for i in range(4)]


# -- one-line errors ------------------------------------------------------------------------------
def test_non_foldable_architecture(ab, tmp_path):
    src = tmp_path / "G"
    shutil.copytree(ab["A"], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "gemma2"
    (src / "config.json").write_text(json.dumps(cfg))
    stack = LayerStack(models=[str(src)], embed_from=str(src),
                       layers=[{"model": str(src), "layer": 0}, {"model": str(src), "layer": 1, "out_scale": 0.5}])
    with pytest.raises(RecipeError) as err:
        write_stack(stack, tmp_path / "out")
    msg = _one_line(err)
    assert "gemma2" in msg and "o_proj/down_proj" in msg and "llama" in msg
    assert not (tmp_path / "out").exists()
    with pytest.raises(RecipeError):
        check_foldable("gpt2", "x")
    check_foldable("qwen3", "x")


def test_layer_index_out_of_range(ab, tmp_path):
    stack = stack_from_path(_path(ab, [("A", 0, 1.0), ("B", 7, 1.0)]))
    with pytest.raises(RecipeError) as err:
        write_stack(stack, tmp_path / "out")
    assert "layer 7" in _one_line(err) and "4 layers" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_unknown_model(ab, tmp_path):
    with pytest.raises(RecipeError) as err:
        LayerStack.from_dict({"models": [ab["A"]], "embed_from": ab["A"], "layers": [{"model": "C", "layer": 0}]})
    assert "'C'" in _one_line(err)
    missing = str(tmp_path / "nowhere")
    stack = LayerStack(models=[ab["A"], missing], embed_from=ab["A"],
                       layers=[{"model": ab["A"], "layer": 0}, {"model": missing, "layer": 0}])
    with pytest.raises(SourceError) as err:
        write_stack(stack, tmp_path / "out")
    assert "nowhere" in _one_line(err)
    assert not (tmp_path / "out").exists()


def test_foreign_out_dir_refused_before_writing(ab, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "README.md").write_text("mine")
    with pytest.raises(ConfigError):
        write_stack(stack_from_path(_path(ab, MIXED)), tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["README.md"]


@pytest.mark.parametrize("params, needle", [
    ("{scale: [{filter: q_proj, value: 0.5}, {value: 1.0}]}", "other than o_proj/down_proj"),
    ("{scale: [{filter: o_proj, value: 0.5}, {filter: down_proj, value: 0.7}, {value: 1.0}]}", "different scales"),
    ("{scale: 0.5}", "other than o_proj/down_proj"),
    ("{weight: 0.5}", "only scale"),
])
def test_yaml_scale_it_cannot_express(ab, tmp_path, params, needle):
    y = tmp_path / "bad.yaml"
    y.write_text(f"merge_method: passthrough\nslices:\n"
                 f"  - sources: [{{model: {ab['A']}, layer_range: [0, 0]}}]\n"
                 f"  - sources: [{{model: {ab['B']}, layer_range: [2, 3]}}]\n    parameters: {params}\n"
                 f"  - sources: [{{model: {ab['A']}, layer_range: [4, 4]}}]\n")
    with pytest.raises(RecipeError) as err:
        load_recipe_file(y)
    assert needle in _one_line(err)


def test_yaml_embeddings_and_head_from_two_models(ab, tmp_path):
    y = tmp_path / "two.yaml"
    y.write_text(f"merge_method: passthrough\nslices:\n"
                 f"  - sources: [{{model: {ab['A']}, layer_range: [0, 2]}}]\n"
                 f"  - sources: [{{model: {ab['B']}, layer_range: [2, 4]}}]\n")
    with pytest.raises(RecipeError) as err:
        load_recipe_file(y)
    assert "zero-length slice" in _one_line(err)
