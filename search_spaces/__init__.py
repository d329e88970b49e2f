"""Search spaces (genomes): a registry from ``space.name`` to a SearchSpace class.

A space turns a nevergrad value into a MergeRecipe and back (see ``base.SearchSpace``).
``check_space`` runs at config-load time so a space that cannot fit the models fails
with one line before any Ray work starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from evomerge.errors import ConfigError, EvomergeError
from evomerge.registry import Registry
from search_spaces.base import SearchSpace

if TYPE_CHECKING:  # pragma: no cover
    from evomerge.config import SearchConfig

#: space name (``space.name``) -> ``"module:Class"``, imported on first use: this package never
#: imports a space to learn its name, so spaces import ``search_spaces.base`` without a circle.
#: A config may name its own space as ``"package.module:Class"``; a class is built as
#: ``cls(cfg, model_set)`` and may add checks in a ``check(cfg, model_set)`` classmethod.
SPACES: Registry[type[SearchSpace]] = Registry("search space", {
    "layerwise": "search_spaces.layerwise:LayerwiseSpace",
    "dataflow": "search_spaces.dataflow:DataflowSpace",
}, error=ConfigError)


def _space_class(name: str) -> type[SearchSpace]:
    return SPACES.get(name, where="space.name")


def build_space(cfg: "SearchConfig", model_set: Any) -> SearchSpace:
    """Check, then build, the configured search space for ``model_set`` (the one place a space is made)."""
    check_space(cfg, model_set)
    return _space_class(cfg.space.name)(cfg, model_set)


def check_space(cfg: "SearchConfig", model_set: Any) -> None:
    """One-line ConfigError if the space cannot be built for these models.

    Checks: the space name is known; every method in ``merge.methods`` can be used with
    these sources (e.g. slerp needs a base and exactly one source); ``layer_group_size``
    divides the layer count; ``space.init`` reads. (Bounds are the config's to check.)
    Space classes may add their own checks in a ``check(cfg, model_set)`` classmethod.
    """
    from evomerge.merge.methods import check_methods_usable

    cls = _space_class(cfg.space.name)
    if not getattr(cls, "parameter_space", True):  # a data-flow space merges no weights: its own checks only
        check = getattr(cls, "check", None)
        if check is not None:
            check(cfg, model_set)
        return
    try:
        check_methods_usable(cfg.merge.methods, n_sources=len(model_set.sources),
                             has_base=model_set.base is not None, where="merge.methods")
    except EvomergeError as err:  # a MethodError: in a config, a config error
        raise ConfigError(str(err)) from None
    n_layers = int(model_set.num_layers)
    k = cfg.space.layer_group_size
    if n_layers % k != 0:
        divisors = [d for d in range(1, n_layers + 1) if n_layers % d == 0]
        raise ConfigError(
            f"config field space.layer_group_size: {k} does not divide the model's {n_layers} layers; "
            f"use one of {', '.join(map(str, divisors))}"
        )
    init = cfg.space.init
    if init not in (None, "uniform"):  # read now, not when the optimizer starts after Ray is up
        from evomerge.merge.recipe_files import load_recipe_file

        try:
            load_recipe_file(init)
        except EvomergeError as err:
            raise ConfigError(f"config field space.init ({init}): {err}") from None
    check = getattr(cls, "check", None)
    if check is not None:
        check(cfg, model_set)


__all__ = ["SPACES", "SearchSpace", "build_space", "check_space"]
