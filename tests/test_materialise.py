"""Materialisation: in place (search) and streamed to a folder (export) agree bit for bit,
match hand-computed merges, shard like transformers, and reject bad input before writing."""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from evomerge.cli import main
from evomerge.errors import MethodError
from evomerge.merge.recipe import GroupRecipe, MergeRecipe
from evomerge.merge.sources import load_model_set


# -- helpers -----------------------------------------------------------------------------------
W_TA = [0.5, 1.0, -0.3]
W_LIN = [1.0, 2.0, 3.0]


def _recipe(tm, *, dtype: str = "float32", sources: list[str] | None = None, **extra_groups) -> MergeRecipe:
    """default: task_arithmetic W_TA; layers.1 and lm_head: linear W_LIN (normalized)."""
    srcs = sources or tm.source_refs
    groups = {
        "default": GroupRecipe(method="task_arithmetic", source_params={s: {"weight": w} for s, w in zip(srcs, W_TA)}),
        "layers.1": GroupRecipe(method="linear", source_params={s: {"weight": w} for s, w in zip(srcs, W_LIN)}),
        "lm_head": GroupRecipe(method="linear", source_params={s: {"weight": w} for s, w in zip(srcs, W_LIN)}),
    }
    groups.update(extra_groups)
    return MergeRecipe(base=tm.base_ref, sources=srcs, groups=groups, dtype=dtype)


