"""The evaluation log's records, typed: what each line of ``evaluations.jsonl`` holds.

The log is the run's source of truth (``docs/architecture.md``): the driver appends to
it, resume replays it, and ``status``/``plot``/``export`` read it. Every one of them goes
through this module, so a record's fields, their types and the words ``ok``/``failed``/
``evaluation``/``reference``/``heldout``/``screen`` are defined once. Records are written as plain
JSON objects (``to_json``), field for field as older versions wrote them, so old run
directories read and resume unchanged; fields a newer version adds are optional here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Mapping, Union

from evomerge.errors import RunDirError


class Kind(str, Enum):
    """What a log line records."""

    EVALUATION = "evaluation"  # a search candidate scored on the selection split
    REFERENCE = "reference"  # a baseline (uniform average, one source alone, the base)
    HELDOUT = "heldout"  # a front member re-scored on the held-out split
    SCREEN = "screen"  # a candidate's low-fidelity screen that promoted it to a full evaluation


class Fidelity(str, Enum):
    """How a candidate's selection scores were obtained (``evaluation.fidelity``)."""

    FULL = "full"  # measured on every selection item: the only scores the front holds
    SCREEN = "screen"  # estimated from a few items (a fixed subset, or IRT anchors): told, never on the front


class Status(str, Enum):
    """How an evaluation ended."""

    OK = "ok"
    FAILED = "failed"


# -- reference labels: "uniform", "source:<ref>", "base" -------------------------------
UNIFORM, BASE, SOURCE_PREFIX = "uniform", "base", "source:"


def source_label(ref: str) -> str:
    """The reference label of one source alone (``source:models/demo/sort``)."""
    return f"{SOURCE_PREFIX}{ref}"


def is_source_label(label: str) -> bool:
    return label.startswith(SOURCE_PREFIX)


def short_label(label: str) -> str:
    """``source:models/demo/sort`` -> ``sort``: readable in legends and tables; others unchanged."""
    if is_source_label(label):
        ref = label[len(SOURCE_PREFIX):].rstrip("/")
        return ref.rsplit("/", 1)[-1] or ref
    return label


def display_label(label: str) -> str:
    """``uniform`` -> ``uniform average``, ``source:x`` -> ``source: x``: for prose (model cards, tables)."""
    if is_source_label(label):
        return f"source: {label[len(SOURCE_PREFIX):]}"
    return {UNIFORM: "uniform average"}.get(label, label)


# -- the records --------------------------------------------------------------------------
@dataclass
class EvaluationRecord:
    """One search candidate: its recipe, genome value, scores, and what the optimizer was told."""

    id: str
    index: int  # the optimizer's ask index: replay tells in this order
    asked: int  # asks made when it finished
    recipe: dict[str, Any] | None
    status: Status
    losses: list[float] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    value: Any = None
    key: str | None = None
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    actor: int | None = None
    attempts: int = 1
    cached_from: str | None = None
    num_workers: int | None = None
    asked_at: float | None = None
    finished_at: float | None = None
    #: None (older logs, and runs without ``evaluation.fidelity``) means measured in full
    fidelity: Fidelity | None = None
    #: the low-fidelity screen when there was one: estimator, estimates, interval, items, promoted
    screen: dict[str, Any] | None = None
    #: per-item selection values (``evaluation.record_items``, or a run that screens)
    items: dict[str, list[float]] | None = None

    kind = Kind.EVALUATION

    @property
    def ok(self) -> bool:
        return self.status is Status.OK

    @property
    def measured(self) -> bool:
        """True when the scores are measurements on every selection item (not a screen's estimate)."""
        return self.fidelity is not Fidelity.SCREEN

    def to_json(self) -> dict[str, Any]:
        out = {"kind": self.kind.value, "id": self.id, "index": self.index, "asked": self.asked,
               "recipe": self.recipe, "value": self.value, "key": self.key, "scores": self.scores,
               "losses": self.losses, "status": self.status.value, "error": self.error, "timings": self.timings,
               "actor": self.actor, "attempts": self.attempts, "cached_from": self.cached_from,
               "num_workers": self.num_workers, "asked_at": self.asked_at, "finished_at": self.finished_at}
        if self.fidelity is not None:  # written only when set: a run without screening logs what it always did
            out["fidelity"] = self.fidelity.value
        if self.screen is not None:
            out["screen"] = self.screen
        if self.items:
            out["items"] = self.items
        return out


