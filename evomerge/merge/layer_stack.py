"""Layer stacks: a data-flow merge written as an ordinary Hugging Face model.

A :class:`~evomerge.merge.path_recipe.PathRecipe` says which decoder layer of which model
comes next and by how much the residual stream entering it is scaled. For pre-norm
decoders whose norms are scale-invariant (RMSNorm / LayerNorm before each sublayer and
before the head), a scale on the residual stream is the same as dividing the sublayer
outputs of that layer and every later one by the running product of scales: fold that
factor into the layer's ``o_proj`` and ``down_proj`` (weights and biases) and the path is a
plain model of the same architecture, loadable with ``AutoModelForCausalLM`` and no custom
code. A :class:`LayerStack` is that plain model's description: per output position, the
source layer and the factor on its output projections (``out_scale``).

Here:

- :func:`stack_from_path`: PathRecipe -> LayerStack (``out_scale`` = ``fold_factors()``);
- :func:`write_stack`: LayerStack -> a HF folder (checked before the folder is touched,
  streamed shard by shard, files written atomically, sharded as ``stream_merge`` does).

The same stack as a mergekit ``passthrough`` config is :mod:`evomerge.merge.layer_stack_yaml`.

Numbers: a folded tensor is ``source.to(float32) * out_scale`` (float64 sources stay
float64), then cast to the output dtype; unscaled tensors are cast directly. That is what
mergekit's passthrough does with ``dtype: float32`` (inputs cast to float32, ``tensor *
scale``, output cast to ``out_dtype``), which is what the stack's YAML asks for.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from evomerge.errors import ConfigError, RecipeError, SourceError
from evomerge.fileio import fsync_dir
from evomerge.merge.dtypes import FLOATS, output_dtype
from evomerge.merge.path_recipe import PathRecipe, PositiveScale
from evomerge.merge.recipe import RecipeModel

if TYPE_CHECKING:
    import torch

    from evomerge.merge.sources import ModelSource

__all__ = ["FOLD_TENSOR", "LayerStack", "SCALE_INVARIANT_MODEL_TYPES", "StackLayer", "check_foldable",
           "stack_from_path", "write_stack"]

#: pre-norm decoders whose every norm is scale-invariant and that add each sublayer's
#: output (o_proj / down_proj) straight onto the residual stream
SCALE_INVARIANT_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3")

#: why a known model_type cannot take a folded residual scale
_NOT_FOLDABLE = {
    "gemma2": "adds a norm after each sublayer (post_attention/post_feedforward_layernorm)",
    "gemma3": "adds a norm after each sublayer (post_attention/post_feedforward_layernorm)",
    "gemma3_text": "adds a norm after each sublayer (post_attention/post_feedforward_layernorm)",
    "olmo2": "normalises each sublayer's output (post-norm)",
    "gpt2": "names its projections c_proj (no o_proj/down_proj to fold into)",
    "gpt_neox": "runs attention and MLP in parallel and names its projections dense/dense_4h_to_h",
}

#: a decoder-layer tensor name: prefix (``model.layers.``), index, rest (``self_attn.o_proj.weight``)
_LAYER_NAME = re.compile(
    r"^(?P<prefix>(?:[A-Za-z_]\w*\.)*?(?:layers|layer|h|blocks|block)\.)(?P<idx>\d+)\.(?P<rest>.+)$")
#: the layer tensors that carry the folded factor: the sublayer outputs added to the residual
FOLD_TENSOR = re.compile(r"(?:^|\.)(?:o_proj|down_proj)\.(?:weight|bias)$")


def check_foldable(model_type: str, ref: str) -> None:
    """A one-line RecipeError unless a residual scale can be folded into ``ref``'s o_proj/down_proj."""
    if model_type in SCALE_INVARIANT_MODEL_TYPES:
        return
    why = _NOT_FOLDABLE.get(model_type, "is not known to have only scale-invariant pre-norms")
    raise RecipeError(
        f"model {ref} (model_type {model_type!r}) {why}, so a residual scale cannot be folded into "
        f"o_proj/down_proj; use scale 1.0 everywhere or models of type {', '.join(SCALE_INVARIANT_MODEL_TYPES)}"
    )


