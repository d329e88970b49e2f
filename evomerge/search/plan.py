"""The plan of a search: every check of a config against the disk and the plug-ins, run once.

A config that parses (``evomerge.config``) can still name a missing model, an unknown
task or a layer group that does not divide the model. ``plan_search`` asks the module
that owns each resource, in the order a user would fix them, and keeps what it learns:
the resolved model set, the built search space, each objective's direction and the
optimizer's name. The commands build the plan once, before the run dir is touched or
Ray starts, and hand it down, so no fact is computed twice on the data path and no
later stage can disagree with an earlier one.
"""

from __future__ import annotations

from dataclasses import dataclass
from evaluators import check_objectives, objective_directions
from evomerge.config import SearchConfig
from evomerge.pareto import Direction
from evomerge.merge.sources import ModelSet, model_set_for
from evomerge.search.screening import check_fidelity
from search_spaces import SearchSpace, build_space
from search_spaces.optimizers import optimizer_name, resolve_optimizer


@dataclass(frozen=True)
class SearchPlan:
    """A checked config and the facts derived from it (see the module docstring)."""

    cfg: SearchConfig
    model_set: ModelSet
    space: SearchSpace
    directions: dict[str, Direction]  # objective -> "maximize" | "minimize", in config order
    optimizer: str  # nevergrad registry name

    @property
    def objectives(self) -> list[tuple[str, Direction]]:
        """``[(objective, direction)]`` in config order: the order losses are told."""
        return list(self.directions.items())

    def with_config(self, cfg: SearchConfig) -> "SearchPlan":
        """The same plan for a config that differs only in operational keys (budget, output, ray)."""
        return SearchPlan(cfg, self.model_set, self.space, self.directions, self.optimizer)


def plan_search(cfg: SearchConfig) -> SearchPlan:
    """Check ``cfg`` against models, space, objectives and optimizer; the first failure is one line."""
    model_set = model_set_for(cfg.models)
    space = build_space(cfg, model_set)
    check_objectives(cfg)
    check_fidelity(cfg)
    directions = objective_directions(cfg)
    name = optimizer_name(cfg)
    resolve_optimizer(name)
    return SearchPlan(cfg, model_set, space, directions, name)


def describe(plan: SearchPlan) -> str:
    """The plan in one line, for the driver log: what is merged, the genome, the optimizer, the objectives."""
    base = plan.model_set.base.ref if plan.model_set.base is not None else "none"
    objectives = ", ".join(f"{k} ({v})" for k, v in plan.directions.items())
    return (f"{len(plan.model_set.sources)} sources on base {base} ({plan.model_set.num_layers} layers); "
            f"{plan.space.describe()}; optimizer {plan.optimizer}; objectives {objectives}")