@dataclass
class ReferenceRecord:
    """A baseline scored once per run with the same objectives, on both splits."""

    label: str
    recipe: dict[str, Any] | None
    status: Status
    scores: dict[str, float] = field(default_factory=dict)
    heldout: dict[str, float] | None = None
    heldout_items: dict[str, list[float]] | None = None  # per-item held-out values (paired intervals)
    error: str | None = None
    timings: dict[str, float] | None = None
    finished_at: float | None = None
    items: dict[str, list[float]] | None = None  # per-item selection values (IRT calibration, record_items)

    kind = Kind.REFERENCE

    @property
    def ok(self) -> bool:
        return self.status is Status.OK

    @property
    def short_label(self) -> str:
        return short_label(self.label)

    def to_json(self) -> dict[str, Any]:
        out = {"kind": self.kind.value, "label": self.label, "recipe": self.recipe, "scores": self.scores,
               "heldout": self.heldout, "heldout_items": self.heldout_items, "status": self.status.value,
               "error": self.error, "timings": self.timings, "finished_at": self.finished_at}
        if self.items:
            out["items"] = self.items
        return out


@dataclass
class HeldoutRecord:
    """A front member's scores on the held-out split (and per-item values when the evaluator gives them)."""

    id: str
    status: Status
    scores: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    items: dict[str, list[float]] | None = None
    finished_at: float | None = None

    kind = Kind.HELDOUT

    @property
    def ok(self) -> bool:
        return self.status is Status.OK

    def to_json(self) -> dict[str, Any]:
        out = {"kind": self.kind.value, "id": self.id, "scores": self.scores, "status": self.status.value,
               "error": self.error, "finished_at": self.finished_at}
        if self.items:
            out["items"] = self.items
        return out


@dataclass
class ScreenRecord:
    """A candidate's screen that promoted it: logged before its full evaluation is dispatched, so a
    resume after a crash evaluates it in full at once instead of screening it again (the decision
    was made against the front of that moment, which a resumed session cannot rebuild)."""

    id: str
    index: int
    screen: dict[str, Any]
    finished_at: float | None = None

    kind = Kind.SCREEN

    @property
    def ok(self) -> bool:
        return True

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "id": self.id, "index": self.index, "screen": self.screen,
                "finished_at": self.finished_at}


Record = Union[EvaluationRecord, ReferenceRecord, HeldoutRecord, ScreenRecord]


# -- reading --------------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_status(v: Any) -> bool:
    return v in (Status.OK.value, Status.FAILED.value)


#: what each record kind must hold to be read back: field -> (test, what it must be)
_REQUIRED: dict[str, list[tuple[str, Any, str]]] = {
    Kind.EVALUATION.value: [
        ("id", lambda v: isinstance(v, str), "a string"),
        ("index", _is_int, "an integer"),
        ("status", _is_status, '"ok" or "failed"'),
        ("recipe", lambda v: v is None or isinstance(v, dict), "an object or null"),
        ("asked", _is_int, "an integer"),
        ("losses", lambda v: isinstance(v, list) and all(_is_number(x) for x in v), "a list of numbers"),
    ],
    Kind.HELDOUT.value: [("id", lambda v: isinstance(v, str), "a string")],
    Kind.REFERENCE.value: [("label", lambda v: isinstance(v, str), "a string")],
    Kind.SCREEN.value: [("id", lambda v: isinstance(v, str), "a string"), ("index", _is_int, "an integer"),
                        ("screen", lambda v: isinstance(v, dict), "an object")],
}


