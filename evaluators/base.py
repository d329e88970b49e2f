"""The evaluator protocol, the registry of evaluator kinds, and ObjectiveSet.

An *evaluator* is the expensive part of fitness: tokenizer, lm-eval task objects,
datasets, tokenised text. It is built ONCE per Ray actor and then called for every
candidate with the live (merged-in-place) model. It returns raw *measurements*, keyed
by a string it chooses (``"demo_add|exact_match|..."``), each with a direction.

An *objective* (config ``objectives:``) is one measurement or a weighted sum of
several (``components``). ``ObjectiveSet`` groups the objectives by evaluator kind,
builds one evaluator per kind (so all lm-eval tasks share one model wrapper and are
run per call in one pass) and turns measurements into ``{objective: score}``.

New kinds register with ``@register_evaluator("name")``; the config's
``objectives[i].evaluator`` picks one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Protocol, Sequence

from evomerge.config import ObjectiveConfig, SearchConfig
from evomerge.errors import EvaluatorError

log = logging.getLogger(__name__)

Direction = Literal["maximize", "minimize"]
Split = Literal["selection", "heldout"]
SPLITS: tuple[str, ...] = ("selection", "heldout")


@dataclass(frozen=True)
class Term:
    """One weighted measurement inside an objective."""

    key: str
    weight: float = 1.0


class Evaluator(Protocol):
    """Built once per actor; called with a live model for every candidate."""

    #: direction of every measurement key this evaluator can return
    directions: Mapping[str, Direction]

    def terms(self, objective: ObjectiveConfig) -> list[Term]:
        """The measurements (and weights) that make up ``objective``."""

    def __call__(self, model: Any, split: Split = "selection") -> dict[str, float]:
        """Score the live model; returns {measurement key: value} for every key in ``directions``."""


class EvaluatorKind(Protocol):
    """What the registry holds: a fast config check and a (slow, once-per-actor) builder."""

    def check(self, objectives: Sequence[ObjectiveConfig], cfg: SearchConfig) -> None: ...

    def __call__(
        self, objectives: Sequence[ObjectiveConfig], cfg: SearchConfig, tokenizer: Any, device: Any
    ) -> Evaluator: ...


_REGISTRY: dict[str, Any] = {}


def register_evaluator(name: str) -> Callable[[Any], Any]:
    """Class decorator: make an evaluator kind available as ``evaluator: <name>`` in configs."""

    def wrap(cls: Any) -> Any:
        _REGISTRY[name] = cls
        return cls

    return wrap


def get_evaluator(name: str, where: str = "objectives") -> Any:
    _load_builtin_kinds()
    if name not in _REGISTRY:
        raise EvaluatorError(
            f"{where}: unknown evaluator {name!r}; use one of {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name]


def evaluator_names() -> list[str]:
    _load_builtin_kinds()
    return sorted(_REGISTRY)


def _load_builtin_kinds() -> None:
    # Imported lazily: the modules import lm-eval/torch, which config loading should not pay
    # unless an objective needs them.
    from evaluators import lm_eval_evaluator, perplexity  # noqa: F401


def _by_kind(cfg: SearchConfig) -> dict[str, list[ObjectiveConfig]]:
    groups: dict[str, list[ObjectiveConfig]] = {}
    for i, obj in enumerate(cfg.objectives):
        get_evaluator(obj.evaluator, where=f"objectives.{i}.evaluator")
        groups.setdefault(obj.evaluator, []).append(obj)
    return groups


def check_objectives(cfg: SearchConfig) -> None:
    """Fast resource checks of ``objectives`` (tasks, metrics, files); one-line EvaluatorError."""
    for kind, objectives in _by_kind(cfg).items():
        get_evaluator(kind).check(objectives, cfg)


def combine(terms: Sequence[Term], measurements: Mapping[str, float]) -> float:
    """A weighted sum of measurements (a single term with weight 1 is the measurement itself)."""
    if len(terms) == 1 and terms[0].weight == 1.0:
        return float(measurements[terms[0].key])
    return float(sum(t.weight * float(measurements[t.key]) for t in terms))


def objective_direction(obj: ObjectiveConfig, terms: Sequence[Term], directions: Mapping[str, Direction]) -> Direction:
    """The config's direction, else the one all its terms share (mixed directions need an explicit one)."""
    if obj.direction is not None:
        return obj.direction
    dirs = {directions[t.key] for t in terms}
    if len(dirs) != 1:
        raise EvaluatorError(
            f"objective {obj.name!r} sums metrics that are maximized and minimized; "
            f"set direction: maximize|minimize on it (and negative weights where needed)"
        )
    return dirs.pop()


class ObjectiveSet:
    """Every objective of a config, ready to score live models (built once per actor)."""

    def __init__(self, cfg: SearchConfig, tokenizer: Any, device: Any) -> None:
        self.objectives: list[ObjectiveConfig] = list(cfg.objectives)
        self.evaluators: dict[str, Evaluator] = {}
        self._terms: dict[str, tuple[str, list[Term]]] = {}
        self.directions: dict[str, Direction] = {}
        t0 = time.perf_counter()
        for kind, objectives in _by_kind(cfg).items():
            ev = get_evaluator(kind)(objectives, cfg, tokenizer, device)
            self.evaluators[kind] = ev
            for obj in objectives:
                terms = ev.terms(obj)
                self._terms[obj.name] = (kind, terms)
        for obj in self.objectives:
            kind, terms = self._terms[obj.name]
            self.directions[obj.name] = objective_direction(obj, terms, self.evaluators[kind].directions)
        self.build_s = time.perf_counter() - t0
        #: seconds spent per evaluator kind in the last ``evaluate`` call
        self.last_timings: dict[str, float] = {}
        #: per-item values of each single-measurement objective from the last call, when its
        #: evaluator reports them (lm_eval does on the heldout split): paired comparisons need them
        self.last_items: dict[str, list[float]] = {}

    def evaluate(self, model: Any, split: Split = "selection") -> dict[str, float]:
        """Score the live model on every objective: {objective name: value}."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        measurements: dict[str, float] = {}
        items: dict[str, list[float]] = {}
        self.last_timings = {}
        for kind, ev in self.evaluators.items():
            t0 = time.perf_counter()
            measurements.update(ev(model, split))
            items.update(getattr(ev, "last_items", None) or {})
            self.last_timings[kind] = time.perf_counter() - t0
        self.last_items = {}
        for o in self.objectives:
            terms = self._terms[o.name][1]
            if len(terms) == 1 and terms[0].weight == 1.0 and terms[0].key in items:
                self.last_items[o.name] = items[terms[0].key]
        return {o.name: combine(self._terms[o.name][1], measurements) for o in self.objectives}


def build_objectives(cfg: SearchConfig, tokenizer: Any, device: Any = "cpu") -> ObjectiveSet:
    """Build every evaluator the config needs (slow: once per actor)."""
    return ObjectiveSet(cfg, tokenizer, device)
