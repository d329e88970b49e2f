"""A read-only view of a run directory, for reports and exports.

``status``, ``plot`` and ``export`` only *read* a run, possibly while the driver is still
writing it (``report.png`` is redrawn at each checkpoint). They therefore read the
append-only ``evaluations.jsonl`` straight from disk (it is the run's source of truth,
see docs/internals.md) instead of going through the driver's resume machinery: a torn
last line from a crash is skipped, not fatal, and nothing here ever writes to the run.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from evomerge.errors import RunDirError, read_utf8
from evomerge.archive import hypervolume_max

log = logging.getLogger(__name__)

MAXIMIZE, MINIMIZE = "maximize", "minimize"


@dataclass(frozen=True)
class Objective:
    name: str
    direction: str  # "maximize" | "minimize"

    @property
    def sign(self) -> float:
        """+1 when larger is better: ``sign * score`` is always 'larger is better'."""
        return 1.0 if self.direction == MAXIMIZE else -1.0


@dataclass
class Evaluation:
    """One ``kind: evaluation`` record of the log."""

    id: str
    index: int
    recipe: dict[str, Any] | None
    scores: dict[str, float]
    status: str
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    asked_at: float | None = None
    finished_at: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class Reference:
    """A baseline (uniform average, a source, the base) scored with the same objectives."""

    label: str
    recipe: dict[str, Any] | None
    scores: dict[str, float]
    heldout: dict[str, float] | None = None
    heldout_items: dict[str, list[float]] | None = None  # per-item held-out values, when logged

    @property
    def short_label(self) -> str:
        """``source:models/demo/add`` -> ``add``: readable in legends and tables."""
        if self.label.startswith("source:"):
            ref = self.label.split(":", 1)[1].rstrip("/")
            return ref.rsplit("/", 1)[-1] or ref
        return self.label


@dataclass
class RunView:
    """Everything a report needs, parsed once from the run directory."""

    path: Path
    config: dict[str, Any]
    objectives: list[Objective]
    evaluations: list[Evaluation]
    heldout: dict[str, dict[str, float]]
    references: list[Reference]
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

    def ok_evaluations(self) -> list[Evaluation]:
        return [e for e in self.evaluations if e.ok and _complete(e.scores, self.objective_names)]

    def get(self, eval_id: str) -> Evaluation | None:
        for e in reversed(self.evaluations):  # a re-evaluation after resume wins
            if e.id == eval_id:
                return e
        return None

    def front_evaluations(self) -> list[Evaluation]:
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


def log_archive(view: "RunView", upto: int | None = None) -> Any:
    """A ParetoArchive fed the successful evaluations of the log, in log (tell) order.

    The same archive class and order the driver uses, so ties, the front and the
    hypervolume reference ("worst score seen") mean exactly what they mean in front.json.
    """
    from evomerge.archive import ParetoArchive

    arch = ParetoArchive(view.directions)
    for e in view.evaluations[:upto]:
        if e.ok and _complete(e.scores, view.objective_names):
            arch.add(e.id, e.scores)
    return arch


# -- loading ------------------------------------------------------------------------
def _objectives_from(front: dict[str, Any] | None, config: dict[str, Any]) -> list[Objective]:
    if front and front.get("objectives"):
        return [Objective(o["name"], o.get("direction") or MAXIMIZE) for o in front["objectives"]]
    out = []
    for o in config.get("objectives") or []:
        direction = o.get("direction") or (MINIMIZE if o.get("evaluator") == "perplexity" else MAXIMIZE)
        out.append(Objective(o["name"], direction))
    return out


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of an append-only JSONL log; a torn line (crash mid-write) is skipped."""
    records = []
    if not path.is_file():
        return records
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s:%d: skipping an unreadable line (torn write?)", path, lineno)
                continue
            if isinstance(rec, dict):
                records.append(rec)
    return records


def load_run(run_dir: str | Path) -> RunView:
    """Parse a run directory; RunDirError (one line) if it is not one."""
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
    objectives = _objectives_from(front, config)
    if not objectives:
        raise RunDirError(f"{path}: neither front.json nor config.yaml names the objectives; the run directory is incomplete")

    evaluations: list[Evaluation] = []
    heldout: dict[str, dict[str, float]] = {}
    heldout_items: dict[str, dict[str, list[float]]] = {}
    references: list[Reference] = []
    for rec in read_jsonl(log_path):
        kind = rec.get("kind", "evaluation")
        if kind == "evaluation" and "id" in rec:
            evaluations.append(Evaluation(
                id=str(rec["id"]), index=int(rec.get("index", len(evaluations))), recipe=rec.get("recipe"),
                scores=dict(rec.get("scores") or {}), status=rec.get("status", "ok"), error=rec.get("error"),
                timings=dict(rec.get("timings") or {}), asked_at=rec.get("asked_at"),
                finished_at=rec.get("finished_at")))
        elif kind == "heldout" and "id" in rec and rec.get("status", "ok") == "ok":
            heldout[str(rec["id"])] = dict(rec.get("scores") or {})
            if isinstance(rec.get("items"), dict):
                heldout_items[str(rec["id"])] = rec["items"]
        elif kind == "reference":
            references.append(Reference(label=str(rec.get("label", "reference")), recipe=rec.get("recipe"),
                                        scores=dict(rec.get("scores") or {}), heldout=rec.get("heldout"),
                                        heldout_items=rec.get("heldout_items")))
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
            ref = arch.reference_point()
            view.front_hypervolume = hypervolume_max(
                [[o.sign * sc[o.name] for o in objectives] for sc in arch.members().values()],
                [o.sign * ref[o.name] for o in objectives])
    return view
