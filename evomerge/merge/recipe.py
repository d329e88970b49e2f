"""MergeRecipe: what to do to every tensor group, small and JSON-serialisable.

A recipe is the unit that crosses the network between the search driver and the Ray
actors, is logged to ``evaluations.jsonl`` and is exported next to a merged model. It
names the models (base + sources, as the user gave them), and for each tensor group
(see ``groups.py``) the merge method, the method-level parameters (mergekit's
``parameters:``: normalize, lambda, rescale, t, ...) and the per-source parameters
(mergekit's per-model ``parameters:``: weight, density, epsilon, gamma).

Lookup of a tensor's settings is most-specific first:
``layers.3.attn`` -> ``layers.3`` -> ``default`` (and ``embed`` / ``final_norm`` /
``lm_head`` -> ``default``), so a recipe can be as coarse or as fine as it likes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, Mapping, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from evomerge.errors import RecipeError
from evomerge.merge.groups import DEFAULT_GROUP, TensorGroup

__all__ = ["DEFAULT_GROUP", "GroupRecipe", "MergeRecipe", "RecipeModel"]


class GroupRecipe(BaseModel):
    """Method and parameters for one tensor group."""

    model_config = ConfigDict(extra="forbid")

    method: str
    params: dict[str, float | bool] = Field(default_factory=dict)
    source_params: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="source name (as in MergeRecipe.sources) -> {weight, density, ...}"
    )


R = TypeVar("R", bound="RecipeModel")


class RecipeModel(BaseModel):
    """What every kind of recipe shares: strict fields, one-line errors, canonical JSON and its hash.

    ``MergeRecipe`` (weights mixed per tensor group) and ``PathRecipe`` (a layer path,
    ``path_recipe.py``) subclass it; ``_what`` names the kind in error messages."""

    model_config = ConfigDict(extra="forbid")
    _what: ClassVar[str] = "recipe"

    # -- serialisation ----------------------------------------------------------
    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls: type[R], data: dict[str, Any]) -> R:
        try:
            return cls.model_validate(data)
        except Exception as err:  # pydantic.ValidationError -> one line
            errors = getattr(err, "errors", None)
            if callable(errors):
                first = errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                raise RecipeError(f"{cls._what} field {where or '<top>'}: "
                                  f"{first['msg'].removeprefix('Value error, ')}") from None
            raise RecipeError(f"invalid {cls._what}: {err}") from None

    @classmethod
    def from_json(cls: type[R], text: str) -> R:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise RecipeError(f"{cls._what} is not valid JSON: {err}") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls: type[R], path: str | Path) -> R:
        p = Path(path)
        if not p.is_file():
            raise RecipeError(f"recipe file {p} does not exist")
        return cls.from_json(p.read_text())

    def canonical_json(self) -> str:
        """The recipe as canonical JSON (``canonical_json``): equal strings <=> equal recipes."""
        return canonical_json(self.to_dict())

    def content_hash(self) -> str:
        """Stable hash of the recipe's meaning, for caches and ids."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:16]


class MergeRecipe(RecipeModel):
    """A complete merge: models, groups, seed and dtypes."""

    base: str | None = None
    sources: list[str]
    groups: dict[str, GroupRecipe]
    seed: int = 0
    dtype: str = "float32"
    compute_dtype: str = "float32"
    tokenizer_source: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "MergeRecipe":
        if not self.sources:
            raise ValueError("a recipe needs at least one source")
        known = set(self.sources)
        for key, group in self.groups.items():
            for src in group.source_params:
                if src not in known:
                    raise ValueError(
                        f"group {key!r} names model {src!r}, which is not a source of the recipe "
                        f"(sources: {', '.join(self.sources)})"
                    )
        return self

    # -- lookup -----------------------------------------------------------------
    def group_for(self, group: TensorGroup) -> tuple[str, GroupRecipe]:
        """The (key, settings) that apply to a tensor of ``group``, most specific first."""
        keys = group.lookup_keys()
        for k in keys:
            if k in self.groups:
                return k, self.groups[k]
        raise RecipeError(f"recipe has no entry for group {keys[0]!r} and no 'default' group; add one")

    def methods_used(self) -> set[str]:
        return {g.method for g in self.groups.values()}


def canonical_json(recipe: Mapping[str, Any] | None) -> str:
    """A recipe dict as sorted, compact JSON: the one spelling every recipe hash and comparison uses.

    Floats round-trip exactly through JSON, so equal strings mean equal recipes (the
    evaluation cache key, the actors' "already merged" check and the resume replay's
    "same ask as logged" check all compare recipes this way).
    """
    return json.dumps(recipe, sort_keys=True, separators=(",", ":"))
