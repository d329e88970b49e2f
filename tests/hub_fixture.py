"""A Hugging Face hub cache that stands in for real 7B/8B/0.5B downloads, built at test time.

Why: ``evomerge check`` must validate the ready configs in ``configs/`` (Mistral-7B,
Llama-3-8B, Qwen2.5-0.5B families) offline and without weights. Those checks read only
what a real cache holds besides the weights: ``config.json``, the tokenizer files, the
safetensors headers and ``model.safetensors.index.json``. So this module writes exactly
those, with each model's real architecture values (written by hand from the public model
cards / config.json of each repo), in the hub cache layout huggingface_hub resolves
offline (``models--org--name/refs/main`` -> ``snapshots/<rev>/``).

The weights are *sparse* files: the real header (every tensor with its real name, shape
and dtype, and its byte offsets), then ``truncate`` to the full size. The file has the
size the header promises (``read_safetensors_header`` refuses a truncated download by
comparing them), so the sources checks pass, but it occupies no disk blocks: a 16 GB
"Llama-3-8B" costs a few kilobytes. Reading a tensor from it would return zeros, and
the tests make sure nothing does.

Shard counts follow the base repos (Mistral-7B-v0.1: 2, Meta-Llama-3-8B: 4, Qwen2.5-0.5B: 1);
those of the fine-tunes are illustrative: no check depends on how tensors are split.

Use: ``cache = build_hub_cache(tmp_path, ALL_MODELS)`` then ``use_hub_cache(monkeypatch,
cache)`` (points ``HF_HUB_CACHE``/``HF_HOME`` at it, ``HF_HUB_OFFLINE=1``), or the
``hub_cache`` fixture of the test module.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

#: safetensors dtype code and bytes per element of the dtypes these repos ship.
_ST = {"bfloat16": ("BF16", 2), "float16": ("F16", 2), "float32": ("F32", 4)}


@dataclass(frozen=True)
class FakeModel:
    """One hub repo: its id, its config.json, how many shards, and which tokenizer family it shares."""

    repo_id: str
    config: dict[str, Any]
    shards: int  # 1: a single model.safetensors; >1: model-0000i-of-0000n.safetensors + index
    tokenizer: str  # models with the same tokenizer family get identical tokenizer files
    revision: str = "0" * 40
    extra_tensors: dict[str, tuple[int, ...]] = field(default_factory=dict)


def _llama_like(model_type: str, arch: str, *, hidden: int, inter: int, layers: int, heads: int, kv_heads: int,
                vocab: int, tie: bool, dtype: str, **extra: Any) -> dict[str, Any]:
    return {"architectures": [arch], "model_type": model_type, "hidden_size": hidden, "intermediate_size": inter,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "vocab_size": vocab, "tie_word_embeddings": tie, "torch_dtype": dtype, "hidden_act": "silu",
            "rms_norm_eps": extra.pop("rms_norm_eps", 1e-5), **extra}


# -- the families the ready configs use (values from each repo's config.json) ------------------
#: mistralai/Mistral-7B-v0.1 and its fine-tunes: 7,241,732,096 parameters.
MISTRAL_7B = _llama_like("mistral", "MistralForCausalLM", hidden=4096, inter=14336, layers=32, heads=32, kv_heads=8,
                         vocab=32000, tie=False, dtype="bfloat16", max_position_embeddings=32768,
                         rope_theta=10000.0, sliding_window=4096, bos_token_id=1, eos_token_id=2)
#: meta-llama/Meta-Llama-3-8B and its fine-tunes: 8,030,261,248 parameters.
LLAMA3_8B = _llama_like("llama", "LlamaForCausalLM", hidden=4096, inter=14336, layers=32, heads=32, kv_heads=8,
                        vocab=128256, tie=False, dtype="bfloat16", max_position_embeddings=8192,
                        rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001)
#: Qwen/Qwen2.5-0.5B and its fine-tunes: 494,032,768 parameters (tied embeddings, q/k/v biases).
QWEN25_05B = _llama_like("qwen2", "Qwen2ForCausalLM", hidden=896, inter=4864, layers=24, heads=14, kv_heads=2,
                         vocab=151936, tie=True, dtype="bfloat16", max_position_embeddings=32768,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151643)


def _model(repo: str, config: dict[str, Any], shards: int, tokenizer: str) -> FakeModel:
    return FakeModel(repo, dict(config), shards, tokenizer)


#: Every repo the ready configs name (shard counts as in the real repos).
EVOLLM_JP_MODELS = [
    _model("mistralai/Mistral-7B-v0.1", MISTRAL_7B, 2, "mistral"),
    _model("augmxnt/shisa-gamma-7b-v1", MISTRAL_7B, 3, "mistral"),
    _model("WizardLMTeam/WizardMath-7B-V1.1", MISTRAL_7B, 3, "mistral"),
    _model("GAIR/Abel-7B-002", MISTRAL_7B, 3, "mistral"),
]
CODE_MATH_MODELS = [
    _model("meta-llama/Meta-Llama-3-8B", LLAMA3_8B, 4, "llama3"),
    _model("ajibawa-2023/Code-Llama-3-8B", LLAMA3_8B, 4, "llama3"),
    _model("TIGER-Lab/MAmmoTH2-8B", LLAMA3_8B, 4, "llama3"),
]
SMALL_QWEN_MODELS = [
    _model("Qwen/Qwen2.5-0.5B", QWEN25_05B, 1, "qwen2"),
    _model("Qwen/Qwen2.5-0.5B-Instruct", QWEN25_05B, 1, "qwen2"),
    _model("Qwen/Qwen2.5-Coder-0.5B", QWEN25_05B, 1, "qwen2"),
]
ALL_MODELS = EVOLLM_JP_MODELS + CODE_MATH_MODELS + SMALL_QWEN_MODELS


def tensor_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Llama/Mistral/Qwen2 checkpoint, by its HF name, in checkpoint order."""
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    bias = config["model_type"] == "qwen2"  # Qwen2 has q/k/v biases
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "self_attn.q_proj.weight"] = (h, h)
        out[p + "self_attn.k_proj.weight"] = (kv, h)
        out[p + "self_attn.v_proj.weight"] = (kv, h)
        if bias:
            out[p + "self_attn.q_proj.bias"] = (h,)
            out[p + "self_attn.k_proj.bias"] = (kv,)
            out[p + "self_attn.v_proj.bias"] = (kv,)
        out[p + "self_attn.o_proj.weight"] = (h, h)
        out[p + "post_attention_layernorm.weight"] = (h,)
        out[p + "mlp.gate_proj.weight"] = (inter, h)
        out[p + "mlp.up_proj.weight"] = (inter, h)
        out[p + "mlp.down_proj.weight"] = (h, inter)
    out["model.norm.weight"] = (h,)
    if not config.get("tie_word_embeddings"):
        out["lm_head.weight"] = (vocab, h)
    return out


