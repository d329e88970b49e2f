"""User-facing errors.

Every mistake a user can make (a config field, a path, a recipe) is reported as one
line saying what is wrong, where, and how to fix it. Code raises these before any Ray
work starts; the CLI prints ``str(err)`` and exits with status 2, never a traceback.
"""

from __future__ import annotations


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
