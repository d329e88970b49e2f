"""MergeRecipe <-> mergekit YAML, with mergekit computing exactly the same parameters.

Why this module exists: users must be able to reproduce (and publish) an evomerge merge with
mergekit, and to start a search from a hand-written mergekit config. Both directions follow
mergekit 0.1.5's own rules for resolving a parameter of one tensor:

* scopes, highest precedence first: the model's entry in the slice (per-input parameters only),
  the slice's ``parameters``, the top-level ``parameters``; the first scope that yields a value
  wins;
* a setting is a scalar, a *gradient* (list of numbers, linearly interpolated over the layers
  of a slice with ``t = idx / (n - 1)``; embeddings / final norm / lm_head are planned with
  ``t = 0``), or a list of ``{filter, value}`` entries where the FIRST entry whose filter is a
  substring of the tensor name (or that has no filter) wins.

Export never uses gradients (interpolating would round): every per-group value becomes one
``{filter: "layers.3.self_attn.", value: x}`` entry, most specific first, ending with an
unfiltered default. Filters are substrings that match exactly the tensors evomerge puts in that
group (see ``_LayoutNames``). Parameters that are constant everywhere are written as scalars.

A recipe that uses several methods cannot be one mergekit pass (``merge_method`` is global).
We then emit a *mergekit-multi* document set: one named full-model merge per method
(``evomerge_<method>``), and a final unnamed ``linear`` merge whose per-group weights are exactly
1 for the intermediate holding that group's method and 0 for the others. In float32
``1*a + 0*b`` and ``/ 1`` are exact, so the result is still identical per tensor.
Run it with ``mergekit-multi config.yaml --intermediate-dir DIR --out-path OUT``.

Import simulates mergekit's resolution on representative tensor names of every evomerge group;
a construct that splits one evomerge group (say ``filter: q_proj``), reorders layers (slices
that are not the identity), or is otherwise not a per-group merge raises a one-line RecipeError.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from evomerge.errors import RecipeError
from evomerge.merge.groups import LAYOUTS_BY_MODEL_TYPE, Layout
from evomerge.merge.recipe import DEFAULT_GROUP, GroupRecipe, MergeRecipe

__all__ = [
    "MERGEKIT_METHODS",
    "MethodSpec",
    "to_mergekit_yaml",
    "from_mergekit_yaml",
    "resolved_group",
    "group_keys",
]

_REQUIRED = object()  # a parameter mergekit insists on (no default)


# --------------------------------------------------------------------------------------------
# What mergekit 0.1.5 knows about each method (merge_methods/registry.py & friends).
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MethodSpec:
    """mergekit's parameters of one method, with mergekit's defaults."""

    name: str
    per_input: Mapping[str, Any]  # per-model parameters -> default (or _REQUIRED)
    shared: Mapping[str, Any]  # method-level parameters -> default (or _REQUIRED)
    uses_base: bool


def _gta(name: str, normalize: bool, rescale: bool, extra: Mapping[str, Any] = {}) -> MethodSpec:
    per_input = {"weight": _REQUIRED, "density": 1.0, **extra}
    shared = {"normalize": normalize, "rescale": rescale, "lambda": 1.0}
    return MethodSpec(name, per_input, shared, True)


MERGEKIT_METHODS: dict[str, MethodSpec] = {
    "linear": MethodSpec("linear", {"weight": _REQUIRED}, {"normalize": True}, False),
    "task_arithmetic": _gta("task_arithmetic", False, False),
    "ties": _gta("ties", True, False),
    "dare_linear": _gta("dare_linear", False, True),
    "dare_ties": _gta("dare_ties", False, True),
    "breadcrumbs": _gta("breadcrumbs", False, False, {"gamma": 0.01}),
    "breadcrumbs_ties": _gta("breadcrumbs_ties", False, False, {"gamma": 0.01}),
    "della": _gta("della", True, True, {"epsilon": 0.15}),
    "della_linear": _gta("della_linear", False, True, {"epsilon": 0.15}),
    "slerp": MethodSpec("slerp", {}, {"t": _REQUIRED}, True),
    "model_stock": MethodSpec("model_stock", {}, {"filter_wise": False}, True),
}
_BOOL_PARAMS = {"normalize", "rescale", "filter_wise", "int8_mask"}
#: accepted on import and dropped: they do not change the merged numbers
_IGNORED_SHARED = {"int8_mask"}


def _spec(method: str, where: str) -> MethodSpec:
    spec = MERGEKIT_METHODS.get(method)
    if spec is None:
        raise RecipeError(
            f"{where}: merge method {method!r} has no mergekit equivalent here; "
            f"use one of {', '.join(MERGEKIT_METHODS)}"
        )
    return spec


def _evomerge_defaults(method: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(per-source, method-level) defaults evomerge fills in, falling back to mergekit's."""
    spec = MERGEKIT_METHODS[method]
    per_input = dict(spec.per_input)
    shared = dict(spec.shared)
    try:  # methods.py owns evomerge's defaults; they are meant to equal mergekit's
        from evomerge.merge.methods import get_method

        m = get_method(method)
        per_input.update({k: v for k, v in dict(m.source_params).items() if k in per_input})
        shared.update({k: v for k, v in dict(m.params).items() if k in shared})
    except Exception:  # noqa: BLE001 - methods.py absent or method unknown there
        if per_input.get("weight") is _REQUIRED:
            per_input["weight"] = 1.0
    return per_input, shared


