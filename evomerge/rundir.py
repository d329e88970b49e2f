"""The run directory: the search's checkpoint on disk (layout in docs/internals.md).

Two kinds of files, two write disciplines:

- ``evaluations.jsonl`` is append-only and the source of truth. Each record is one
  JSON line written with a single ``write`` then flushed and fsynced, so a crash can at
  worst leave a *torn last line*; readers skip it and the next append truncates it
  first, so nothing finished is lost and no garbage is ever followed by good records.
- everything else (config.yaml, front.json, state/, front/<id>/) is rewritten whole
  through ``atomic_write`` (temp file in the same folder, fsync, rename, fsync the
  folder): a reader sees the old or the new file, never half of one.

One writer at a time: ``RunLock`` holds an exclusive ``flock`` on ``<run_dir>/.lock``
for as long as a search, resume or heldout re-score runs. Two writers would interleave
appends, replay each other's asks and rewrite the front under each other; readers
(status, plot, export) need no lock, because of the disciplines above.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import yaml

from evomerge.errors import RunDirError, read_utf8

log = logging.getLogger(__name__)

CONFIG = "config.yaml"
EVALUATIONS = "evaluations.jsonl"
FRONT_JSON = "front.json"
STATE_DIR = "state"
FRONT_DIR = "front"
DRIVER_LOG = "driver.log"
REPORT_PNG = "report.png"
OPTIMIZER_STATE = "optimizer.pkl"
COUNTERS = "counters.json"
LOCK = ".lock"
IDENTITY = "identity.json"
#: every entry the run writes; --overwrite removes exactly these, nothing else (never LOCK:
#: the overwriting command holds it while it clears the rest).
RUN_ENTRIES = (CONFIG, EVALUATIONS, FRONT_JSON, STATE_DIR, FRONT_DIR, DRIVER_LOG, REPORT_PNG, IDENTITY)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot open/fsync a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Replace ``path`` with ``data`` atomically: temp file in the same folder, fsync, rename, fsync folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False) + "\n"


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


#: what each record kind must hold for the driver to replay it: field -> (test, what it must be)
_REQUIRED: dict[str, list[tuple[str, Any, str]]] = {
    "evaluation": [
        ("id", lambda v: isinstance(v, str), "a string"),
        ("index", _is_int, "an integer"),
        ("status", lambda v: isinstance(v, str), "a string"),
        ("recipe", lambda v: v is None or isinstance(v, dict), "an object or null"),
        ("asked", _is_int, "an integer"),
        ("losses", lambda v: isinstance(v, list) and all(_is_number(x) for x in v), "a list of numbers"),
    ],
    "heldout": [("id", lambda v: isinstance(v, str), "a string")],
    "reference": [("label", lambda v: isinstance(v, str), "a string")],
}


def validate_record(rec: Mapping[str, Any], lineno: int, path: str | Path) -> None:
    """Raise a one-line RunDirError if a log record lacks a field the driver needs, or has a wrong type.

    Required, by ``kind``: evaluation: ``id`` (str), ``index`` (int), ``status`` (str),
    ``recipe`` (object or null), ``asked`` (int) and ``losses`` (list of numbers), which
    the replay tells again, and ``scores`` (object) when ``status`` is ``ok``; heldout:
    ``id`` (str), and ``scores`` (object) when its status is ok (or absent); reference:
    ``label`` (str). Records of other kinds (or none) are left alone.
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
    if (kind == "evaluation" and rec["status"] == "ok") or (kind == "heldout" and rec.get("status", "ok") == "ok"):
        if not isinstance(rec.get("scores"), dict):
            what = "lacks 'scores'" if "scores" not in rec else f"has 'scores' {type(rec['scores']).__name__}, not an object"
            raise RunDirError(f"{path} line {lineno}: {kind} record with status ok {what}; {fix}")


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
    def report_path(self) -> Path:
        return self.path / REPORT_PNG

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

    def lock(self, command: str = "evomerge") -> contextlib.AbstractContextManager["RunLock"]:
        """``hold_run_lock`` on this directory: ``with run.lock("evomerge search"): ...``."""
        return hold_run_lock(self.path, command)

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

    # -- writes -----------------------------------------------------------------------
    def atomic_write(self, path: str | Path, data: bytes | str) -> Path:
        """``atomic_write`` with ``path`` relative to the run directory (absolute paths kept)."""
        return atomic_write(self.path / path, data)

    def append_evaluation(self, record: Mapping[str, Any]) -> None:
        """Append one record to evaluations.jsonl as one line (one write, flush, fsync)."""
        line = json.dumps(record, separators=(",", ":")) + "\n"
        if "\n" in line[:-1]:
            raise ValueError("a record must serialise to one line")
        self.truncate_torn_tail()
        with open(self.evaluations_path, "ab") as f:
            f.write(line.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())

    # -- reads ------------------------------------------------------------------------
    def _scan(self) -> tuple[list[dict[str, Any]], int | None]:
        """(records, byte offset where a torn tail starts or None)."""
        numbered, torn = self._scan_numbered()
        return [rec for _, rec in numbered], torn

    def _scan_numbered(self, data: bytes | None = None) -> tuple[list[tuple[int, dict[str, Any]]], int | None]:
        """([(1-based line number, record)], byte offset where a torn tail starts or None)."""
        if data is None:
            if not self.evaluations_path.exists():
                return [], None
            data = self.evaluations_path.read_bytes()
        records: list[tuple[int, dict[str, Any]]] = []
        offset = 0
        lines = data.split(b"\n")
        for i, raw in enumerate(lines):
            last = i == len(lines) - 1  # the piece after the final newline ('' when the file ends cleanly)
            if raw.strip():
                try:
                    rec = json.loads(raw)
                    if not isinstance(rec, dict):
                        raise ValueError("not an object")
                except ValueError:
                    if last or all(not x.strip() for x in lines[i + 1:]):
                        return records, offset
                    raise RunDirError(
                        f"{self.evaluations_path} line {i + 1} is corrupt (not a JSON object) and is not the last "
                        f"line; fix or delete that line, then resume"
                    ) from None
                if last:  # complete record whose newline was lost: keep it, repair adds the newline
                    records.append((i + 1, rec))
                    return records, None
                records.append((i + 1, rec))
            offset += len(raw) + 1
        return records, None

    def validated_records(self) -> list[dict[str, Any]]:
        """All records, each checked by ``validate_record``; read-only (a torn last line is skipped, not cut).

        The driver's pre-flight: a record the resume would trip over is one line naming
        its line number, before Ray starts and before anything is written.
        """
        numbered, torn = self._scan_numbered()
        if torn is not None:
            log.warning("ignoring a torn last line in %s (a crash mid-write)", self.evaluations_path)
        for lineno, rec in numbered:
            validate_record(rec, lineno, self.evaluations_path)
        return [rec for _, rec in numbered]

    def read_records(self, kind: str | None = None) -> list[dict[str, Any]]:
        """All records of evaluations.jsonl (of ``kind`` if given), ignoring a torn last line."""
        records, torn = self._scan()
        if torn is not None:
            log.warning("ignoring a torn last line in %s (a crash mid-write)", self.evaluations_path)
        return [r for r in records if kind is None or r.get("kind") == kind]

    def truncate_torn_tail(self) -> int:
        """Cut a torn last line off evaluations.jsonl (and end the file with a newline); bytes removed."""
        p = self.evaluations_path
        if not p.exists() or p.stat().st_size == 0:
            return 0
        with open(p, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return 0
        _, torn = self._scan()
        size = p.stat().st_size
        with open(p, "r+b") as f:
            if torn is None:  # complete JSON without its newline
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
                removed = 0
            else:
                f.truncate(torn)
                removed = size - torn
                log.warning("truncated a torn last line (%d bytes) from %s", removed, p)
            f.flush()
            os.fsync(f.fileno())
        return removed

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
        numbered, _ = self._scan_numbered(data)
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
    def write_front(self, archive: Any, records: Iterable[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]],
                    *, evaluations: int | None = None) -> None:
        """Rewrite front.json and front/<id>/ for the archive's members; never delete a recipe.

        A member that leaves the front keeps its ``front/<id>/recipe.json`` and
        ``scores.json`` exactly as they were last written (``front.json`` lists the
        current members); only its ``weights/`` folder (``save_front_weights``, large)
        is removed.

        ``records``: evaluation-log records (an iterable, e.g. ``read_records()``, or a
        mapping id -> evaluation record). Each member's recipe comes from its
        ``evaluation`` record; ``heldout`` records add the heldout scores.
        ``evaluations`` defaults to the number of evaluation records given.
        """
        recs = list(records.values()) if isinstance(records, Mapping) else list(records)
        by_id = {r["id"]: r for r in recs if r.get("kind", "evaluation") == "evaluation" and "id" in r}
        heldout = {r["id"]: r.get("scores") for r in recs if r.get("kind") == "heldout" and "id" in r}
        members = archive.front()
        for mid in members:
            d = self.member_dir(mid)
            rec = by_id.get(mid)
            if rec is not None and rec.get("recipe") is not None:
                atomic_write(d / "recipe.json", _json(rec["recipe"]))
            atomic_write(d / "scores.json", _json({"selection": archive.scores(mid), "heldout": heldout.get(mid)}))
        front = {
            "objectives": [{"name": k, "direction": v} for k, v in archive.directions.items()],
            "members": members,
            "hypervolume": archive.hypervolume(),
            "evaluations": len(by_id) if evaluations is None else evaluations,
            "updated_at": time.time(),
        }
        atomic_write(self.front_json_path, _json(front))
        if self.front_dir.is_dir():
            keep = set(members)
            for d in self.front_dir.iterdir():
                if d.name in keep or d.name.startswith(".") or not d.is_dir() or d.is_symlink():
                    continue
                weights = d / "weights"
                if weights.is_dir() and not weights.is_symlink():
                    shutil.rmtree(weights)
                    _fsync_dir(d)

    def read_front(self) -> dict[str, Any] | None:
        if not self.front_json_path.is_file():
            return None
        return json.loads(self.front_json_path.read_text())

    # -- optimizer state ----------------------------------------------------------
    def save_state(self, optimizer: bytes, counters: Mapping[str, Any] | None = None) -> None:
        """Write the optimizer dump and counters under state/, each atomically.

        The counters file records the dump's sha256 and is written second, so a crash
        between the two writes is detected by ``load_state`` (hash mismatch).
        """
        digest = hashlib.sha256(optimizer).hexdigest()
        atomic_write(self.state_dir / OPTIMIZER_STATE, optimizer)
        atomic_write(self.state_dir / COUNTERS, _json({**dict(counters or {}), "optimizer_sha256": digest}))

    def load_state(self) -> tuple[bytes | None, dict[str, Any]]:
        """(optimizer dump or None, counters). None when missing or not the dump the counters describe."""
        cpath, opath = self.state_dir / COUNTERS, self.state_dir / OPTIMIZER_STATE
        counters: dict[str, Any] = {}
        if cpath.is_file():
            try:
                counters = json.loads(cpath.read_text())
            except ValueError:
                log.warning("%s is unreadable; rebuilding from %s", cpath, EVALUATIONS)
                counters = {}
        digest = counters.pop("optimizer_sha256", None)
        if not opath.is_file():
            return None, counters
        data = opath.read_bytes()
        if digest != hashlib.sha256(data).hexdigest():
            log.warning("%s does not match %s; the optimizer will be rebuilt from %s", opath, cpath, EVALUATIONS)
            return None, counters
        return data, counters

    # -- logging ----------------------------------------------------------------------
    def log_handler(self, level: int = logging.INFO) -> logging.FileHandler:
        """A FileHandler appending to driver.log (the caller attaches and removes it)."""
        self.path.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.log_path, mode="a", encoding="utf-8")
        handler.setLevel(level)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        return handler


