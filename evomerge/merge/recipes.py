"""Either kind of recipe from a dict: a parameter-space ``MergeRecipe`` or a data-flow ``PathRecipe``.

Logs, caches and actors hold recipes as plain dicts. Older logs know only the
parameter-space kind, which has no ``kind`` field, so the absence of the field means
``MergeRecipe`` and every old run directory still reads.
"""

from __future__ import annotations

from typing import Any, Mapping, Union

from evomerge.merge.path_recipe import DATAFLOW_KIND, PathRecipe
from evomerge.merge.recipe import MergeRecipe

#: what a search space produces and an actor materialises
AnyRecipe = Union[MergeRecipe, PathRecipe]


def is_path_recipe(data: Mapping[str, Any] | None) -> bool:
    """True when a recipe dict describes a data-flow path."""
    return bool(data) and data.get("kind") == DATAFLOW_KIND  # type: ignore[union-attr]


def recipe_from_dict(data: Mapping[str, Any]) -> AnyRecipe:
    """The recipe a dict stands for (one-line RecipeError when it is not one)."""
    if is_path_recipe(data):
        return PathRecipe.from_dict(dict(data))
    return MergeRecipe.from_dict(dict(data))


__all__ = ["AnyRecipe", "is_path_recipe", "recipe_from_dict"]