# --------------------------------------------------------------------------------------------
# Tensor names per layout: filters (export) and representative names (import).
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _LayoutNames:
    layer_prefix: str  # "{i}" is the layer index; a substring of every tensor of that layer
    part_prefixes: Mapping[str, tuple[str, ...]]  # part -> name components after the layer prefix
    embed: tuple[str, ...]  # filters for the embedding group
    final_norm: tuple[str, ...]
    lm_head: tuple[str, ...]
    # representative mergekit names (for import): layer template with {i}, and the other groups
    rep_layer: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    rep_embed: tuple[str, ...] = ()
    rep_final_norm: tuple[str, ...] = ()
    rep_lm_head: tuple[str, ...] = ()

    def layer_filter(self, i: int) -> str:
        return self.layer_prefix.format(i=i)

    def part_filters(self, i: int, part: str) -> list[str]:
        return [self.layer_filter(i) + p for p in self.part_prefixes[part]]

    def group_filters(self, key: str) -> list[str]:
        kind, layer, part = _parse_key(key)
        if kind == "layer":
            return self.part_filters(layer, part) if part else [self.layer_filter(layer)]
        return list(getattr(self, kind))

    def representatives(self, key: str) -> list[str]:
        kind, layer, part = _parse_key(key)
        if kind == "layer":
            assert part is not None
            return [n.format(i=layer) for n in self.rep_layer[part]]
        return list(getattr(self, "rep_" + kind))