# -- the stack ----------------------------------------------------------------------------------
class StackLayer(BaseModel):
    """Output layer: decoder layer ``layer`` of ``model``, its o_proj/down_proj times ``out_scale``."""

    model_config = ConfigDict(extra="forbid")

    model: str
    layer: int = Field(..., ge=0)
    out_scale: PositiveScale = 1.0


class LayerStack(RecipeModel):
    """A plain model assembled from other models' layers (the folded form of a PathRecipe).

    ``models`` is kept in one canonical order, ``embed_from`` first and then the others in
    order of first use, and lists exactly the models the stack uses: that is all a mergekit
    YAML can say, so a stack and its YAML round-trip to an equal stack.
    """

    _what: ClassVar[str] = "layer stack"

    models: list[str] = Field(..., min_length=1)
    embed_from: str
    layers: list[StackLayer] = Field(..., min_length=1)
    dtype: str = "float32"
    tokenizer_source: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "LayerStack":
        if len(set(self.models)) != len(self.models):
            raise ValueError("models lists a model twice; list each model once")
        known = set(self.models)
        if self.embed_from not in known:
            raise ValueError(f"embed_from {self.embed_from!r} is not one of the stack's models "
                             f"({', '.join(self.models)})")
        for i, layer in enumerate(self.layers):
            if layer.model not in known:
                raise ValueError(f"layers[{i}] names model {layer.model!r}, which is not one of the stack's models "
                                 f"({', '.join(self.models)})")
        order = [self.embed_from]
        for layer in self.layers:
            if layer.model not in order:
                order.append(layer.model)
        unused = [m for m in self.models if m not in order]
        if unused:
            raise ValueError(f"model {unused[0]!r} is listed but gives no layer and no embeddings; remove it")
        self.models = order
        return self

    def describe(self) -> str:
        index = {m: chr(ord("A") + i) if i < 26 else f"M{i}" for i, m in enumerate(self.models)}
        parts = [f"{index[x.model]}{x.layer}" + ("" if x.out_scale == 1.0 else f"*{x.out_scale:.2f}")
                 for x in self.layers]
        return f"{len(self.layers)} layers: " + " ".join(parts)


def stack_from_path(recipe: PathRecipe) -> LayerStack:
    """The plain model a path recipe stands for: each step's scale folded into ``out_scale``."""
    factors = recipe.fold_factors()
    return LayerStack.from_dict({
        "models": recipe.models_used(),
        "embed_from": recipe.embed_from,
        "layers": [{"model": s.model, "layer": s.layer, "out_scale": f} for s, f in zip(recipe.path, factors)],
        "dtype": recipe.dtype,
        "tokenizer_source": recipe.tokenizer_source,
    })


# -- writing a folder -------------------------------------------------------------------------
class _Layers:
    """One model's decoder-layer tensors: prefix, and per layer index ``{rest: full name}``."""

    def __init__(self, src: "ModelSource") -> None:
        self.src = src
        prefixes: dict[str, int] = {}
        matches = []
        for name in src.tensor_names():
            m = _LAYER_NAME.match(name)
            if m:
                prefixes[m.group("prefix")] = prefixes.get(m.group("prefix"), 0) + 1
                matches.append((name, m))
        if not prefixes:
            raise SourceError(f"model {src.ref}: no decoder-layer tensors (names like model.layers.0.*) found; "
                              f"a layer stack needs a decoder-only model")
        self.prefix = max(prefixes, key=lambda p: prefixes[p])
        self.by_layer: dict[int, dict[str, str]] = {}
        for name, m in matches:
            if m.group("prefix") == self.prefix:
                self.by_layer.setdefault(int(m.group("idx")), {})[m.group("rest")] = name
        self.other = [n for n in src.tensor_names() if not (_LAYER_NAME.match(n) and
                                                            _LAYER_NAME.match(n).group("prefix") == self.prefix)]
        self.count = max(self.by_layer) + 1
        cfg_n = src.config.get("num_hidden_layers")
        if isinstance(cfg_n, int) and cfg_n != self.count:
            raise SourceError(f"model {src.ref}: config.json says {cfg_n} layers but the weights hold {self.count}; "
                              f"re-download or fix the model")

    def signature(self, layer: int) -> dict[str, tuple[tuple[int, ...], bool]]:
        return {rest: (self.src.shape(n), self.src.dtype(n) in FLOATS) for rest, n in self.by_layer[layer].items()}


