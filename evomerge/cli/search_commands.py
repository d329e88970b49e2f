"""``evomerge search`` and ``evomerge resume``: the checks a user can fail, then a search session.

Both commands do every check that can fail *before* they write to the run directory or
start Ray: the config and its resources (``search.plan``), the run dir's records and log
(``search.session.preflight``), the run's frozen identity, a ``--budget`` that only
raises. The session itself is ``search.session.run_search``; this module adds the
report drawn at each checkpoint, which the search layer must not know about.
"""

from __future__ import annotations

import argparse
import logging
import threading
from pathlib import Path

from evomerge.config import load_config
from evomerge.rundir import RunDir
from evomerge.runlock import hold_run_lock
from evomerge.search.plan import plan_search
from evomerge.search.session import (check_budget, check_or_record_identity, plan_run, preflight, raise_budget,
                                     require_run_dir, run_search)

log = logging.getLogger("evomerge.cli")


class ReportDrawer:
    """Redraws report.png at each checkpoint, in a background thread while the search runs.

    Drawing takes ~1 s of CPU; done inline it would leave an actor idle at every
    checkpoint. The report reads only the run dir (append-only log, atomic files), so it
    is safe next to the running search; a draw still running is not queued again, and
    the last checkpoint (``wait``) draws inline so the run ends with a current report.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None

    def __call__(self, run: RunDir, wait: bool) -> None:
        def draw() -> None:
            try:
                from evomerge.report import draw_report

                draw_report(run.path)
            except Exception as err:  # noqa: BLE001 - a plot must never stop a search
                log.warning("could not draw report.png: %s", err)

        previous = self._thread
        if previous is not None and previous.is_alive():
            if not wait:
                return
            previous.join()
        if wait:
            draw()
        else:
            self._thread = threading.Thread(target=draw, name="evomerge-report", daemon=True)
            self._thread.start()


def search_command(args: argparse.Namespace) -> int:
    """``evomerge search CONFIG``: validate everything, then search (or continue the same search).

    The run dir's lock is taken after the config checks (they touch only the config and
    the models) and before the run dir is created, compared or cleared by --overwrite,
    so a second writer fails before it changes anything or starts Ray.
    """
    cfg = load_config(args.config, getattr(args, "overrides", None) or [])
    plan = plan_search(cfg)
    run_dir = Path(getattr(args, "run_dir", None) or cfg.resolved_run_dir())
    plan = plan.with_config(cfg.model_copy(update={"output": cfg.output.model_copy(update={"run_dir": str(run_dir)})}))
    with hold_run_lock(run_dir, "evomerge search"):
        from evomerge.search.identity import identity_record, write_identity

        overwrite = bool(getattr(args, "overwrite", False))
        run = RunDir(run_dir)
        if run.exists() and not overwrite:
            run.create(plan.cfg)  # the same search, or a one-line refusal; writes nothing either way
            preflight(run)
            check_or_record_identity(run, plan.cfg)
            log.info("%s holds this search already: continuing it", run_dir)
        else:
            record = identity_record(plan.cfg)  # computed first: a failure leaves no half-made run dir
            run.create(plan.cfg, overwrite=overwrite)
            write_identity(run_dir, record)
        return run_search(plan, run_dir, address=getattr(args, "address", None),
                          progress=not getattr(args, "no_progress", False), checked=True,
                          on_checkpoint=ReportDrawer())


def resume_command(args: argparse.Namespace) -> int:
    """``evomerge resume RUN_DIR [--budget N]``: continue to the budget, losing and repeating nothing.

    Every check (config, records, the log against the last checkpoint, the run's
    identity) runs before anything is written or Ray starts; ``--budget`` then raises the
    frozen config's evaluation budget.
    """
    run_dir = Path(args.run_dir)
    require_run_dir(run_dir)
    with hold_run_lock(run_dir, "evomerge resume"):
        plan = plan_run(run_dir)
        run = RunDir(run_dir)
        preflight(run)
        budget = getattr(args, "budget", None)
        if budget is not None:
            check_budget(plan.cfg, budget)
        check_or_record_identity(run, plan.cfg)
        if budget is not None:
            plan = plan.with_config(raise_budget(run, plan.cfg, budget))
        return run_search(plan, run_dir, address=getattr(args, "address", None),
                          progress=not getattr(args, "no_progress", False), checked=True,
                          on_checkpoint=ReportDrawer())