_LLAMA_NAMES = _LayoutNames(
    layer_prefix="layers.{i}.",
    part_prefixes={
        "attn": ("self_attn.",),
        "mlp": ("mlp.", "block_sparse_moe."),
        "norm": (
            "input_layernorm.",
            "post_attention_layernorm.",
            "pre_feedforward_layernorm.",
            "post_feedforward_layernorm.",
        ),
    },
    embed=("embed_tokens.",),
    final_norm=("model.norm.", "language_model.norm."),
    lm_head=("lm_head.",),
    rep_layer={
        "attn": tuple(f"model.layers.{{i}}.self_attn.{p}_proj.weight" for p in "qkvo"),
        "mlp": tuple(f"model.layers.{{i}}.mlp.{p}_proj.weight" for p in ("up", "gate", "down")),
        "norm": ("model.layers.{i}.input_layernorm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    },
    rep_embed=("model.embed_tokens.weight",),
    rep_final_norm=("model.norm.weight",),
    rep_lm_head=("lm_head.weight",),
)
_GPT2_NAMES = _LayoutNames(
    layer_prefix="h.{i}.",
    part_prefixes={"attn": ("attn.",), "mlp": ("mlp.",), "norm": ("ln_1.", "ln_2.")},
    embed=("wte.", "wpe."),
    final_norm=("ln_f.",),
    lm_head=("lm_head.",),
    rep_layer={
        "attn": ("transformer.h.{i}.attn.c_attn.weight", "transformer.h.{i}.attn.c_proj.bias"),
        "mlp": ("transformer.h.{i}.mlp.c_fc.weight", "transformer.h.{i}.mlp.c_proj.bias"),
        "norm": ("transformer.h.{i}.ln_1.weight", "transformer.h.{i}.ln_2.bias"),
    },
    rep_embed=("transformer.wte.weight", "transformer.wpe.weight"),
    rep_final_norm=("transformer.ln_f.weight",),
    rep_lm_head=("lm_head.weight",),
)
_NEOX_NAMES = _LayoutNames(
    layer_prefix="layers.{i}.",
    part_prefixes={
        "attn": ("attention.",),
        "mlp": ("mlp.",),
        "norm": ("input_layernorm.", "post_attention_layernorm."),
    },
    embed=("embed_in.",),
    final_norm=("final_layer_norm.",),
    lm_head=("embed_out.",),
    rep_layer={
        "attn": ("gpt_neox.layers.{i}.attention.query_key_value.weight", "gpt_neox.layers.{i}.attention.dense.bias"),
        "mlp": ("gpt_neox.layers.{i}.mlp.dense_h_to_4h.weight", "gpt_neox.layers.{i}.mlp.dense_4h_to_h.bias"),
        "norm": ("gpt_neox.layers.{i}.input_layernorm.weight", "gpt_neox.layers.{i}.post_attention_layernorm.bias"),
    },
    rep_embed=("gpt_neox.embed_in.weight",),
    rep_final_norm=("gpt_neox.final_layer_norm.weight",),
    rep_lm_head=("embed_out.weight",),
)
_NAMES_BY_LAYOUT = {"llama": _LLAMA_NAMES, "gpt2": _GPT2_NAMES, "gpt_neox": _NEOX_NAMES}


def _layout_names(layout: Layout | str | None) -> _LayoutNames:
    name = "llama" if layout is None else (layout if isinstance(layout, str) else layout.name)
    try:
        return _NAMES_BY_LAYOUT[name]
    except KeyError:
        raise RecipeError(
            f"no mergekit tensor names for layout {name!r}; add them to _NAMES_BY_LAYOUT in "
            f"evomerge/merge/mergekit_yaml.py"
        ) from None


# --------------------------------------------------------------------------------------------
# Group keys
# --------------------------------------------------------------------------------------------
_KEY_RE = re.compile(r"^layers\.(\d+)(?:\.(attn|mlp|norm))?$")
_PARTS = ("attn", "mlp", "norm")


def _parse_key(key: str) -> tuple[str, int | None, str | None]:
    if key in ("embed", "final_norm", "lm_head", DEFAULT_GROUP):
        return key, None, None
    m = _KEY_RE.match(key)
    if not m:
        raise RecipeError(
            f"recipe group {key!r} is not a group key; use default, embed, final_norm, lm_head, "
            f"layers.<i> or layers.<i>.attn|mlp|norm"
        )
    return "layer", int(m.group(1)), m.group(2)


def group_keys(num_layers: int) -> list[str]:
    """Every leaf group of a model: embed, layers.<i>.attn|mlp|norm, final_norm, lm_head."""
    keys = ["embed"]
    for i in range(num_layers):
        keys += [f"layers.{i}.{p}" for p in _PARTS]
    return keys + ["final_norm", "lm_head"]


def _lookup(recipe: MergeRecipe, leaf: str) -> GroupRecipe | None:
    """evomerge's most-specific-first lookup (MergeRecipe.group_for) by key."""
    kind, layer, part = _parse_key(leaf)
    chain = [leaf, f"layers.{layer}"] if kind == "layer" else [leaf]
    for k in chain + [DEFAULT_GROUP]:
        if k in recipe.groups:
            return recipe.groups[k]
    return None


def resolved_group(recipe: MergeRecipe, leaf: str) -> tuple[str, dict[str, Any], dict[str, dict[str, Any]]] | None:
    """(method, method params, per-source params) a leaf group gets, defaults filled in.

    Two recipes are equivalent exactly when this agrees on every leaf; tests use it for
    round trips. Only parameters mergekit knows for the method are kept.
    """
    g = _lookup(recipe, leaf)
    if g is None:
        return None
    spec = _spec(g.method, f"recipe group for {leaf!r}")
    per_def, shared_def = _evomerge_defaults(g.method)
    params = {k: _norm_value(k, g.params.get(k, shared_def[k])) for k in spec.shared}
    sources = _method_sources(recipe, g.method)
    sp = {
        s: {k: _norm_value(k, g.source_params.get(s, {}).get(k, per_def[k])) for k in spec.per_input}
        for s in sources
    }
    return g.method, params, sp


def _norm_value(name: str, v: Any) -> Any:
    if v is _REQUIRED:
        return None
    if name in _BOOL_PARAMS:
        return bool(v)
    return float(v)


def _method_sources(recipe: MergeRecipe, method: str) -> list[str]:
    return list(recipe.sources)


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------
def _leaf_order(num_layers: int) -> list[str]:
    """Recipe keys in filter order: parts, then layers, then the other groups (most specific first)."""
    keys = [f"layers.{i}.{p}" for i in range(num_layers) for p in _PARTS]
    keys += [f"layers.{i}" for i in range(num_layers)]
    return keys + ["embed", "final_norm", "lm_head"]


def _fallthrough_key(recipe_keys: Iterable[str], key: str) -> str | None:
    """The recipe key a tensor of ``key`` would get if ``key`` were absent."""
    keys = set(recipe_keys)
    kind, layer, part = _parse_key(key)
    if kind == "layer" and part and f"layers.{layer}" in keys:
        return f"layers.{layer}"
    return DEFAULT_GROUP if DEFAULT_GROUP in keys else None


def _setting(values: dict[str, Any], fallback: Any, names: _LayoutNames) -> Any:
    """One mergekit parameter setting from per-recipe-key values (key -> value)."""
    if all(v == fallback for v in values.values()):
        return fallback
    entries: list[dict[str, Any]] = []
    for key in _leaf_order(_max_layer(values) + 1):
        if key not in values:
            continue
        nxt = _fallthrough_key(values, key)
        below = values[nxt] if nxt is not None and nxt in values else fallback
        if values[key] == below:
            continue  # a redundant entry: the tensor gets the same value without it
        entries += [{"filter": f, "value": values[key]} for f in names.group_filters(key)]
    if not entries:
        return fallback
    entries.append({"value": fallback})
    return entries


def _max_layer(keys: Iterable[str]) -> int:
    layers = [_parse_key(k)[1] for k in keys if k != DEFAULT_GROUP]
    return max([x for x in layers if x is not None], default=-1)


def _yaml_value(name: str, v: Any) -> Any:
    if name in _BOOL_PARAMS:
        return bool(v)
    f = float(v)
    return int(f) if f.is_integer() and abs(f) < 2**53 else f


def _method_doc(
    recipe: MergeRecipe, method: str, keys: list[str], names: _LayoutNames, num_layers: int
) -> dict[str, Any]:
    """One mergekit config merging the whole model with ``method`` and the settings of ``keys``."""
    spec = _spec(method, "recipe")
    per_def, shared_def = _evomerge_defaults(method)
    groups = {k: recipe.groups[k] for k in keys}
    for k, g in groups.items():
        _parse_key(k)
        unknown = sorted(set(g.params) - set(spec.shared) - _IGNORED_SHARED)
        unknown += sorted({p for sp in g.source_params.values() for p in sp} - set(spec.per_input))
        if unknown:
            raise RecipeError(
                f"recipe group {k!r}: parameter {unknown[0]!r} has no meaning for mergekit's {method}; "
                f"remove it or pick a method that uses it"
            )
    # the value for tensors no group of this method covers: the default group's if it has
    # this method, else any group's (those tensors are replaced by another method's result)
    fb_key = DEFAULT_GROUP if DEFAULT_GROUP in groups else keys[0]

    def value_of(k: str, name: str, src: str | None) -> Any:
        g = groups[k]
        if src is None:
            v = g.params.get(name, shared_def[name])
        else:
            v = g.source_params.get(src, {}).get(name, per_def[name])
        if v is _REQUIRED:
            raise RecipeError(
                f"recipe group {k!r}: {method} needs parameter {name!r}"
                + (f" for source {src!r}" if src else "")
                + "; set it in the recipe"
            )
        return _yaml_value(name, v)

    def setting(name: str, src: str | None) -> Any:
        vals = {k: value_of(k, name, src) for k in groups}
        return _setting(vals, vals[fb_key], names)

    # one slice over all layers: equal to mergekit's own expansion of `models:`, and it
    # carries the layer count so the YAML reads back without the model folders
    doc: dict[str, Any] = {"merge_method": method}
    entries = []
    for src in _method_sources(recipe, method):
        entry: dict[str, Any] = {"model": src, "layer_range": [0, num_layers]}
        params = {p: setting(p, src) for p in spec.per_input}
        if params:
            entry["parameters"] = params
        entries.append(entry)
    if spec.uses_base:
        if recipe.base is None:
            raise RecipeError(f"recipe uses {method}, which needs a base model; set the recipe's base")
        doc["base_model"] = recipe.base
        entries.append({"model": recipe.base, "layer_range": [0, num_layers]})
    elif recipe.base is not None and recipe.base not in recipe.sources:
        # linear ignores the base, but keep it named (config/tokenizer come from it): as an
        # input of weight 0, which adds exactly 0 to the weighted sum
        doc["base_model"] = recipe.base
        entries.append({"model": recipe.base, "layer_range": [0, num_layers], "parameters": {"weight": 0}})
    doc["slices"] = [{"sources": entries}]
    shared = {p: setting(p, None) for p in spec.shared}
    if shared:
        doc["parameters"] = shared
    doc["dtype"] = recipe.compute_dtype
    return doc


def to_mergekit_yaml(recipe: MergeRecipe, num_layers: int, layout: Layout | str | None = None) -> str:
    """A mergekit YAML that computes exactly ``recipe``'s per-tensor parameters.

    One method: a plain ``mergekit-yaml`` config. Several methods: a ``mergekit-multi``
    document set (see the module docstring). ``num_layers`` bounds the per-layer filters;
    ``layout`` (groups.Layout or its name) picks the tensor-name substrings of the filters.
    """
    names = _layout_names(layout)
    for k in recipe.groups:
        kind, layer, _ = _parse_key(k)
        if layer is not None and layer >= num_layers:
            raise RecipeError(f"recipe group {k!r} is past the model's {num_layers} layers; remove it")
    by_method: dict[str, list[str]] = {}
    for k, g in recipe.groups.items():
        by_method.setdefault(g.method, []).append(k)
    if not by_method:
        raise RecipeError("recipe has no groups; add at least a 'default' group")
    header = (
        f"# mergekit config written by evomerge; recipe seed={recipe.seed} "
        f"(mergekit draws DARE/DELLA masks from its own RNG)\n"
    )
    if len(by_method) == 1:
        method, keys = next(iter(by_method.items()))
        doc = _method_doc(recipe, method, keys, names, num_layers)
        _finish(doc, recipe)
        return header + _dump(doc)

    # several methods: mergekit-multi, one intermediate per method + a 0/1 linear selector
    header += (
        "# several merge methods: run with `mergekit-multi THIS.yaml --intermediate-dir DIR --out-path OUT`\n"
    )
    docs = []
    leaves = group_keys(num_layers)
    owner = {leaf: (_lookup(recipe, leaf).method if _lookup(recipe, leaf) else None) for leaf in leaves}
    if None in owner.values():
        missing = next(leaf for leaf, m in owner.items() if m is None)
        raise RecipeError(f"recipe has no entry for group {missing!r} and no 'default' group; add one")
    # tensors outside attn/mlp/norm inside a layer follow layers.<i> (or default) like in evomerge
    for i in range(num_layers):
        g = _lookup(recipe, f"layers.{i}")
        owner[f"layers.{i}"] = g.method if g else None
    default_owner = recipe.groups[DEFAULT_GROUP].method if DEFAULT_GROUP in recipe.groups else None
    selector_models = []
    for method, keys in by_method.items():
        name = f"evomerge_{method}"
        doc = {"name": name, **_method_doc(recipe, method, keys, names, num_layers)}
        doc["out_dtype"] = recipe.compute_dtype  # keep full precision between passes
        if recipe.tokenizer_source:
            doc["tokenizer_source"] = recipe.tokenizer_source
        docs.append(doc)
        # weight 1 on the leaves this method owns, 0 elsewhere, expressed per recipe key
        vals = {key: (1 if m == method else 0) for key, m in owner.items()}
        fallback = 1 if default_owner == method else 0
        selector_models.append(
            {"model": name, "layer_range": [0, num_layers], "parameters": {"weight": _setting(vals, fallback, names)}}
        )
    final: dict[str, Any] = {
        "merge_method": "linear",
        "slices": [{"sources": selector_models}],
        "parameters": {"normalize": True},
        "dtype": recipe.compute_dtype,
    }
    _finish(final, recipe)
    return header + "\n---\n".join(_dump(d) for d in docs + [final])


def _finish(doc: dict[str, Any], recipe: MergeRecipe) -> None:
    if recipe.dtype != recipe.compute_dtype:
        doc["out_dtype"] = recipe.dtype
    tok = recipe.tokenizer_source
    if tok and tok != (recipe.base or recipe.sources[0]):
        doc["tokenizer_source"] = tok


def _dump(doc: dict[str, Any]) -> str:
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=120)


# --------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------
_TOP_KEYS = {
    "merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
    "tokenizer_source", "chat_template", "name",
}


def _ref(value: Any, where: str, base_dir: Path | None) -> str:
    if isinstance(value, dict) and set(value) <= {"model", "path"}:  # {model: {path: ...}} forms
        value = value.get("model", value.get("path"))
        if isinstance(value, dict):
            value = value.get("path")
    if not isinstance(value, str) or not value:
        raise RecipeError(f"mergekit YAML {where}: expected a model path or hub id, got {value!r}")
    if "+" in value:
        raise RecipeError(f"mergekit YAML {where}: LoRA references ({value!r}) are not supported; merge the LoRA first")
    if base_dir is not None and not Path(value).is_absolute() and (Path(base_dir) / value).exists():
        return str(Path(base_dir) / value)
    return value


def _model_config(ref: str) -> dict[str, Any] | None:
    p = Path(ref) / "config.json"
    if p.is_file():
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None
    return None


def _eval_setting(setting: Any, tensor: str, t: float, where: str) -> Any:
    """mergekit's ``evaluate_setting``: filters (first match wins) and interpolated gradients."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            vals = [_num_or_str(e) for e in setting]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
                return vals[int(t * (len(vals) - 1))]
            scaled = t * (len(vals) - 1)
            i0 = int(scaled)
            i1 = min(len(vals) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * float(vals[i0]) + frac * float(vals[i1])
        for cond in setting:
            if not isinstance(cond, dict) or "value" not in cond or set(cond) - {"value", "filter"}:
                raise RecipeError(
                    f"mergekit YAML {where}: a list entry must be a number or a {{filter, value}} mapping, got {cond!r}"
                )
            flt = cond.get("filter")
            if flt is None or flt == "*" or (tensor and str(flt) in tensor):
                return _eval_setting(cond["value"], tensor, t, where)
        return None
    raise RecipeError(f"mergekit YAML {where}: unexpected parameter value {setting!r}")


def _num_or_str(v: Any) -> Any:
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def _resolve(name: str, scopes: list[Mapping[str, Any] | None], tensor: str, t: float, where: str) -> Any:
    for scope in scopes:
        if scope and name in scope:
            v = _eval_setting(scope[name], tensor, t, f"{where}.{name}")
            if v is not None:
                return v
    return _REQUIRED


@dataclass
class _Slice:
    start: int
    end: int
    models: list[str]
    model_params: dict[str, Mapping[str, Any] | None]
    params: Mapping[str, Any] | None


def _mapping(value: Any, where: str) -> Mapping[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise RecipeError(f"mergekit YAML {where}: expected a mapping of parameters, got {type(value).__name__}")
    return value


def _read_slices(doc: dict[str, Any], base_dir: Path | None, num_layers: int | None) -> tuple[list[_Slice], int | None]:
    if "slices" in doc:
        raw = doc["slices"]
        if not isinstance(raw, list) or not raw:
            raise RecipeError("mergekit YAML slices: expected a non-empty list of slices")
        slices: list[_Slice] = []
        pos = 0
        for si, s in enumerate(raw):
            where = f"slices[{si}]"
            if not isinstance(s, dict) or "sources" not in s:
                raise RecipeError(f"mergekit YAML {where}: a slice needs 'sources'")
            extra = set(s) - {"sources", "parameters", "base_model"}
            if extra:
                raise RecipeError(f"mergekit YAML {where}: {sorted(extra)[0]!r} is not supported; remove it")
            models, mparams, ranges = [], {}, set()
            for j, src in enumerate(s["sources"]):
                w = f"{where}.sources[{j}]"
                if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
                    raise RecipeError(f"mergekit YAML {w}: needs 'model' and 'layer_range'")
                ref = _ref(src["model"], w, base_dir)
                lr = src["layer_range"]
                if not (isinstance(lr, list) and len(lr) == 2 and all(isinstance(x, int) for x in lr)):
                    raise RecipeError(f"mergekit YAML {w}.layer_range: expected [start, end], got {lr!r}")
                ranges.add(tuple(lr))
                models.append(ref)
                mparams[ref] = _mapping(src.get("parameters"), f"{w}.parameters")
            if len(ranges) != 1 or next(iter(ranges))[0] != pos:
                raise RecipeError(
                    f"mergekit YAML {where}: layer ranges {sorted(ranges)} move or repeat layers (output layer "
                    f"{pos} onward); evomerge merges layer i of every model into layer i only"
                )
            start, end = next(iter(ranges))
            if end <= start:
                raise RecipeError(f"mergekit YAML {where}: empty layer_range [{start}, {end}]")
            if slices and models != slices[0].models:
                raise RecipeError(f"mergekit YAML {where}: every slice must list the same models in the same order")
            slices.append(_Slice(start, end, models, mparams, _mapping(s.get("parameters"), f"{where}.parameters")))
            pos = end
        if num_layers is not None and pos != num_layers:
            raise RecipeError(f"mergekit YAML slices cover {pos} layers but the models have {num_layers}; cover all layers")
        return slices, pos
    raw = doc.get("models")
    if not isinstance(raw, list) or not raw:
        raise RecipeError("mergekit YAML: give 'models' (a list) or 'slices'")
    models, mparams = [], {}
    for j, m in enumerate(raw):
        w = f"models[{j}]"
        if isinstance(m, str):
            m = {"model": m}
        if not isinstance(m, dict) or "model" not in m or set(m) - {"model", "parameters"}:
            raise RecipeError(f"mergekit YAML {w}: expected {{model, parameters}}")
        ref = _ref(m["model"], w, base_dir)
        models.append(ref)
        mparams[ref] = _mapping(m.get("parameters"), f"{w}.parameters")
    return [_Slice(0, num_layers or 0, models, mparams, None)], num_layers


def _needs_layers(doc: dict[str, Any]) -> bool:
    """True when some setting is not one plain scalar (so per-layer evaluation is needed)."""
    scopes = [doc.get("parameters") or {}]
    for m in doc.get("models") or []:
        if isinstance(m, dict):
            scopes.append(m.get("parameters") or {})
    return any(not isinstance(v, (bool, int, float, str)) for s in scopes if isinstance(s, dict) for v in s.values())


def _parse_seed(text: str) -> int:
    m = re.search(r"recipe seed=(\d+)", text)
    return int(m.group(1)) if m else 0


def from_mergekit_yaml(text: str, base_dir: str | Path | None = None) -> MergeRecipe:
    """A MergeRecipe equivalent to a mergekit config (single document, or evomerge's multi set).

    ``base_dir``: relative model paths that exist under it are made absolute there; model
    folders with a ``config.json`` tell the layer count and the naming layout when the YAML
    uses per-layer settings without slices.
    """
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:
        raise RecipeError(f"mergekit YAML does not parse: {' '.join(str(err).split())}") from None
    if not docs:
        raise RecipeError("mergekit YAML is empty")
    bd = Path(base_dir) if base_dir is not None else None
    seed = _parse_seed(text)
    if len(docs) == 1:
        doc = docs[0]
        if not isinstance(doc, dict):
            raise RecipeError("mergekit YAML: the document must be a mapping")
        if "name" in doc:
            doc = {k: v for k, v in doc.items() if k != "name"}
        recipe, _ = _import_doc(doc, bd, seed)
        return recipe
    return _import_multi(docs, bd, seed)


def _import_doc(doc: dict[str, Any], base_dir: Path | None, seed: int,
                num_layers: int | None = None) -> tuple[MergeRecipe, int]:
    if "modules" in doc:
        raise RecipeError("mergekit YAML 'modules' (multi-module models) is not supported; use 'models' or 'slices'")
    if "tokenizer" in doc:
        raise RecipeError("mergekit YAML 'tokenizer' (vocabulary surgery) is not supported; use tokenizer_source")
    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        raise RecipeError(f"mergekit YAML: unknown key {unknown[0]!r}; see mergekit's configuration docs")
    if "merge_method" not in doc:
        raise RecipeError("mergekit YAML: 'merge_method' is missing; add e.g. merge_method: ties")
    method = str(doc["merge_method"])
    spec = _spec(method, "mergekit YAML merge_method")
    base = _ref(doc["base_model"], "base_model", base_dir) if doc.get("base_model") is not None else None
    if spec.uses_base and base is None:
        raise RecipeError(f"mergekit YAML: {method} needs 'base_model'; add it")

    # layer count and layout: slices tell the count; otherwise the models' config.json
    cfg = None
    listed = list(doc.get("models") or []) + [
        src for s in (doc.get("slices") or []) if isinstance(s, dict) for src in (s.get("sources") or [])
    ]
    for ref in ([base] if base else []) + [(m.get("model") if isinstance(m, dict) else m) for m in listed]:
        if isinstance(ref, str):
            cfg = _model_config(_ref(ref, "models", base_dir))
            if cfg:
                break
    layout = LAYOUTS_BY_MODEL_TYPE.get((cfg or {}).get("model_type", "llama"), LAYOUTS_BY_MODEL_TYPE["llama"])
    names = _layout_names(layout)
    if num_layers is None and cfg:
        num_layers = cfg.get("num_hidden_layers", cfg.get("n_layer", cfg.get("num_layers")))
    slices, n = _read_slices(doc, base_dir, num_layers)
    if n is None:
        if "slices" not in doc and _needs_layers(doc):
            raise RecipeError(
                "mergekit YAML uses per-layer settings (filters or gradients) but the layer count is unknown; "
                "give slices with layer_range, or pass base_dir where the models' config.json can be read"
            )
        n = 1  # scalar settings only: one representative layer
        slices[0].end = 1
    all_models = slices[0].models
    if spec.uses_base:
        sources = [m for m in all_models if m != base]
    else:
        sources = list(all_models)
    if not sources:
        raise RecipeError(f"mergekit YAML: {method} needs at least one model besides the base")
    top = _mapping(doc.get("parameters"), "parameters")
    if not spec.uses_base and base is not None and base in sources and _zero_weight_everywhere(
        base, slices, top, names, n
    ):
        sources.remove(base)  # evomerge's export form: the base named, with weight 0

    # evaluate every leaf group on its representative tensor names
    leaf_settings: dict[str, tuple] = {}

    def evaluate(leaf: str, sl: _Slice, t: float) -> tuple:
        reps = names.representatives(leaf)
        params: dict[str, Any] = {}
        for p, default in spec.shared.items():
            params[p] = _agree(leaf, p, [_resolve(p, [sl.params, top], r, t, "parameters") for r in reps], default)
        for p in _IGNORED_SHARED:
            params.pop(p, None)
        sp: dict[str, dict[str, Any]] = {}
        for s in sources:
            sp[s] = {
                p: _agree(
                    leaf, p,
                    [_resolve(p, [sl.model_params.get(s), sl.params, top], r, t, f"models[{s}]") for r in reps],
                    default, s,
                )
                for p, default in spec.per_input.items()
            }
        return _freeze(params, sp)

    leaf_settings["embed"] = evaluate("embed", slices[0], 0.0)
    for sl in slices:
        length = sl.end - sl.start
        for idx in range(length):
            t = idx / (length - 1) if length > 1 else 1.0
            for part in _PARTS:
                leaf = f"layers.{sl.start + idx}.{part}"
                leaf_settings[leaf] = evaluate(leaf, sl, t)
    for leaf in ("final_norm", "lm_head"):
        leaf_settings[leaf] = evaluate(leaf, slices[-1], 0.0)

    groups = _compress(leaf_settings, n, method, scalar_only=(n == 1 and "slices" not in doc))
    dtype = doc.get("dtype")
    out_dtype = doc.get("out_dtype") or dtype
    recipe = MergeRecipe.from_dict(
        {
            "base": base,
            "sources": sources,
            "groups": groups,
            "seed": seed,
            **({"compute_dtype": str(dtype)} if dtype else {}),
            **({"dtype": str(out_dtype)} if out_dtype else {}),
            **({"tokenizer_source": _tok(doc["tokenizer_source"], base, base_dir)} if doc.get("tokenizer_source") else {}),
        }
    )
    return recipe, n


def _zero_weight_everywhere(model: str, slices: list["_Slice"], top: Mapping[str, Any] | None,
                            names: _LayoutNames, n: int) -> bool:
    for leaf in group_keys(n):
        kind, layer, _ = _parse_key(leaf)
        sl = slices[0] if leaf == "embed" else slices[-1]
        t = 0.0
        if kind == "layer":
            sl = next(x for x in slices if x.start <= layer < x.end)
            length = sl.end - sl.start
            t = (layer - sl.start) / (length - 1) if length > 1 else 1.0
        for rep in names.representatives(leaf):
            v = _resolve("weight", [sl.model_params.get(model), sl.params, top], rep, t, f"models[{model}]")
            if v is _REQUIRED or float(_num_or_str(v)) != 0.0:
                return False
    return True


def _tok(value: Any, base: str | None, base_dir: Path | None) -> str:
    if value == "base" and base:
        return base
    if value == "union":
        raise RecipeError("mergekit YAML tokenizer_source: 'union' is not supported; name one model's tokenizer")
    return _ref(value, "tokenizer_source", base_dir)


def _agree(leaf: str, p: str, values: list[Any], default: Any, src: str | None = None) -> Any:
    vals = [default if v is _REQUIRED else v for v in values]
    if any(v is _REQUIRED for v in vals):
        raise RecipeError(
            f"mergekit YAML: parameter {p!r} is missing"
            + (f" for model {src!r}" if src else "")
            + f" (group {leaf}); add it to the model's parameters or the top-level parameters"
        )
    vals = [_norm_value(p, _num_or_str(v)) for v in vals]
    if any(v != vals[0] for v in vals):
        raise RecipeError(
            f"mergekit YAML: parameter {p!r} takes different values inside evomerge group {leaf} "
            f"(a filter finer than attn/mlp/norm); use filters on self_attn / mlp / layernorm names"
        )
    return vals[0]


def _freeze(params: dict[str, Any], sp: dict[str, dict[str, Any]]) -> tuple:
    return (tuple(sorted(params.items())), tuple((s, tuple(sorted(v.items()))) for s, v in sp.items()))


def _thaw(method: str, frozen: tuple) -> dict[str, Any]:
    params, sp = frozen
    return {"method": method, "params": dict(params), "source_params": {s: dict(v) for s, v in sp}}


def _compress(leaf_settings: dict[str, tuple], n: int, method: str, scalar_only: bool) -> dict[str, dict[str, Any]]:
    """Fewest recipe keys that give every leaf its settings: a default, then layers, then parts."""
    if scalar_only:  # no per-layer information: one layer stood for all
        units = {"embed": leaf_settings["embed"], "final_norm": leaf_settings["final_norm"],
                 "lm_head": leaf_settings["lm_head"]}
        parts = {p: leaf_settings[f"layers.0.{p}"] for p in _PARTS}
        if len(set(parts.values())) != 1:
            raise RecipeError("internal: scalar-only mergekit settings differ between layer parts")
        units["layers"] = parts["attn"]
        default = Counter(units.values()).most_common(1)[0][0]
        groups = {DEFAULT_GROUP: _thaw(method, default)}
        for k in ("embed", "final_norm", "lm_head"):
            if units[k] != default:
                groups[k] = _thaw(method, units[k])
        if units["layers"] != default:
            raise RecipeError("mergekit YAML sets layers apart from embeddings but the layer count is unknown; pass base_dir")
        return groups
    leaves: list[tuple] = list(leaf_settings.values())
    default = Counter(leaves).most_common(1)[0][0]
    groups: dict[str, dict[str, Any]] = {DEFAULT_GROUP: _thaw(method, default)}
    for k in ("embed", "final_norm", "lm_head"):
        if leaf_settings[k] != default:
            groups[k] = _thaw(method, leaf_settings[k])
    for i in range(n):
        parts = {p: leaf_settings[f"layers.{i}.{p}"] for p in _PARTS}
        layer_val = Counter(parts.values()).most_common(1)[0][0]
        if layer_val != default:
            groups[f"layers.{i}"] = _thaw(method, layer_val)
        for p, v in parts.items():
            if v != layer_val:
                groups[f"layers.{i}.{p}"] = _thaw(method, v)
    return groups


def _import_multi(docs: list[Any], base_dir: Path | None, seed: int) -> MergeRecipe:
    """Read back the mergekit-multi set ``to_mergekit_yaml`` writes for multi-method recipes."""
    named: dict[str, dict[str, Any]] = {}
    final = None
    for d in docs:
        if not isinstance(d, dict):
            raise RecipeError("mergekit YAML: every document must be a mapping")
        if "name" in d:
            named[str(d["name"])] = {k: v for k, v in d.items() if k != "name"}
        elif final is None:
            final = d
        else:
            raise RecipeError("mergekit-multi YAML has two unnamed (final) documents; name all but one")
    sel_models = [src for s in final.get("slices") or [] for src in s.get("sources", [])] if final else []
    if final is None or final.get("merge_method") != "linear" or not sel_models or not all(
        isinstance(m, dict) and m.get("model") in named for m in sel_models
    ):
        raise RecipeError(
            "mergekit-multi YAML: only the shape evomerge writes is supported (named per-method merges and a final "
            "linear 0/1 selector over them); run mergekit-multi and merge its output instead"
        )
    parts = {}
    n = None
    for name, d in named.items():
        recipe, n_doc = _import_doc(d, base_dir, seed, None if n is None else n)
        parts[name] = recipe
        n = n_doc if n is None else n
    assert n is not None
    # read the selector's weights per leaf as a plain linear doc over the intermediates' names
    sel, _ = _import_doc(final, None, seed, n)
    first = next(iter(parts.values()))
    leaf_groups: dict[str, tuple] = {}
    for leaf in group_keys(n):
        _, _, sp = resolved_group(sel, leaf)
        chosen = [name for name, p in sp.items() if p["weight"] == 1.0]
        if len(chosen) != 1 or any(p["weight"] not in (0.0, 1.0) for p in sp.values()):
            raise RecipeError(f"mergekit-multi YAML: group {leaf} is not selected from exactly one merge (weights 0/1)")
        r = parts[chosen[0]]
        if r.sources != first.sources or r.base != first.base:
            raise RecipeError("mergekit-multi YAML: the per-method merges must use the same base and models")
        method, params, srcp = resolved_group(r, leaf)
        leaf_groups[leaf] = (method, _freeze(params, srcp))
    # compress like a single method, with the method part of the settings
    default = Counter(leaf_groups.values()).most_common(1)[0][0]
    groups = {DEFAULT_GROUP: _thaw(default[0], default[1])}
    for k in ("embed", "final_norm", "lm_head"):
        if leaf_groups[k] != default:
            groups[k] = _thaw(*leaf_groups[k])
    for i in range(n):
        ps = {p: leaf_groups[f"layers.{i}.{p}"] for p in _PARTS}
        lv = Counter(ps.values()).most_common(1)[0][0]
        if lv != default:
            groups[f"layers.{i}"] = _thaw(*lv)
        for p, v in ps.items():
            if v != lv:
                groups[f"layers.{i}.{p}"] = _thaw(*v)
    dtype = final.get("out_dtype") or final.get("dtype") or first.dtype
    return MergeRecipe.from_dict(
        {"base": first.base, "sources": first.sources, "groups": groups, "seed": seed,
         "dtype": str(dtype), "compute_dtype": first.compute_dtype,
         **({"tokenizer_source": _tok(final["tokenizer_source"], first.base, base_dir)}
            if final.get("tokenizer_source") else {})}
    )
