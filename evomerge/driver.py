"""The search driver: ask/tell with nevergrad, dispatch to Ray actors, checkpoint, resume.

Shape of a run (``search_command`` / ``resume_command``):

1. Pre-flight, *before Ray starts*: the config is loaded and fully checked
   (``load_config``), the optimizer name resolved, the run directory checked (a run dir
   holding a different search is an error unless ``--overwrite``). Every user mistake is
   one line and Ray is never initialised for it.
2. Ray: embedded local Ray by default; ``--address`` / ``ray.address`` / ``RAY_ADDRESS``
   (a Ray Job sets it) connect to a cluster. One actor per GPU, else ``ray.actors`` CPU
   actors (``evomerge.actors``).
3. Resume state is rebuilt from ``evaluations.jsonl`` alone (``SearchBook.replay``): a
   fresh optimizer seeded as at the start is fed the logged asks and tells in the logged
   order, so nothing finished is lost or evaluated twice, and candidates in flight at a
   crash are evaluated again. ``state/`` (optimizer pickle + counters) is written too, for
   inspection and tools, but resume never trusts it over the log.
4. References (uniform merge, each source alone, the base) are scored once.
5. Steady-state search: ``ray.wait`` over everything in flight; the moment an actor is
   free it gets the next candidate (no generation barrier). Each finished candidate is
   appended to the log *first*, then told. Failed candidates are told a penalty worse
   than anything seen. A recipe already evaluated is not evaluated again (its scores
   are reused and logged as ``cached_from``); cache hits count toward the budget, so a
   converged optimizer cannot loop forever.
6. Checkpoints every ``output.checkpoint_every`` evaluations and on SIGINT/SIGTERM; at the
   end the front is re-scored on the heldout split.

Time-outs (``ray.eval_timeout_s``): torch cannot be interrupted from inside the actor, so
the driver kills an actor whose evaluation runs too long (``ray.kill(no_restart=False)``);
Ray restarts it (counts toward ``ray.max_restarts``) and the candidate is logged as failed.
An actor that dies for any other reason is restarted by Ray and its candidate re-queued
(up to ``MAX_ATTEMPTS`` times, then logged as failed).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from evomerge.config import SearchConfig, check_config, load_config
from evomerge.errors import ConfigError, EvomergeError, RunDirError
from evomerge.rundir import RunDir, hold_run_lock
from evomerge.searchbook import Asked, SearchBook

log = logging.getLogger("evomerge.driver")

#: times a candidate is dispatched again after its actor died under it, before it is logged failed
MAX_ATTEMPTS = 3
#: longest ray.wait, so time-outs, signals and the display are looked at this often
TICK_S = 0.5
#: wait before asking a restarting actor again whether it is back
PROBE_RETRY_S = 1.0
#: evaluate each source alone as a reference when there are at most this many
MAX_SOURCE_REFERENCES = 8
FAULTS_ENV = "EVOMERGE_TEST_FAULTS"


# =====================================================================================
# Run directory I/O (layout and write discipline: evomerge/rundir.py)
# =====================================================================================
class RunFiles(RunDir):
    """``RunDir`` plus the few reads the driver does in one place."""

    def records(self) -> list[dict[str, Any]]:
        """Every complete record, validated (``rundir.validate_record``); a torn last line is cut off first.

        Callers have run ``preflight`` (which validates every record read-only) before this
        writes anything, so the torn tail is cut only from a log already known to be sound.
        """
        if self.evaluations_path.exists():
            self.truncate_torn_tail()
        return self.validated_records()

    def preflight(self) -> None:
        """Read-only checks of the run dir before Ray starts: every record valid, the log as checkpointed."""
        self.validated_records()
        self.check_log()

    def counters(self) -> dict[str, Any]:
        return self.load_state()[1]


# =====================================================================================
# Pre-flight: config and run directory, before any Ray work
# =====================================================================================
def check_optimizer(cfg: SearchConfig) -> None:
    from search_spaces import optimizer_name
    from search_spaces.optimizers import resolve_optimizer

    resolve_optimizer(optimizer_name(cfg))


# =====================================================================================
# Ray
# =====================================================================================
def init_ray(cfg: SearchConfig, address: str | None) -> bool:
    """Connect to (or start) Ray. Returns True if this call started it (and must stop it)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or cfg.ray.address or os.environ.get("RAY_ADDRESS")
    quiet = dict(log_to_driver=log.isEnabledFor(logging.DEBUG), logging_level=logging.WARNING)
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, **quiet)
    else:
        use_gpu = _local_gpus() > 0 if cfg.ray.use_gpu is None else cfg.ray.use_gpu
        n_actors = cfg.ray.actors or (_local_gpus() if use_gpu else 1)
        num_cpus = None if use_gpu else max(1, math.ceil(n_actors * cfg.ray.num_cpus_per_actor))
        log.info("starting an embedded local Ray (%s CPUs)", num_cpus or "all")
        ray.init(num_cpus=num_cpus, include_dashboard=False,
                 object_store_memory=cfg.ray.object_store_memory or 128 * 1024**2, **quiet)
    return True


def _local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        return 0


