"""The run directory: the search's checkpoint on disk (layout in docs/architecture.md).

Every path of a run is named here, and every write to one goes through here:

- ``evaluations.jsonl``, append-only and the source of truth: typed records
  (``evomerge.records``) appended one line at a time (``fileio.append_jsonl``);
- everything else (config.yaml, front.json, state/counters.json, front/<id>/) is
  rewritten whole through ``fileio.atomic_write``;
- ``check_log`` holds the log to the last checkpoint's mark (record count, bytes,
  sha256), so a truncated or edited log is refused instead of silently resumed.

One writer at a time is ``evomerge.runlock``'s job; readers (status, plot, export)
need no lock, because of the disciplines above.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import yaml

from evomerge.errors import RunDirError, read_utf8
from evomerge.fileio import append_jsonl, atomic_write, fsync_dir, json_text, read_jsonl, scan_jsonl, truncate_torn_tail
from evomerge.records import Record, parse_record, validate_record
from evomerge.runlock import LOCK

log = logging.getLogger(__name__)

CONFIG = "config.yaml"
EVALUATIONS = "evaluations.jsonl"
FRONT_JSON = "front.json"
STATE_DIR = "state"
FRONT_DIR = "front"
DRIVER_LOG = "driver.log"
REPORT_PNG = "report.png"
COUNTERS = "counters.json"
IDENTITY = "identity.json"
MEMORY_PLAN = "memory_plan.json"
IRT = "irt.json"
#: members of this run merged for later runs that chain from it (``evomerge.merge.run_member``)
MEMBERS_DIR = "members"
#: every entry the run writes; --overwrite removes exactly these, nothing else (never LOCK:
#: the overwriting command holds it while it clears the rest).
RUN_ENTRIES = (CONFIG, EVALUATIONS, FRONT_JSON, STATE_DIR, FRONT_DIR, DRIVER_LOG, REPORT_PNG, IDENTITY, MEMORY_PLAN, IRT,
               MEMBERS_DIR)


def config_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain data (what config.yaml holds)."""
    return cfg.model_dump(mode="json") if hasattr(cfg, "model_dump") else dict(cfg)