def _live_model(path: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _files_state(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def _assert_bitwise(model, state: dict[str, torch.Tensor]) -> None:
    live = model.state_dict()
    for name, t in state.items():
        assert live[name].dtype == t.dtype, name
        assert torch.equal(live[name], t), name


def _hand(tm, recipe_weights: dict[str, list[float]], name: str, sources: list[str] | None = None) -> torch.Tensor:
    """Expected merged tensor in float64, straight from the files."""
    files = {str(p): load_file(p / "model.safetensors") for p in [tm.base, *tm.sources]}
    base = files[tm.base_ref][name].double()
    srcs = [files[s][name].double() for s in (sources or tm.source_refs)]
    if "layers.1." in name or name == "lm_head.weight":
        w = recipe_weights["lin"]
        return sum(wi * si for wi, si in zip(w, srcs)) / sum(w)
    w = recipe_weights["ta"]
    return base + sum(wi * (si - base) for wi, si in zip(w, srcs))


@pytest.fixture(scope="module")
def merged(tiny_models):
    """One live model + merger, merged with the standard recipe (shared by several tests)."""
    ms = load_model_set(tiny_models.base_ref, tiny_models.source_refs)
    model = _live_model(tiny_models.base)
    from evomerge.merge.materialise import InPlaceMerger

    merger = InPlaceMerger(model, ms, device="cpu")
    recipe = _recipe(tiny_models)
    timings = merger.apply(recipe)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    return types.SimpleNamespace(ms=ms, model=model, merger=merger, recipe=recipe, timings=timings, state=snapshot)


# -- in place ------------------------------------------------------------------------------------
def test_inplace_equals_hand_computed(tiny_models, merged):
    assert merged.timings["tensors"] == 39 and merged.timings["merge_s"] > 0
    weights = {"ta": W_TA, "lin": W_LIN}
    base = load_file(tiny_models.base / "model.safetensors")
    for name in merged.ms.tensor_names:
        want = _hand(tiny_models, weights, name)
        got = merged.state[name].double()
        assert torch.allclose(got, want, atol=2e-6, rtol=1e-5), name
        assert (got - base[name].double()).abs().max() > 1e-3, name  # it really moved
    # lm_head (linear, normalised) is a weighted mean of the sources: not near the base's
    assert merged.state["lm_head.weight"].dtype == torch.float32


def test_apply_is_repeatable_and_host_mode_agrees(tiny_models, merged):
    other = _recipe(tiny_models, default=GroupRecipe(method="linear", source_params={}))
    merged.merger.apply(other)
    assert not torch.equal(merged.model.state_dict()["model.norm.weight"], merged.state["model.norm.weight"])
    merged.merger.apply(merged.recipe)  # no drift: every apply starts from the stored task vectors
    _assert_bitwise(merged.model, merged.state)

    bad = _recipe(tiny_models, **{"layers.3": GroupRecipe(method="ties", source_params={
        tiny_models.source_refs[0]: {"density": 0.0}})})
    with pytest.raises(MethodError) as err:  # found before any tensor is written
        merged.merger.apply(bad)
    assert "density" in str(err.value) and "layers.3" in str(err.value)
    _assert_bitwise(merged.model, merged.state)

    from evomerge.merge.materialise import InPlaceMerger

    model = _live_model(tiny_models.base)
    host = InPlaceMerger(model, merged.ms, device="cpu", task_vectors_on="host")
    host.apply(merged.recipe)
    _assert_bitwise(model, merged.state)


def test_subset_and_reordered_sources(tiny_models, merged, tmp_path):
    from evomerge.merge.materialise import merge_to_folder

    srcs = [tiny_models.source_refs[2], tiny_models.source_refs[0]]
    recipe = _recipe(tiny_models, sources=srcs)
    merged.merger.apply(recipe)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight", "lm_head.weight"):
        want = _hand(tiny_models, {"ta": W_TA[:2], "lin": W_LIN[:2]}, name, sources=srcs)
        assert torch.allclose(merged.model.state_dict()[name].double(), want, atol=2e-6, rtol=1e-5), name
    out = merge_to_folder(recipe, tmp_path / "subset")  # a set of just these two sources
    _assert_bitwise(merged.model, _files_state(out))
    merged.merger.apply(merged.recipe)


# -- streamed ------------------------------------------------------------------------------------
def test_streamed_equals_inplace_bit_for_bit(tiny_models, merged, tmp_path):
    from evomerge.merge.materialise import merge_to_folder

    out = merge_to_folder(merged.recipe, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"])
    state = _files_state(out)
    assert set(state) == set(merged.ms.tensor_names)
    for name, t in state.items():
        assert torch.equal(t, merged.state[name]), name
    assert not list(out.glob(".*"))  # no temp files left


def test_tied_embeddings_merge_once_and_agree(tiny_models_tied, tmp_path):
    from evomerge.merge.materialise import InPlaceMerger, merge_to_folder

    tm = tiny_models_tied
    recipe = MergeRecipe(base=tm.base_ref, sources=tm.source_refs, groups={
        "default": GroupRecipe(method="task_arithmetic", source_params={tm.source_refs[0]: {"weight": 0.7}}),
        "embed": GroupRecipe(method="linear", source_params={tm.source_refs[1]: {"weight": 3.0}})})
    ms = load_model_set(tm.base_ref, tm.source_refs)
    model = _live_model(tm.base)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    InPlaceMerger(model, ms, device="cpu").apply(recipe)
    files = [load_file(p / "model.safetensors") for p in (tm.base, *tm.sources)]
    e = "model.embed_tokens.weight"
    want = (files[1][e].double() + 3.0 * files[2][e].double()) / 4.0  # linear, weight default 1.0 for src0
    assert torch.allclose(model.model.embed_tokens.weight.double(), want, atol=2e-6)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    out = merge_to_folder(recipe, tmp_path / "tied")
    state = _files_state(out)
    assert "lm_head.weight" not in state
    _assert_bitwise(model, state)
    reloaded = _live_model(out)
    assert torch.equal(reloaded.lm_head.weight, model.model.embed_tokens.weight)


def test_sharded_output_loads_with_transformers(tiny_models, merged, tmp_path):
    from transformers import AutoTokenizer

    from evomerge.merge.materialise import merge_to_folder

    out = merge_to_folder(merged.recipe, tmp_path / "sharded", max_shard_size="60KB")
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) >= 3 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(merged.ms.tensor_names) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in merged.state.values())
    for s in shards:  # no shard over the limit unless it holds a single tensor
        n = sum(1 for v in index["weight_map"].values() if v == s)
        assert n == 1 or (out / s).stat().st_size <= 60_000 + 4096
    model = _live_model(out)
    for name, t in model.state_dict().items():
        assert torch.equal(t, merged.state[name]), name
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids("w7") == 7

    # rewriting the folder as one file removes the old shards
    merge_to_folder(merged.recipe, out)
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]


