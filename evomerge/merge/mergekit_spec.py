"""What mergekit 0.1.5 calls things: each method's parameters, and each layout's tensor names.

Shared by both directions of the translation, :mod:`evomerge.merge.mergekit_yaml` (recipe ->
mergekit YAML) and :mod:`evomerge.merge.mergekit_import` (mergekit YAML -> recipe):

* :data:`MERGEKIT_METHODS`: mergekit's parameter table of each method, *derived* from the
  method registry (:mod:`evomerge.merge.methods`, whose task-arithmetic rows live in
  :mod:`evomerge.merge.family`): the parameters a method reads plus those mergekit accepts
  and that change nothing here, with mergekit's defaults, and the ones mergekit requires;
* :class:`_LayoutNames`: substrings that select exactly one evomerge group's tensors
  (export's filters) and representative tensor names of each group (import's probes);
* :func:`resolved_group`: what a recipe gives one leaf group, defaults filled in - two
  recipes are equivalent exactly when it agrees on every leaf.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from evomerge.errors import RecipeError
from evomerge.merge.groups import DEFAULT_GROUP, Layout, TensorGroup, parse_key
from evomerge.merge.recipe import GroupRecipe, MergeRecipe

if TYPE_CHECKING:
    from evomerge.merge.methods import MergeMethod

REQUIRED = object()  # a parameter mergekit insists on (no default)
#: Parameters whose values are true/false.
BOOL_PARAMS = {"normalize", "rescale", "filter_wise", "int8_mask", "normalize_weights", "nuslerp_flatten",
               "nuslerp_row_wise"}
#: Accepted on import and dropped, never written: they do not change the merged numbers.
IGNORED_SHARED = {"int8_mask"}
#: Methods that merge with or without a base: given ``base_model``, mergekit takes it as the
#: base (multislerp, nuslerp: task vectors; karcher: one more model in the mean), never as a
#: weighted source. Export names it without per-model parameters; import keeps it out of the sources.
BASE_OPTIONAL = {"multislerp", "nuslerp", "karcher"}
#: mergekit's order of parameters (the order a YAML lists them in).
_ORDER = ("weight", "density", "gamma", "epsilon", "scale", "normalize", "rescale", "lambda", "t", "filter_wise",
          "select_topk", "normalize_weights", "nuslerp_flatten", "nuslerp_row_wise", "max_iter", "tol", "r", "alpha")


@dataclass(frozen=True)
class MethodSpec:
    """mergekit's parameters of one method, with mergekit's defaults (or :data:`REQUIRED`)."""

    name: str
    per_input: Mapping[str, Any]  # per-model parameters -> default (or REQUIRED)
    shared: Mapping[str, Any]  # method-level parameters -> default (or REQUIRED)
    uses_base: bool
    base_optional: bool = False  # see BASE_OPTIONAL


def method_spec(m: "MergeMethod") -> MethodSpec:
    """mergekit's view of ``m``: what it reads plus what it accepts and ignores (not
    :data:`IGNORED_SHARED`), in mergekit's order, with the parameters mergekit requires."""

    def view(own: Mapping[str, Any], ignored: frozenset[str]) -> dict[str, Any]:
        table = {**own, **{k: m.ignored_defaults[k] for k in ignored if k not in IGNORED_SHARED}}
        order = sorted(table, key=lambda k: _ORDER.index(k) if k in _ORDER else len(_ORDER))
        return {k: (REQUIRED if k in m.required else table[k]) for k in order}

    return MethodSpec(m.name, view(m.source_params, m.ignored_source_params), view(m.params, m.ignored_params),
                      m.uses_base, m.name in BASE_OPTIONAL)


class _MergekitMethods(Mapping[str, MethodSpec]):
    """Every registered method's :class:`MethodSpec` (imports the methods on first use)."""

    def __getitem__(self, name: str) -> MethodSpec:
        from evomerge.merge.methods import METHODS

        return method_spec(METHODS[name])

    def __iter__(self) -> Iterator[str]:
        from evomerge.merge.methods import METHODS

        return iter(METHODS)

    def __len__(self) -> int:
        from evomerge.merge.methods import METHODS

        return len(METHODS)