def parameter_count(config: dict[str, Any]) -> int:
    """Parameters of the checkpoint (elements of every tensor in its files)."""
    total = 0
    for shape in tensor_shapes(config).values():
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


def write_sparse_safetensors(path: Path, tensors: dict[str, tuple[int, ...]], dtype: str) -> int:
    """Write a safetensors header for ``tensors`` and extend the file to its full size without data.

    Returns the data bytes. ``truncate`` past the end makes a hole: the size is right, no
    blocks are used, and any read of the data gives zeros.
    """
    code, itemsize = _ST[dtype]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors.items():
        n = itemsize
        for s in shape:
            n *= s
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)
    return offset


def _split(names: list[str], shapes: dict[str, tuple[int, ...]], shards: int) -> list[list[str]]:
    """Tensors into ``shards`` consecutive runs of about equal bytes (as HF's max_shard_size does)."""
    sizes = []
    for n in names:
        k = 1
        for s in shapes[n]:
            k *= s
        sizes.append(k)
    target = sum(sizes) / shards
    out: list[list[str]] = [[]]
    acc = 0
    for name, size in zip(names, sizes):
        if acc >= target * len(out) and len(out) < shards:
            out.append([])
        out[-1].append(name)
        acc += size
    return out


def _tokenizer_files(folder: Path, family: str, vocab_size: int) -> None:
    """Small stand-ins for the tokenizer files: the same bytes for every model of a family.

    evomerge compares the token -> id maps of the models it merges (``sources.tokenizer_vocab``);
    only equality matters, so a few tokens per family stand for the real vocabulary.
    """
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, f"<family:{family}>": 3, "<last>": vocab_size - 1}
    tok = {"version": "1.0", "added_tokens": [], "model": {"type": "BPE", "vocab": vocab, "merges": []}}
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                              "bos_token": "<s>", "eos_token": "</s>"}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


def write_model(cache: Path, model: FakeModel) -> Path:
    """One repo in hub cache layout; returns its snapshot folder."""
    repo = cache / ("models--" + model.repo_id.replace("/", "--"))
    snap = repo / "snapshots" / model.revision
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(model.revision)
    (snap / "config.json").write_text(json.dumps(model.config, indent=2))
    (snap / "generation_config.json").write_text(json.dumps({"bos_token_id": model.config.get("bos_token_id")}))
    _tokenizer_files(snap, model.tokenizer, model.config["vocab_size"])
    shapes = {**tensor_shapes(model.config), **model.extra_tensors}
    dtype = model.config.get("torch_dtype", "bfloat16")
    if model.shards == 1:
        write_sparse_safetensors(snap / "model.safetensors", shapes, dtype)
        return snap
    weight_map: dict[str, str] = {}
    total = 0
    runs = _split(list(shapes), shapes, model.shards)
    for i, run in enumerate(runs, start=1):
        file = f"model-{i:05d}-of-{len(runs):05d}.safetensors"
        total += write_sparse_safetensors(snap / file, {n: shapes[n] for n in run}, dtype)
        weight_map.update({n: file for n in run})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (snap / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return snap


def build_hub_cache(root: Path, models: list[FakeModel] | None = None) -> Path:
    """A hub cache folder under ``root`` holding ``models`` (default: every model the ready configs use)."""
    cache = root / "hub"
    cache.mkdir(parents=True, exist_ok=True)
    for m in models if models is not None else ALL_MODELS:
        write_model(cache, m)
    return cache


def use_hub_cache(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    """Point huggingface_hub (read at call time by evomerge) at ``cache``, offline."""
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def allocated_bytes(folder: Path) -> int:
    """Disk blocks really used under ``folder`` (sparse files count only their header)."""
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file())
