"""One shape for every plug-in registry: names mapped to lazy ``"module:attribute"`` entries.

Merge methods, search spaces and evaluator kinds are all looked up by a name written in
a config or a mergekit YAML. Each kind keeps a :class:`Registry` whose entries are
*strings* naming where the plug-in lives (``"search_spaces.layerwise:LayerwiseSpace"``),
as lm-eval registers its model backends. Why strings and not decorators:

* a registry never imports its plug-ins to learn their names, so the module that holds
  the registry sits *below* the plug-ins in the import layers and no plug-in imports a
  module that imports it back (the circle a decorator registry makes);
* listing the names (config checks, ``--help``, "did you mean") costs no import of
  torch or lm-eval; only the plug-in a run actually uses is imported, once.

A user's own plug-in needs no change to evomerge: a config may name
``"my_package.my_module:MyEvaluator"`` directly, and :meth:`Registry.add` registers one
under a short name from code.
"""

from __future__ import annotations

import difflib
import importlib
import threading
from typing import Generic, TypeVar

from evomerge.errors import EvomergeError

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> lazily imported plug-ins of one kind (``what``: "merge method", "search space", ...)."""

    def __init__(self, what: str, entries: dict[str, str], error: type[EvomergeError] = EvomergeError) -> None:
        for name, target in entries.items():
            _split(target, name)  # a malformed built-in entry is a bug: fail at import, not at lookup
        self.what = what
        self.error = error
        self._entries: dict[str, str | T] = dict(entries)
        self._loaded: dict[str, T] = {}
        self._lock = threading.RLock()  # re-entrant: a plug-in may look up another while it is imported

    def names(self) -> list[str]:
        """Registered names, sorted (imports nothing)."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries or (isinstance(name, str) and ":" in name)

    def add(self, name: str, target: str | T) -> None:
        """Register ``target`` (an object, or a ``"module:attribute"`` string) under ``name``."""
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} is registered already")
        if isinstance(target, str):
            _split(target, name)
        self._entries[name] = target

    def get(self, name: str, where: str | None = None) -> T:
        """The plug-in called ``name`` (imported on first use), or a one-line ``error``.

        ``name`` may also be a ``"module:attribute"`` path to a plug-in outside evomerge.
        ``where`` names the config field, for the message.
        """
        with self._lock:
            if name in self._loaded:
                return self._loaded[name]
            target = self._entries.get(name)
            if target is None and ":" in name:
                target = name
            if target is None:
                raise self.error(self._unknown(name, where))
            obj = _load(target, name, self.what, where, self.error) if isinstance(target, str) else target
            self._loaded[name] = obj
            return obj

    def _unknown(self, name: str, where: str | None) -> str:
        close = difflib.get_close_matches(str(name), list(self._entries), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        prefix = f"config field {where}: " if where else ""
        return (f"{prefix}unknown {self.what} {name!r}; {hint}known: {', '.join(self.names())} "
                f"(or a 'module:attribute' path to your own)")


def _split(target: str, name: str) -> tuple[str, str]:
    module, sep, attr = target.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"registry entry {name!r}: {target!r} is not 'module:attribute'")
    return module, attr


def _load(target: str, name: str, what: str, where: str | None, error: type[EvomergeError]) -> object:
    module_name, attr = _split(target, name)
    prefix = f"config field {where}: " if where else ""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise error(f"{prefix}{what} {name!r}: module {module_name!r} cannot be imported ({err}); "
                    f"install it or fix the path") from None
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise error(f"{prefix}{what} {name!r}: {module_name!r} has no attribute {attr!r}; fix the path") from None
    return obj