def _other_rank(name: str) -> int:
    """Non-layer tensors in reading order: embeddings (and anything else) first, final norm, head."""
    if name.startswith("lm_head.") or name.startswith("embed_out."):
        return 2
    if re.search(r"(?:^|\.)(?:norm|ln_f|final_layer_norm|final_norm)\.", name):
        return 1
    return 0


#: config fields that list layer indices (not one entry per layer)
_INDEX_LIST_FIELDS = ("mlp_only_layers",)


def _stack_config(stack: LayerStack, srcs: dict[str, "ModelSource"], layers: dict[str, _Layers],
                  out_name: str) -> dict[str, Any]:
    """embed_from's config with the layer count and per-layer fields rebuilt per output position."""
    ref = srcs[stack.embed_from]
    config = json.loads(json.dumps(ref.config))
    n_ref = layers[stack.embed_from].count
    for key in _INDEX_LIST_FIELDS:  # lists of layer indices: the output positions whose layer is listed
        if isinstance(config.get(key), list):
            config[key] = [p for p, x in enumerate(stack.layers) if x.layer in (srcs[x.model].config.get(key) or [])]
    # per-layer lists (layer_types, no_rope_layers, ...): one entry per output position, taken
    # from the source layer's own config; other lists (eos_token_id, architectures) are left alone
    per_layer = [k for k, v in config.items() if isinstance(v, list) and k not in _INDEX_LIST_FIELDS
                 and "layer" in k and (len(v) == n_ref or k == "layer_types")]
    for key in per_layer:
        values = []
        for i, x in enumerate(stack.layers):
            own = srcs[x.model].config.get(key)
            if not (isinstance(own, list) and len(own) == layers[x.model].count):
                raise RecipeError(f"config field {key!r} of model {x.model} is not a per-layer list like "
                                  f"{stack.embed_from}'s; cannot rebuild it for layer {i}")
            values.append(own[x.layer])
        config[key] = values
    config["num_hidden_layers"] = len(stack.layers)
    config["dtype"] = out_name
    if "torch_dtype" in config:
        config["torch_dtype"] = out_name
    return config


