"""Model sources: local folders (single / sharded), hub cache, pickle policy, set validation."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from evomerge.config import ModelsConfig
from evomerge.errors import SourceError
from evomerge.merge.sources import model_set_for, load_model_set, resolve_source


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg
    return msg


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def sharded(tiny_models, tmp_path_factory) -> Path:
    """The base re-saved by transformers in ~50 KB shards with model.safetensors.index.json."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("sharded") / "base_sharded"
    AutoModelForCausalLM.from_pretrained(tiny_models.base, dtype=torch.float32).save_pretrained(
        out, max_shard_size="50KB")
    return out


def test_single_file_source_reads_what_the_file_holds(tiny_models):
    src = resolve_source(tiny_models.base_ref)
    want = load_file(tiny_models.base / "model.safetensors")
    assert src.model_type == "llama" and src.ref == tiny_models.base_ref
    assert set(src.tensor_names()) == set(want) and len(want) == 1 + 4 * 9 + 1 + 1
    for name, t in want.items():
        assert src.shape(name) == tuple(t.shape)
        assert torch.equal(src.get_tensor(name), t)
    assert src.shape("model.layers.0.self_attn.k_proj.weight") == (16, 32)  # 2 kv heads * head_dim 8


def test_sharded_source_is_lazy_and_memory_mapped(tiny_models, sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    src = resolve_source(str(sharded))
    assert src.open_files() == []  # resolving reads headers only
    single = load_file(tiny_models.base / "model.safetensors")
    assert set(src.tensor_names()) == set(single)
    name = "model.layers.3.mlp.up_proj.weight"
    assert torch.equal(src.get_tensor(name), single[name])
    assert src.open_files() == [index["weight_map"][name]]  # only the shard holding it
    for n, t in single.items():
        assert torch.equal(src.get_tensor(n), t)
    assert src.open_files() == shards
    again = pickle.loads(pickle.dumps(src))  # as sent to a Ray actor: re-opens its files there
    assert again.open_files() == [] and torch.equal(again.get_tensor(name), single[name])


def _populate_hub_cache(cache: Path, repo: str, folder: Path, commit: str = "0123456789abcdef" * 2 + "01234567") -> Path:
    """Lay a folder out as huggingface_hub's cache does: refs/main -> snapshots/<commit>/."""
    storage = cache / ("models--" + repo.replace("/", "--"))
    snap = storage / "snapshots" / commit
    shutil.copytree(folder, snap)
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(commit)
    return snap


@pytest.mark.parametrize("env", ["HF_HUB_CACHE", "HF_HOME"])
def test_hub_id_resolves_from_local_cache_offline(tiny_models, tmp_path, monkeypatch, env):
    cache = tmp_path / "hub" if env == "HF_HUB_CACHE" else tmp_path / "home" / "hub"
    snap = _populate_hub_cache(cache, "tiny-org/tiny-llama", tiny_models.base)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv(env, str(cache if env == "HF_HUB_CACHE" else tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = resolve_source("tiny-org/tiny-llama")
    assert src.path == snap and src.ref == "tiny-org/tiny-llama"
    want = load_file(tiny_models.base / "model.safetensors")
    assert torch.equal(src.get_tensor("model.norm.weight"), want["model.norm.weight"])
    # a set mixing a hub id and local folders validates like any other
    ms = load_model_set("tiny-org/tiny-llama", tiny_models.source_refs[:1])
    assert ms.base.path == snap and ms.tokenizer_path == snap

    with pytest.raises(SourceError) as err:
        resolve_source("tiny-org/not-cached")
    msg = _one_line(err)
    assert "tiny-org/not-cached" in msg and "HF_HUB_OFFLINE" in msg


def test_pickle_checkpoints_refused_unless_allowed(tiny_models, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_models.sources[0] / "config.json", folder)
    state = load_file(tiny_models.sources[0] / "model.safetensors")
    torch.save(state, folder / "pytorch_model.bin")
    torch.save({"lr": 1.0}, folder / "optimizer.pt")  # a training leftover, not a weight file

    with pytest.raises(SourceError) as err:
        resolve_source(str(folder))
    msg = _one_line(err)
    assert "pytorch_model.bin" in msg and "pickle" in msg and "allow" in msg

    src = resolve_source(str(folder), allow_pickle=True)
    assert set(src.tensor_names()) == set(state)
    for name, t in state.items():
        assert torch.equal(src.get_tensor(name), t)
    ms = load_model_set(tiny_models.base_ref, [str(folder)], allow_pickle=True)  # same set as a safetensors source
    assert ms.sources[0].shape("lm_head.weight") == (96, 32)


def _rewrite(folder: Path, edit) -> None:
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_shape_mismatch_names_both_models_and_first_tensor(tiny_models, tmp_path):
    bad = _copy(tiny_models.sources[1], tmp_path / "wider")

    def edit(state):  # what a different intermediate_size does to the MLP
        for i in range(4):
            for p in ("up_proj", "gate_proj"):
                state[f"model.layers.{i}.mlp.{p}.weight"] = torch.zeros(48, 32)
            state[f"model.layers.{i}.mlp.down_proj.weight"] = torch.zeros(32, 48)

    _rewrite(bad, edit)
    with pytest.raises(SourceError) as err:
        load_model_set(tiny_models.base_ref, [tiny_models.source_refs[0], str(bad)])
    msg = _one_line(err)
    assert tiny_models.base_ref in msg and str(bad) in msg
    assert "'model.layers.0.mlp.down_proj.weight'" in msg and "[32, 64]" in msg and "[32, 48]" in msg


def test_missing_tensor_is_named(tiny_models, tmp_path):
    bad = _copy(tiny_models.sources[0], tmp_path / "nohead")
    _rewrite(bad, lambda s: s.pop("lm_head.weight"))
    with pytest.raises(SourceError) as err:
        load_model_set(tiny_models.base_ref, [str(bad)])
    msg = _one_line(err)
    assert "'lm_head.weight' is in " + tiny_models.base_ref in msg and str(bad) in msg


def test_two_architectures(tiny_models, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=96, n_positions=64)).save_pretrained(gpt2)
    with pytest.raises(SourceError) as err:
        load_model_set(tiny_models.base_ref, [tiny_models.source_refs[0], str(gpt2)])
    msg = _one_line(err)
    assert tiny_models.base_ref in msg and str(gpt2) in msg and "'llama'" in msg and "'gpt2'" in msg


def test_vocab_mismatch_needs_tokenizer_source(tiny_models, tmp_path):
    other = _copy(tiny_models.sources[2], tmp_path / "other_tok")
    tj = json.loads((other / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    vocab["w7"], vocab["w8"] = vocab["w8"], vocab["w7"]  # same size, different ids
    (other / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(SourceError) as err:
        load_model_set(tiny_models.base_ref, [tiny_models.source_refs[0], str(other)])
    msg = _one_line(err)
    assert "different vocabularies" in msg and "'w7' has id 7 vs 8" in msg and str(other) in msg

    ms = load_model_set(tiny_models.base_ref, [tiny_models.source_refs[0], str(other)], tokenizer_source=str(other))
    assert ms.tokenizer_path == other

    cfg = json.loads((other / "config.json").read_text())
    cfg["vocab_size"] = 128
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SourceError) as err:
        load_model_set(tiny_models.base_ref, [str(other)])
    assert "vocab_size 96 vs 128" in _one_line(err)


def test_missing_path_and_missing_config(tiny_models, tmp_path):
    for ref in (str(tmp_path / "nope"), "models/demo/add", "./rel"):
        with pytest.raises(SourceError) as err:
            load_model_set(tiny_models.base_ref, [ref])
        msg = _one_line(err)
        assert ref in msg and "does not exist" in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError) as err:
        resolve_source(str(empty))
    assert "config.json" in _one_line(err)
    noweights = _copy(tiny_models.base, tmp_path / "noweights")
    (noweights / "model.safetensors").unlink()
    with pytest.raises(SourceError) as err:
        resolve_source(str(noweights))
    assert "no weights" in _one_line(err)


def test_tied_embeddings_and_model_set_layout(tiny_models, tiny_models_tied):
    ms = load_model_set(tiny_models_tied.base_ref, tiny_models_tied.source_refs)
    assert "lm_head.weight" not in ms.tensor_names
    assert ms.num_layers == 4 and ms.layout.name == "llama"
    assert {g.kind for g in ms.groups.values()} == {"embed", "layer", "final_norm"}
    assert ms.tensor_names[0] == "model.embed_tokens.weight" and ms.tensor_names[-1] == "model.norm.weight"
    # untied and tied sets cannot be mixed: the first differing tensor is lm_head
    with pytest.raises(SourceError) as err:
        load_model_set(tiny_models.base_ref, [tiny_models_tied.source_refs[0]])
    assert "'lm_head.weight'" in _one_line(err)


def test_model_set_for_from_config(tiny_models):
    cfg = ModelsConfig(base=tiny_models.base_ref, sources=tiny_models.source_refs)
    ms = model_set_for(cfg)
    assert [s.ref for s in ms.sources] == tiny_models.source_refs
    assert ms.by_ref(tiny_models.source_refs[1]) is ms.sources[1]
    assert ms.tensor_names[-1] == "lm_head.weight" and ms.groups["lm_head.weight"].kind == "lm_head"
    with pytest.raises(SourceError):
        ms.by_ref("someone/else")
