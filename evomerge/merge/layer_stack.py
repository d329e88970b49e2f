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
  streamed shard by shard, files written atomically, sharded as ``stream_merge`` does);
- :func:`stack_to_mergekit_yaml` / :func:`stack_from_mergekit_yaml`: the same stack as a
  mergekit ``passthrough`` config with ``slices`` and ``scale`` filters on ``o_proj`` and
  ``down_proj``; zero-length slices (``layer_range: [k, k]``) first and last name the model
  the embeddings and the final norm / head come from (mergekit 0.1.5 takes the "pre
  weights" from ``slices[0]`` and the "post weights" from ``slices[-1]`` and plans no
  layer for an empty range).

Numbers: a folded tensor is ``source.to(float32) * out_scale`` (float64 sources stay
float64), then cast to the output dtype; unscaled tensors are cast directly. That is what
mergekit's passthrough does with ``dtype: float32`` (inputs cast to float32, ``tensor *
scale``, output cast to ``out_dtype``), which is what the YAML written here asks for.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Mapping

from pydantic import BaseModel, ConfigDict, Field, model_validator

from evomerge.errors import ConfigError, RecipeError, SourceError
from evomerge.fileio import atomic_file, fsync_dir
from evomerge.merge.dtypes import FLOATS, ITEMSIZE, OUTPUT_DTYPES, ST_CODES, torch_dtype
from evomerge.merge.path_recipe import PathRecipe

if TYPE_CHECKING:
    import torch

    from evomerge.merge.sources import ModelSource

__all__ = ["FOLD_TENSOR", "LayerStack", "SCALE_INVARIANT_MODEL_TYPES", "StackLayer", "check_foldable",
           "has_scale_parameters", "is_layer_stack_yaml", "stack_from_mergekit_yaml", "stack_from_path",
           "stack_to_mergekit_yaml",
           "write_stack"]

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
#: the mergekit filters that select them (substring match on the tensor name)
_FOLD_FILTERS = ("o_proj", "down_proj")


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
    out_scale: float = 1.0

    @model_validator(mode="after")
    def _positive(self) -> "StackLayer":
        if not (math.isfinite(self.out_scale) and self.out_scale > 0):
            raise ValueError(f"out_scale must be a finite number > 0 (got {self.out_scale})")
        return self