MERGEKIT_METHODS: Mapping[str, MethodSpec] = _MergekitMethods()


def spec_of(method: str, where: str) -> MethodSpec:
    """``method``'s :class:`MethodSpec`, or a RecipeError naming the methods mergekit knows."""
    if method not in MERGEKIT_METHODS:
        raise RecipeError(
            f"{where}: merge method {method!r} has no mergekit equivalent here; "
            f"use one of {', '.join(MERGEKIT_METHODS)}"
        )
    return MERGEKIT_METHODS[method]


def evomerge_defaults(method: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(per-source, method-level) defaults evomerge fills in: its own where it has the
    parameter (mergekit's required ones included), else mergekit's."""
    from evomerge.merge.methods import get_method

    m, spec = get_method(method), spec_of(method, "recipe")
    per_input = {k: m.source_params.get(k, v) for k, v in spec.per_input.items()}
    shared = {k: m.params.get(k, v) for k, v in spec.shared.items()}
    return per_input, shared


def _group(key: str) -> TensorGroup:
    g = parse_key(key)
    if g is None:
        raise RecipeError(f"recipe group {key!r}: the default group has no tensor names of its own")
    return g


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
        g = _group(key)
        if g.kind == "layer":
            return self.part_filters(g.layer, g.part) if g.part else [self.layer_filter(g.layer)]
        return list(getattr(self, g.kind))

    def representatives(self, key: str) -> list[str]:
        g = _group(key)
        if g.kind == "layer":
            assert g.part is not None
            return [n.format(i=g.layer) for n in self.rep_layer[g.part]]
        return list(getattr(self, "rep_" + g.kind))


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


def layout_names(layout: Layout | str | None) -> _LayoutNames:
    name = "llama" if layout is None else (layout if isinstance(layout, str) else layout.name)
    try:
        return _NAMES_BY_LAYOUT[name]
    except KeyError:
        raise RecipeError(
            f"no mergekit tensor names for layout {name!r}; add them to _NAMES_BY_LAYOUT in "
            f"evomerge/merge/mergekit_spec.py"
        ) from None



# --------------------------------------------------------------------------------------------
# What a recipe gives each leaf group
# --------------------------------------------------------------------------------------------
def lookup(recipe: MergeRecipe, leaf: str) -> GroupRecipe | None:
    """evomerge's most-specific-first lookup (MergeRecipe.group_for) by key."""
    g = parse_key(leaf)
    keys = g.lookup_keys() if g is not None else [DEFAULT_GROUP]
    return next((recipe.groups[k] for k in keys if k in recipe.groups), None)


def resolved_group(recipe: MergeRecipe, leaf: str) -> tuple[str, dict[str, Any], dict[str, dict[str, Any]]] | None:
    """(method, method params, per-source params) a leaf group gets, defaults filled in.

    Two recipes are equivalent exactly when this agrees on every leaf; tests use it for
    round trips. Only parameters mergekit knows for the method are kept.
    """
    g = lookup(recipe, leaf)
    if g is None:
        return None
    spec = spec_of(g.method, f"recipe group for {leaf!r}")
    per_def, shared_def = evomerge_defaults(g.method)
    params = {k: norm_value(k, g.params.get(k, shared_def[k])) for k in spec.shared}
    sp = {
        s: {k: norm_value(k, g.source_params.get(s, {}).get(k, per_def[k])) for k in spec.per_input}
        for s in recipe.sources
    }
    return g.method, params, sp


def norm_value(name: str, v: Any) -> Any:
    """A parameter value as compared between recipes: bool, float, or None for missing."""
    if v is REQUIRED:
        return None
    if name in BOOL_PARAMS:
        return bool(v)
    return float(v)