def test_interrupted_rewrite_never_mixes_two_merges(tiny_models, merged, tmp_path, monkeypatch):
    """A merge into a folder holding an earlier sharded merge, killed after its first shard:
    no old shard or old index survives next to the new shard (that set would load silently)."""
    from evomerge.merge import materialise

    out = materialise.merge_to_folder(merged.recipe, tmp_path / "re", max_shard_size="60KB")
    old = {p.name: p.read_bytes() for p in out.glob("model*")}
    assert len(old) >= 4  # shards + index
    first_shard = sum(1 for f in json.loads(old["model.safetensors.index.json"])["weight_map"].values()
                      if f.startswith("model-00001-"))
    other = _recipe(tiny_models, **{"layers.0": GroupRecipe(method="linear", source_params={
        s: {"weight": 1.0} for s in tiny_models.source_refs})})
    real, calls = materialise._merge_one, []

    def dies_in_second_shard(name, *args, **kwargs):
        calls.append(name)
        if len(calls) > first_shard:
            raise KeyboardInterrupt
        return real(name, *args, **kwargs)

    monkeypatch.setattr(materialise, "_merge_one", dies_in_second_shard)
    with pytest.raises(KeyboardInterrupt):
        materialise.merge_to_folder(other, out, max_shard_size="60KB")
    left = {p.name: p.read_bytes() for p in out.glob("model*")}
    assert not any(old.get(name) == data for name, data in left.items())
    assert left and "model.safetensors.index.json" not in left  # the new first shard, alone