def plan_actors(cfg: SearchConfig) -> tuple[int, bool]:
    """(number of actors, on GPU?) for the connected cluster."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = gpus > 0 if cfg.ray.use_gpu is None else cfg.ray.use_gpu
    if use_gpu and gpus == 0:
        raise EvomergeError("ray.use_gpu is true but the Ray cluster has no GPU; set ray.use_gpu: false")
    n = cfg.ray.actors or (gpus if use_gpu else 1)
    return max(1, n), use_gpu


@dataclass
class Job:
    """One unit of actor work: a search candidate, a reference, or a heldout re-score."""

    kind: str  # "evaluation" | "reference" | "heldout"
    id: str
    recipe: dict[str, Any]
    split: str = "selection"
    asked: Asked | None = None
    key: str | None = None
    label: str | None = None
    asked_at: float = field(default_factory=time.time)
    attempts: int = 0
    timed_out: bool = False
    dispatched_at: float = 0.0


@dataclass
class Event:
    job: Job
    result: dict[str, Any] | None  # None: the actor died under the job (re-queue it)
    actor: int
    error: str | None = None


class ActorPool:
    """Actors with at most one job each; ``poll`` waits on everything in flight at once."""

    def __init__(self, cfg: SearchConfig, n: int, use_gpu: bool, faults: dict[str, Any] | None = None) -> None:
        from evomerge.actors import make_actor

        self.cfg = cfg
        self.timeout_s = cfg.ray.eval_timeout_s
        cfg_data = cfg.model_dump(mode="json")
        self.actors = {i: make_actor(cfg, cfg_data, i, use_gpu, faults=faults) for i in range(n)}
        self.state = {i: "starting" for i in range(n)}
        self.info: dict[int, dict[str, Any]] = {}
        self.probes: dict[Any, int] = {a.ready.remote(): i for i, a in self.actors.items()}
        self.inflight: dict[Any, tuple[int, Job]] = {}
        self.reprobe: dict[int, float] = {}  # actor -> when to ask again if it is back
        self.last_error: str | None = None

    # -- bookkeeping ----------------------------------------------------------------
    def free(self) -> list[int]:
        return [i for i, s in self.state.items() if s == "free"]

    def alive(self) -> int:
        return sum(1 for s in self.state.values() if s != "dead")

    def busy(self) -> bool:
        return bool(self.inflight)

    def jobs(self) -> list[Job]:
        return [job for _, job in self.inflight.values()]

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until at least one actor is up; error out if every actor failed to start."""
        t0 = time.monotonic()
        while not self.free():
            if self.alive() == 0:
                raise EvomergeError(f"no evaluation actor could start: {self.last_error}")
            if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                raise EvomergeError(f"no evaluation actor started within {timeout_s:.0f}s")
            self.poll(TICK_S)

    def submit(self, i: int, job: Job) -> None:
        job.dispatched_at = time.time()
        ref = self.actors[i].evaluate.remote(job.id, job.recipe, job.split)
        self.inflight[ref] = (i, job)
        self.state[i] = "busy"

    # -- waiting --------------------------------------------------------------------
    def poll(self, timeout: float) -> list[Event]:
        """Wait up to ``timeout`` for any job or probe; return finished/lost jobs."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

        now = time.monotonic()
        for i, when in list(self.reprobe.items()):
            if now >= when:
                del self.reprobe[i]
                self.probes[self.actors[i].ready.remote()] = i
        refs = list(self.inflight) + list(self.probes)
        if not refs:
            if self.reprobe:
                time.sleep(max(0.0, min(timeout, min(self.reprobe.values()) - now)))
            return []
        if self.timeout_s is not None:  # wake up in time to enforce the next time-out
            due = [job.dispatched_at + self.timeout_s for _, job in self.inflight.values() if not job.timed_out]
            if due:
                timeout = max(0.0, min(timeout, min(due) - time.time() + 0.01))
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if ready:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        events: list[Event] = []
        for ref in ready:
            if ref in self.probes:
                i = self.probes.pop(ref)
                try:
                    self.info[i] = ray.get(ref)
                    self.state[i] = "free"
                    log.info("actor %d ready: %s", i, self.info[i])
                except ActorUnavailableError:  # restarting: ask again shortly
                    self.reprobe[i] = time.monotonic() + PROBE_RETRY_S
                except (RayActorError, RayTaskError) as err:
                    self.state[i] = "dead"
                    self.last_error = _ray_error_line(err)
                    log.error("actor %d is gone for good: %s", i, self.last_error)
                continue
            i, job = self.inflight.pop(ref)
            try:
                result = ray.get(ref)
                self.state[i] = "free"
                events.append(Event(job, result, i))
            except RayActorError as err:
                line = _ray_error_line(err)
                if job.timed_out:
                    msg = f"timeout: evaluation ran longer than ray.eval_timeout_s={self.timeout_s:g}s; actor restarted"
                    events.append(Event(job, _failed_result(job, i, msg), i))
                else:
                    log.warning("actor %d died while evaluating %s (%s); re-queueing it", i, job.id, line)
                    events.append(Event(job, None, i, error=line))
                self.state[i] = "starting"  # restarted by Ray (max_restarts) or dead: the probe tells
                self.probes[self.actors[i].ready.remote()] = i
            except RayTaskError as err:  # evaluate() itself never raises; defensive
                self.state[i] = "free"
                events.append(Event(job, _failed_result(job, i, _ray_error_line(err)), i))
        if self.timeout_s is not None:
            now = time.time()
            for ref, (i, job) in list(self.inflight.items()):
                if not job.timed_out and now - job.dispatched_at > self.timeout_s:
                    job.timed_out = True
                    log.warning("candidate %s exceeded ray.eval_timeout_s=%gs on actor %d; restarting the actor",
                                job.id, self.timeout_s, i)
                    ray.kill(self.actors[i], no_restart=False)
        return events

    def pids(self) -> dict[int, int]:
        return {i: int(info["pid"]) for i, info in self.info.items() if "pid" in info}


def _ray_error_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}"


def _failed_result(job: Job, actor: int, error: str) -> dict[str, Any]:
    return {"id": job.id, "split": job.split, "actor": actor, "scores": {}, "status": "failed", "error": error,
            "timings": {"merge_s": 0.0, "eval_s": 0.0}}


# =====================================================================================
# The search
# =====================================================================================
def reference_recipes(cfg: SearchConfig, sources: list[str], base: str | None) -> list[tuple[str, dict[str, Any]]]:
    """Baselines scored once: the uniform average, each source alone (if few), the base."""
    from evomerge.merge.recipe import GroupRecipe, MergeRecipe

    def linear(weights: dict[str, float]) -> dict[str, Any]:
        group = GroupRecipe(method="linear", params={"normalize": True},
                            source_params={s: {"weight": w} for s, w in weights.items()})
        return MergeRecipe(base=base, sources=list(sources), groups={"default": group}, seed=cfg.merge.seed,
                           dtype=cfg.merge.dtype, compute_dtype=cfg.merge.compute_dtype,
                           tokenizer_source=cfg.models.tokenizer_source).to_dict()

    out = [("uniform", linear({s: 1.0 for s in sources}))]
    if len(sources) > 1 and len(sources) <= MAX_SOURCE_REFERENCES:
        out += [(f"source:{s}", linear({t: (1.0 if t == s else 0.0) for t in sources})) for s in sources]
    if base is not None:
        group = GroupRecipe(method="task_arithmetic", params={},
                            source_params={s: {"weight": 0.0} for s in sources})
        out.append(("base", MergeRecipe(base=base, sources=list(sources), groups={"default": group},
                                        seed=cfg.merge.seed, dtype=cfg.merge.dtype,
                                        compute_dtype=cfg.merge.compute_dtype,
                                        tokenizer_source=cfg.models.tokenizer_source).to_dict()))
    return out


class Search:
    """One driver session over a run directory (a new run, or the continuation of one)."""

    def __init__(self, cfg: SearchConfig, run: RunFiles, *, progress: bool = True) -> None:
        from evomerge.sources import load_model_set
        from search_spaces import get_space

        self.cfg = cfg
        self.run = run
        self.show_progress = progress
        m = cfg.models
        self.model_set = load_model_set(m.base, m.sources, tokenizer_source=m.tokenizer_source, revision=m.revision,
                                        allow_pickle=m.allow_pickle)
        self.space = get_space(cfg, self.model_set)
        self.budget_evals = cfg.budget.evaluations
        # the optimizer is created with the budget the run started with, so a replay after
        # `evomerge resume --budget N` builds the very same optimizer
        self.optimizer_budget = cfg.budget.evaluations
        with contextlib.suppress(EvomergeError):
            from evomerge.identity import read_identity

            stored = read_identity(run.path)
            if stored is not None and "optimizer_budget" in stored:
                self.optimizer_budget = stored["optimizer_budget"]
        self.stop_signal: int | None = None
        self.queue: collections.deque[Job] = collections.deque()  # candidates to evaluate first
        self._batch_queue: collections.deque[Job] = collections.deque()  # references / heldout jobs
        self._batch_results: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.waiters: dict[str, list[Job]] = {}  # evaluation key -> duplicates waiting for its result
        self.cache: dict[str, dict[str, Any]] = {}  # evaluation key -> ok record
        self.records_by_id: dict[str, dict[str, Any]] = {}
        self.heldout: dict[str, dict[str, float]] = {}
        self.since_checkpoint = 0
        self.busy_s = 0.0  # actor time inside merge + evaluation, this session
        self._report_thread: threading.Thread | None = None
        self.pool: ActorPool | None = None
        self.book: SearchBook | None = None
        self.archive: Any = None

    # -- setup ----------------------------------------------------------------------
    def _key(self, recipe: dict[str, Any]) -> str:
        from evaluators import evaluation_key
        from evomerge.merge.recipe import MergeRecipe

        return evaluation_key(MergeRecipe.from_dict(recipe), self.cfg)

    def _start(self) -> list[dict[str, Any]]:
        from evomerge.archive import ParetoArchive
        from search_spaces import make_optimizer

        records = self.run.records()
        counters = self.run.counters()
        self.elapsed_before = float(counters.get("elapsed_s", 0.0))
        n_actors, use_gpu = plan_actors(self.cfg)
        faults = json.loads(os.environ[FAULTS_ENV]) if os.environ.get(FAULTS_ENV) else None
        self.pool = ActorPool(self.cfg, n_actors, use_gpu, faults=faults)
        # the optimizer's num_workers is fixed by the first session, so a replay is exact
        # even if the resumed session has another number of actors
        self.num_workers = int(counters.get("num_workers") or self._logged_num_workers(records)
                               or self.cfg.optimizer.popsize or n_actors)
        self.directions = self._directions()
        objectives = [(o.name, self.directions[o.name]) for o in self.cfg.objectives]
        optimizer = make_optimizer(self.cfg, self.space.parametrization(), budget=self.optimizer_budget,
                                   num_workers=self.num_workers)
        self.book = SearchBook(optimizer, self.space, objectives)
        self.book.replay(records)
        if self.book.diverged:
            log.warning("replay: %d logged asks differed from this optimizer's; the log was followed",
                        self.book.diverged)
        self.archive = ParetoArchive(self.directions)
        for rec in records:
            if rec.get("kind") == "evaluation":
                self.records_by_id[rec["id"]] = rec
                if rec.get("status") == "ok":
                    self.archive.add(rec["id"], rec["scores"])
                    if rec.get("key"):
                        self.cache.setdefault(rec["key"], rec)
            elif rec.get("kind") == "heldout" and rec.get("status", "ok") == "ok":
                self.heldout[rec["id"]] = rec["scores"]
        # asked before the crash's last tell but never finished: evaluate them again, first
        for asked in sorted(self.book.pending.values(), key=lambda a: a.index):
            self.queue.append(self._job_for(asked))
        if records:
            log.info("resuming %s: %d evaluations logged (%d failed), %d to evaluate again, front %d",
                     self.run.path, self.book.n_told, self.book.n_failed, len(self.queue), len(self.archive))
        return records

    @staticmethod
    def _logged_num_workers(records: list[dict[str, Any]]) -> int | None:
        for rec in records:
            if rec.get("kind") == "evaluation" and rec.get("num_workers"):
                return int(rec["num_workers"])
        return None

    def _directions(self) -> dict[str, str]:
        """Directions come from the evaluators (they know their metrics): ask the first actor up."""
        import ray

        assert self.pool is not None
        self.pool.wait_ready()
        i = self.pool.free()[0]
        return ray.get(self.pool.actors[i].directions.remote())

    def _job_for(self, asked: Asked) -> Job:
        return Job("evaluation", asked.id, asked.recipe, asked=asked, key=self._key(asked.recipe))

    # -- budget ---------------------------------------------------------------------
    def elapsed(self) -> float:
        return self.elapsed_before + (time.monotonic() - self.t0)

    def _outstanding(self) -> int:
        assert self.pool is not None
        n = sum(1 for j in self.pool.jobs() if j.kind == "evaluation") + len(self.queue)
        return n + sum(len(w) for w in self.waiters.values())

    def _can_ask(self) -> bool:
        assert self.book is not None
        if self.stop_signal is not None:
            return False
        if self.budget_evals is not None and self.book.n_told + self._outstanding() >= self.budget_evals:
            return False
        if self.cfg.budget.wall_clock_s is not None and self.elapsed() >= self.cfg.budget.wall_clock_s:
            return False
        return True

    # -- the loop -------------------------------------------------------------------
    def _next_job(self) -> Job | None:
        """The next candidate to dispatch: a re-queued one, or a fresh ask (cache hits are told here)."""
        assert self.book is not None
        while True:
            if self.queue:
                return self.queue.popleft()
            if not self._can_ask():
                return None
            job = self._job_for(self.book.ask())
            hit = self.cache.get(job.key or "")
            if hit is not None:
                self._finish(job, {"scores": hit["scores"], "status": "ok", "error": None,
                                   "timings": {"merge_s": 0.0, "eval_s": 0.0}, "actor": None},
                             cached_from=hit["id"])
                continue
            in_flight = [j for j in (self.pool.jobs() if self.pool else []) + list(self.queue) if j.key == job.key]
            if in_flight:
                self.waiters.setdefault(job.key or "", []).append(job)
                continue
            return job

    def _dispatch(self) -> None:
        assert self.pool is not None
        if self.stop_signal is not None:
            return
        for i in self.pool.free():
            job = self._next_job()
            if job is None:
                return
            self.pool.submit(i, job)

    def _finish(self, job: Job, result: dict[str, Any], cached_from: str | None = None) -> None:
        """Log (first) and tell one finished candidate; update front, cache and waiters."""
        assert self.book is not None and job.asked is not None
        ok = result["status"] == "ok"
        losses = self.book.losses_for(result["scores"], ok)
        now = time.time()
        timings = dict(result.get("timings") or {})
        timings["wall_s"] = round(now - (job.dispatched_at or job.asked_at), 6)
        record = {
            "kind": "evaluation", "id": job.id, "index": job.asked.index, "asked": self.book.n_asked,
            "recipe": job.recipe, "value": job.asked.value, "key": job.key,
            "scores": result["scores"] if ok else {}, "losses": losses, "status": result["status"],
            "error": result.get("error"), "timings": timings, "actor": result.get("actor"),
            "attempts": job.attempts + (0 if cached_from else 1), "cached_from": cached_from,
            "num_workers": self.num_workers, "asked_at": job.asked_at, "finished_at": now,
        }
        self.run.append_evaluation(record)
        self.book.tell(job.asked.index, losses, ok)
        self.records_by_id[job.id] = record
        self.since_checkpoint += 1
        if ok:
            self.archive.add(job.id, record["scores"])
            if job.key:
                self.cache.setdefault(job.key, record)
        else:
            log.warning("candidate %s failed: %s", job.id, record["error"])
        if not cached_from:
            self.busy_s += float(timings.get("merge_s", 0.0)) + float(timings.get("eval_s", 0.0))
        for waiter in self.waiters.pop(job.key or "", []):
            if ok:
                self._finish(waiter, result, cached_from=job.id)
            else:
                self.queue.append(waiter)  # failures are not cached: evaluate the duplicate itself

    def _handle(self, ev: Event) -> None:
        job = ev.job
        if ev.result is None:  # actor died under it
            job.attempts += 1
            if job.attempts < MAX_ATTEMPTS:
                (self.queue if job.kind == "evaluation" else self._batch_queue).appendleft(job)
                return
            ev.result = _failed_result(job, ev.actor, f"actor died {job.attempts} times while evaluating it "
                                                      f"(last: {ev.error})")
        if job.kind == "evaluation":
            self._finish(job, ev.result)
        else:
            self._batch_results[(job.kind, job.id, job.split)] = ev.result

    def _search_loop(self, progress: Any) -> None:
        assert self.pool is not None
        while self.stop_signal is None:
            self._dispatch()
            if not self.pool.busy():
                if self.pool.alive() == 0:
                    self.checkpoint("interrupted")
                    raise EvomergeError(f"every evaluation actor died; last error: {self.pool.last_error}; "
                                        f"resume with `evomerge resume {self.run.path}`")
                if not self.queue and not self._can_ask():
                    break  # budget spent; otherwise actors are restarting: keep polling
            for ev in self.pool.poll(TICK_S):
                self._handle(ev)
            self._dispatch()  # free actors get work before the bookkeeping below
            if self.since_checkpoint >= self.cfg.output.checkpoint_every:
                self.checkpoint()
            self._show(progress, "search")

    def _run_batch(self, jobs: list[Job], progress: Any, phase: str) -> dict[tuple[str, str, str], dict[str, Any]]:
        """Run non-search jobs (references, heldout) over the pool; results by (kind, id, split)."""
        assert self.pool is not None
        self._batch_results = {}
        self._batch_queue.extend(jobs)
        while self.stop_signal is None and (self._batch_queue or self.pool.busy()):
            for i in self.pool.free():
                if not self._batch_queue:
                    break
                self.pool.submit(i, self._batch_queue.popleft())
            if not self.pool.busy() and self.pool.alive() == 0:
                raise EvomergeError(f"every evaluation actor died; last error: {self.pool.last_error}")
            for ev in self.pool.poll(TICK_S):
                self._handle(ev)
            self._show(progress, phase)
        self._batch_queue.clear()
        return self._batch_results

    # -- references and heldout -----------------------------------------------------
    def _references(self, records: list[dict[str, Any]], progress: Any) -> None:
        done = {r["label"] for r in records if r.get("kind") == "reference"}
        todo = [(label, recipe) for label, recipe in reference_recipes(
            self.cfg, [s.ref for s in self.model_set.sources],
            self.model_set.base.ref if self.model_set.base is not None else None) if label not in done]
        if not todo:
            return
        splits = ["selection"] + (["heldout"] if self.cfg.evaluation.rescore_heldout else [])
        jobs = [Job("reference", f"ref:{label}", recipe, split=s, label=label) for label, recipe in todo for s in splits]
        results = self._run_batch(jobs, progress, "references")
        for label, recipe in todo:
            sel = results.get(("reference", f"ref:{label}", "selection"))
            if sel is None:  # interrupted
                continue
            held = results.get(("reference", f"ref:{label}", "heldout"))
            rec = {"kind": "reference", "label": label, "recipe": recipe,
                   "scores": sel["scores"] if sel["status"] == "ok" else {},
                   "heldout": held["scores"] if held and held["status"] == "ok" else None,
                   "heldout_items": held.get("items") if held and held["status"] == "ok" else None,
                   "status": sel["status"], "error": sel.get("error") or (held or {}).get("error"),
                   "timings": sel.get("timings"), "finished_at": time.time()}
            self.run.append_evaluation(rec)
            log.info("reference %s: %s%s", label, rec["scores"] or rec["error"],
                     f" (heldout {rec['heldout']})" if rec["heldout"] else "")

    def rescore_heldout(self, progress: Any, ids: list[str] | None = None) -> dict[str, dict[str, float]]:
        """Score front members (default: those not scored yet) on the heldout split; log and save them."""
        ids = [i for i in (ids if ids is not None else self.archive.front()) if i not in self.heldout]
        jobs = [Job("heldout", i, self.records_by_id[i]["recipe"], split="heldout") for i in ids]
        if not jobs:
            return {}
        results = self._run_batch(jobs, progress, "heldout")
        out = {}
        for i in ids:
            res = results.get(("heldout", i, "heldout"))
            if res is None:
                continue
            rec = {"kind": "heldout", "id": i, "scores": res["scores"], "status": res["status"],
                   "error": res.get("error"), "finished_at": time.time()}
            if res.get("items"):
                rec["items"] = res["items"]  # per-item values: paired intervals between models
            self.run.append_evaluation(rec)
            if res["status"] == "ok":
                self.heldout[i] = res["scores"]
                out[i] = res["scores"]
            else:
                log.warning("heldout scoring of %s failed: %s", i, res.get("error"))
        self.write_front()
        return out

    # -- checkpoint -----------------------------------------------------------------
    def write_front(self) -> None:
        """front.json and front/<id>/ (recipe, scores, weights if asked) for the current members."""
        members = self.archive.front()
        recs = [self.records_by_id[m] for m in members]
        recs += [{"kind": "heldout", "id": m, "scores": self.heldout[m]} for m in members if m in self.heldout]
        self.run.write_front(self.archive, recs, evaluations=self.book.n_told if self.book else 0)
        if self.cfg.output.save_front_weights:
            for eid in members:
                out = self.run.weights_dir(eid)
                if not (out / "config.json").is_file():
                    self._save_weights(eid, self.records_by_id[eid]["recipe"], out)

    def _save_weights(self, eid: str, recipe: dict[str, Any], out: Path) -> None:
        from evomerge.merge.materialise import merge_to_folder
        from evomerge.merge.recipe import MergeRecipe

        try:
            merge_to_folder(MergeRecipe.from_dict(recipe), out, allow_pickle=self.cfg.models.allow_pickle,
                            revision=self.cfg.models.revision)
        except Exception as err:  # noqa: BLE001 - a failed export must not stop the search
            log.warning("could not save weights of front member %s: %s", eid, err)

    def checkpoint(self, status: str = "running") -> None:
        assert self.book is not None
        t0 = time.perf_counter()
        pending = sorted({j.id: j for j in list(self.queue) + (self.pool.jobs() if self.pool else [])
                          + [w for ws in self.waiters.values() for w in ws] if j.kind == "evaluation"}.values(),
                         key=lambda j: j.id)
        counters = {"status": status, "evaluations": self.book.n_told, "failed": self.book.n_failed,
                    "asked": self.book.n_asked, "num_workers": self.num_workers, "elapsed_s": self.elapsed(),
                    "front": self.archive.front(), "updated_at": time.time(),
                    "pending": [{"id": j.id, "index": j.asked.index if j.asked else None, "recipe": j.recipe}
                                for j in pending], **self.run.log_mark()}
        try:
            from search_spaces.optimizers import optimizer_to_bytes

            self.run.save_state(optimizer_to_bytes(self.book.optimizer), counters)
        except Exception as err:  # noqa: BLE001 - the dump is a convenience; the log is the truth
            log.warning("could not save the optimizer state (%s); resume replays the log anyway", err)
        self.write_front()
        self._draw_report(wait=status != "running")
        self.since_checkpoint = 0
        log.info("checkpoint: %d evaluations (%d failed), front %d, %.2fs", self.book.n_told, self.book.n_failed,
                 len(self.archive), time.perf_counter() - t0)

    def _draw_report(self, wait: bool) -> None:
        """Redraw report.png from the files on disk, in a background thread during the search.

        Drawing takes ~1 s of CPU; done inline it would leave an actor idle at every
        checkpoint. The report reads only the run dir (append-only log, atomic files), so
        it is safe next to the running search; a draw still running is not queued again.
        """
        def draw() -> None:
            try:
                from evomerge.report import draw_report

                draw_report(self.run.path)
            except Exception as err:  # noqa: BLE001 - a plot must never stop a search
                log.warning("could not draw report.png: %s", err)

        previous = self._report_thread
        if previous is not None and previous.is_alive():
            if not wait:
                return
            previous.join()
        if wait:
            draw()
        else:
            self._report_thread = threading.Thread(target=draw, name="evomerge-report", daemon=True)
            self._report_thread.start()

    # -- display ---------------------------------------------------------------------
    def _show(self, progress: Any, phase: str) -> None:
        if progress is None or self.book is None:
            return
        best = {}
        if len(self.archive):
            for o in self.cfg.objectives:
                bid = self.archive.best(o.name)
                best[o.name] = (self.archive.scores(bid)[o.name], bid)
        progress.update(done=self.book.n_told, failed=self.book.n_failed, in_flight=len(self.pool.jobs()),
                        front=len(self.archive), elapsed_s=self.elapsed(), best=best, phase=phase)

    # -- signals --------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stop_signal is not None:
            raise KeyboardInterrupt
        self.stop_signal = signum
        log.warning("received %s: checkpointing and stopping (again to abort at once)", signal.Signals(signum).name)

    # -- main -----------------------------------------------------------------------
    def execute(self) -> int:
        from evomerge.progress import SearchProgress

        self.t0 = time.monotonic()
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for s in old:
                signal.signal(s, self._on_signal)
        except ValueError:  # not the main thread (tests, Ray Job wrappers): no handlers
            old = {}
        try:
            records = self._start()
            logged = {r["id"] for r in records if r.get("kind") == "evaluation" and "id" in r}
            with SearchProgress(self.show_progress, title=f"evomerge search: {self.cfg.name}",
                                budget=self.budget_evals, wall_clock_s=self.cfg.budget.wall_clock_s) as progress:
                self._references(records, progress)
                self._search_loop(progress)
                if self.stop_signal is not None:
                    self.checkpoint("interrupted")
                    log.warning("search stopped after %d evaluations; continue with `evomerge resume %s`",
                                self.book.n_told, self.run.path)
                    return 128 + int(self.stop_signal)
                self.checkpoint("searched")
                if self.cfg.evaluation.rescore_heldout:
                    self.rescore_heldout(progress)
                failure = self._failure(logged)
                # "failed", not "done": run_is_complete must not report a run that found nothing as complete
                self.checkpoint("interrupted" if self.stop_signal is not None else "failed" if failure else "done")
                self._show(progress, "done")
            self._summary()
            if self.stop_signal is not None:
                return 128 + int(self.stop_signal)
            if failure:
                log.error("%s", failure)
                return 1
            return 0
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _failure(self, logged_before: set[str]) -> str | None:
        """The one-line verdict of a session whose candidates all failed, else None.

        Judged on this session's evaluations; a session that evaluated nothing (a resume
        with the budget already spent) is judged on the whole log, so resuming a run that
        never produced a score does not turn it into a success.
        """
        session = [r for i, r in self.records_by_id.items() if i not in logged_before]
        return all_failed_line(session or list(self.records_by_id.values()))

    def _summary(self) -> None:
        wall = time.monotonic() - self.t0
        n_actors = max(1, len(self.pool.actors)) if self.pool else 1
        share = self.busy_s / (wall * n_actors) if wall > 0 else 0.0
        log.info("finished: %d evaluations (%d failed), front %d (%s); actors busy %.0f%% of %.0fs",
                 self.book.n_told, self.book.n_failed, len(self.archive), ", ".join(self.archive.front()),
                 100 * share, wall)


# =====================================================================================
# Commands
# =====================================================================================
def _attach_log(run: RunFiles) -> logging.Handler:
    handler = run.log_handler()
    logger = logging.getLogger("evomerge")
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    return handler


def all_failed_line(records: list[dict[str, Any]]) -> str | None:
    """``every candidate failed (N of N); first error: ...`` when no evaluation succeeded, else None.

    A search whose every candidate failed (a broken evaluator, an out-of-memory merge,
    a missing task) has an empty front and nothing to export: it must not exit 0 as if
    it had searched. ``records``: evaluation records in log order; other kinds are
    ignored, and no evaluation at all is not a failure (nothing was asked).
    """
    evals = [r for r in records if r.get("kind", "evaluation") == "evaluation"]
    if not evals or any(r.get("status") == "ok" for r in evals):
        return None
    first = next((str(r["error"]) for r in evals if r.get("error")), "no error was recorded")
    return f"every candidate failed ({len(evals)} of {len(evals)}); first error: {first}"


def run_is_complete(cfg: SearchConfig, run: RunFiles) -> bool:
    """True when a previous session finished this run (budget spent, front re-scored): no Ray needed."""
    counters = run.counters()
    if counters.get("status") != "done" or cfg.budget.evaluations is None:
        return False
    recs = run.records()
    n = sum(1 for r in recs if r.get("kind") == "evaluation")
    return n >= cfg.budget.evaluations and n == counters.get("evaluations")


def run_search(cfg: SearchConfig, run_dir: Path, *, address: str | None, progress: bool,
               checked: bool = False) -> int:
    """Start Ray (unless already up), run a search session on ``run_dir``, stop Ray.

    Holds the run dir's lock throughout (already held when called from the commands);
    returns 0, 1 when every candidate of the session failed, or 128+signal when stopped.
    """
    import ray

    run = RunFiles(run_dir)
    with hold_run_lock(run_dir, "evomerge search"):
        if not checked:  # the commands ran it already, before their own writes
            run.preflight()  # before anything is written or Ray starts
        if run_is_complete(cfg, run):
            print(f"{run_dir}: this search is complete ({cfg.budget.evaluations} evaluations); "
                  f"see `evomerge status {run_dir}`")
            return 0
        handler = _attach_log(run)
        started = False
        try:
            started = init_ray(cfg, address)
            return Search(cfg, run, progress=progress).execute()
        finally:
            if started and ray.is_initialized():
                ray.shutdown()
            logging.getLogger("evomerge").removeHandler(handler)
            handler.close()


def search_command(args: argparse.Namespace) -> int:
    """``evomerge search CONFIG``: validate everything, then search (or continue the same search).

    The run dir's lock is taken after the config checks (they touch only the config and
    the models) and before the run dir is created, compared or cleared by --overwrite,
    so a second writer fails before it changes anything or starts Ray.
    """
    cfg = load_config(args.config, getattr(args, "overrides", None) or [])
    check_optimizer(cfg)
    run_dir = Path(getattr(args, "run_dir", None) or cfg.resolved_run_dir())
    cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"run_dir": str(run_dir)})})
    with hold_run_lock(run_dir, "evomerge search"):
        from evomerge.identity import identity_record, write_identity

        overwrite = bool(getattr(args, "overwrite", False))
        run = RunFiles(run_dir)
        if run.exists() and not overwrite:
            run.create(cfg)  # the same search, or a one-line refusal; writes nothing either way
            run.preflight()
            check_or_record_identity(run, cfg)
            log.info("%s holds this search already: continuing it", run_dir)
        else:
            record = identity_record(cfg)  # computed first: a failure leaves no half-made run dir
            run.create(cfg, overwrite=overwrite)
            write_identity(run_dir, record)
        return run_search(cfg, run_dir, address=getattr(args, "address", None),
                          progress=not getattr(args, "no_progress", False), checked=True)


def load_run_config(run_dir: Path) -> SearchConfig:
    """The frozen config of a run dir, validated and checked (one-line errors)."""
    cfg = RunDir(run_dir).load_config()
    check_config(cfg)
    check_optimizer(cfg)
    return cfg


def _require_run_dir(run_dir: Path) -> None:
    """One line when ``run_dir`` is not a run directory, checked *before* locking it.

    Taking the lock creates ``.lock``; a mistyped path must not get a folder and a lock
    file made for it.
    """
    if not RunDir(run_dir).exists():
        what = "does not exist" if not run_dir.exists() else "is not a run directory (no config.yaml)"
        raise RunDirError(f"{run_dir} {what}; pass the run dir of an `evomerge search`")


def check_or_record_identity(run: RunFiles, cfg: SearchConfig) -> None:
    """Refuse a run whose models, tasks or settings changed since it started (``evomerge.identity``).

    A run dir from before identity.json existed gets one now, with a warning: its
    identity is what the files are today, checked from then on.
    """
    from evomerge.identity import check_identity, identity_record, write_identity

    if check_identity(run.path, cfg) is None:
        log.warning("%s has no %s (written by an older evomerge): recording the models, tasks and settings "
                    "as they are now; later sessions are checked against them", run.path, run.identity_path.name)
        record = identity_record(cfg)
        record["optimizer_budget"] = cfg.budget.evaluations  # the budget it ran under so far
        record["recorded_late"] = True
        write_identity(run.path, record)


def check_budget(cfg: SearchConfig, evaluations: int) -> None:
    """One line when ``--budget`` is not a raise of the run's evaluation budget."""
    current = cfg.budget.evaluations
    if evaluations <= 0:
        raise ConfigError(f"--budget {evaluations}: give a number of evaluations > 0")
    if current is not None and evaluations < current:
        raise ConfigError(f"--budget {evaluations} is below the run's budget of {current} evaluations; "
                          f"--budget only raises it")


