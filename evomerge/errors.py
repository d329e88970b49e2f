"""User-facing errors.

Every mistake a user can make (a config field, a path, a recipe) is reported as one
line saying what is wrong, where, and how to fix it. Code raises these before any Ray
work starts; the CLI prints ``str(err)`` and exits with status 2, never a traceback.
``read_utf8`` reads a user's text file (config, recipe) with such an error for bad bytes.
"""

from __future__ import annotations

import os
from pathlib import Path


class EvomergeError(Exception):
    """Base class for errors meant for the user: the message is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class ConfigError(EvomergeError):
    """A config field is missing, malformed or inconsistent."""


class SourceError(EvomergeError):
    """A model source cannot be found, read or used with the others."""


class RecipeError(EvomergeError):
    """A merge recipe is malformed or does not fit the models it names."""


class MethodError(EvomergeError):
    """A merge method is unknown or was given parameters it cannot use."""


class EvaluatorError(EvomergeError):
    """An evaluator or one of its tasks/files is unknown or unusable."""


class RunDirError(EvomergeError):
    """A run directory is missing, corrupt, or holds a different search."""


class MemoryPlanError(EvomergeError):
    """No residency mode of the merge fits the memory available (``evomerge.merge.memory_plan``)."""


class ClusterError(EvomergeError):
    """The Ray cluster cannot be joined, or has no node left that can host an evaluation actor."""


def read_utf8(path: str | os.PathLike[str], error: type[EvomergeError] = EvomergeError) -> str:
    """The text of a user-supplied file, or one line (``error``) saying why it cannot be read.

    ``Path.read_text()`` decodes with the locale's encoding and lets a bad byte escape as a
    multi-line ``UnicodeDecodeError`` traceback; configs, recipes and run-dir files are
    UTF-8 by contract (YAML and JSON both say so), so decode exactly that (a leading BOM,
    as some editors write, is accepted) and name the first bad byte so it can be found.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as err:
        raise error(f"cannot read {p} ({type(err).__name__}: {err.strerror or err}); check the path "
                    f"and its permissions") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise error(f"{p} is not UTF-8 text; byte 0x{data[err.start]:02x} at line {line} (offset {err.start}) "
                    f"cannot be decoded: re-save the file as UTF-8") from None
