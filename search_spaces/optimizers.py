"""Picking and seeding the nevergrad optimizer.

Any name in ``ng.optimizers.registry`` works. Without a name, CMA-ES drives a single
objective (it adapts step sizes per gene, the strongest default for continuous genomes)
and differential evolution several (nevergrad's multi-objective mode works with any
optimizer, and DE's population spreads along the front better than CMA's single mean).

Reproducibility: the optimizer draws every random number from
``parametrization.random_state``, which is seeded from ``optimizer.seed``; so a fresh
optimizer fed the logged asks and tells (``search.searchbook.SearchBook.replay``) asks
exactly what the uninterrupted run would have asked. Nothing is pickled: the log is the state.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

import nevergrad as ng
import numpy as np

from evomerge.errors import ConfigError


def optimizer_name(cfg: Any) -> str:
    """The configured optimizer, or the default for the number of objectives."""
    if cfg.optimizer.name:
        return cfg.optimizer.name
    return "CMA" if len(cfg.objectives) == 1 else "DE"


def resolve_optimizer(name: str) -> Any:
    """The registry entry for ``name``; one-line ConfigError with close matches if unknown."""
    registry = ng.optimizers.registry
    if name in registry:
        return registry[name]
    lowered = {k.lower(): k for k in registry}
    if name.lower() in lowered:
        return registry[lowered[name.lower()]]
    close = [lowered[c] for c in difflib.get_close_matches(name.lower(), list(lowered), n=5, cutoff=0.6)]
    hint = f"close matches: {', '.join(close)}" if close else "e.g. CMA, DE, TwoPointsDE, NGOpt, PSO, OnePlusOne"
    raise ConfigError(
        f"config field optimizer.name: unknown nevergrad optimizer {name!r}; {hint} "
        f"(any name in nevergrad.optimizers.registry works)"
    )


def _with_popsize(name: str, factory: Any, popsize: int) -> Any:
    """A copy of a configured optimizer family (DE, CMA, ...) with another population size."""
    config = getattr(factory, "_config", None)
    if config is not None and "popsize" in inspect.signature(type(factory).__init__).parameters:
        return type(factory)(**{**config, "popsize": popsize})
    raise ConfigError(
        f"config field optimizer.popsize: optimizer {name!r} has no population size; remove popsize "
        f"or use a population-based optimizer (DE, TwoPointsDE, CMA, PSO)"
    )


def make_optimizer(cfg: Any, parametrization: ng.p.Parameter, *, budget: int | None = None,
                   num_workers: int = 1) -> Any:
    """A seeded nevergrad optimizer over ``parametrization``.

    ``num_workers`` is the number of actors (candidates in flight at once);
    ``cfg.optimizer.popsize`` overrides the family's population size when set.
    """
    name = optimizer_name(cfg)
    factory = resolve_optimizer(name)
    if cfg.optimizer.popsize is not None:
        factory = _with_popsize(name, factory, cfg.optimizer.popsize)
    parametrization.random_state = np.random.RandomState(cfg.optimizer.seed)
    return factory(parametrization=parametrization, budget=budget, num_workers=max(1, int(num_workers)))
