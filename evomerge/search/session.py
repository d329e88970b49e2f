"""One locked session on a run directory: the checks, Ray up, the work, Ray down.

The commands (``evomerge.cli``) parse arguments; everything between "the config is
valid" and "the run dir holds the result" happens here, in an order that never loses
or half-writes anything: every check that can fail runs *before* the run directory is
written or Ray starts (the plan, the records, the log against the last checkpoint, the
run's frozen identity), all under the run dir's lock (``evomerge.runlock``).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable, Iterator

import yaml

from evomerge.config import SearchConfig, parse_config
from evomerge.errors import ConfigError, EvomergeError, RunDirError
from evomerge.fileio import atomic_write
from evomerge.pareto import ParetoArchive
from evomerge.records import EvaluationRecord, HeldoutRecord
from evomerge.rundir import RunDir
from evomerge.runlock import hold_run_lock
from evomerge.search.plan import SearchPlan, describe, plan_search

log = logging.getLogger("evomerge.search")

#: called at each checkpoint with the run dir and whether to wait for it (the CLI draws report.png)
CheckpointHook = Callable[[RunDir, bool], None]


def preflight(run: RunDir) -> None:
    """Read-only checks of a run dir before Ray starts: every record valid, the log as checkpointed."""
    run.validated_records()
    run.check_log()


def require_run_dir(run_dir: Path) -> None:
    """One line when ``run_dir`` is not a run directory, checked *before* locking it.

    Taking the lock creates ``.lock``; a mistyped path must not get a folder and a lock
    file made for it.
    """
    if not RunDir(run_dir).exists():
        what = "does not exist" if not run_dir.exists() else "is not a run directory (no config.yaml)"
        raise RunDirError(f"{run_dir} {what}; pass the run dir of an `evomerge search`")


def plan_run(run_dir: Path) -> SearchPlan:
    """The plan of a run dir's frozen config (validated and checked; one-line errors)."""
    return plan_search(RunDir(run_dir).load_config())


@contextlib.contextmanager
def driver_log(run: RunDir) -> Iterator[None]:
    """Copy the ``evomerge`` loggers into the run's driver.log for the session."""
    handler = run.log_handler()
    logger = logging.getLogger("evomerge")
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()


@contextlib.contextmanager
def ray_session(cfg: SearchConfig, address: str | None) -> Iterator[None]:
    """Ray for the session: started here (and stopped after) unless it is up already."""
    import ray

    from evomerge.search.ray_cluster import init_ray

    started = False
    try:
        started = init_ray(cfg, address)
        yield
    finally:
        if started and ray.is_initialized():
            ray.shutdown()


# -- identity and budget -----------------------------------------------------------------------
def check_or_record_identity(run: RunDir, cfg: SearchConfig) -> None:
    """Refuse a run whose models, tasks or settings changed since it started (``search.identity``).

    A run dir from before identity.json existed gets one now, with a warning: its
    identity is what the files are today, checked from then on.
    """
    from evomerge.search.identity import check_identity, identity_record, write_identity

    if check_identity(run.path, cfg) is None:
        log.warning("%s has no %s (written by an older evomerge): recording the models, tasks and settings "
                    "as they are now; later sessions are checked against them", run.path, run.identity_path.name)
        record = identity_record(cfg)
        record["optimizer_budget"] = cfg.budget.evaluations  # the budget it ran under so far
        record["recorded_late"] = True
        write_identity(run.path, record)


def optimizer_budget(run: RunDir, cfg: SearchConfig) -> int | None:
    """The budget the run's optimizer was created with (``resume --budget`` does not change it)."""
    from evomerge.search.identity import read_identity

    with contextlib.suppress(EvomergeError):
        stored = read_identity(run.path)
        if stored is not None and "optimizer_budget" in stored:
            return stored["optimizer_budget"]
    return cfg.budget.evaluations


def check_budget(cfg: SearchConfig, evaluations: int) -> None:
    """One line when ``--budget`` is not a raise of the run's evaluation budget."""
    current = cfg.budget.evaluations
    if evaluations <= 0:
        raise ConfigError(f"--budget {evaluations}: give a number of evaluations > 0")
    if current is not None and evaluations < current:
        raise ConfigError(f"--budget {evaluations} is below the run's budget of {current} evaluations; "
                          f"--budget only raises it")


