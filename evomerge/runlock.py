"""One writer per run directory: an exclusive ``flock`` on ``<run_dir>/.lock``.

Two writers would interleave appends to the evaluation log, replay each other's asks and
rewrite the front under each other. Readers (status, plot, export) need no lock: the
log is append-only and every other file is replaced atomically (``evomerge.fileio``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from evomerge.errors import RunDirError

log = logging.getLogger(__name__)

LOCK = ".lock"


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