class LayerStack(BaseModel):
    """A plain model assembled from other models' layers (the folded form of a PathRecipe).

    ``models`` is kept in one canonical order, ``embed_from`` first and then the others in
    order of first use, and lists exactly the models the stack uses: that is all a mergekit
    YAML can say, so a stack and its YAML round-trip to an equal stack.
    """

    model_config = ConfigDict(extra="forbid")

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

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LayerStack":
        try:
            return cls.model_validate(dict(data))
        except Exception as err:  # pydantic.ValidationError -> one line
            errors = getattr(err, "errors", None)
            if callable(errors):
                first = errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                raise RecipeError(f"layer stack field {where or '<top>'}: "
                                  f"{first['msg'].removeprefix('Value error, ')}") from None
            raise RecipeError(f"invalid layer stack: {err}") from None


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
    import torch

    from evomerge.merge.materialise import (
        SAFE_INDEX,
        TOKENIZER_FILES,
        _WEIGHT_FILE,
        _check_out_dir,
        _copy_file,
        _plan_shards,
        _tensor_bytes,
        _write_json,
        parse_size,
    )
    from evomerge.merge.sources import _tokenizer_folder, resolve_source

    out = Path(out_dir)
    limit = parse_size(max_shard_size)
    out_name = dtype or stack.dtype
    if out_name not in OUTPUT_DTYPES:
        raise ConfigError(f"output dtype {out_name!r} is not supported; use one of {', '.join(OUTPUT_DTYPES)}")
    out_dtype = torch_dtype(out_name)
    srcs = {m: resolve_source(m, allow_pickle=allow_pickle, revision=revision) for m in stack.models}
    try:
        plan, config = _plan(stack, srcs, out_name)
        tok = stack.tokenizer_source
        tok_path = srcs[stack.embed_from].path if tok in (None, "base") else _tokenizer_folder(
            tok, list(srcs.values()), revision)
        _check_out_dir(out, SimpleNamespace(models=list(srcs.values()), tokenizer_path=tok_path))

        dtypes, sizes = {}, []
        for out_n, m, n, _ in plan:
            src_dtype = srcs[m].dtype(n)
            dtypes[out_n] = out_name if src_dtype in FLOATS else src_dtype
            sizes.append((out_n, math.prod(srcs[m].shape(n)) * ITEMSIZE[dtypes[out_n]]))
        size_of = dict(sizes)
        shards = _plan_shards(sizes, limit)
        files = (["model.safetensors"] if len(shards) == 1
                 else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
        by_out = {p[0]: p for p in plan}

        out.mkdir(parents=True, exist_ok=True)
        for stale in out.iterdir():  # an earlier merge's weights go first (see stream_merge)
            if _WEIGHT_FILE.match(stale.name):
                stale.unlink()
        fsync_dir(out)
        weight_map: dict[str, str] = {}
        with torch.no_grad():
            for file, shard in zip(files, shards):
                header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
                offset = 0
                for n in shard:
                    _, m, src_name, _ = by_out[n]
                    header[n] = {"dtype": ST_CODES[dtypes[n]], "shape": list(srcs[m].shape(src_name)),
                                 "data_offsets": [offset, offset + size_of[n]]}
                    offset += size_of[n]
                    weight_map[n] = file
                hbytes = json.dumps(header, separators=(",", ":")).encode()
                hbytes += b" " * (-len(hbytes) % 8)
                with atomic_file(out / file) as f:
                    f.write(struct.pack("<Q", len(hbytes)))
                    f.write(hbytes)
                    for n in shard:
                        _, m, src_name, factor = by_out[n]
                        data = _tensor_bytes(_stack_tensor(srcs[m], src_name, factor, out_dtype))
                        if data.nbytes != size_of[n]:
                            raise RuntimeError(f"internal error: {n} has {data.nbytes} bytes, planned {size_of[n]}")
                        f.write(data)
        if len(files) > 1:
            _write_json(out / SAFE_INDEX, {"metadata": {"total_size": sum(size_of.values())},
                                           "weight_map": weight_map})
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


# -- mergekit YAML ----------------------------------------------------------------------------
def _yaml_float(x: float) -> str:
    """``repr`` (exact round trip), spelled so YAML 1.1 readers (PyYAML, mergekit) see a float."""
    r = repr(float(x))
    if "e" in r and "." not in r.split("e")[0]:
        mant, exp = r.split("e")
        r = f"{mant}.0e{exp}"
    return r


def _yaml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a YAML double-quoted scalar


def stack_to_mergekit_yaml(stack: LayerStack) -> str:
    """The stack as a mergekit ``passthrough`` config (``slices``, ``scale`` filters on o_proj/down_proj).

    Consecutive layers of one model with contiguous indices and equal ``out_scale`` share a
    slice. A zero-length slice of ``embed_from`` comes first and last: mergekit takes the
    embeddings from ``slices[0]`` and the final norm and head from ``slices[-1]``, and an
    empty ``layer_range`` adds no layer. ``base_model`` is ``embed_from`` so mergekit copies its
    config (and tokenizer). Tensors are computed in float32 and written in the stack's dtype.
    """
    runs: list[list[Any]] = []  # [model, start, end, scale]
    for x in stack.layers:
        last = runs[-1] if runs else None
        if last and last[0] == x.model and last[2] == x.layer and last[3] == x.out_scale:
            last[2] += 1
        else:
            runs.append([x.model, x.layer, x.layer + 1, x.out_scale])
    emb = _yaml_str(stack.embed_from)
    lines = [
        "# evomerge layer stack: a data-flow path with its residual scales folded into o_proj/down_proj.",
        "# The zero-length slices first and last only say where the embeddings and the final norm/head come from.",
        "merge_method: passthrough",
        f"base_model: {emb}",
        "dtype: float32",
        f"out_dtype: {stack.dtype}",
    ]
    if stack.tokenizer_source is not None:
        lines.append(f"tokenizer_source: {_yaml_str(stack.tokenizer_source)}")
    lines.append("slices:")
    lines.append(f"  - sources: [{{model: {emb}, layer_range: [0, 0]}}]")
    for model, start, end, scale in runs:
        lines.append(f"  - sources: [{{model: {_yaml_str(model)}, layer_range: [{start}, {end}]}}]")
        if scale != 1.0:
            v = _yaml_float(scale)
            lines.append(f"    parameters: {{scale: [{{filter: o_proj, value: {v}}}, "
                         f"{{filter: down_proj, value: {v}}}, {{value: 1.0}}]}}")
    n_emb = _num_layers_of(stack.embed_from)
    lines.append(f"  - sources: [{{model: {emb}, layer_range: [{n_emb}, {n_emb}]}}]")
    return "\n".join(lines) + "\n"


def _num_layers_of(ref: str) -> int:
    """The layer count of a local model (0 when unknown: any empty range does the same)."""
    p = Path(ref).expanduser() / "config.json"
    try:
        n = json.loads(p.read_text()).get("num_hidden_layers")
    except (OSError, ValueError, AttributeError):
        return 0
    return n if isinstance(n, int) and n >= 0 else 0


_STACK_TOP_KEYS = {"merge_method", "base_model", "slices", "dtype", "out_dtype", "tokenizer_source", "name",
                   "parameters"}
#: layer tensors (after ``<prefix><i>.``) a scale filter is tried on, to tell what it selects
_REP_LAYER = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
              "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias", "self_attn.qkv_proj.weight",
              "self_attn.q_norm.weight", "self_attn.k_norm.weight", "self_attn.o_proj.weight", "self_attn.o_proj.bias",
              "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.gate_up_proj.weight", "mlp.down_proj.weight",
              "mlp.down_proj.bias", "input_layernorm.weight", "post_attention_layernorm.weight")