def _plan(stack: LayerStack, srcs: dict[str, "ModelSource"], out_name: str) -> tuple[
        list[tuple[str, str, str, float]], dict[str, Any]]:
    """Check the stack against its models; (output name, model, source name, factor) per tensor and config."""
    types = {m: s.model_type for m, s in srcs.items()}
    emb = srcs[stack.embed_from]
    for m, t in types.items():
        if t != emb.model_type:
            raise SourceError(f"models {stack.embed_from} and {m} have different architectures (model_type "
                              f"{emb.model_type!r} vs {t!r}); stack layers of one architecture only")
    if any(x.out_scale != 1.0 for x in stack.layers):
        check_foldable(emb.model_type, stack.embed_from)
    layers = {m: _Layers(s) for m, s in srcs.items()}
    ref_layers = layers[stack.embed_from]
    want = ref_layers.signature(0)
    for i, x in enumerate(stack.layers):
        lay = layers[x.model]
        if lay.prefix != ref_layers.prefix:
            raise SourceError(f"models {stack.embed_from} and {x.model} name their layers differently "
                              f"({ref_layers.prefix}N. vs {lay.prefix}N.); stack layers of one architecture only")
        if x.layer not in lay.by_layer:
            raise RecipeError(f"layers[{i}] asks for layer {x.layer} of model {x.model}, which has {lay.count} "
                              f"layers (0-{lay.count - 1})")
        got = lay.signature(x.layer)
        if got != want:
            rest = next(r for r in sorted(set(got) | set(want)) if got.get(r) != want.get(r))
            raise SourceError(f"layers[{i}]: layer {x.layer} of model {x.model} differs from the layers of "
                              f"{stack.embed_from} in tensor {rest!r} ({got.get(rest, ('missing',))[0]} vs "
                              f"{want.get(rest, ('missing',))[0]}); stack layers of one architecture and size only")
        if x.out_scale != 1.0 and not any(FOLD_TENSOR.search(r) for r in got):
            raise RecipeError(f"layer {x.layer} of model {x.model} has no o_proj/down_proj tensor to fold a scale into")
    plan: list[tuple[str, str, str, float]] = []
    for n in sorted(ref_layers.other, key=lambda n: (_other_rank(n), n)):
        if _other_rank(n) == 0:
            plan.append((n, stack.embed_from, n, 1.0))
    for p, x in enumerate(stack.layers):
        for rest, name in sorted(layers[x.model].by_layer[x.layer].items()):
            plan.append((f"{ref_layers.prefix}{p}.{rest}", x.model, name,
                         x.out_scale if FOLD_TENSOR.search(rest) else 1.0))
    for n in sorted(ref_layers.other, key=lambda n: (_other_rank(n), n)):
        if _other_rank(n) > 0:
            plan.append((n, stack.embed_from, n, 1.0))
    return plan, _stack_config(stack, srcs, layers, out_name)


def _stack_tensor(src: "ModelSource", name: str, factor: float, out_dtype: "torch.dtype") -> "torch.Tensor":
    """One output tensor: copied, or (folded) ``t.to(float32) * factor`` cast to the output dtype."""
    import torch

    t = src.get_tensor(name)
    if not t.is_floating_point():
        return t
    if factor != 1.0:
        t = (t if t.dtype == torch.float64 else t.to(torch.float32)) * factor
    return t.to(out_dtype)


def write_stack(stack: LayerStack, out_dir: str | Path, *, max_shard_size: str | int = "2GB",
                dtype: str | None = None, allow_pickle: bool = False, revision: str | None = None) -> Path:
    """Write ``stack`` as a Hugging Face folder; everything is checked before ``out_dir`` is touched."""
    from evomerge.merge.materialise import (
        TOKENIZER_FILES,
        _check_out_dir,
        _copy_file,
        _write_json,
        parse_size,
        write_shards,
    )
    from evomerge.merge.sources import tokenizer_folder, resolve_source

    out = Path(out_dir)
    limit = parse_size(max_shard_size)
    out_name = dtype or stack.dtype
    out_dtype = output_dtype(out_name, ConfigError)
    srcs = {m: resolve_source(m, allow_pickle=allow_pickle, revision=revision) for m in stack.models}
    try:
        plan, config = _plan(stack, srcs, out_name)
        tok = stack.tokenizer_source
        tok_path = srcs[stack.embed_from].path if tok in (None, "base") else tokenizer_folder(
            tok, list(srcs.values()), revision)
        _check_out_dir(out, SimpleNamespace(models=list(srcs.values()), tokenizer_path=tok_path))

        entries = [(out_n, out_name if srcs[m].dtype(n) in FLOATS else srcs[m].dtype(n), srcs[m].shape(n))
                   for out_n, m, n, _ in plan]
        by_out = {p[0]: p for p in plan}

        def tensor_for(n: str) -> "torch.Tensor":
            _, m, src_name, factor = by_out[n]
            return _stack_tensor(srcs[m], src_name, factor, out_dtype)

        write_shards(out, entries, limit, tensor_for)
        _write_json(out / "config.json", config)
        emb = srcs[stack.embed_from]
        if (emb.path / "generation_config.json").is_file():
            _copy_file(emb.path / "generation_config.json", out / "generation_config.json")
        for tf in TOKENIZER_FILES:
            if (tok_path / tf).is_file():
                _copy_file(tok_path / tf, out / tf)
        fsync_dir(out)
        return out
    finally:
        for s in srcs.values():
            s.close()

