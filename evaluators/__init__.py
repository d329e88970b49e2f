"""Fitness functions: evaluators built once per actor, scoring live (merged-in-place) models.

Public API (see docs/internals.md, "Evaluators"):
``build_objectives(cfg, tokenizer, device) -> ObjectiveSet``, ``ObjectiveSet.evaluate(model, split)``,
``ObjectiveSet.directions``, ``check_objectives(cfg)``, ``evaluation_key(recipe, cfg)``;
``register_evaluator(name)`` adds an evaluator kind (built in: ``lm_eval``, ``perplexity``).
"""

from evaluators.base import (
    Direction,
    Evaluator,
    ObjectiveSet,
    Term,
    build_objectives,
    check_objectives,
    evaluator_names,
    get_evaluator,
    register_evaluator,
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
    "evaluator_names",
    "get_evaluator",
    "register_evaluator",
]
