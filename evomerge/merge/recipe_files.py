"""Reading a recipe file of any kind: what ``evomerge merge`` and ``space.init`` accept.

``recipe.json`` holds a parameter-space ``MergeRecipe`` or a data-flow ``PathRecipe``; a
mergekit YAML is a per-group merge (``mergekit_import``) or, for a passthrough that stacks
layers, a ``LayerStack`` (``layer_stack_yaml``). Kept apart from the writers so that the writers
(``materialise``, ``layer_stack``) never import each other through it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from evomerge.errors import RecipeError, read_utf8
from evomerge.merge.recipe import MergeRecipe
from evomerge.merge.recipes import is_path_recipe, recipe_from_dict

if TYPE_CHECKING:  # pragma: no cover
    from evomerge.merge.layer_stack import LayerStack
    from evomerge.merge.path_recipe import PathRecipe

__all__ = ["load_recipe_file"]


def load_recipe_file(path: str | Path) -> "MergeRecipe | PathRecipe | LayerStack":
    """A recipe from ``recipe.json`` or a mergekit YAML (model paths relative to the YAML's folder).

    JSON: a parameter-space ``MergeRecipe``, or a data-flow ``PathRecipe`` (``"kind": "dataflow"``).
    YAML: a ``LayerStack`` for a passthrough whose slices reorder layers, mix models or have
    empty ranges (:func:`evomerge.merge.layer_stack_yaml.is_layer_stack_yaml`), else a ``MergeRecipe``.
    """
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe file {p} does not exist; pass a recipe.json or a mergekit YAML")
    text = read_utf8(p, RecipeError)  # bad bytes: one line, not a UnicodeDecodeError traceback
    if p.suffix.lower() in (".yaml", ".yml"):
        return _load_yaml_recipe(text, p.parent)
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    try:
        if isinstance(data, dict) and is_path_recipe(data):
            return recipe_from_dict(data)
        return MergeRecipe.from_json(text)
    except RecipeError as err:
        raise RecipeError(f"{p}: {err}") from None


def _load_yaml_recipe(text: str, base_dir: Path) -> "MergeRecipe | LayerStack":
    import yaml

    from evomerge.merge.layer_stack_yaml import has_scale_parameters, is_layer_stack_yaml, stack_from_mergekit_yaml
    from evomerge.merge.mergekit_import import from_mergekit_yaml

    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError:
        docs = []  # the importer reports the parse error
    doc = docs[0] if len(docs) == 1 else None
    if is_layer_stack_yaml(doc):
        return stack_from_mergekit_yaml(doc, base_dir)
    try:
        return from_mergekit_yaml(text, base_dir=base_dir)
    except RecipeError as err:
        # one model's layers in order with scale filters the parameter-space groups cannot
        # hold (say filter: o_proj): a layer stack can, when that is all it is
        if not (isinstance(doc, dict) and str(doc.get("merge_method")) == "passthrough"
                and has_scale_parameters(doc)):
            raise
        first = err
    try:
        return stack_from_mergekit_yaml(doc, base_dir)
    except RecipeError:
        raise first from None