def test_bfloat16_output_matches_inplace_rounding(tiny_models, merged, tmp_path):
    from evomerge.merge.materialise import merge_to_folder

    recipe = _recipe(tiny_models, dtype="bfloat16")
    out = merge_to_folder(recipe, tmp_path / "bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    state = _files_state(out)
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    merged.merger.apply(recipe)  # float32 live model holds exactly the bf16 values
    live = merged.model.state_dict()
    for name, t in state.items():
        assert torch.equal(live[name], t.float()), name
        assert torch.equal(t, merged.state[name].to(torch.bfloat16)), name
    merged.merger.apply(merged.recipe)


# -- command line ----------------------------------------------------------------------------------
def test_cli_merge_recipe_json(tiny_models, merged, tmp_path, capsys):
    path = tmp_path / "recipe.json"
    path.write_text(merged.recipe.to_json())
    out = tmp_path / "cli_out"
    assert main(["merge", str(path), "--out", str(out), "--max-shard-size", "100KB"]) == 0
    assert "merged 3 source(s)" in capsys.readouterr().out
    assert (out / "model.safetensors.index.json").is_file()
    state = _files_state(out)
    assert set(state) == set(merged.state)
    for name, t in state.items():
        assert torch.equal(t, merged.state[name]), name
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def test_load_recipe_file_mergekit_yaml(tiny_models, tmp_path):
    from evomerge.merge.recipe_files import load_recipe_file

    y = tmp_path / "m.yaml"
    y.write_text(
        f"merge_method: task_arithmetic\nbase_model: {tiny_models.base_ref}\ndtype: float32\nmodels:\n"
        + "".join(f"  - model: {s}\n    parameters: {{weight: {w}}}\n" for s, w in zip(tiny_models.source_refs, W_TA)))
    recipe = load_recipe_file(y)
    assert recipe.base == tiny_models.base_ref and recipe.sources == tiny_models.source_refs
    _, g = recipe.group_for(load_model_set(tiny_models.base_ref, tiny_models.source_refs).groups["model.norm.weight"])
    assert g.method == "task_arithmetic"
    assert [g.source_params[s]["weight"] for s in tiny_models.source_refs] == W_TA


def _bad_cases(tm, tmp: Path) -> dict[str, tuple[dict[str, Any], list[str], str]]:
    good = _recipe(tm).to_dict()

    def variant(**changes):
        d = json.loads(json.dumps(good))
        for k, v in changes.items():
            d[k] = v
        return d

    s = tm.source_refs
    ties = {"method": "ties", "source_params": {s[0]: {"density": 1.5}}}
    return {
        "unknown_method": (variant(groups={"default": {"method": "frobnicate"}}), [], "frobnicate"),
        "density": (variant(groups={"default": ties}), [], "density"),
        "slerp_three": (variant(groups={"default": {"method": "slerp", "params": {"t": 0.5}}}), [], "slerp"),
        "not_a_source": (variant(groups={"default": {"method": "linear",
                                                     "source_params": {"someone/else": {"weight": 1}}}}),
                         [], "someone/else"),
        "missing_model": (variant(sources=[s[0], str(tmp / "gone")], groups={"default": {"method": "linear"}}),
                          [], str(tmp / "gone")),
        "layer_out_of_range": (variant(groups={**good["groups"], "layers.9": {"method": "linear"}}), [], "layers.9"),
        "bad_shard_size": (good, ["--max-shard-size", "lots"], "lots"),
        "out_is_source": (good, ["--out-is-source"], "inside model"),
    }


@pytest.mark.parametrize("case", ["unknown_method", "density", "slerp_three", "not_a_source", "missing_model",
                                  "layer_out_of_range", "bad_shard_size", "out_is_source"])
def test_bad_input_is_one_line_and_writes_nothing(tiny_models, tmp_path, capsys, case):
    data, extra, needle = _bad_cases(tiny_models, tmp_path)[case]
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "out"
    if extra == ["--out-is-source"]:
        out, extra = tiny_models.sources[0] / "merged", []
    rc = main(["merge", str(path), "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("evomerge merge: error: ") and needle in err, err
    assert not out.exists()


def test_missing_recipe_file(tmp_path, capsys):
    assert main(["merge", str(tmp_path / "nope.json"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_random_and_sign_methods_agree_streamed_vs_inplace(tiny_models, merged, tmp_path, method):
    from evomerge.merge.materialise import merge_to_folder

    s = tiny_models.source_refs
    recipe = MergeRecipe(base=tiny_models.base_ref, sources=s, seed=7, groups={"default": GroupRecipe(
        method=method, source_params={x: {"weight": w, "density": d} for x, w, d in zip(s, W_LIN, [0.3, 0.5, 0.9])})})
    merged.merger.apply(recipe)
    _assert_bitwise(merged.model, _files_state(merge_to_folder(recipe, tmp_path / method)))
    merged.merger.apply(merged.recipe)


def test_no_base_linear_merge(tiny_models, tmp_path):
    from evomerge.merge.materialise import InPlaceMerger, merge_to_folder

    s = tiny_models.source_refs
    recipe = MergeRecipe(base=None, sources=s, groups={"default": GroupRecipe(
        method="linear", source_params={x: {"weight": w} for x, w in zip(s, W_LIN)})})
    ms = load_model_set(None, s)
    model = _live_model(tiny_models.sources[0])
    InPlaceMerger(model, ms, device="cpu").apply(recipe)
    files = [load_file(p / "model.safetensors") for p in tiny_models.sources]
    for name in ("model.embed_tokens.weight", "model.layers.2.self_attn.o_proj.weight", "model.norm.weight"):
        want = sum(w * f[name].double() for w, f in zip(W_LIN, files)) / sum(W_LIN)
        assert torch.allclose(model.state_dict()[name].double(), want, atol=2e-6), name
    _assert_bitwise(model, _files_state(merge_to_folder(recipe, tmp_path / "nobase")))


def test_fused_hot_path_equals_export_bit_for_bit(tiny_models, merged, tmp_path):
    """The compiled one-pass kernel (ties, breadcrumbs, task_arithmetic) writes the very bits
    the eager export writes, next to eager groups (linear, dare_ties) and with bf16 output."""
    from evomerge.merge.materialise import InPlaceMerger, merge_to_folder

    s = tiny_models.source_refs
    per = lambda **p: {x: {k: v[i] for k, v in p.items()} for i, x in enumerate(s)}  # noqa: E731
    recipe = _recipe(
        tiny_models,
        **{"layers.0": GroupRecipe(method="ties", source_params=per(weight=W_LIN, density=[0.3, 0.5, 0.9])),
           "layers.2": GroupRecipe(method="breadcrumbs_ties", source_params=per(
               weight=W_TA, density=[0.6, 0.5, 0.9], gamma=[0.05, 0.0, 0.1]), params={"normalize": True}),
           "layers.3": GroupRecipe(method="dare_ties", source_params=per(weight=W_TA, density=[0.5, 0.5, 0.5])),
           "embed": GroupRecipe(method="breadcrumbs", source_params=per(
               weight=W_LIN, density=[0.4, 0.7, 0.2], gamma=[0.01, 0.02, 0.0]), params={"lambda": 0.8})})
    model = _live_model(tiny_models.base)
    fused_merger = InPlaceMerger(model, merged.ms, device="cpu", fused=True)
    assert not InPlaceMerger(_live_model(tiny_models.base), merged.ms, device="cpu").fused  # tiny: auto is off
    for dtype in ("float32", "bfloat16"):
        r = recipe.model_copy(update={"dtype": dtype, "seed": 3})
        timings = fused_merger.apply(r)
        # default (TA) + layers.0/2 (ties) + embed (breadcrumbs); linear and dare_ties stay eager
        assert 0 < timings["fused_tensors"] < timings["tensors"]
        state = {k: v.to(model.dtype) for k, v in _files_state(merge_to_folder(r, tmp_path / dtype)).items()}
        _assert_bitwise(model, state)


def test_hub_ids_resolve_at_the_configured_revision(tiny_models, tmp_path, monkeypatch):
    """Models named by hub id are fetched at ``revision`` (the search config's models.revision)
    when merging to a folder, as the search merged them - not at the hub's default branch."""
    from evomerge.merge import sources
    from evomerge.merge.materialise import merge_to_folder

    local = {"org/base": tiny_models.base_ref, **{f"org/s{i}": s for i, s in enumerate(tiny_models.source_refs)}}
    asked: list[tuple[str, str | None]] = []

    def fake_download(ref, *, revision, patterns):
        asked.append((ref, revision))
        return Path(local[ref])

    monkeypatch.setattr(sources, "_download", fake_download)
    s = [f"org/s{i}" for i in range(len(tiny_models.source_refs))]
    recipe = MergeRecipe(base="org/base", sources=s, groups={"default": GroupRecipe(
        method="task_arithmetic", source_params={x: {"weight": w} for x, w in zip(s, W_TA)})})
    merge_to_folder(recipe, tmp_path / "out", revision="v1.2")
    assert {ref for ref, _ in asked} >= set(local) and all(rev == "v1.2" for _, rev in asked)


def test_merge_refuses_a_folder_with_foreign_files_but_rewrites_an_earlier_merge(tiny_models, merged, tmp_path, capsys):
    """An earlier merge is rewritten in place; a folder with anything else in it is refused in one line,
    untouched; --out under an existing file is one line too."""
    path = tmp_path / "recipe.json"
    path.write_text(merged.recipe.to_json())
    out = tmp_path / "again"
    assert main(["merge", str(path), "--out", str(out)]) == 0
    assert main(["merge", str(path), "--out", str(out)]) == 0  # holds only a merge's files: rewritten
    capsys.readouterr()
    (out / "README.md").write_text("someone's notes")
    (out / "adapter_model.safetensors").write_bytes(b"x")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["merge", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not hold an earlier merge (README.md, adapter_model.safetensors)" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["merge", str(path), "--out", str(blocker / "sub")]) == 2
    assert f"{blocker} is a file, not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["sce", "multislerp", "nuslerp", "karcher", "arcee_fusion", "nearswap",
                                    "passthrough", "ram", "ramplus_tl"])
def test_new_methods_agree_inplace_vs_export(tiny_models, merged, tmp_path, method):
    """The search's in-place hot path and the exported folder give the same bits for every method
    added for mergekit parity, on per-layer recipes (the search's model set has a base: a
    passthrough candidate carries it, as the space writes it)."""
    from mergekit_compare import per_layer_recipe

    from evomerge.merge.materialise import merge_to_folder

    recipe = per_layer_recipe(method, tiny_models.base_ref, tiny_models.source_refs, 4)
    recipe = recipe.model_copy(update={"base": tiny_models.base_ref})
    merged.merger.apply(recipe)
    _assert_bitwise(merged.model, _files_state(merge_to_folder(recipe, tmp_path / method)))
    merged.merger.apply(merged.recipe)
