"""Fitness functions: evaluators built once per actor, scoring live (merged-in-place) models.

Public API (the layers and the data path: docs/architecture.md):
``build_objectives(cfg, tokenizer, device) -> ObjectiveSet``, ``ObjectiveSet.evaluate(model, split)``,
``ObjectiveSet.directions``, ``check_objectives(cfg)``, ``evaluation_key(recipe, cfg)``;
``objective_directions(cfg)``; ``EVALUATORS`` is the lazy registry of evaluator kinds (built in:
``lm_eval``, ``perplexity``; ``EVALUATORS.add(name, "module:Class")`` adds one).
"""

from evaluators.base import (
    Direction,
    Evaluator,
    ObjectiveSet,
    Term,
    build_objectives,
    check_objectives,
    EVALUATORS,
    objective_directions,
    get_evaluator,
)
from evaluators.cache import evaluation_key

__all__ = [
    "Direction",
    "Evaluator",
    "ObjectiveSet",
    "Term",
    "build_objectives",
    "check_objectives",
    "evaluation_key",
    "EVALUATORS",
    "objective_directions",
    "get_evaluator",
]
