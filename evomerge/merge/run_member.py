"""A member of an earlier run as a model: ``runs/demo#e000218``, ``runs/demo#knee`` or ``runs/demo#mean``.

Chaining: a later search names, as one of its models, a merge an earlier search found.
The ref is the run directory, ``#`` and a selector: an evaluation id (``e`` + digits),
``knee`` (the knee of the run's final front, the member ``evomerge export --knee`` picks) or
``mean`` (the front's best mean of selection scores: the member the demo's verdict judges).
The member's recipe (a parameter-space ``MergeRecipe`` from ``evaluations.jsonl``) is
merged once into ``<run_dir>/members/<id>/`` with ``merge_to_folder`` and reused from then
on; ``#knee`` and ``#<its id>`` share that folder. Relative model refs in the recipe are
relative to the current directory, as everywhere in evomerge.

The folder is built in a hidden temp sibling (``members/.<id>.tmp-<host>-<pid>-<random>``) and
renamed into place only when complete, with ``evomerge_member.json`` (where it came from:
run, id, recipe and its hash, scores, held-out scores); a crash leaves only a temp folder,
which is never trusted and is removed by the next resolve on the same host once its
process is gone. A finished folder is reused when its ``evomerge_member.json`` names the
same recipe hash; otherwise it is rebuilt.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from evomerge import pareto
from evomerge.errors import EvomergeError, SourceError
from evomerge.fileio import atomic_write, fsync_dir, json_text
from evomerge.records import EvaluationRecord, HeldoutRecord
from evomerge.rundir import CONFIG, EVALUATIONS, FRONT_DIR, FRONT_JSON, MEMBERS_DIR, RunDir

PROVENANCE = "evomerge_member.json"
KNEE = "knee"
#: the best mean of selection scores over the front (ties: the earliest evaluated): the member the
#: demo's verdict (``evomerge.verdict.choose_on_selection``, rule "mean") judges
MEAN = "mean"
_ID = re.compile(r"e\d+")
_TMP = re.compile(r"^\.(?P<id>e\d+)\.(tmp|old)-(?P<host>.+)-(?P<pid>\d+)-[^-]+$")


# -- parsing ----------------------------------------------------------------------------------
def _split(ref: str) -> tuple[str, str] | None:
    if not isinstance(ref, str) or "#" not in ref:
        return None
    head, _, selector = ref.rpartition("#")
    return (head, selector) if head else None


def _valid_selector(selector: str) -> bool:
    return selector in (KNEE, MEAN) or _ID.fullmatch(selector) is not None


def parse_member_ref(ref: str) -> tuple[Path, str] | None:
    """``(run_dir, selector)`` for ``<run_dir>#<e000218 | knee>`` naming an existing run; else None.

    The run dir must hold ``evaluations.jsonl``. Callers that also accept plain folders
    check ``Path(ref).exists()`` first: a real folder whose name contains ``#`` wins.
    """
    parts = _split(ref)
    if parts is None or not _valid_selector(parts[1]):
        return None
    run = Path(parts[0]).expanduser()
    if not (run / EVALUATIONS).is_file():
        return None
    return run, parts[1]


def _parse_or_raise(ref: str) -> tuple[Path, str]:
    """``parse_member_ref``, or a one-line SourceError saying which part is wrong."""
    parts = _split(ref)
    if parts is None:
        raise SourceError(f"model {ref}: not a run member ref; write <run dir>#<evaluation id> "
                          f"(e.g. runs/demo#e000218) or <run dir>#knee")
    head, selector = parts
    run = Path(head).expanduser()
    if not run.is_dir():
        raise SourceError(f"model {ref}: run directory {run} does not exist (and neither does a folder named {ref}); "
                          f"check the path (relative paths are relative to {Path.cwd()})")
    if not (run / EVALUATIONS).is_file():
        raise SourceError(f"model {ref}: {run} is not a run directory (no {EVALUATIONS}); name the folder "
                          f"a search wrote, e.g. runs/demo#knee")
    if not _valid_selector(selector):
        raise SourceError(f"model {ref}: {selector!r} after '#' is neither an evaluation id (like e000218) nor "
                          f"'knee' or 'mean'; use an id from `evomerge status {run}`, {run}#knee or {run}#mean")
    return run, selector


# -- choosing the member -------------------------------------------------------------------------
def _records(ref: str, run: Path) -> list[Any]:
    try:
        return RunDir(run).records()
    except EvomergeError as err:
        raise SourceError(f"model {ref}: {err}") from None


def _last(evaluations: list[EvaluationRecord], eval_id: str) -> EvaluationRecord | None:
    for e in reversed(evaluations):  # a re-evaluation after resume wins, as in status/export
        if e.id == eval_id:
            return e
    return None


def _scored(e: EvaluationRecord, names: list[str]) -> bool:
    return e.ok and e.measured and all(isinstance(e.scores.get(n), (int, float)) and math.isfinite(e.scores[n]) for n in names)


def _chosen_id(ref: str, run: Path, evaluations: list[EvaluationRecord], selector: str) -> str:
    """The front member ``selector`` names: ``knee`` as ``evomerge export --knee`` chooses it, or
    ``mean``, the best mean over objectives of the selection scores (signed by direction)."""
    points, directions = _front_points(ref, run, evaluations)
    if selector == KNEE:
        return pareto.knee(points, directions)
    signs = {n: pareto.sign(d) for n, d in directions.items()}
    order = {e.id: e.index for e in evaluations}
    return max(points, key=lambda i: (sum(signs[n] * points[i][n] for n in signs) / len(signs),
                                      -(order.get(i) or 0)))


def _front_points(ref: str, run: Path,
                  evaluations: list[EvaluationRecord]) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """The run's final front as ``{id: scores}``, and the objectives' directions.

    Objectives and directions come from front.json; its member list is the front unless
    the log holds evaluations after it was written, in which case the front is recomputed
    from the log with the driver's archive, in log order.
    """
    fix = f"name a member by id instead (an id from `evomerge status {run}`)"
    try:
        front = json.loads((run / FRONT_JSON).read_text())
    except (OSError, ValueError):
        front = None
    objectives = front.get("objectives") if isinstance(front, dict) else None
    if not isinstance(objectives, list) or not objectives:
        raise SourceError(f"model {ref}: {run} has no readable {FRONT_JSON} naming its objectives, so its knee "
                          f"cannot be chosen; {fix}")
    if not all(isinstance(o, dict) and o.get("name") for o in objectives):
        raise SourceError(f"model {ref}: {run / FRONT_JSON} lists an objective without a name; {fix}")
    directions = {str(o["name"]): str(o.get("direction") or pareto.MAXIMIZE) for o in objectives}
    names = list(directions)
    members = front.get("members")
    try:  # front.json's member list is the front unless evaluations were logged after it (as status/export read it)
        counted = int(front.get("evaluations") or 0)
    except (TypeError, ValueError):
        counted = 0
    if isinstance(members, list) and counted >= len(evaluations):
        ids = [str(m) for m in members]
    else:
        arch = pareto.ParetoArchive(directions)
        for e in evaluations:
            if _scored(e, names):
                arch.add(e.id, e.scores)
        ids = arch.front()
    points: dict[str, dict[str, float]] = {}
    for i in ids:
        e = _last(evaluations, i)
        if e is not None and e.ok and e.recipe is not None and all(n in e.scores for n in names):
            points[e.id] = e.scores
    if not points:
        raise SourceError(f"model {ref}: the Pareto front of {run} is empty, so no member can be chosen; wait "
                          f"for evaluations to finish or {fix}")
    return points, directions


def _heldout(run: Path, records: list[Any], eval_id: str) -> dict[str, float] | None:
    held = None
    for r in records:
        if isinstance(r, HeldoutRecord) and r.ok and r.id == eval_id:
            held = dict(r.scores)
    if held is None:  # rescoring may have written it to front/<id>/scores.json only
        with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
            h = json.loads((run / FRONT_DIR / eval_id / "scores.json").read_text()).get("heldout")
            held = dict(h) if h else None
    return held


def _run_model_options(run: Path) -> tuple[bool, str | None]:
    """``models.allow_pickle`` and ``models.revision`` of the run's frozen config (defaults if unreadable)."""
    if not (run / CONFIG).is_file():
        return False, None
    try:
        models = RunDir(run).read_config_dict().get("models") or {}
    except EvomergeError:
        return False, None
    if not isinstance(models, dict):
        return False, None
    revision = models.get("revision")
    return bool(models.get("allow_pickle", False)), (str(revision) if revision is not None else None)


