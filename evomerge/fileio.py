"""Writing files so that a crash never leaves half of one, and reading an append-only log.

Two disciplines, used for every file evomerge writes (run directories, exported
models, reports):

- **Whole files** are replaced by :func:`atomic_write`: a temp file in the same folder,
  fsync, rename, fsync the folder. A reader sees the old file or the new one, never half.
- **Append-only JSONL logs** get one record per line, written by :func:`append_jsonl`
  with a single ``write``, flush and fsync. A crash can at worst leave a *torn last
  line*. :func:`scan_jsonl` is the one reading rule: a bad **last** line is a torn write
  (skipped, and cut off by the next append), a bad line **before** good ones is
  corruption (a one-line error naming the line): garbage is never followed by records
  that a reader would silently trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator, Mapping

from evomerge.errors import RunDirError

log = logging.getLogger(__name__)


def fsync_dir(path: str | Path) -> None:
    """Make a rename or unlink in ``path`` durable (some file systems cannot: then a no-op)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """A file object whose content replaces ``path`` only when the ``with`` body succeeds.

    Temp file in the same folder (so the rename is atomic), flush, fsync, rename, fsync
    the folder; on any error the temp file goes and ``path`` is untouched. For content
    written in pieces (weight shards, a PNG drawn by matplotlib, a copied tokenizer file).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Replace ``path`` with ``data`` atomically (``atomic_file``)."""
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    with atomic_file(path, "wb") as f:
        f.write(payload)
    return Path(path)


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB pieces (model, task and data files can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def json_text(obj: Any) -> str:
    """Pretty JSON for whole files people read (front.json, recipes, counters)."""
    return json.dumps(obj, indent=2, sort_keys=False) + "\n"


def jsonl_line(record: Mapping[str, Any]) -> bytes:
    """One record as one compact JSON line (ValueError if it would span lines)."""
    line = json.dumps(record, separators=(",", ":")) + "\n"
    if "\n" in line[:-1]:
        raise ValueError("a record must serialise to one line")
    return line.encode("utf-8")


def append_jsonl(path: str | Path, record: Mapping[str, Any]) -> None:
    """Append one record as one line (one write, flush, fsync), after cutting a torn tail."""
    payload = jsonl_line(record)
    truncate_torn_tail(path)
    with open(path, "ab") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())


def scan_jsonl(data: bytes, path: str | Path) -> tuple[list[tuple[int, dict[str, Any]]], int | None]:
    """([(1-based line number, record)], byte offset where a torn tail starts, or None).

    The one tolerance rule (module docstring): an unreadable line that only blank lines
    follow is a torn tail; one followed by records is a one-line ``RunDirError``. A last
    record that lost only its newline is complete and kept.
    """
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
                raise RunDirError(f"{path} line {i + 1} is corrupt (not a JSON object) and is not the last "
                                  f"line; fix or delete that line, then resume") from None
            records.append((i + 1, rec))
            if last:  # complete record whose newline was lost: kept; the next append adds the newline
                return records, None
        offset += len(raw) + 1
    return records, None


def read_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """Numbered records of a JSONL log (none if it does not exist); a torn tail is skipped with a warning."""
    p = Path(path)
    if not p.exists():
        return []
    numbered, torn = scan_jsonl(p.read_bytes(), p)
    if torn is not None:
        log.warning("ignoring a torn last line in %s (a crash mid-write)", p)
    return numbered


def truncate_torn_tail(path: str | Path) -> int:
    """Cut a torn last line off a JSONL log (and end it with a newline); bytes removed."""
    p = Path(path)
    if not p.exists() or p.stat().st_size == 0:
        return 0
    with open(p, "rb") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return 0
    _, torn = scan_jsonl(p.read_bytes(), p)
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