def validate_record(rec: Mapping[str, Any], lineno: int, path: str | Path) -> None:
    """Raise a one-line RunDirError if a log record lacks a field a reader needs, or has a wrong type.

    Required, by ``kind``: evaluation: ``id`` (str), ``index`` (int), ``status``, ``recipe``
    (object or null), ``asked`` (int) and ``losses`` (list of numbers), which the replay
    tells again, and ``scores`` (object) when ``status`` is ``ok``; heldout: ``id`` (str),
    and ``scores`` (object) when its status is ok (or absent); reference: ``label`` (str).
    Records of other kinds (or none) are left alone (``parse_record`` skips them).
    """
    kind = rec.get("kind")
    fields = _REQUIRED.get(kind) if isinstance(kind, str) else None
    if fields is None:
        return
    fix = "restore the log from a backup or delete that line"
    for name, ok, what in fields:
        if name not in rec:
            raise RunDirError(f"{path} line {lineno}: {kind} record lacks {name!r}; {fix}")
        if not ok(rec[name]):
            raise RunDirError(f"{path} line {lineno}: {kind} record's {name!r} is {type(rec[name]).__name__} "
                              f"{json.dumps(rec[name])[:40]}, not {what}; {fix}")
    ok_status = rec["status"] if kind == Kind.EVALUATION.value else rec.get("status", Status.OK.value)
    if kind not in (Kind.REFERENCE.value, Kind.SCREEN.value) and ok_status == Status.OK.value and not isinstance(rec.get("scores"), dict):
        what = "lacks 'scores'" if "scores" not in rec else f"has 'scores' {type(rec['scores']).__name__}, not an object"
        raise RunDirError(f"{path} line {lineno}: {kind} record with status ok {what}; {fix}")


def _status(v: Any) -> Status:
    return Status.OK if v in (None, Status.OK.value) else Status.FAILED


def parse_record(rec: Mapping[str, Any], lineno: int = 0, path: str | Path = "evaluations.jsonl") -> Record | None:
    """The typed record of one validated log line; None for a kind this version does not know."""
    validate_record(rec, lineno, path)
    kind = rec.get("kind")
    if kind == Kind.EVALUATION.value:
        return EvaluationRecord(
            id=rec["id"], index=int(rec["index"]), asked=int(rec["asked"]), recipe=rec["recipe"],
            status=Status(rec["status"]), losses=[float(x) for x in rec["losses"]],
            scores=dict(rec.get("scores") or {}), value=rec.get("value"), key=rec.get("key"), error=rec.get("error"),
            timings=dict(rec.get("timings") or {}), actor=rec.get("actor"), attempts=int(rec.get("attempts") or 1),
            cached_from=rec.get("cached_from"), num_workers=rec.get("num_workers"), asked_at=rec.get("asked_at"),
            finished_at=rec.get("finished_at"),
            fidelity=Fidelity(rec["fidelity"]) if rec.get("fidelity") in (Fidelity.FULL.value, Fidelity.SCREEN.value)
            else None,
            screen=rec.get("screen") if isinstance(rec.get("screen"), dict) else None,
            items=rec.get("items") if isinstance(rec.get("items"), dict) else None)
    if kind == Kind.SCREEN.value:
        return ScreenRecord(id=rec["id"], index=int(rec["index"]), screen=dict(rec["screen"]),
                            finished_at=rec.get("finished_at"))
    if kind == Kind.REFERENCE.value:
        return ReferenceRecord(
            label=rec["label"], recipe=rec.get("recipe"), status=_status(rec.get("status")),
            scores=dict(rec.get("scores") or {}), heldout=rec.get("heldout"), heldout_items=rec.get("heldout_items"),
            error=rec.get("error"), timings=rec.get("timings"), finished_at=rec.get("finished_at"),
            items=rec.get("items") if isinstance(rec.get("items"), dict) else None)
    if kind == Kind.HELDOUT.value:
        items = rec.get("items")
        return HeldoutRecord(
            id=rec["id"], status=_status(rec.get("status")), scores=dict(rec.get("scores") or {}),
            error=rec.get("error"), items=items if isinstance(items, dict) else None,
            finished_at=rec.get("finished_at"))
    return None