# -- the folder -----------------------------------------------------------------------------------
def member_provenance(folder: str | Path) -> dict[str, Any] | None:
    """The ``evomerge_member.json`` of a member folder (run, id, recipe, hash, scores), or None."""
    try:
        data = json.loads((Path(folder) / PROVENANCE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_done(folder: Path, recipe_hash: str) -> bool:
    info = member_provenance(folder) if folder.is_dir() else None
    return info is not None and info.get("recipe_hash") == recipe_hash


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but not ours (EPERM)
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


def _temp_name(eval_id: str, what: str) -> str:
    """``.<id>.<tmp|old>-<host>-<pid>-``: a prefix ``tempfile`` completes with a random part."""
    return f".{eval_id}.{what}-{socket.gethostname()}-{os.getpid()}-"


def _clean_stale(members: Path, eval_id: str) -> None:
    """Remove temp (and set-aside old) folders of ``eval_id`` left by a dead process of this host.

    Those of a live process, or of another host (a shared file system), are left alone.
    """
    if not members.is_dir():
        return
    host = socket.gethostname()
    for p in members.iterdir():
        m = _TMP.match(p.name)
        if m and m["id"] == eval_id and m["host"] == host and not _pid_alive(int(m["pid"])):
            _remove(p)


def member_folder(ref: str) -> Path:
    """The folder holding the merged weights of run member ``ref``; merged once, then reused.

    One-line SourceError when the run dir, the evaluation or its success is missing, or
    the selector is neither an id nor ``knee``.
    """
    from evomerge.merge.materialise import merge_to_folder
    from evomerge.merge.recipe import MergeRecipe

    run, selector = _parse_or_raise(ref)
    records = _records(ref, run)
    evaluations = [r for r in records if isinstance(r, EvaluationRecord)]
    eval_id = _chosen_id(ref, run, evaluations, selector) if selector in (KNEE, MEAN) else selector
    ev = _last(evaluations, eval_id)
    if ev is None:
        raise SourceError(f"model {ref}: {run} has no evaluation {eval_id}; use an id from `evomerge status {run}`")
    if not ev.ok or ev.recipe is None:
        raise SourceError(f"model {ref}: evaluation {eval_id} of {run} failed ({ev.error or 'no recipe'}); "
                          f"use an ok id from `evomerge status {run}`")
    try:
        recipe = MergeRecipe.from_dict(ev.recipe)
    except EvomergeError as err:
        raise SourceError(f"model {ref}: the recipe of {eval_id} is not a parameter-space merge recipe ({err}); "
                          f"only such members can be used as models") from None
    recipe_hash = recipe.content_hash()

    members = run / MEMBERS_DIR
    folder = members / eval_id
    _clean_stale(members, eval_id)
    if _is_done(folder, recipe_hash):
        return folder

    allow_pickle, revision = _run_model_options(run)
    members.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_name(eval_id, "tmp"), dir=members))  # empty: merge_to_folder takes it
    try:
        try:
            merge_to_folder(recipe, tmp, allow_pickle=allow_pickle, revision=revision)
        except EvomergeError as err:
            raise SourceError(f"model {ref}: cannot merge member {eval_id} of {run}: {err}") from None
        info = {"run_dir": str(run), "id": eval_id, "recipe": ev.recipe, "recipe_hash": recipe_hash,
                "scores": dict(ev.scores), "heldout": _heldout(run, records, eval_id)}
        atomic_write(tmp / PROVENANCE, json_text(info))
        fsync_dir(tmp)
        if folder.exists():  # an older build of another recipe (or one without provenance): replace it
            if _is_done(folder, recipe_hash):  # another process finished first
                return folder
            old = members / (_temp_name(eval_id, "old") + tmp.name.rsplit("-", 1)[-1])
            os.rename(folder, old)
            _remove(old)
        try:
            os.rename(tmp, folder)
        except OSError:
            if _is_done(folder, recipe_hash):  # lost a race to an identical build
                return folder
            raise
        fsync_dir(members)
    finally:
        if tmp.exists():
            _remove(tmp)
    return folder
