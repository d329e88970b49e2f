"""A recipe against the loaded models: every check before any work, and each group's plan.

Why a module of its own: both ways of materialising a recipe - in place into the live
model (:mod:`evomerge.merge.inplace`) and streamed to a folder
(:mod:`evomerge.merge.materialise`) - must read a recipe identically, or the folder
would not hold what the search scored. They share :func:`plan_group` (defaults filled
in, one Python float per source) and :func:`source_indices`, and check a recipe with
:func:`validate_recipe`, whose first problem is one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from evomerge.errors import RecipeError, SourceError
from evomerge.merge.dtypes import COMPUTE_DTYPES, OUTPUT_DTYPES
from evomerge.merge.groups import DEFAULT_GROUP, OTHER_KINDS, PARTS, layer_key
from evomerge.merge.recipe import MergeRecipe

if TYPE_CHECKING:
    from evomerge.merge.sources import ModelSet


@dataclass(frozen=True)
class GroupPlan:
    """What ``merge_tensor`` gets for every tensor of one recipe group (params with defaults)."""

    method: str
    params: dict[str, Any]
    #: param -> one Python float per recipe source, in recipe order. Floats, not float32 tensors:
    #: density counts are int(density * numel), and float32 rounding of 0.7 would change them.
    source_params: dict[str, list[float]]


def plan_group(recipe: MergeRecipe, key: str) -> GroupPlan:
    """Fill a group's parameters with the method's defaults; a missing required value is an error."""
    from evomerge.merge import methods

    grp = recipe.groups[key]
    method = methods.get_method(grp.method)
    params = {**dict(method.params), **grp.params}
    names = list(method.source_params) + sorted(
        {p for sp in grp.source_params.values() for p in sp} - set(method.source_params))
    sp: dict[str, list[float]] = {}
    for p in names:
        default = method.source_params.get(p)
        values = []
        for src in recipe.sources:
            v = grp.source_params.get(src, {}).get(p, default)
            if v is None:
                raise RecipeError(f"recipe group {key!r}: model {src} has no {p!r} for method {grp.method}; "
                                  f"add it to source_params")
            values.append(float(v))
        sp[p] = values
    return GroupPlan(grp.method, params, sp)


def _lookup_keys(model_set: "ModelSet") -> set[str]:
    """Every recipe key some tensor of the model would look up (plus kind keys always)."""
    keys = {DEFAULT_GROUP, *OTHER_KINDS}
    for g in model_set.groups.values():
        if g.kind == "layer":
            keys.update(layer_key(g.layer, p) for p in (None, *PARTS))
    return keys


def source_indices(recipe: MergeRecipe, model_set: "ModelSet") -> list[int]:
    """Index in ``model_set.sources`` of each recipe source; one-line error for a stranger."""
    if (recipe.base is None) != (model_set.base is None):
        have = model_set.base.ref if model_set.base is not None else "none"
        raise RecipeError(f"recipe base is {recipe.base or 'none'} but the loaded models' base is {have}; "
                          f"use a recipe made for these models")
    if recipe.base is not None and model_set.by_ref(recipe.base) is not model_set.base:
        raise RecipeError(f"recipe base {recipe.base} is not the loaded base {model_set.base.ref}")
    out = []
    for ref in recipe.sources:
        hit = [i for i, s in enumerate(model_set.sources) if s.ref == ref]
        if not hit:
            try:
                m = model_set.by_ref(ref)
            except SourceError:
                m = None
            hit = [i for i, s in enumerate(model_set.sources) if s is m]
        if not hit:
            known = ", ".join(s.ref for s in model_set.sources)
            raise RecipeError(f"recipe names model {ref}, which is not a source (sources: {known}); "
                              f"name models exactly as in models.sources")
        out.append(hit[0])
    if len(set(out)) != len(out):
        raise RecipeError("recipe lists the same source model twice; list each source once")
    return out


def validate_recipe(recipe: MergeRecipe, model_set: "ModelSet") -> None:
    """Check a recipe against the loaded models before any work; the first problem is one line."""
    from evomerge.merge import methods

    source_indices(recipe, model_set)
    if recipe.dtype not in OUTPUT_DTYPES:
        raise RecipeError(f"recipe dtype {recipe.dtype!r} is not supported; use one of {', '.join(OUTPUT_DTYPES)}")
    if recipe.compute_dtype not in COMPUTE_DTYPES:
        raise RecipeError(f"recipe compute_dtype {recipe.compute_dtype!r} is not supported; use one of "
                          f"{', '.join(COMPUTE_DTYPES)}")
    valid = _lookup_keys(model_set)
    for key in recipe.groups:
        if key not in valid:
            raise RecipeError(f"recipe group {key!r} matches no tensor of the model ({model_set.num_layers} layers: "
                              f"layers.0 .. layers.{model_set.num_layers - 1}); fix or remove it")
    seen: set[str] = set()
    for group in model_set.groups.values():
        key, _ = recipe.group_for(group)  # no 'default' and a group uncovered -> RecipeError
        seen.add(key)
    for key, grp in recipe.groups.items():
        where = f"recipe group {key!r}"
        methods.check_methods_usable([grp.method], n_sources=len(recipe.sources), has_base=recipe.base is not None,
                                     where=where)
        plan = plan_group(recipe, key)
        methods.check_params(methods.get_method(grp.method), plan.source_params, plan.params, where)

