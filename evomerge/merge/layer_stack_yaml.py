"""A layer stack as a mergekit ``passthrough`` config, and back.

:func:`stack_to_mergekit_yaml` / :func:`stack_from_mergekit_yaml`: a
:class:`~evomerge.merge.layer_stack.LayerStack` as a mergekit ``passthrough`` config with
``slices`` and ``scale`` filters on ``o_proj`` and ``down_proj``; zero-length slices
(``layer_range: [k, k]``) first and last name the model the embeddings and the final norm /
head come from (mergekit 0.1.5 takes the "pre weights" from ``slices[0]`` and the "post
weights" from ``slices[-1]`` and plans no layer for an empty range).
:func:`is_layer_stack_yaml` / :func:`has_scale_parameters` tell such a config from a
parameter-space one (:mod:`evomerge.merge.recipe_files`).

The YAML asks mergekit for ``dtype: float32`` (inputs cast to float32, ``tensor * scale``,
output cast to ``out_dtype``): the numbers :func:`~evomerge.merge.layer_stack.write_stack` writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from evomerge.errors import RecipeError
from evomerge.merge.layer_stack import FOLD_TENSOR, LayerStack

__all__ = ["has_scale_parameters", "is_layer_stack_yaml", "stack_from_mergekit_yaml", "stack_to_mergekit_yaml"]


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
    from evomerge.merge.mergekit_import import eval_setting

    for scope in scopes:
        if isinstance(scope, dict) and "scale" in scope:
            v = eval_setting(scope["scale"], tensor, t, f"{where}.scale")
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
    from evomerge.merge.mergekit_import import source_ref

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
        parsed.append((source_ref(src["model"], w, bd), lr[0], lr[1], scopes, where))

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
        base = source_ref(doc["base_model"], "base_model", bd)
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
            tok = source_ref(tok, "tokenizer_source", bd)
    return LayerStack.from_dict({"models": list(dict.fromkeys(models)), "embed_from": embed_ref, "layers": layers,
                                 "dtype": str(dtype), "tokenizer_source": tok})
