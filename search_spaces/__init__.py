"""Search spaces (genomes): a registry from ``space.name`` to a SearchSpace class.

A space turns a nevergrad value into a MergeRecipe and back (see ``base.SearchSpace``).
``check_space`` runs at config-load time so a space that cannot fit the models fails
with one line before any Ray work starts.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any, Callable

from evomerge.errors import ConfigError, EvomergeError
from search_spaces.base import SearchSpace

if TYPE_CHECKING:  # pragma: no cover
    from evomerge.config import SearchConfig

#: space name -> class; a class is built as ``cls(cfg, model_set)``.
SPACES: dict[str, type[SearchSpace]] = {}


def register_space(name: str) -> Callable[[type[SearchSpace]], type[SearchSpace]]:
    """Class decorator adding a space to the registry under ``name``."""

    def deco(cls: type[SearchSpace]) -> type[SearchSpace]:
        cls.name = name
        SPACES[name] = cls
        return cls

    return deco


def _space_class(name: str) -> type[SearchSpace]:
    if name not in SPACES:
        close = difflib.get_close_matches(name, list(SPACES), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(
            f"config field space.name: unknown search space {name!r}; {hint}known spaces: {', '.join(sorted(SPACES))}"
        )
    return SPACES[name]


def get_space(cfg: "SearchConfig", model_set: Any) -> SearchSpace:
    """Build the configured search space for ``model_set`` (checks it first)."""
    check_space(cfg, model_set)
    return _space_class(cfg.space.name)(cfg, model_set)


def check_space(cfg: "SearchConfig", model_set: Any) -> None:
    """One-line ConfigError if the space cannot be built for these models.

    Checks: the space name is known; ``layer_group_size`` divides the layer count;
    bounds are ordered; every method in ``merge.methods`` can be used with these
    sources (e.g. slerp needs a base and exactly one source). Space classes may add
    their own checks in a ``check(cfg, model_set)`` classmethod.
    """
    cls = _space_class(cfg.space.name)
    n_layers = int(model_set.num_layers)
    k = cfg.space.layer_group_size
    if n_layers % k != 0:
        divisors = [d for d in range(1, n_layers + 1) if n_layers % d == 0]
        raise ConfigError(
            f"config field space.layer_group_size: {k} does not divide the model's {n_layers} layers; "
            f"use one of {', '.join(map(str, divisors))}"
        )
    for key, (lo, hi) in cfg.space.bounds.items():
        if lo > hi:
            raise ConfigError(f"config field space.bounds.{key}: lower bound {lo} > upper bound {hi}; swap them")
    from evomerge.merge.methods import check_methods_usable

    try:
        check_methods_usable(
            cfg.merge.methods,
            n_sources=len(model_set.sources),
            has_base=model_set.base is not None,
            where="merge.methods",
        )
    except ConfigError:
        raise
    except EvomergeError as err:
        raise ConfigError(str(err)) from None
    init = cfg.space.init
    if init not in (None, "uniform"):  # read now, not when the optimizer starts after Ray is up
        from evomerge.merge.materialise import load_recipe_file

        try:
            load_recipe_file(init)
        except EvomergeError as err:
            raise ConfigError(f"config field space.init ({init}): {err}") from None
    check = getattr(cls, "check", None)
    if check is not None:
        check(cfg, model_set)


# register the built-in spaces
from search_spaces import layerwise as _layerwise  # noqa: E402,F401
from search_spaces.optimizers import make_optimizer, optimizer_name  # noqa: E402,F401

__all__ = ["SPACES", "SearchSpace", "check_space", "get_space", "make_optimizer", "optimizer_name", "register_space"]
