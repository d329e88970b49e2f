"""The steady-state search over a run directory: ask, dispatch, log, tell, checkpoint.

Shape of a session (``Search.execute``), after ``session.run_search`` has started Ray:

1. Resume state is rebuilt from ``evaluations.jsonl`` alone (``SearchBook.replay``): a
   fresh optimizer seeded as at the start is fed the logged asks and tells in the logged
   order, so nothing finished is lost or evaluated twice, and candidates in flight at a
   crash are evaluated again.
2. References (uniform merge, each source alone, the base) are scored once per run.
3. Steady state: the moment an actor is free it gets the next candidate (no generation
   barrier). Each finished candidate is appended to the log *first*, then told. Failed
   candidates are told a penalty worse than anything seen. A recipe already evaluated is
   not evaluated again (its scores are reused and logged as ``cached_from``); cache hits
   count toward the budget, so a converged optimizer cannot loop forever.
4. Checkpoints every ``output.checkpoint_every`` evaluations and on SIGINT/SIGTERM; at the
   end the front is re-scored on the held-out split (``heldout.score_heldout``).

The loop knows nothing of reports: a caller that wants one drawn at each checkpoint
passes ``on_checkpoint``.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

from evomerge.errors import ClusterError, EvomergeError
from evomerge.pareto import ParetoArchive
from evomerge.records import (EvaluationRecord, Fidelity, HeldoutRecord, Kind, Record, ReferenceRecord, ScreenRecord,
                              Status)
from evomerge.rundir import RunDir
from evomerge.search.heldout import score_heldout
from evomerge.search.memory import plan_for_pool
from evomerge.search.plan import SearchPlan
from evomerge.search.fidelity import screen_summary
from evomerge.search.references import score_references
from evomerge.search.screening import Screener
from evomerge.search.pool import MAX_ATTEMPTS, TICK_S, EvaluatorPool, Event, Job, failed_result
from evomerge.search.ray_cluster import plan_actors
from evomerge.search.searchbook import Asked, SearchBook

log = logging.getLogger("evomerge.search")

#: test hook: JSON of faults the actors inject (``actor._inject_fault``); never set outside tests
FAULTS_ENV = "EVOMERGE_TEST_FAULTS"


def all_failed_line(records: list[Record]) -> str | None:
    """``every candidate failed (N of N); first error: ...`` when no evaluation succeeded, else None.

    A search whose every candidate failed (a broken evaluator, an out-of-memory merge,
    a missing task) has an empty front and nothing to export: it must not exit 0 as if
    it had searched. Other record kinds are ignored; no evaluation at all is not a failure.
    """
    evals = [r for r in records if isinstance(r, EvaluationRecord)]
    if not evals or any(r.ok for r in evals):
        return None
    first = next((str(r.error) for r in evals if r.error), "no error was recorded")
    return f"every candidate failed ({len(evals)} of {len(evals)}); first error: {first}"


class Search:
    """One driver session over a run directory (a new run, or the continuation of one)."""

    def __init__(self, plan: SearchPlan, run: RunDir, *, progress: bool = True, optimizer_budget: int | None = None,
                 on_checkpoint: Callable[[RunDir, bool], None] | None = None) -> None:
        self.plan = plan
        self.cfg = plan.cfg
        self.run = run
        self.show_progress = progress
        self.on_checkpoint = on_checkpoint
        self.budget_evals = self.cfg.budget.evaluations
        # the optimizer is created with the budget the run started with, so a replay after
        # `evomerge resume --budget N` builds the very same optimizer
        self.optimizer_budget = optimizer_budget if optimizer_budget is not None else self.cfg.budget.evaluations
        self.directions = dict(plan.directions)
        self.stop_signal: int | None = None
        self.queue: collections.deque[Job] = collections.deque()  # candidates to evaluate first
        self.waiters: dict[str, list[Job]] = {}  # evaluation key -> duplicates waiting for its result
        self.cache: dict[str, EvaluationRecord] = {}  # evaluation key -> ok record
        self.records_by_id: dict[str, EvaluationRecord] = {}
        self.heldout: dict[str, dict[str, float]] = {}
        self.since_checkpoint = 0
        self.busy_s = 0.0  # actor time inside merge + evaluation, this session
        self.pool: EvaluatorPool | None = None
        self.book: SearchBook | None = None
        self.archive = ParetoArchive(self.directions)
        #: evaluation.fidelity: what a candidate is screened on; None when every candidate is measured in full
        self.screener: Screener | None = None
        self.screens: dict[str, dict[str, Any]] = {}  # id -> the screen that promoted it (ScreenRecord)
        self.t0 = time.monotonic()
        self.elapsed_before = 0.0

    # -- setup ----------------------------------------------------------------------
    def _key(self, recipe: dict[str, Any]) -> str:
        from evaluators import evaluation_key
        from evomerge.merge.recipes import recipe_from_dict

        return evaluation_key(recipe_from_dict(recipe), self.cfg)

    def _start(self) -> list[Record]:
        from search_spaces.optimizers import make_optimizer

        self.run.truncate_torn_tail()  # the commands' pre-flight validated the log; cut only a torn tail
        records = self.run.records()
        counters = self.run.load_counters()
        self.elapsed_before = float(counters.get("elapsed_s", 0.0))
        n_actors, use_gpu = plan_actors(self.cfg)
        memory = plan_for_pool(self.cfg, self.plan.model_set, n_actors, use_gpu)  # before any actor starts
        if memory is not None:
            log.info("memory plan per actor: %s", memory["chosen"]["describe"])
        faults = json.loads(os.environ[FAULTS_ENV]) if os.environ.get(FAULTS_ENV) else None
        self.pool = EvaluatorPool(self.cfg, n_actors, use_gpu, self.directions, faults=faults,
                                  memory_bytes=memory["ray_memory_bytes"] if memory else None)
        self.pool.wait_ready()
        record = memory or {"device": "cuda" if use_gpu else "cpu", "actors": n_actors, "chosen": None}
        self.memory_record = record
        self._save_actor_nodes()
        # the optimizer's num_workers is fixed by the first session, so a replay is exact
        # even if the resumed session has another number of actors
        logged = next((r.num_workers for r in records if isinstance(r, EvaluationRecord) and r.num_workers), None)
        self.num_workers = int(counters.get("num_workers") or logged or self.cfg.optimizer.popsize or n_actors)
        optimizer = make_optimizer(self.cfg, self.plan.space.parametrization(), budget=self.optimizer_budget,
                                   num_workers=self.num_workers)
        self.book = SearchBook(optimizer, self.plan.space, self.plan.objectives)
        self.book.replay(records)
        if self.cfg.evaluation.fidelity is not None:
            self.screener = Screener(self.cfg, self.run)
            self.screener.calibrate(records)  # an IRT run that reached its calibration before a crash
            self.screens = {r.id: r.screen for r in records if isinstance(r, ScreenRecord)}
        if self.book.diverged:
            log.warning("replay: %d logged asks differed from this optimizer's; the log was followed",
                        self.book.diverged)
        for rec in records:
            if isinstance(rec, EvaluationRecord):
                self.records_by_id[rec.id] = rec
                if rec.ok and rec.measured:  # a screen's estimate is told, never put on the front
                    self.archive.add(rec.id, rec.scores)
                    if rec.key:
                        self.cache.setdefault(rec.key, rec)
            elif isinstance(rec, HeldoutRecord) and rec.ok:
                self.heldout[rec.id] = rec.scores
        self.write_front()  # front.json names the objectives and directions from the first moment on
        # asked before the crash's last tell but never finished: evaluate them again, first
        for asked in sorted(self.book.pending.values(), key=lambda a: a.index):
            self.queue.append(self._job_for(asked))
        if records:
            log.info("resuming %s: %d evaluations logged (%d failed), %d to evaluate again, front %d",
                     self.run.path, self.book.n_told, self.book.n_failed, len(self.queue), len(self.archive))
        return records

    def _save_actor_nodes(self) -> None:
        """memory_plan.json's ``per_actor`` as the actors are now: kept current when an actor
        restarts on another node, so ``evomerge status`` shows where each one runs."""
        assert self.pool is not None
        self.memory_record["per_actor"] = {
            str(i): {k: info.get(k) for k in ("node", "node_id", "pid", "device", "residency", "memory")}
            for i, info in sorted(self.pool.info.items())}
        self.run.save_memory_plan(self.memory_record)
        self._actor_nodes_version = self.pool.info_version

    def _job_for(self, asked: Asked) -> Job:
        """A candidate's job: a screen when the run screens (and this candidate was not promoted before a
        crash: it is then measured at once), else a full evaluation."""
        job = Job(Kind.EVALUATION, asked.id, asked.recipe, asked=asked, key=self._key(asked.recipe))
        if self.screener is not None and asked.id in self.screens:
            self._measure_rest(job, self.screens[asked.id])
        elif self.screener is not None and self.screener.ready:
            job.stage, job.items = "screen", self.screener.items()
        return job

    def _measure_rest(self, job: Job, screen: dict[str, Any]) -> None:
        """Make ``job`` a promoted candidate's full evaluation: only the items its screen did not score,
        when the screen may be reused (``Screener.reusable``); every item otherwise (and for screens
        logged before reuse existed, which carry no ``reuse`` flag)."""
        assert self.screener is not None
        if screen.get("reuse"):
            job.stage, job.items = "rest", self.screener.rest_items(screen["positions"])

    # -- budget ---------------------------------------------------------------------
    def elapsed(self) -> float:
        return self.elapsed_before + (time.monotonic() - self.t0)

    def _outstanding(self) -> int:
        assert self.pool is not None
        n = sum(1 for j in self.pool.jobs() if j.kind is Kind.EVALUATION) + len(self.queue)
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
                self._finish(job, {"scores": hit.scores, "status": Status.OK.value, "error": None,
                                   "timings": {"merge_s": 0.0, "eval_s": 0.0}, "actor": None},
                             cached_from=hit.id)
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

    def _screened(self, job: Job, result: dict[str, Any]) -> None:
        """A screen came back: promote the candidate to a full evaluation, or tell its estimate."""
        assert self.screener is not None and job.asked is not None
        values = result.get("items") or {}
        missing = [k for k in self.screener.objectives if len(values.get(k) or []) != len(job.items.get(k) or [])]
        if missing:
            self._finish(job, failed_result(job, result.get("actor"), f"screen: no per-item values for "
                                            f"{', '.join(missing)}; the evaluator must report per-item results"))
            return
        timings = dict(result.get("timings") or {})
        estimates = self.screener.estimate(values, seed=job.asked.index)
        front = {i: self.records_by_id[i].scores for i in self.archive.front()}
        probability = self.screener.entry_probability(estimates, front, self.directions)
        promoted = self.screener.promote(probability)
        summary = screen_summary(self.screener.estimator, estimates, values, promoted, self.screener.confidence,
                                 probability, positions=job.items)
        summary["timings"] = timings
        summary["doc_ids"] = result.get("doc_ids") or {}  # lm-eval's ids: `lm_eval --samples` reproduces the screen
        summary["reuse"] = self.screener.reusable(result.get("scores") or {}, values)
        if promoted:  # logged before the full job goes out: a crash now resumes with the full evaluation
            # the screen's actor time (an estimate's is counted by _finish, with its record)
            self.busy_s += float(timings.get("merge_s", 0.0)) + float(timings.get("eval_s", 0.0))
            self.run.append(ScreenRecord(id=job.id, index=job.asked.index, screen=summary, finished_at=time.time()))
            self.screens[job.id] = summary
            full = Job(Kind.EVALUATION, job.id, job.recipe, asked=job.asked, key=job.key, asked_at=job.asked_at)
            self._measure_rest(full, summary)
            self.queue.appendleft(full)
            return
        self._finish(job, {**result, "scores": summary["scores"], "items": None}, fidelity=Fidelity.SCREEN,
                     screen=summary)

    def _finish(self, job: Job, result: dict[str, Any], cached_from: str | None = None,
                fidelity: Fidelity | None = None, screen: dict[str, Any] | None = None) -> None:
        """Log (first) and tell one finished candidate; update front, cache and waiters."""
        assert self.book is not None and job.asked is not None
        status = Status(result["status"])
        ok = status is Status.OK
        if self.screener is not None:
            fidelity = fidelity or Fidelity.FULL
            screen = screen or self.screens.get(job.id)
        measured = fidelity is not Fidelity.SCREEN
        items = result.get("items") if (ok and measured and not cached_from
                                        and self.cfg.evaluation.wants_items) else None
        losses = self.book.losses_for(result["scores"], ok)
        now = time.time()
        timings = dict(result.get("timings") or {})
        timings["wall_s"] = round(now - (job.dispatched_at or job.asked_at), 6)
        record = EvaluationRecord(
            id=job.id, index=job.asked.index, asked=self.book.n_asked, recipe=job.recipe, value=job.asked.value,
            key=job.key, scores=result["scores"] if ok else {}, losses=losses, status=status,
            error=result.get("error"), timings=timings, actor=result.get("actor"),
            attempts=job.attempts + (0 if cached_from else 1), cached_from=cached_from,
            num_workers=self.num_workers, asked_at=job.asked_at, finished_at=now, fidelity=fidelity, screen=screen,
            items=items or None)
        self.run.append(record)
        self.book.tell(job.asked.index, losses, ok)
        self.records_by_id[job.id] = record
        self.since_checkpoint += 1
        if ok and measured:
            self.archive.add(job.id, record.scores)
            if job.key:
                self.cache.setdefault(job.key, record)
            if self.screener is not None and not self.screener.ready and items:
                self._calibrate_when_due()
        elif not ok:  # (an ok screen estimate is neither on the front nor a failure)
            log.warning("candidate %s failed: %s", job.id, record.error)
        if not cached_from:
            self.busy_s += float(timings.get("merge_s", 0.0)) + float(timings.get("eval_s", 0.0))
        for waiter in self.waiters.pop(job.key or "", []):
            if ok:
                self._finish(waiter, result, cached_from=job.id, fidelity=fidelity,
                             screen=screen if not measured else None)
            else:
                self.queue.append(waiter)  # failures are not cached: evaluate the duplicate itself

    def _calibrate_when_due(self) -> None:
        """Fit the IRT model once ``irt.calibration`` candidates are measured with their items. Counted in
        memory; the log (which also holds the references' items) is read once, when the fit is due."""
        assert self.screener is not None
        measured = sum(1 for r in self.records_by_id.values() if r.ok and r.measured and r.items and not r.cached_from)
        if measured >= self.cfg.evaluation.irt.calibration:
            self.screener.calibrate(self.run.records())

    def _handle(self, ev: Event) -> None:
        job = ev.job
        if ev.result is None:  # actor died under it
            job.attempts += 1
            if job.attempts < MAX_ATTEMPTS:
                self.queue.appendleft(job)
                return
            ev.result = failed_result(job, ev.actor, f"actor died {job.attempts} times while evaluating it "
                                                     f"(last: {ev.error})")
        if job.stage == "screen" and ev.result["status"] == Status.OK.value:
            self._screened(job, ev.result)
            return
        if job.stage == "rest" and ev.result["status"] == Status.OK.value:
            assert self.screener is not None
            ev.result = self.screener.with_screen(ev.result, self.screens[job.id], job.items or {})
        # a screen that failed is logged as one: it never was a full evaluation
        self._finish(job, ev.result, fidelity=Fidelity.SCREEN if job.stage == "screen" else None)

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
            lost = self.pool.capacity_timeout()
            if lost:
                self.checkpoint("interrupted")
                raise ClusterError(f"{lost}; checkpointed: resume with `evomerge resume {self.run.path}`")
            for ev in self.pool.poll(TICK_S):
                self._handle(ev)
            self._dispatch()  # free actors get work before the bookkeeping below
            if self.pool.info_version != self._actor_nodes_version:
                self._save_actor_nodes()
            if self.since_checkpoint >= self.cfg.output.checkpoint_every:
                self.checkpoint()
            self._show(progress, "search")

    # -- references and heldout -----------------------------------------------------
    def _references(self, records: list[Record], progress: Any) -> None:
        assert self.pool is not None
        done = {r.label for r in records if isinstance(r, ReferenceRecord)}
        score_references(self.run, self.pool, self.plan, done, should_stop=lambda: self.stop_signal is not None,
                         on_tick=lambda: self._show(progress, "references"))

    def rescore_heldout(self, progress: Any) -> dict[str, dict[str, float]]:
        """Score front members not scored yet on the held-out split; log them and rewrite the front."""
        assert self.pool is not None
        todo = {i: self.records_by_id[i].recipe or {} for i in self.archive.front() if i not in self.heldout}
        done = score_heldout(self.run, self.pool, todo, should_stop=lambda: self.stop_signal is not None,
                             on_tick=lambda: self._show(progress, "heldout"))
        self.heldout.update({i: rec.scores for i, rec in done.items()})
        if todo:
            self.write_front()
        return {i: rec.scores for i, rec in done.items()}

    # -- checkpoint -----------------------------------------------------------------
    def write_front(self) -> None:
        """front.json and front/<id>/ (recipe, scores, weights if asked) for the current members."""
        members = self.archive.front()
        self.run.write_front(self.archive, {m: self.records_by_id[m].recipe for m in members}, self.heldout,
                             evaluations=self.book.n_told if self.book else 0)
        if self.cfg.output.save_front_weights:
            for eid in members:
                out = self.run.weights_dir(eid)
                if not (out / "config.json").is_file():
                    self._save_weights(eid, self.records_by_id[eid].recipe or {}, out)

    def _save_weights(self, eid: str, recipe: dict[str, Any], out: Path) -> None:
        from evomerge.merge.layer_stack import stack_from_path, write_stack
        from evomerge.merge.materialise import merge_to_folder
        from evomerge.merge.path_recipe import PathRecipe
        from evomerge.merge.recipes import recipe_from_dict

        try:
            parsed = recipe_from_dict(recipe)
            if isinstance(parsed, PathRecipe):
                write_stack(stack_from_path(parsed), out, allow_pickle=self.cfg.models.allow_pickle,
                            revision=self.cfg.models.revision)
            else:
                merge_to_folder(parsed, out, allow_pickle=self.cfg.models.allow_pickle,
                                revision=self.cfg.models.revision)
        except Exception as err:  # noqa: BLE001 - a failed export must not stop the search
            log.warning("could not save weights of front member %s: %s", eid, err)

    def checkpoint(self, status: str = "running") -> None:
        assert self.book is not None
        t0 = time.perf_counter()
        pending = sorted({j.id: j for j in list(self.queue) + (self.pool.jobs() if self.pool else [])
                          + [w for ws in self.waiters.values() for w in ws] if j.kind is Kind.EVALUATION}.values(),
                         key=lambda j: j.id)
        counters = {"status": status, "evaluations": self.book.n_told, "failed": self.book.n_failed,
                    "asked": self.book.n_asked, "num_workers": self.num_workers, "elapsed_s": self.elapsed(),
                    "front": self.archive.front(), "updated_at": time.time(),
                    "pending": [{"id": j.id, "index": j.asked.index if j.asked else None, "recipe": j.recipe}
                                for j in pending], **self.run.log_mark()}
        self.run.save_counters(counters)
        self.write_front()
        if self.on_checkpoint is not None:
            self.on_checkpoint(self.run, status != "running")
        self.since_checkpoint = 0
        log.info("checkpoint: %d evaluations (%d failed), front %d, %.2fs", self.book.n_told, self.book.n_failed,
                 len(self.archive), time.perf_counter() - t0)

    # -- display ---------------------------------------------------------------------
    def _show(self, progress: Any, phase: str) -> None:
        if progress is None or self.book is None:
            return
        best = {}
        if len(self.archive):
            for o in self.cfg.objectives:
                bid = self.archive.best(o.name)
                best[o.name] = (self.archive.scores(bid)[o.name], bid)
        progress.update(done=self.book.n_told, failed=self.book.n_failed,
                        in_flight=len(self.pool.jobs()) if self.pool else 0,
                        front=len(self.archive), elapsed_s=self.elapsed(), best=best, phase=phase,
                        actors=self.pool.where() if self.pool else None)

    # -- signals --------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stop_signal is not None:
            raise KeyboardInterrupt
        self.stop_signal = signum
        log.warning("received %s: checkpointing and stopping (again to abort at once)", signal.Signals(signum).name)

    # -- main -----------------------------------------------------------------------
    def execute(self) -> int:
        """Run the session; 0, 1 when every candidate of the session failed, or 128+signal when stopped."""
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
            logged = {r.id for r in records if isinstance(r, EvaluationRecord)}
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
                session = [r for i, r in self.records_by_id.items() if i not in logged]
                # judged on this session; a session that evaluated nothing is judged on the whole log
                failure = all_failed_line(session or list(self.records_by_id.values()))
                # "failed", not "done": a run that found nothing must not read as complete
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

    def _summary(self) -> None:
        wall = time.monotonic() - self.t0
        n_actors = max(1, len(self.pool.actors)) if self.pool else 1
        share = self.busy_s / (wall * n_actors) if wall > 0 else 0.0
        log.info("finished: %d evaluations (%d failed), front %d (%s); actors busy %.0f%% of %.0fs",
                 self.book.n_told, self.book.n_failed, len(self.archive), ", ".join(self.archive.front()),
                 100 * share, wall)
