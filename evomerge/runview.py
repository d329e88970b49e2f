"""A read-only view of a run directory, for reports and exports.

``status``, ``plot`` and ``export`` only *read* a run, possibly while the driver is still
writing it (``report.png`` is redrawn at each checkpoint). They therefore read the
append-only ``evaluations.jsonl`` straight from disk (it is the run's source of truth,
see docs/architecture.md) instead of going through the search layer, and
nothing here ever writes to the run. The log is read by the project's one JSONL reader
(``fileio.read_jsonl``: a torn last line from a crash is skipped, a corrupt line before
good ones is a one-line RunDirError) into the typed records of ``evomerge.records``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from evomerge.errors import EvomergeError, RunDirError, read_utf8
from evomerge.fileio import read_jsonl
from evomerge.pareto import MAXIMIZE, ParetoArchive, sign
from evomerge.records import EvaluationRecord, HeldoutRecord, ReferenceRecord, parse_record

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Objective:
    """One objective of the run and which way is better (from front.json, else config.yaml)."""

    name: str
    direction: str  # "maximize" | "minimize" (``evomerge.pareto.Direction``)

    @property
    def sign(self) -> float:
        """+1 when larger is better: ``sign * score`` is always 'larger is better'."""
        return sign(self.direction)

    @property
    def maximized(self) -> bool:
        return self.direction == MAXIMIZE


@dataclass
class RunView:
    """Everything a report needs, parsed once from the run directory."""

    path: Path
    config: dict[str, Any]
    objectives: list[Objective]
    evaluations: list[EvaluationRecord]
    heldout: dict[str, dict[str, float]]
    references: list[ReferenceRecord]
    front: list[str]
    front_hypervolume: float | None = None
    #: per-item held-out values {id: {objective: [value per item]}}, for runs that logged them
    heldout_items: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    # -- lookups -----------------------------------------------------------------
    @property
    def objective_names(self) -> list[str]:
        return [o.name for o in self.objectives]

    @property
    def directions(self) -> dict[str, str]:
        return {o.name: o.direction for o in self.objectives}

    @property
    def failed(self) -> int:
        """Evaluations that failed (shown next to the count done)."""
        return sum(1 for e in self.evaluations if not e.ok)

    def scored(self, e: EvaluationRecord) -> bool:
        """``e`` was measured (not a screen's estimate) with a finite score on every objective: a point
        the front can hold."""
        return e.ok and e.measured and _complete(e.scores, self.objective_names)

    def ok_evaluations(self) -> list[EvaluationRecord]:
        return [e for e in self.evaluations if self.scored(e)]

    def estimated_evaluations(self) -> list[EvaluationRecord]:
        """Candidates a screen estimated and did not promote (``evaluation.fidelity``): told to the
        optimizer, shown apart, never on the front."""
        return [e for e in self.evaluations if e.ok and not e.measured and _complete(e.scores, self.objective_names)]

    def get(self, eval_id: str) -> EvaluationRecord | None:
        for e in reversed(self.evaluations):  # a re-evaluation after resume wins
            if e.id == eval_id:
                return e
        return None

    def front_evaluations(self) -> list[EvaluationRecord]:
        out = []
        for i in self.front:
            e = self.get(i)
            if e is not None and e.ok:
                out.append(e)
        return out

    def budget(self) -> dict[str, Any]:
        return dict(self.config.get("budget") or {})


def _complete(scores: Mapping[str, float], names: Sequence[str]) -> bool:
    return all(isinstance(scores.get(n), (int, float)) and math.isfinite(scores[n]) for n in names)


def log_archive(view: RunView, upto: int | None = None) -> ParetoArchive:
    """A ParetoArchive fed the successful evaluations of the log, in log (tell) order.

    The same archive class and order the driver uses, so ties, the front and the
    hypervolume reference ("worst score seen") mean exactly what they mean in front.json.
    """
    arch = ParetoArchive(view.directions)
    for e in view.evaluations[:upto]:
        if view.scored(e):
            arch.add(e.id, e.scores)
    return arch


# -- loading ------------------------------------------------------------------------
def _objectives_from(path: Path, front: dict[str, Any] | None, config: dict[str, Any]) -> list[Objective]:
    """The objectives and their directions, as the search defined them.

    front.json records them (a search writes it as soon as its session starts); a run
    dir without one (a crash before that) gets them the way the search does, from the
    config through the evaluators (``evaluators.objective_directions``), never guessed
    from a name.
    """
    if front and front.get("objectives"):
        return [Objective(o["name"], o.get("direction") or MAXIMIZE) for o in front["objectives"]]
    if not config.get("objectives"):
        return []
    from evaluators import objective_directions
    from evomerge.config import parse_config

    try:
        directions = objective_directions(parse_config(config))
    except EvomergeError as err:
        raise RunDirError(f"{path}: no front.json yet, and the objectives' directions cannot be read from its "
                          f"config.yaml ({err})") from None
    return [Objective(name, direction) for name, direction in directions.items()]


def load_run(run_dir: str | Path) -> RunView:
    """Parse a run directory; RunDirError (one line) if it is not one, or its log is corrupt before its end."""
    path = Path(run_dir)
    log_path = path / "evaluations.jsonl"
    if not path.is_dir():
        raise RunDirError(f"run directory {path} does not exist; pass the folder a search wrote (e.g. runs/demo)")
    if not log_path.is_file() and not (path / "config.yaml").is_file():
        raise RunDirError(f"{path} is not a run directory (no evaluations.jsonl or config.yaml); pass the folder a search wrote")
    config: dict[str, Any] = {}
    if (path / "config.yaml").is_file():
        try:
            config = yaml.safe_load(read_utf8(path / "config.yaml", RunDirError)) or {}
        except yaml.YAMLError as err:
            raise RunDirError(f"{path / 'config.yaml'} is not valid YAML ({str(err).splitlines()[0]}); restore it from the run's start") from None
    front: dict[str, Any] | None = None
    if (path / "front.json").is_file():
        try:
            front = json.loads((path / "front.json").read_text())
        except json.JSONDecodeError:
            log.warning("%s is unreadable; recomputing the front from the log", path / "front.json")
    objectives = _objectives_from(path, front, config)
    if not objectives:
        raise RunDirError(f"{path}: neither front.json nor config.yaml names the objectives; the run directory is incomplete")

    evaluations: list[EvaluationRecord] = []
    heldout: dict[str, dict[str, float]] = {}
    heldout_items: dict[str, dict[str, list[float]]] = {}
    references: list[ReferenceRecord] = []
    for lineno, raw in read_jsonl(log_path):
        rec = parse_record(raw, lineno, log_path)
        if isinstance(rec, EvaluationRecord):
            evaluations.append(rec)
        elif isinstance(rec, HeldoutRecord) and rec.ok:
            heldout[rec.id] = dict(rec.scores)
            if rec.items is not None:
                heldout_items[rec.id] = rec.items
        elif isinstance(rec, ReferenceRecord):
            references.append(rec)
    # front/<id>/scores.json may hold heldout scores the log does not (written by rescoring).
    for sc in sorted(path.glob("front/*/scores.json")):
        try:
            held = (json.loads(sc.read_text()) or {}).get("heldout")
        except (json.JSONDecodeError, AttributeError):
            continue
        if held and sc.parent.name not in heldout:
            heldout[sc.parent.name] = dict(held)

    view = RunView(path=path, config=config, objectives=objectives, evaluations=evaluations, heldout=heldout,
                   references=references, front=[], front_hypervolume=None, heldout_items=heldout_items)
    fresh = front and isinstance(front.get("members"), list) and int(front.get("evaluations") or 0) >= len(evaluations)
    if fresh:
        view.front = [str(m) for m in front["members"]]  # type: ignore[index]
        hv = front.get("hypervolume")  # type: ignore[union-attr]
        view.front_hypervolume = float(hv) if isinstance(hv, (int, float)) else None
    else:  # no front.json yet, or the log is ahead of the last checkpoint: recompute as the driver would
        arch = log_archive(view)
        view.front = arch.front()
        if len(arch):
            view.front_hypervolume = arch.hypervolume()
    return view
