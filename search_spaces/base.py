"""The SearchSpace interface: a genome (nevergrad parametrization) and its recipe.

A search space owns the translation between what the optimizer moves (a nevergrad
value: dicts of bounded arrays and categorical choices) and what the actors merge (a
``MergeRecipe``). Keeping it a pure, deterministic function of the value means the
append-only evaluation log can be replayed into a fresh optimizer on resume, and a
recipe read from a file can seed the search (``from_recipe``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import nevergrad as ng
import numpy as np

from evomerge.merge.recipe import MergeRecipe


class SearchSpace(ABC):
    """Base class of every genome. Subclasses register themselves in ``search_spaces.SPACES``."""

    #: registry name (``space.name`` in the config)
    name: str = ""
    #: True when candidates are weight merges (``MergeRecipe``): ``merge.methods`` and the layer
    #: groups apply. A data-flow space (``PathRecipe``) sets it False and checks its own keys.
    parameter_space: bool = True

    @abstractmethod
    def parametrization(self) -> ng.p.Parameter:
        """A fresh nevergrad parameter whose initial value is ``initial_value()``."""

    @abstractmethod
    def to_recipe(self, value: Any) -> MergeRecipe:
        """The recipe a genome value stands for (pure; any in-bounds value gives a valid recipe)."""

    @abstractmethod
    def from_recipe(self, recipe: MergeRecipe) -> Any:
        """A genome value for ``recipe``; ``to_recipe(from_recipe(r)) == r`` when the space can express r."""

    @abstractmethod
    def initial_value(self) -> Any:
        """Where the optimizer starts (the uniform merge, or the user's ``space.init`` recipe)."""

    def describe(self) -> str:
        """One line for the driver log: the genome's shape (spaces override it with their genes)."""
        return self.name

    # -- JSON for the evaluation log ------------------------------------------------
    def value_to_json(self, value: Any) -> Any:
        """A JSON-serialisable copy of a value (arrays -> lists, tuples -> lists)."""
        return _to_json(value)

    def value_from_json(self, data: Any) -> Any:
        """Inverse of ``value_to_json``: what ``parametrization().value = ...`` accepts."""
        return data


def _to_json(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    return value
