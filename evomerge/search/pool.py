"""The driver's side of its actors: at most one job each, waited on all at once.

``EvaluatorPool`` (not Ray's ``ray.util.ActorPool``, which it does not use: that one has
no notion of an actor dying under a job, being restarted by Ray, or a job timing out)
keeps, per actor, a ``State`` and the job in flight, and turns everything Ray can report
into ``Event``s: a result, a failure, or "the actor died under this job" (the caller
re-queues it). Time-outs are enforced here: torch cannot be interrupted from inside the
actor, so an actor whose job runs past ``ray.eval_timeout_s`` is killed and restarted
by Ray, and its job is reported failed.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Mapping

from evomerge.config import SearchConfig
from evomerge.errors import ClusterError, EvomergeError
from evomerge.records import Kind, Status
from evomerge.search.ray_cluster import ray_error_line
from evomerge.search.searchbook import Asked

log = logging.getLogger("evomerge.search")

#: longest ray.wait, so time-outs, signals and the display are looked at this often
TICK_S = 0.5
#: wait before asking a restarting actor again whether it is back
PROBE_RETRY_S = 1.0
#: times a job is dispatched again after its actor died under it, before it is reported failed
MAX_ATTEMPTS = 3
#: new actors started in a row for one slot that never became ready, before the slot is left dead
REPLACE_LIMIT = 3


class State(str, Enum):
    """Where an actor is in its life, as the driver sees it."""

    STARTING = "starting"  # started or restarted by Ray; its ``ready`` probe is pending
    FREE = "free"
    BUSY = "busy"
    DEAD = "dead"  # could not start (or restart) for good


@dataclass
class Job:
    """One unit of actor work: a search candidate, a reference, or a held-out re-score."""

    kind: Kind
    id: str
    recipe: dict[str, Any]
    split: str = "selection"
    #: "screen": score only ``items`` (positions of each objective's selection items); "full": every item
    stage: str = "full"
    items: dict[str, list[int]] | None = None
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


def failed_result(job: Job, actor: int | None, error: str) -> dict[str, Any]:
    """The result dict of a job that failed outside the actor's own error handling."""
    return {"id": job.id, "split": job.split, "actor": actor, "scores": {}, "status": Status.FAILED.value,
            "error": error, "timings": {"merge_s": 0.0, "eval_s": 0.0}}


