"""Live terminal display of a running search (rich), or nothing.

Why a separate module: the driver only reports numbers (``update``); how they are shown
is a presentation concern. When stdout is not a terminal (a Ray Job, CI, a pipe) or the
user passed ``--no-progress``, ``SearchProgress`` is a no-op and driver.log has it all.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Mapping


class SearchProgress:
    """``with SearchProgress(enabled, budget=..) as p: p.update(...)`` — refreshed at most 4x a second."""

    def __init__(self, enabled: bool, *, title: str, budget: int | None, wall_clock_s: float | None) -> None:
        self.enabled = bool(enabled) and sys.stdout.isatty()
        self.title = title
        self.budget = budget
        self.wall_clock_s = wall_clock_s
        self._live: Any = None
        self._last = 0.0
        self._state: dict[str, Any] = {}

    def __enter__(self) -> "SearchProgress":
        if self.enabled:
            from rich.live import Live

            self._live = Live(self._render(), refresh_per_second=4, transient=False)
            self._live.__enter__()
            # log lines to the terminal must go through the live display's redirected stream,
            # or they tear the table; restored on exit
            self._streams = []
            for h in logging.getLogger().handlers:
                if type(h) is logging.StreamHandler and h.stream in (sys.__stderr__, sys.__stdout__):
                    self._streams.append((h, h.setStream(sys.stderr)))
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            for h, old in getattr(self, "_streams", []):
                h.setStream(old)
            self._live.update(self._render())
            self._live.__exit__(*exc)
            self._live = None

    def update(self, *, done: int, failed: int, in_flight: int, front: int, elapsed_s: float,
               best: Mapping[str, tuple[float, str]], phase: str = "search", force: bool = False,
               actors: str | None = None) -> None:
        """Record the numbers; redraw when the display is on and due. ``actors``: where each runs."""
        self._state = dict(done=done, failed=failed, in_flight=in_flight, front=front, elapsed_s=elapsed_s,
                           best=dict(best), phase=phase, actors=actors)
        now = time.monotonic()
        if self._live is not None and (force or now - self._last > 0.25):
            self._last = now
            self._live.update(self._render())

    def _render(self) -> Any:
        from rich.table import Table

        s = self._state
        table = Table(title=self.title, show_header=False, box=None, pad_edge=False)
        table.add_column(style="bold")
        table.add_column()
        if not s:
            table.add_row("status", "starting actors ...")
            return table
        budget = f" / {self.budget}" if self.budget else ""
        elapsed = s["elapsed_s"]
        wall = f" / {self.wall_clock_s:.0f}s" if self.wall_clock_s else ""
        rate = s["done"] / elapsed * 3600 if elapsed > 0 and s["done"] else 0.0
        table.add_row("phase", s["phase"])
        table.add_row("evaluations", f"{s['done']}{budget}   (in flight {s['in_flight']}, failed {s['failed']})")
        table.add_row("elapsed", f"{elapsed:.0f}s{wall}   {rate:.0f} evaluations/hour")
        table.add_row("front size", str(s["front"]))
        if s.get("actors"):
            table.add_row("actors", s["actors"])
        for name, (score, eid) in s["best"].items():
            table.add_row(f"best {name}", f"{score:.4g}  ({eid})")
        return table