def raise_budget(run: RunDir, cfg: SearchConfig, evaluations: int) -> SearchConfig:
    """Set the frozen config's ``budget.evaluations`` to ``evaluations`` (only ever up); the new config."""
    check_budget(cfg, evaluations)
    current = cfg.budget.evaluations
    if evaluations == current:
        return cfg
    data = run.read_config_dict()
    data.setdefault("budget", {})["evaluations"] = evaluations
    new = parse_config(data)
    atomic_write(run.config_path, yaml.safe_dump(data, sort_keys=False))
    log.info("%s: budget raised from %s to %d evaluations", run.path, current, evaluations)
    return new


# -- sessions --------------------------------------------------------------------------------
def run_is_complete(cfg: SearchConfig, run: RunDir) -> bool:
    """True when a previous session finished this run (budget spent, front re-scored): no Ray needed."""
    counters = run.load_counters()
    if counters.get("status") != "done" or cfg.budget.evaluations is None:
        return False
    n = sum(1 for r in run.records() if isinstance(r, EvaluationRecord))
    return n >= cfg.budget.evaluations and n == counters.get("evaluations")


def run_search(plan: SearchPlan, run_dir: Path, *, address: str | None, progress: bool, checked: bool = False,
               on_checkpoint: CheckpointHook | None = None) -> int:
    """Start Ray (unless already up), run a search session on ``run_dir``, stop Ray.

    Holds the run dir's lock throughout (already held when called from the commands);
    returns 0, 1 when every candidate of the session failed, or 128+signal when stopped.
    """
    from evomerge.search.loop import Search

    cfg = plan.cfg
    run = RunDir(run_dir)
    with hold_run_lock(run_dir, "evomerge search"):
        if not checked:  # the commands ran it already, before their own writes
            preflight(run)
        if run_is_complete(cfg, run):
            print(f"{run_dir}: this search is complete ({cfg.budget.evaluations} evaluations); "
                  f"see `evomerge status {run_dir}`")
            return 0
        with driver_log(run), ray_session(cfg, address):
            log.info("plan: %s", describe(plan))
            search = Search(plan, run, progress=progress, optimizer_budget=optimizer_budget(run, cfg),
                            on_checkpoint=on_checkpoint)
            return search.execute()


def rescore_front(run_dir: str | Path, address: str | None = None,
                  on_done: CheckpointHook | None = None) -> dict[str, dict[str, float]]:
    """Score the run's current front on the held-out split now (members not scored yet).

    A writer like a search (it appends heldout records and rewrites the front), so it
    holds the run dir's lock. It needs no optimizer: the front is the Pareto archive of
    the logged evaluations, exactly as the search keeps it.
    """
    from evomerge.search.heldout import score_heldout
    from evomerge.search.pool import EvaluatorPool
    from evomerge.search.ray_cluster import plan_actors

    run_dir = Path(run_dir)
    require_run_dir(run_dir)
    with hold_run_lock(run_dir, "evomerge status --rescore"):
        plan = plan_run(run_dir)
        run = RunDir(run_dir)
        preflight(run)
        run.truncate_torn_tail()
        records = run.records()
        evaluations = {r.id: r for r in records if isinstance(r, EvaluationRecord)}
        heldout = {r.id: r.scores for r in records if isinstance(r, HeldoutRecord) and r.ok}
        archive = ParetoArchive(plan.directions)
        for rec in evaluations.values():
            if rec.ok and rec.measured:  # a screen's estimate never enters the front
                archive.add(rec.id, rec.scores)
        todo = {i: evaluations[i].recipe or {} for i in archive.front() if i not in heldout}
        if not todo:
            return {}
        with driver_log(run), ray_session(plan.cfg, address):
            n_actors, use_gpu = plan_actors(plan.cfg)
            pool = EvaluatorPool(plan.cfg, n_actors, use_gpu, plan.directions)
            pool.wait_ready()
            done = score_heldout(run, pool, todo)
        heldout.update({i: rec.scores for i, rec in done.items()})
        n_told = sum(1 for r in records if isinstance(r, EvaluationRecord))
        run.write_front(archive, {m: evaluations[m].recipe for m in archive.front()}, heldout, evaluations=n_told)
        if on_done is not None:
            on_done(run, True)
        return {i: rec.scores for i, rec in done.items()}