class EvaluatorPool:
    """Actors with at most one job each; ``poll`` waits on everything in flight at once.

    ``directions``: what the plan derived from the config; an actor whose evaluators
    define an objective the other way round is refused when it reports ready.
    """

    def __init__(self, cfg: SearchConfig, n: int, use_gpu: bool, directions: Mapping[str, str],
                 faults: dict[str, Any] | None = None, memory_bytes: int | None = None) -> None:
        from evomerge.search.actor import make_actor

        self.cfg = cfg
        self.use_gpu = use_gpu
        self.timeout_s = cfg.ray.eval_timeout_s
        self.directions = dict(directions)
        cfg_data = cfg.model_dump(mode="json")
        self._make = lambda i: make_actor(cfg, cfg_data, i, use_gpu, faults=faults, memory_bytes=memory_bytes)
        self.actors = {i: self._make(i) for i in range(n)}
        self.refused: set[int] = set()  # refused at start (sources, memory, directions): never replaced
        self.replaced = {i: 0 for i in range(n)}  # replacements since the actor was last ready
        self.info_version = 0  # bumped whenever an actor reports where it runs (memory_plan.json follows)
        self.capacity_since: float | None = None  # when the cluster was first seen unable to host an actor
        self._capacity_checked = 0.0
        self.state = {i: State.STARTING for i in range(n)}
        self.info: dict[int, dict[str, Any]] = {}
        self.probes: dict[Any, int] = {a.ready.remote(): i for i, a in self.actors.items()}
        self.inflight: dict[Any, tuple[int, Job]] = {}
        self.reprobe: dict[int, float] = {}  # actor -> when to ask again if it is back
        self.last_error: str | None = None

    # -- bookkeeping ----------------------------------------------------------------
    def free(self) -> list[int]:
        return [i for i, s in self.state.items() if s is State.FREE]

    def alive(self) -> int:
        return sum(1 for s in self.state.values() if s is not State.DEAD)

    def busy(self) -> bool:
        return bool(self.inflight)

    def jobs(self) -> list[Job]:
        return [job for _, job in self.inflight.values()]

    def usable(self) -> int:
        """Actors that are up (free or busy)."""
        return sum(1 for s in self.state.values() if s in (State.FREE, State.BUSY))

    def where(self) -> str:
        """Each actor and the node it runs on (or its state), for the live display."""
        return ", ".join(f"{i}@{self.info.get(i, {}).get('node', '?')}" if s in (State.FREE, State.BUSY)
                         else f"{i} {s.value}" for i, s in sorted(self.state.items()))

    def capacity_timeout(self) -> str | None:
        """None, or the one line to stop on when no node could host an actor for ``ray.capacity_wait_s``.

        Why here: when every node that hosts actors dies, Ray keeps the actors "restarting"
        for ever and the driver would poll for ever. The cluster is asked (at most every
        2 s) only while no actor is up; the wait is announced once, with its deadline.
        """
        if self.usable():
            self.capacity_since = None
            return None
        now = time.monotonic()
        if now - self._capacity_checked < 2.0:
            return self._capacity_line(now)
        self._capacity_checked = now
        from evomerge.search.ray_cluster import can_host_actor

        if can_host_actor(self.cfg, self.use_gpu):
            if self.capacity_since is not None:
                log.warning("a node that can host an actor is back; waiting for the actors to start")
            self.capacity_since = None
            return None
        if self.capacity_since is None:
            self.capacity_since = now
            need = "a GPU" if self.use_gpu else f"{self.cfg.ray.num_cpus_per_actor:g} CPU(s)"
            log.warning("no node of the Ray cluster can host an evaluation actor (each needs %s): waiting up "
                        "to %.0fs (ray.capacity_wait_s) for one to join", need, self.cfg.ray.capacity_wait_s)
        return self._capacity_line(now)

    def _capacity_line(self, now: float) -> str | None:
        if self.capacity_since is None or now - self.capacity_since < self.cfg.ray.capacity_wait_s:
            return None
        return (f"no node of the Ray cluster could host an evaluation actor for {self.cfg.ray.capacity_wait_s:g}s "
                f"(ray.capacity_wait_s): every node that ran one is gone; add nodes")

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until at least one actor is up; error out if every actor failed to start."""
        t0 = time.monotonic()
        while not self.free():
            if self.alive() == 0:
                raise EvomergeError(f"no evaluation actor could start: {self.last_error}")
            if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                raise EvomergeError(f"no evaluation actor started within {timeout_s:.0f}s")
            lost = self.capacity_timeout()
            if lost:
                raise ClusterError(lost)
            self.poll(TICK_S)

    def _replace_dead(self) -> None:
        """Start a new actor for each one Ray gave up on (``max_restarts`` spent, e.g. its node died
        more than that many times), so the pool grows back to its size when the cluster has room.
        Actors refused at start are not replaced (they would be refused again), and a slot is
        replaced at most ``REPLACE_LIMIT`` times in a row without becoming ready."""
        for i, st in self.state.items():
            if st is State.DEAD and i not in self.refused and self.replaced[i] < REPLACE_LIMIT:
                self.replaced[i] += 1
                log.warning("starting a new actor %d in place of the one Ray gave up on", i)
                self.actors[i] = self._make(i)
                self.state[i] = State.STARTING
                self.probes[self.actors[i].ready.remote()] = i

    def submit(self, i: int, job: Job) -> None:
        job.dispatched_at = time.time()
        ref = self.actors[i].evaluate.remote(job.id, job.recipe, job.split, job.items)
        self.inflight[ref] = (i, job)
        self.state[i] = State.BUSY

    # -- waiting --------------------------------------------------------------------
    def _ready(self, i: int, info: dict[str, Any]) -> None:
        """An actor's ``ready`` answer: free, unless its evaluators disagree with the plan's directions."""
        if info.get("error"):  # it could not start (sources or memory on its node): dead, with its one line
            self.state[i] = State.DEAD
            self.refused.add(i)
            self.last_error = str(info["error"])
            log.error("%s", self.last_error)
            return
        theirs = info.get("directions")
        if theirs is not None and dict(theirs) != self.directions:
            name = next(k for k in self.directions if theirs.get(k) != self.directions[k])
            self.state[i] = State.DEAD
            self.refused.add(i)
            self.last_error = (f"objective {name!r}: the evaluator built on actor {i} says {theirs.get(name)}, the "
                               f"task config says {self.directions[name]}; set direction on the objective")
            return
        self.info[i] = info
        self.info_version += 1
        self.replaced[i] = 0
        self.state[i] = State.FREE
        log.info("actor %d ready: %s", i, {k: v for k, v in info.items() if k != "directions"})

    def poll(self, timeout: float) -> list[Event]:
        """Wait up to ``timeout`` for any job or probe; return finished/lost jobs."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

        self._replace_dead()
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
                    self._ready(i, ray.get(ref))
                except ActorUnavailableError:  # restarting: ask again shortly
                    self.reprobe[i] = time.monotonic() + PROBE_RETRY_S
                except (RayActorError, RayTaskError) as err:
                    self.state[i] = State.DEAD
                    self.last_error = ray_error_line(err)
                    log.error("actor %d is gone for good: %s", i, self.last_error)
                continue
            i, job = self.inflight.pop(ref)
            try:
                result = ray.get(ref)
                self.state[i] = State.FREE
                events.append(Event(job, result, i))
            except RayActorError as err:
                line = ray_error_line(err)
                if job.timed_out:
                    msg = f"timeout: evaluation ran longer than ray.eval_timeout_s={self.timeout_s:g}s; actor restarted"
                    events.append(Event(job, failed_result(job, i, msg), i))
                else:
                    log.warning("actor %d died while evaluating %s (%s); re-queueing it", i, job.id, line)
                    events.append(Event(job, None, i, error=line))
                self.state[i] = State.STARTING  # restarted by Ray (max_restarts) or dead: the probe tells
                self.probes[self.actors[i].ready.remote()] = i
            except RayTaskError as err:  # evaluate() itself never raises; defensive
                self.state[i] = State.FREE
                events.append(Event(job, failed_result(job, i, ray_error_line(err)), i))
        if self.timeout_s is not None:
            now = time.time()
            for ref, (i, job) in list(self.inflight.items()):
                if not job.timed_out and now - job.dispatched_at > self.timeout_s:
                    job.timed_out = True
                    log.warning("candidate %s exceeded ray.eval_timeout_s=%gs on actor %d; restarting the actor",
                                job.id, self.timeout_s, i)
                    ray.kill(self.actors[i], no_restart=False)
        return events

    # -- batches ----------------------------------------------------------------------
    def run_batch(self, jobs: list[Job], *, should_stop: Callable[[], bool] = lambda: False,
                  on_tick: Callable[[], None] = lambda: None) -> dict[tuple[str, str, str], dict[str, Any]]:
        """Run jobs that are not search candidates (references, held-out re-scores) over the pool.

        Results by ``(kind, id, split)``; a job whose actor died under it is dispatched again
        up to ``MAX_ATTEMPTS`` times, then reported failed. Stops early (results so far)
        when ``should_stop()`` turns true.
        """
        results: dict[tuple[str, str, str], dict[str, Any]] = {}
        queue: collections.deque[Job] = collections.deque(jobs)
        while not should_stop() and (queue or self.busy()):
            for i in self.free():
                if not queue:
                    break
                self.submit(i, queue.popleft())
            if not self.busy() and self.alive() == 0:
                raise EvomergeError(f"every evaluation actor died; last error: {self.last_error}")
            lost = self.capacity_timeout()
            if lost:
                raise ClusterError(lost)
            for ev in self.poll(TICK_S):
                job = ev.job
                result = ev.result
                if result is None:
                    job.attempts += 1
                    if job.attempts < MAX_ATTEMPTS:
                        queue.appendleft(job)
                        continue
                    result = failed_result(job, ev.actor, f"actor died {job.attempts} times while evaluating it "
                                                          f"(last: {ev.error})")
                results[(job.kind.value, job.id, job.split)] = result
            on_tick()
        return results