_REP_PRE = ("model.embed_tokens.weight",)
_REP_POST = ("model.norm.weight", "lm_head.weight")


def _slices_of(doc: Mapping[str, Any]) -> list[Any] | None:
    s = doc.get("slices")
    return s if isinstance(s, list) and s else None


def is_layer_stack_yaml(doc: Any) -> bool:
    """True for a passthrough config whose slices reorder layers, mix models or have empty ranges.

    A passthrough over one model's layers in order (one slice or contiguous ones) is a
    parameter-space recipe and stays with :mod:`evomerge.merge.mergekit_import`.
    """
    if not isinstance(doc, dict) or str(doc.get("merge_method")) != "passthrough":
        return False
    slices = _slices_of(doc)
    if slices is None:
        return False
    pos, models = 0, set()
    for s in slices:
        srcs = s.get("sources") if isinstance(s, dict) else None
        if not isinstance(srcs, list) or len(srcs) != 1 or not isinstance(srcs[0], dict):
            return False  # not a stack; the importer reports what is wrong
        lr = srcs[0].get("layer_range")
        if not (isinstance(lr, list) and len(lr) == 2 and all(isinstance(v, int) for v in lr)):
            return False
        models.add(json.dumps(srcs[0].get("model"), sort_keys=True, default=str))
        if lr[0] != pos or lr[1] <= lr[0]:
            return True
        pos = lr[1]
    return len(models) > 1