# =====================================================================================
# One writer per run directory
# =====================================================================================
def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (signal 0 checks without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


#: errno values of a file system that cannot flock (some network mounts)
_NO_LOCKING = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}


class RunLock:
    """An exclusive ``flock`` on ``<run_dir>/.lock``: the one-writer rule of a run directory.

    flock rather than a PID file: the kernel drops the lock when its holder exits for
    any reason (crash, SIGKILL, the OOM killer), so a dead holder never blocks the next
    writer and nobody has to delete anything by hand. The file's content (JSON: host,
    pid, start time, command) only *names* the holder for the error message; it is
    written after the lock is taken and emptied on a clean release, so content found by
    a new holder means the previous one died holding it (a "stale" lock, taken over).

    The file is never deleted: removing it while another process waits on it would let
    two processes lock two different files of the same name. The descriptor is opened
    close-on-exec (Python's default), so Ray processes started by the driver do not
    inherit the lock and keep it alive after the driver exits.
    """

    def __init__(self, run_dir: str | Path, command: str = "evomerge") -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self.command = command
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    @staticmethod
    def read_holder(path: str | Path) -> dict[str, Any] | None:
        """The holder record in a lock file (None when empty, missing or half-written)."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else None

    def acquire(self) -> "RunLock":
        """Take the lock or raise a one-line RunDirError naming the process that holds it.

        Creates the run directory if needed (the lock file has to live somewhere), and
        nothing else: callers take the lock before they read-modify-write anything.
        """
        import fcntl

        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise RunDirError(f"run dir {self.run_dir} is a file; pass another --run-dir")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise RunDirError(f"cannot create the lock file {self.path} ({err.strerror or err}); "
                              f"the run dir must be a writable folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirError(self._busy_message()) from None
            if err.errno in _NO_LOCKING:
                log.warning("the file system of %s cannot lock files (%s); make sure no other evomerge writes to "
                            "this run dir while this one runs", self.run_dir, err.strerror or err)
                return self
            raise RunDirError(f"cannot lock {self.path} ({err.strerror or err})") from None
        self._fd = fd
        self._take_over(self.read_holder(self.path))
        now = time.time()
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "started_at": now, "started": _utc(now),
                  "command": self.command}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode("utf-8"), 0)
            os.fsync(fd)
        except OSError as err:  # the lock is held; only the holder's name is missing
            log.warning("could not record the holder in %s (%s)", self.path, err)
        return self

    def _busy_message(self) -> str:
        # The holder writes its name just after taking the lock; until then the file is empty or
        # still names the previous (dead) holder. Wait a moment for the live holder's name.
        holder = self.read_holder(self.path)
        for _ in range(40):
            if holder is not None and (holder.get("host") != socket.gethostname() or _pid_alive(holder["pid"])):
                break
            time.sleep(0.025)
            holder = self.read_holder(self.path)
        if holder is None:  # the holder took the lock a moment ago and has not written its name yet
            return (f"{self.run_dir} is in use by another evomerge process; "
                    f"wait for it to finish or stop it")
        since = holder.get("started") or _utc(float(holder.get("started_at", 0.0)))
        return (f"{self.run_dir} is in use by evomerge pid {holder['pid']} on host {holder.get('host', '?')} "
                f"since {since}; wait for it to finish or stop it")

    def _take_over(self, previous: dict[str, Any] | None) -> None:
        """Log what the lock file says about a holder that died without releasing it."""
        if previous is None:
            return
        pid, host = previous["pid"], previous.get("host")
        if host == socket.gethostname() and not _pid_alive(pid):
            log.warning("taking over a stale lock of pid %d in %s (held since %s; that process is gone)",
                        pid, self.run_dir, previous.get("started", "?"))
        else:  # another host, or the pid was reused: the kernel says nobody holds it, which is what counts
            log.info("taking over the lock of %s left by pid %s on host %s", self.run_dir, pid, host)

    def release(self) -> None:
        """Empty the holder record (a clean exit leaves nothing stale) and unlock."""
        import fcntl

        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


#: locks this process holds: (real path of the run dir, thread) -> [lock, nesting depth]
_HELD: dict[tuple[str, int], list[Any]] = {}
_HELD_GUARD = threading.Lock()


@contextlib.contextmanager
def hold_run_lock(run_dir: str | Path, command: str = "evomerge") -> Iterator[RunLock]:
    """Hold ``run_dir``'s RunLock for the ``with`` body; nested holds in one thread share it.

    ``search_command`` takes the lock before it clears or creates anything and then calls
    ``run_search``, which takes it as well (for callers that call it directly). The inner
    hold must not flock again: a second open file of the same process conflicts with the
    first like another process would. Another *thread* does flock again, and fails, which
    is right: it is a second writer.
    """
    key = (os.path.realpath(run_dir), threading.get_ident())
    with _HELD_GUARD:
        entry = _HELD.get(key)
        if entry is not None:
            entry[1] += 1
    if entry is not None:
        try:
            yield entry[0]
        finally:
            with _HELD_GUARD:
                entry[1] -= 1
        return
    lock = RunLock(run_dir, command).acquire()
    with _HELD_GUARD:
        _HELD[key] = [lock, 1]
    try:
        yield lock
    finally:
        with _HELD_GUARD:
            _HELD.pop(key, None)
        lock.release()