def raise_budget(run: RunFiles, cfg: SearchConfig, evaluations: int) -> SearchConfig:
    """Set the frozen config's ``budget.evaluations`` to ``evaluations`` (only ever up); the new config."""
    from evomerge.config import parse_config

    check_budget(cfg, evaluations)
    current = cfg.budget.evaluations
    if evaluations == current:
        return cfg
    data = run.read_config_dict()
    data.setdefault("budget", {})["evaluations"] = evaluations
    new = parse_config(data)
    run.atomic_write(run.config_path, yaml.safe_dump(data, sort_keys=False))
    log.info("%s: budget raised from %s to %d evaluations", run.path, current, evaluations)
    return new


def resume_command(args: argparse.Namespace) -> int:
    """``evomerge resume RUN_DIR [--budget N]``: continue to the budget, losing and repeating nothing.

    Every check (config, records, the log against the last checkpoint, the run's
    identity) runs before anything is written or Ray starts; ``--budget`` then raises the
    frozen config's evaluation budget.
    """
    run_dir = Path(args.run_dir)
    _require_run_dir(run_dir)
    with hold_run_lock(run_dir, "evomerge resume"):
        cfg = load_run_config(run_dir)
        run = RunFiles(run_dir)
        run.preflight()
        budget = getattr(args, "budget", None)
        if budget is not None:
            check_budget(cfg, budget)
        check_or_record_identity(run, cfg)
        if budget is not None:
            cfg = raise_budget(run, cfg, budget)
        return run_search(cfg, run_dir, address=getattr(args, "address", None),
                          progress=not getattr(args, "no_progress", False), checked=True)


def rescore_front(run_dir: str | Path, address: str | None = None) -> dict[str, dict[str, float]]:
    """Score the run's current front on the heldout split now (members not scored yet).

    A writer like a search (it appends heldout records and rewrites the front), so it
    holds the run dir's lock; ``evomerge status`` without --rescore only reads.
    """
    run_dir = Path(run_dir)
    _require_run_dir(run_dir)
    with hold_run_lock(run_dir, "evomerge status --rescore"):
        return _rescore_front_locked(run_dir, address)


def _rescore_front_locked(run_dir: Path, address: str | None) -> dict[str, dict[str, float]]:
    import ray

    cfg = load_run_config(run_dir)
    run = RunFiles(run_dir)
    run.preflight()
    handler = _attach_log(run)
    started = False
    try:
        started = init_ray(cfg, address)
        search = Search(cfg, run, progress=False)
        search.t0 = time.monotonic()
        search._start()
        from evomerge.progress import SearchProgress

        with SearchProgress(False, title="", budget=None, wall_clock_s=None) as progress:
            return search.rescore_heldout(progress)
    finally:
        if started and ray.is_initialized():
            ray.shutdown()
        logging.getLogger("evomerge").removeHandler(handler)
        handler.close()
