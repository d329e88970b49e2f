"""The evaluator protocol, the registry of evaluator kinds, and ObjectiveSet.

An *evaluator* is the expensive part of fitness: tokenizer, lm-eval task objects,
datasets, tokenised text. It is built ONCE per Ray actor and then called for every
candidate with the live (merged-in-place) model. It returns raw *measurements*, keyed
by a string it chooses (``"demo_add|exact_match|..."``), each with a direction.

An *objective* (config ``objectives:``) is one measurement or a weighted sum of
several (``components``). ``ObjectiveSet`` groups the objectives by evaluator kind,
builds one evaluator per kind (so all lm-eval tasks share one model wrapper and are
run per call in one pass) and turns measurements into ``{objective: score}``.

Kinds are entries of the lazy ``EVALUATORS`` registry (``"module:Class"``); the config's
``objectives[i].evaluator`` picks one by name, or names a ``"module:Class"`` of its own.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Protocol, Sequence

from evomerge.config import ObjectiveConfig, SearchConfig
from evomerge.errors import EvaluatorError
from evomerge.registry import Registry

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
    """What the registry holds: fast config-level checks and directions, and a (slow, once-per-actor) builder."""

    def check(self, objectives: Sequence[ObjectiveConfig], cfg: SearchConfig) -> None: ...

    def directions(self, objectives: Sequence[ObjectiveConfig], cfg: SearchConfig) -> dict[str, Direction]: ...

    def __call__(
        self, objectives: Sequence[ObjectiveConfig], cfg: SearchConfig, tokenizer: Any, device: Any
    ) -> Evaluator: ...


#: evaluator kinds by config name (``objectives[i].evaluator``); entries are imported on first use,
#: so this module never imports a plug-in (which imports this module) and config checks that
#: only need the names import neither lm-eval nor torch. A config may also name its own kind as
#: ``"package.module:Class"``.
EVALUATORS: Registry[Any] = Registry("evaluator", {
    "lm_eval": "evaluators.lm_eval_evaluator:LmEvalEvaluator",
    "perplexity": "evaluators.perplexity:PerplexityEvaluator",
}, error=EvaluatorError)


def get_evaluator(name: str, where: str = "objectives") -> Any:
    """The evaluator kind called ``name`` (imported on first use); one-line EvaluatorError otherwise."""
    return EVALUATORS.get(name, where=where)


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


def objective_directions(cfg: SearchConfig) -> dict[str, Direction]:
    """{objective: direction} from the config alone: no model, no actor, no lm-eval task built.

    An objective's ``direction`` wins; otherwise each evaluator kind says which way its
    metrics are better (``Kind.directions``: lm-eval reads ``higher_is_better`` from the task
    YAML and its metric registry, perplexity is minimized). The driver, the archive and
    every report use these; an actor checks that the evaluators it built agree.
    """
    out: dict[str, Direction] = {}
    for kind, objectives in _by_kind(cfg).items():
        out.update(get_evaluator(kind).directions(objectives, cfg))
    return {o.name: out[o.name] for o in cfg.objectives}


def shared_direction(obj: ObjectiveConfig, term_directions: Sequence[Direction]) -> Direction:
    """The config's direction, else the one all the objective's terms share (mixed needs an explicit one)."""
    if obj.direction is not None:
        return obj.direction
    dirs = set(term_directions)
    if len(dirs) != 1:
        raise EvaluatorError(
            f"objective {obj.name!r} sums metrics that are maximized and minimized; "
            f"set direction: maximize|minimize on it (and negative weights where needed)"
        )
    return dirs.pop()


def combine(terms: Sequence[Term], measurements: Mapping[str, float]) -> float:
    """A weighted sum of measurements (a single term with weight 1 is the measurement itself)."""
    if len(terms) == 1 and terms[0].weight == 1.0:
        return float(measurements[terms[0].key])
    return float(sum(t.weight * float(measurements[t.key]) for t in terms))


def objective_direction(obj: ObjectiveConfig, terms: Sequence[Term], directions: Mapping[str, Direction]) -> Direction:
    """The direction of ``obj`` as the built evaluators define its terms (``shared_direction``)."""
    return shared_direction(obj, [directions[t.key] for t in terms])


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
        #: a screen's items as lm-eval doc ids of each objective's task, from the last call with ``items``
        self.last_doc_ids: dict[str, list[int]] = {}

    def evaluate(self, model: Any, split: Split = "selection",
                 items: Mapping[str, Sequence[int]] | None = None) -> dict[str, float]:
        """Score the live model on every objective: {objective name: value}.

        ``items``: a screen (``evaluation.fidelity``): {objective: positions of its selection
        items}; each objective is scored on those items only (the mean of their values) and
        ``last_items`` holds their per-item values, in sorted position order. Only
        single-measurement objectives of evaluators that take ``items`` can be screened.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        measurements: dict[str, float] = {}
        per_item: dict[str, list[float]] = {}
        doc_ids: dict[str, list[int]] = {}
        self.last_timings = {}
        by_key = None
        if items is not None:
            by_key = {}
            for name, positions in items.items():
                kind, terms = self._terms[name]
                if len(terms) != 1 or terms[0].weight != 1.0:
                    raise EvaluatorError(f"objective {name!r} sums several metrics and cannot be screened")
                by_key.setdefault(kind, {})[terms[0].key] = list(positions)
        for kind, ev in self.evaluators.items():
            if by_key is not None and kind not in by_key:
                continue
            t0 = time.perf_counter()
            measurements.update(ev(model, split) if by_key is None else ev(model, split, items=by_key[kind]))
            per_item.update(getattr(ev, "last_items", None) or {})
            doc_ids.update(getattr(ev, "last_doc_ids", None) or {})
            self.last_timings[kind] = time.perf_counter() - t0
        self.last_items = {}
        self.last_doc_ids = {}
        for o in self.objectives:
            terms = self._terms[o.name][1]
            if len(terms) == 1 and terms[0].weight == 1.0 and terms[0].key in per_item:
                self.last_items[o.name] = per_item[terms[0].key]
            if items is not None and o.name in items and len(terms) == 1 and terms[0].key in doc_ids:
                self.last_doc_ids[o.name] = doc_ids[terms[0].key]
        names = [o.name for o in self.objectives if items is None or o.name in items]
        return {n: combine(self._terms[n][1], measurements) for n in names}


def build_objectives(cfg: SearchConfig, tokenizer: Any, device: Any = "cpu") -> ObjectiveSet:
    """Build every evaluator the config needs (slow: once per actor)."""
    return ObjectiveSet(cfg, tokenizer, device)