def _search_identity(data: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a config that defines *which* search it is: everything but output.run_dir."""
    data = json.loads(json.dumps(data))  # deep copy, tuples -> lists
    data.get("output", {}).pop("run_dir", None)
    return data


def _first_difference(a: Any, b: Any, where: str = "") -> str:
    """Dotted path of the first field where two config dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            path = f"{where}.{k}" if where else str(k)
            if k not in a or k not in b:
                return path
            if a[k] != b[k]:
                return _first_difference(a[k], b[k], path)
    return where or "<top level>"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


class RunDir:
    """One run directory; every path the run uses is a property here."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # -- layout -----------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def evaluations_path(self) -> Path:
        return self.path / EVALUATIONS

    @property
    def front_json_path(self) -> Path:
        return self.path / FRONT_JSON

    @property
    def state_dir(self) -> Path:
        return self.path / STATE_DIR

    @property
    def front_dir(self) -> Path:
        return self.path / FRONT_DIR

    @property
    def log_path(self) -> Path:
        return self.path / DRIVER_LOG

    @property
    def identity_path(self) -> Path:
        return self.path / IDENTITY

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK

    def member_dir(self, id: str) -> Path:
        return self.front_dir / id

    def weights_dir(self, id: str) -> Path:
        """Where a front member's merged weights go when ``output.save_front_weights`` is on."""
        return self.member_dir(id) / "weights"

    def exists(self) -> bool:
        """True if this is a run directory (it holds config.yaml)."""
        return self.config_path.is_file()

    # -- creation / config ---------------------------------------------------------
    def create(self, cfg: Any, overwrite: bool = False) -> bool:
        """Prepare the directory for ``cfg``; True if a new run starts, False if the same search is already here.

        The frozen, resolved config is written as config.yaml. A directory that holds
        a *different* search (config differs other than in output.run_dir) or other
        files is refused unless ``overwrite``, which removes only the run's own
        entries (``RUN_ENTRIES``), never unrelated files.
        """
        new = config_dict(cfg)
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"run dir {self.path} is a file; pass another --run-dir")
        if self.exists() and not overwrite:
            old = self.read_config_dict()
            try:  # re-validate so that defaults added by a newer evomerge compare equal
                from evomerge.config import parse_config

                old = config_dict(parse_config(old))
            except Exception:  # noqa: BLE001 - an old config that no longer validates is simply "different"
                pass
            if _search_identity(old) == _search_identity(new):
                return False
            where = _first_difference(_search_identity(old), _search_identity(new))
            raise RunDirError(
                f"run dir {self.path} already holds a different search (config differs at {where}); "
                f"resume it with 'evomerge resume {self.path}', pick another --run-dir, or pass --overwrite to replace it"
            )
        if self.path.is_dir():
            foreign = sorted(p.name for p in self.path.iterdir() if p.name not in RUN_ENTRIES + (LOCK,))
            ours = [p for p in self.path.iterdir() if p.name in RUN_ENTRIES]
            if foreign and not overwrite:
                raise RunDirError(
                    f"run dir {self.path} is not empty and is not a run directory (holds {foreign[0]!r}); "
                    f"pick another --run-dir, or pass --overwrite to write the run into it anyway"
                )
            if ours and not overwrite:
                raise RunDirError(
                    f"run dir {self.path} holds run files but no config.yaml; pass --overwrite to replace them"
                )
            for p in ours:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.config_path, yaml.safe_dump(new, sort_keys=False))
        return True

    def read_config_dict(self) -> dict[str, Any]:
        if not self.config_path.is_file():
            raise RunDirError(f"{self.path} is not a run directory (no {CONFIG}); start a run with 'evomerge search'")
        try:
            data = yaml.safe_load(read_utf8(self.config_path, RunDirError))
        except yaml.YAMLError as err:
            raise RunDirError(f"{self.config_path} is not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise RunDirError(f"{self.config_path} does not hold a config mapping")
        return data

    def load_config(self) -> Any:
        """The frozen SearchConfig of this run (validated again)."""
        from evomerge.config import parse_config

        return parse_config(self.read_config_dict())

    # -- the evaluation log ---------------------------------------------------------
    def append(self, record: Record) -> None:
        """Append one typed record to evaluations.jsonl (``fileio.append_jsonl``: one write, flush, fsync)."""
        append_jsonl(self.evaluations_path, record.to_json())

    def read_records(self, kind: str | None = None) -> list[dict[str, Any]]:
        """The raw records of evaluations.jsonl (of ``kind`` if given), a torn last line skipped; for tools."""
        return [r for _, r in read_jsonl(self.evaluations_path) if kind is None or r.get("kind") == kind]

    def validated_records(self) -> list[dict[str, Any]]:
        """The raw records, each checked by ``records.validate_record``; read-only.

        The commands' pre-flight: a record the resume would trip over is one line naming
        its line number, before Ray starts and before anything is written.
        """
        numbered = read_jsonl(self.evaluations_path)
        for lineno, rec in numbered:
            validate_record(rec, lineno, self.evaluations_path)
        return [rec for _, rec in numbered]

    def records(self) -> list[Record]:
        """Every record, typed and validated, in log order (kinds this version does not know are left out)."""
        out = []
        for lineno, rec in read_jsonl(self.evaluations_path):
            typed = parse_record(rec, lineno, self.evaluations_path)
            if typed is not None:
                out.append(typed)
        return out

    def truncate_torn_tail(self) -> int:
        """Cut a torn last line off evaluations.jsonl; bytes removed."""
        return truncate_torn_tail(self.evaluations_path)

    # -- the log as checkpointed -------------------------------------------------------
    def log_mark(self) -> dict[str, Any]:
        """What a checkpoint records about the log: ``log_records``, ``log_bytes``, ``log_sha256``.

        ``log_sha256`` is the sha256 of the log's first ``log_bytes`` bytes, which hold its
        first ``log_records`` complete (newline-ended) records; a torn or unterminated tail is
        not counted. Plain bytes, not a hash chained over re-serialised records: the log is
        append-only, so the prefix a checkpoint saw must stay byte for byte the same forever;
        hashing the bytes needs no canonical-JSON rules (key order, float spelling) that a
        newer version could change, and catches any edit (even whitespace).

        Incremental: the hash state and offset are kept between calls, so a checkpoint reads
        and hashes only what was appended since the last one (a checkpoint every few
        evaluations must not re-read a log of thousands of records). If the file is shorter
        than the kept offset (replaced under us), it starts over from byte 0.
        """
        path = self.evaluations_path
        size = path.stat().st_size if path.exists() else 0
        offset, count, hasher = getattr(self, "_mark", None) or (0, 0, hashlib.sha256())
        if size < offset:
            offset, count, hasher = 0, 0, hashlib.sha256()
        if size > offset:
            with open(path, "rb") as f:
                f.seek(offset)
                new = f.read(size - offset)
            chunk = new[: new.rfind(b"\n") + 1]
            hasher.update(chunk)
            count += sum(1 for line in chunk.split(b"\n") if line.strip())
            offset += len(chunk)
        self._mark = (offset, count, hasher)
        return {"log_records": count, "log_bytes": offset, "log_sha256": hasher.copy().hexdigest()}

    def check_log(self) -> None:
        """Refuse a log shorter than the last checkpoint counted, or whose checkpointed part changed.

        One-line RunDirError; read-only. A log longer than the checkpoint (evaluations
        after it) passes; counters without the ``log_*`` fields (a run dir written before
        they existed) are not checked.
        """
        cpath = self.state_dir / COUNTERS
        try:
            counters = json.loads(cpath.read_text()) if cpath.is_file() else {}
        except (OSError, ValueError):
            return  # load_state warns about it and the log is rebuilt from as it is
        if not isinstance(counters, dict):
            return
        n, size, digest = counters.get("log_records"), counters.get("log_bytes"), counters.get("log_sha256")
        if not (_is_int(n) and _is_int(size) and isinstance(digest, str)):
            return
        stamp = counters.get("updated_at")
        when = f"the checkpoint of {_utc(float(stamp))}" if _is_number(stamp) else "the last checkpoint"
        data = self.evaluations_path.read_bytes() if self.evaluations_path.exists() else b""
        numbered, _ = scan_jsonl(data, self.evaluations_path)
        if len(numbered) < n or len(data) < size:
            missing = (f"record {len(numbered) + 1} onwards is missing" if len(numbered) < n
                       else "its last record is cut short")
            raise RunDirError(
                f"{self.evaluations_path} holds {len(numbered)} records but {when} ({cpath}) counted {n} "
                f"({missing}); the log was truncated or replaced: restore it from a backup (nothing was changed)")
        if hashlib.sha256(data[:size]).hexdigest() != digest:
            raise RunDirError(
                f"{self.evaluations_path}: its first {n} records are not those {when} ({cpath}) counted (sha256 "
                f"differs); the log was modified or replaced: restore it from a backup (nothing was changed)")

    # -- front ------------------------------------------------------------------------
    def write_front(self, archive: Any, recipes: Mapping[str, dict[str, Any] | None],
                    heldout: Mapping[str, Mapping[str, float]], *, evaluations: int) -> None:
        """Rewrite front.json and front/<id>/ for the archive's members; never delete a recipe.

        ``recipes``/``heldout``: by member id (a member without held-out scores yet is
        absent). A member that leaves the front keeps its ``front/<id>/recipe.json`` and
        ``scores.json`` exactly as they were last written (``front.json`` lists the
        current members); only its ``weights/`` folder (``save_front_weights``, large)
        is removed.
        """
        members = archive.front()
        for mid in members:
            d = self.member_dir(mid)
            if recipes.get(mid) is not None:
                atomic_write(d / "recipe.json", json_text(recipes[mid]))
            held = heldout.get(mid)
            atomic_write(d / "scores.json", json_text({"selection": archive.scores(mid),
                                                       "heldout": dict(held) if held is not None else None}))
        front = {
            "objectives": [{"name": k, "direction": v} for k, v in archive.directions.items()],
            "members": members,
            "hypervolume": archive.hypervolume(),
            "evaluations": evaluations,
            "updated_at": time.time(),
        }
        atomic_write(self.front_json_path, json_text(front))
        if self.front_dir.is_dir():
            keep = set(members)
            for d in self.front_dir.iterdir():
                if d.name in keep or d.name.startswith(".") or not d.is_dir() or d.is_symlink():
                    continue
                weights = d / "weights"
                if weights.is_dir() and not weights.is_symlink():
                    shutil.rmtree(weights)
                    fsync_dir(d)

    # -- memory plan ---------------------------------------------------------------------
    @property
    def memory_plan_path(self) -> Path:
        return self.path / MEMORY_PLAN

    def save_memory_plan(self, record: Mapping[str, Any]) -> None:
        """memory_plan.json: the session's residency plan per actor (``search.memory``), for ``status``."""
        atomic_write(self.memory_plan_path, json_text(dict(record)))

    def load_memory_plan(self) -> dict[str, Any] | None:
        """The last session's memory plan, or None (none recorded, or unreadable: it is informational)."""
        try:
            data = json.loads(self.memory_plan_path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    # -- IRT anchors ----------------------------------------------------------------------
    @property
    def irt_path(self) -> Path:
        return self.path / IRT

    def save_irt(self, data: Mapping[str, Any]) -> None:
        """irt.json: the fitted item parameters and anchors (``evaluation.estimator: irt``), written once.

        Resume and ``status`` read these very numbers: refitting on resume could choose other
        anchors, and the estimates already told would not be comparable."""
        atomic_write(self.irt_path, json_text(dict(data)))

    def load_irt(self) -> dict[str, Any] | None:
        """The run's IRT fit, or None when the calibration has not finished (an unreadable file is an error:
        a fit that cannot be read back cannot be reproduced)."""
        if not self.irt_path.is_file():
            return None
        try:
            data = json.loads(self.irt_path.read_text())
        except ValueError as err:
            raise RunDirError(f"{self.irt_path} is not valid JSON ({err}); restore it from a backup, or delete it "
                              f"to fit the IRT model again from the log") from None
        if not isinstance(data, dict):
            raise RunDirError(f"{self.irt_path} is not a JSON object; restore it or delete it to refit")
        return data

    # -- counters -----------------------------------------------------------------------
    def save_counters(self, counters: Mapping[str, Any]) -> None:
        """Write state/counters.json atomically: what ``status`` shows and the log mark ``check_log`` verifies."""
        atomic_write(self.state_dir / COUNTERS, json_text(dict(counters)))

    def load_counters(self) -> dict[str, Any]:
        """The last checkpoint's counters ({} when missing or unreadable: the log is the truth)."""
        cpath = self.state_dir / COUNTERS
        if not cpath.is_file():
            return {}
        try:
            counters = json.loads(cpath.read_text())
        except ValueError:
            log.warning("%s is unreadable; rebuilding from %s", cpath, EVALUATIONS)
            return {}
        if not isinstance(counters, dict):
            return {}
        counters.pop("optimizer_sha256", None)  # written by versions that also dumped the optimizer
        return counters

    # -- logging ----------------------------------------------------------------------
    def log_handler(self, level: int = logging.INFO) -> logging.FileHandler:
        """A FileHandler appending to driver.log (the caller attaches and removes it)."""
        self.path.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.log_path, mode="a", encoding="utf-8")
        handler.setLevel(level)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        return handler
