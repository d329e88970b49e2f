"""``evomerge status`` and ``evomerge plot``: read a run directory, print or draw it.

Both only read (``evomerge.runview``), so they work on a finished run, on a crashed one,
and while a search is still writing it; ``status --rescore`` is the exception, a writer
that holds the run's lock like a search (``search.session.rescore_front``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from evomerge.errors import RunDirError
from evomerge.report import draw_report, front_table, progress_line, summary
from evomerge.rundir import RunDir
from evomerge.runview import load_run


def plot_command(args: argparse.Namespace) -> int:
    out = getattr(args, "out", None)
    view = load_run(args.run_dir)  # a wrong run dir is one line before any drawing
    if out is not None:
        target = Path(out)
        if target.is_dir():
            raise RunDirError(f"--out {target} is a folder; pass a file name such as {target / 'report.png'}")
        parent = target.parent if str(target.parent) else Path(".")
        if not parent.is_dir():
            raise RunDirError(f"--out {target}: folder {parent} does not exist; create it or choose another path")
        if not os.access(parent, os.W_OK):
            raise RunDirError(f"--out {target}: folder {parent} is not writable; choose another path")
    try:
        path = draw_report(view, out)
    except OSError as err:
        raise RunDirError(f"could not write {out or view.path / 'report.png'}: {err.strerror or err}") from None
    print(f"wrote {path}")
    return 0


def status_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    run_dir = Path(args.run_dir)
    load_run(run_dir)  # a wrong path fails here, in one line, before any Ray work
    RunDir(run_dir).check_log()  # a truncated or edited log is refused, not shown as a smaller run
    if getattr(args, "rescore", False):
        from evomerge.search.session import rescore_front

        rescore_front(run_dir, getattr(args, "address", None), on_done=lambda run, wait: draw_report(run.path))
    view = load_run(run_dir)
    console = Console()
    console.print(front_table(view))
    console.print(progress_line(summary(view)))
    plan = RunDir(run_dir).load_memory_plan()
    if plan is not None:
        console.print(memory_line(plan))
    return 0


def memory_line(plan: dict) -> str:
    """The run's memory plan in one line: the mode chosen per actor, and where each actor runs."""
    chosen = (plan.get("chosen") or {}).get("describe") or "planned by each actor on its node"
    actors = plan.get("per_actor") or {}
    where = ", ".join(f"{i} on {a.get('node')} ({a.get('residency')})" for i, a in actors.items())
    cap = f", cap {plan['actor_memory_gb']:g} GB" if plan.get("actor_memory_gb") else ""
    return f"memory plan ({plan.get('device')}, {plan.get('actors')} actor(s){cap}): {chosen}" + (
        f"; actors: {where}" if where else "")