def has_scale_parameters(doc: Any) -> bool:
    """True when a passthrough config sets ``scale`` anywhere (top, slice or source parameters)."""
    if not isinstance(doc, dict):
        return False
    scopes = [doc.get("parameters")]
    for s in _slices_of(doc) or []:
        if isinstance(s, dict):
            scopes.append(s.get("parameters"))
            scopes += [src.get("parameters") for src in s.get("sources") or [] if isinstance(src, dict)]
    return any(isinstance(p, dict) and "scale" in p for p in scopes)


def _scale_at(scopes: list[Any], tensor: str, t: float, where: str) -> float:
    """mergekit's resolution of ``scale`` for one tensor (first scope that sets it; unset = 1)."""
    from evomerge.merge.mergekit_import import _eval_setting

    for scope in scopes:
        if isinstance(scope, dict) and "scale" in scope:
            v = _eval_setting(scope["scale"], tensor, t, f"{where}.scale")
            if v is not None:
                try:
                    f = float(v)
                except (TypeError, ValueError):
                    raise RecipeError(f"mergekit YAML {where}.scale: {v!r} is not a number") from None
                return f
    return 1.0


def stack_from_mergekit_yaml(doc: Mapping[str, Any], base_dir: Path | None = None) -> LayerStack:
    """The LayerStack a mergekit passthrough config with slices stands for (what
    :func:`stack_to_mergekit_yaml` writes, and any config of that shape).

    Each slice takes one model's layers; ``scale`` may be set (slice, source or top-level
    parameters; filters and gradients resolved as mergekit does) only on o_proj and
    down_proj, equally on both. Zero-length slices may come first and last only, naming the
    model of the embeddings and of the final norm/head, which must be one model. Model paths
    are relative to ``base_dir`` (the YAML's folder) when they exist there."""
    from evomerge.merge.mergekit_import import _ref

    if not isinstance(doc, Mapping):
        raise RecipeError("mergekit YAML: the document must be a mapping")
    if str(doc.get("merge_method")) != "passthrough":
        raise RecipeError(f"mergekit YAML: a layer stack is a passthrough merge, not {doc.get('merge_method')!r}")
    unknown = sorted(set(doc) - _STACK_TOP_KEYS)
    if unknown:
        raise RecipeError(f"mergekit YAML: {unknown[0]!r} is not supported in a layer stack (passthrough slices); "
                          f"remove it")
    raw = _slices_of(doc)
    if raw is None:
        raise RecipeError("mergekit YAML slices: expected a non-empty list of slices")
    top = doc.get("parameters")
    if top is not None and not isinstance(top, dict):
        raise RecipeError("mergekit YAML parameters: expected a mapping")
    bd = Path(base_dir) if base_dir is not None else None
    parsed = []  # (ref, start, end, slice scopes)
    for si, s in enumerate(raw):
        where = f"slices[{si}]"
        if not isinstance(s, dict) or not isinstance(s.get("sources"), list):
            raise RecipeError(f"mergekit YAML {where}: a slice needs 'sources'")
        extra = set(s) - {"sources", "parameters"}
        if extra:
            raise RecipeError(f"mergekit YAML {where}: {sorted(extra)[0]!r} is not supported in a layer stack; "
                              f"remove it")
        if len(s["sources"]) != 1:
            raise RecipeError(f"mergekit YAML {where}: {len(s['sources'])} sources; a layer stack takes each slice "
                              f"from exactly one model")
        src = s["sources"][0]
        w = f"{where}.sources[0]"
        if not isinstance(src, dict) or "model" not in src or "layer_range" not in src or set(src) - {
                "model", "layer_range", "parameters"}:
            raise RecipeError(f"mergekit YAML {w}: needs exactly 'model' and 'layer_range' (and 'parameters')")
        lr = src["layer_range"]
        if not (isinstance(lr, list) and len(lr) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                               for v in lr) and 0 <= lr[0] <= lr[1]):
            raise RecipeError(f"mergekit YAML {w}.layer_range: expected [start, end] with 0 <= start <= end, "
                              f"got {lr!r}")
        scopes = [src.get("parameters"), s.get("parameters"), top]
        for k, scope in zip(("sources[0].parameters", "parameters", "<top>.parameters"), scopes):
            if scope is None:
                continue
            if not isinstance(scope, dict):
                raise RecipeError(f"mergekit YAML {where}.{k}: expected a mapping")
            if set(scope) - {"scale"}:
                raise RecipeError(f"mergekit YAML {where}.{k}: {sorted(set(scope) - {'scale'})[0]!r} is not a "
                                  f"passthrough parameter a layer stack understands; only scale is")
        parsed.append((_ref(src["model"], w, bd), lr[0], lr[1], scopes, where))

    for i, (_, start, end, _, where) in enumerate(parsed):
        if start == end and 0 < i < len(parsed) - 1:
            raise RecipeError(f"mergekit YAML {where}: an empty layer_range is only understood first or last "
                              f"(naming where the embeddings or the head come from); remove it")
    embed_ref, head_ref = parsed[0][0], parsed[-1][0]
    if embed_ref != head_ref:
        raise RecipeError(f"mergekit YAML: the embeddings come from {embed_ref} (slices[0]) but the final norm and "
                          f"head from {head_ref} (slices[-1]); a layer stack takes both from one model: add a "
                          f"zero-length slice of it first or last")
    if doc.get("base_model") is not None:
        base = _ref(doc["base_model"], "base_model", bd)
        if base != embed_ref:
            raise RecipeError(f"mergekit YAML base_model {base} is not the model of the embeddings and head "
                              f"({embed_ref}); mergekit would copy its config: make them the same model")
    for tensor, (_, _, _, scopes, where) in [(n, parsed[0]) for n in _REP_PRE] + [(n, parsed[-1]) for n in _REP_POST]:
        if _scale_at(scopes, tensor, 0.0, where) != 1.0:
            raise RecipeError(f"mergekit YAML {where}: scale on {tensor} cannot be expressed; a layer stack scales "
                              f"only o_proj and down_proj")

    layers = []
    pos = 0
    for ref, start, end, scopes, where in parsed:
        n = end - start
        for k in range(n):
            t = k / (n - 1) if n > 1 else 1.0
            fold, other = set(), set()
            for rest in _REP_LAYER:
                v = _scale_at(scopes, f"model.layers.{pos}.{rest}", t, where)
                (fold if FOLD_TENSOR.search(rest) else other).add(v)
            if other - {1.0}:
                raise RecipeError(f"mergekit YAML {where}: scale {sorted(other - {1.0})[0]!r} reaches layer tensors "
                                  f"other than o_proj/down_proj; a layer stack scales only those (filter: o_proj, "
                                  f"filter: down_proj, then value: 1.0)")
            if len(fold) != 1:
                raise RecipeError(f"mergekit YAML {where}: o_proj and down_proj get different scales {sorted(fold)}; "
                                  f"a layer stack scales both by one factor")
            layers.append({"model": ref, "layer": start + k, "out_scale": fold.pop()})
            pos += 1
    if not layers:
        raise RecipeError("mergekit YAML: the slices hold no layer")
    models = [embed_ref] + [x["model"] for x in layers]
    dtype = doc.get("out_dtype") or doc.get("dtype") or "float32"
    tok = doc.get("tokenizer_source")
    if tok is not None:
        if tok == "base":
            tok = embed_ref
        elif tok == "union" or not isinstance(tok, str):
            raise RecipeError(f"mergekit YAML tokenizer_source: {tok!r} is not supported; name one model's tokenizer")
        else:
            tok = _ref(tok, "tokenizer_source", bd)
    return LayerStack.from_dict({"models": list(dict.fromkeys(models)), "embed_from": embed_ref, "layers": layers,
                                 "dtype": str(dtype), "tokenizer_source": tok})
