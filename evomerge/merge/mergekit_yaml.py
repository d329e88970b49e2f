"""MergeRecipe -> mergekit YAML, with mergekit computing exactly the same parameters.

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

The reverse direction is :mod:`evomerge.merge.mergekit_import`; the vocabulary both share
(mergekit's parameter tables, tensor names per layout) is :mod:`evomerge.merge.mergekit_spec`.
"""

from __future__ import annotations

from typing import Any, Iterable

import yaml

from evomerge.errors import RecipeError
from evomerge.merge.groups import DEFAULT_GROUP, OTHER_KINDS, PARTS, Layout, layer_key, leaf_keys, parse_key
from evomerge.merge.mergekit_spec import (
    BOOL_PARAMS,
    IGNORED_SHARED,
    REQUIRED,
    _LayoutNames,
    evomerge_defaults,
    layout_names,
    lookup,
    spec_of,
)
from evomerge.merge.recipe import MergeRecipe

__all__ = ["to_mergekit_yaml"]


def _leaf_order(num_layers: int) -> list[str]:
    """Recipe keys in filter order: parts, then layers, then the other groups (most specific first)."""
    keys = [layer_key(i, p) for i in range(num_layers) for p in PARTS]
    keys += [layer_key(i) for i in range(num_layers)]
    return keys + list(OTHER_KINDS)


def _fallthrough_key(recipe_keys: Iterable[str], key: str) -> str | None:
    """The recipe key a tensor of ``key`` would get if ``key`` were absent."""
    keys = set(recipe_keys)
    g = parse_key(key)
    if g is not None and g.kind == "layer" and g.part and layer_key(g.layer) in keys:
        return layer_key(g.layer)
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
    groups = [parse_key(k) for k in keys]
    return max([g.layer for g in groups if g is not None and g.layer is not None], default=-1)


def _yaml_value(name: str, v: Any) -> Any:
    if name in BOOL_PARAMS:
        return bool(v)
    f = float(v)
    return int(f) if f.is_integer() and abs(f) < 2**53 else f


def _method_doc(
    recipe: MergeRecipe, method: str, keys: list[str], names: _LayoutNames, num_layers: int
) -> dict[str, Any]:
    """One mergekit config merging the whole model with ``method`` and the settings of ``keys``."""
    spec = spec_of(method, "recipe")
    per_def, shared_def = evomerge_defaults(method)
    groups = {k: recipe.groups[k] for k in keys}
    for k, g in groups.items():
        parse_key(k)
        unknown = sorted(set(g.params) - set(spec.shared) - IGNORED_SHARED)
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
        if v is REQUIRED:
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
    for src in recipe.sources:
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
    elif spec.base_optional and recipe.base is not None:
        # multislerp/nuslerp/karcher: mergekit uses the base as evomerge does (listed last, as
        # mergekit appends an unlisted base); without a base both merge the sources alone
        doc["base_model"] = recipe.base
        entries.append({"model": recipe.base, "layer_range": [0, num_layers]})
    elif recipe.base is not None and recipe.base not in recipe.sources and "weight" in spec.per_input:
        # linear ignores the base, but keep it named (config/tokenizer come from it): as an
        # input of weight 0, which adds exactly 0 to the weighted sum. (passthrough has no
        # weight and mergekit's takes one input, so its base is left out: it ignores it anyway.)
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
    names = layout_names(layout)
    for k in recipe.groups:
        g = parse_key(k)
        if g is not None and g.layer is not None and g.layer >= num_layers:
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
    leaves = leaf_keys(num_layers)
    owner = {leaf: (lookup(recipe, leaf).method if lookup(recipe, leaf) else None) for leaf in leaves}
    if None in owner.values():
        missing = next(leaf for leaf, m in owner.items() if m is None)
        raise RecipeError(f"recipe has no entry for group {missing!r} and no 'default' group; add one")
    # tensors outside attn/mlp/norm inside a layer follow layers.<i> (or default) like in evomerge
    for i in range(num_layers):
        g = lookup(recipe, layer_key(i))
        owner[layer_key(i)] = g.method if g else None
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
