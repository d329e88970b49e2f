"""The Ray actor that merges and scores candidates: one per GPU, or per CPU slot.

Why an actor (not tasks): loading the sources, precomputing task vectors and building
the lm-eval task objects is expensive, and must happen once per device, not once per
candidate. Each actor therefore owns, for its whole life, one live model and one
``InPlaceMerger`` (sources / task vectors resident on its device or host) -- or, for a
data-flow search, one ``PathModel`` (every source loaded once; a candidate path is a new
list of layers shared by reference) -- and one ``ObjectiveSet``. A candidate is only a small recipe dict in and a small score dict out:
weights never cross the object store (sources are read from disk on the actor's node).

Failures: any exception while merging or evaluating becomes a ``failed`` result with
a one-line error, so a bad candidate never kills the actor. An evaluation that hangs
cannot be interrupted from inside Python (torch holds the thread), so time-outs are
enforced by the driver: it kills the actor with ``ray.kill(no_restart=False)``, Ray
restarts it (``ray.max_restarts``) and the candidate is recorded as failed.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import traceback
from typing import Any

from evomerge.merge.dtypes import OUTPUT_DTYPES

from evomerge.errors import EvomergeError, MemoryPlanError
from evomerge.records import Status

log = logging.getLogger(__name__)

_DTYPES = {name: name for name in OUTPUT_DTYPES}


def one_line(err: BaseException, limit: int = 400) -> str:
    """``Type: message`` squeezed onto one line (for the log's ``error`` field)."""
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class CandidateEvaluator:
    """Holds one live model and scores recipes on it. Wrapped by ``ray.remote`` in ``make_actor``.

    ``cfg_data`` is ``SearchConfig.model_dump(mode="json")``. Relative paths in it (and model
    refs in recipes) mean what they mean in the driver's working directory ``cwd``, so the
    actor moves there when that folder exists on its node (a shared file system); model
    refs must stay exactly as the user wrote them because recipes name sources by ref.
    """

    def __init__(self, cfg_data: dict[str, Any], actor_index: int = 0, device: str | None = None,
                 cwd: str | None = None, faults: dict[str, Any] | None = None) -> None:
        t0 = time.perf_counter()
        self.faults = faults or {}
        if cwd and os.path.isdir(cwd):
            os.chdir(cwd)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from evomerge.config import SearchConfig
        from evomerge.merge.materialise import InPlaceMerger
        from evomerge.merge.sources import model_set_for
        from evaluators import build_objectives

        self.cfg = SearchConfig.model_validate(cfg_data)
        self.actor_index = actor_index
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        if device == "cpu":
            threads = max(1, int(self.cfg.ray.num_cpus_per_actor))
            torch.set_num_threads(threads)
        m = self.cfg.models
        self.startup_error: str | None = None
        self.node = node_label()
        try:  # each actor resolves the sources on its own node: one missing there fails this actor only
            self.model_set = model_set_for(m)  # headers only
        except EvomergeError as err:
            self.startup_error = f"actor {actor_index} on node {self.node}: {err}"
            self.load_s = time.perf_counter() - t0
            return
        from evomerge.search.memory import is_path_search

        self.path_search = is_path_search(self.cfg)
        try:  # before a single weight is loaded: a plan that cannot fit is one line, not an OOM later
            from evomerge.search.memory import plan_residency

            self.residency, _ = plan_residency(self.cfg, self.model_set, "cuda" if device.startswith("cuda") else "cpu")
        except MemoryPlanError as err:
            self.startup_error = f"actor {actor_index} on node {self.node}: {err}"
            self.load_s = time.perf_counter() - t0
            return
        dtype = getattr(torch, _DTYPES[self.cfg.merge.dtype])
        self.merger: Any = None
        self.paths: Any = None
        if self.path_search:  # every source once; a candidate is a new list of shared layers
            from evomerge.merge.path_model import PathModel

            self.paths = PathModel(self.model_set, device=device, dtype=dtype, trust_remote_code=m.trust_remote_code,
                                   allow_pickle=m.allow_pickle)
            self.model: Any = None
        else:
            live_path = self.model_set.base.path if self.model_set.base is not None else self.model_set.sources[0].path
            self.model = AutoModelForCausalLM.from_pretrained(
                str(live_path), dtype=dtype, trust_remote_code=m.trust_remote_code,
                use_safetensors=None if m.allow_pickle else True,
            ).to(device)
            self.model.eval()
            self.merger = InPlaceMerger(self.model, self.model_set, device=device,
                                        compute_dtype=getattr(torch, self.cfg.merge.compute_dtype),
                                        residency=self.residency.mode, fused=self.cfg.merge.fused)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_set.tokenizer_path),
                                                       trust_remote_code=m.trust_remote_code)
        self.objectives = build_objectives(self.cfg, self.tokenizer, device)
        self._current: str | None = None  # content hash of the recipe now in the live model
        self.load_s = time.perf_counter() - t0

    # -- probes ---------------------------------------------------------------------
    def ready(self) -> dict[str, Any]:
        """Called once after (re)start: proves the actor is alive, says where it runs, and how its
        evaluators define each objective's direction (the pool checks them against the plan's)."""
        info = {"actor": self.actor_index, "pid": os.getpid(), "node": self.node, "node_id": ray_node_id(),
                "device": self.device, "load_s": round(self.load_s, 3)}
        if self.startup_error is not None:  # the pool marks this actor dead with this line
            return {**info, "error": self.startup_error}
        return {**info, "directions": dict(self.objectives.directions), "residency": self.residency.mode,
                "memory": self.residency.describe()}

    # -- work -----------------------------------------------------------------------
    def evaluate(self, candidate_id: str, recipe_dict: dict[str, Any], split: str = "selection",
                 items: dict[str, list[int]] | None = None) -> dict[str, Any]:
        """Merge ``recipe_dict`` into the live model and score it on ``split`` (only the item positions
        ``items`` names per objective, for a screen; every item when None).

        Never raises for a bad candidate: returns ``status: failed`` and a one-line error.
        Merging is skipped when the live model already holds this recipe (heldout
        re-scoring right after selection scoring, or a cached duplicate).
        """
        import torch

        from evomerge.merge.path_recipe import PathRecipe
        from evomerge.merge.recipes import recipe_from_dict

        result: dict[str, Any] = {"id": candidate_id, "split": split, "actor": self.actor_index,
                                  "pid": os.getpid(), "scores": {}, "status": Status.OK.value, "error": None,
                                  "timings": {"merge_s": 0.0, "eval_s": 0.0}}
        stage = "merge"
        try:
            recipe = recipe_from_dict(recipe_dict)
            if self.path_search != isinstance(recipe, PathRecipe):
                raise ValueError(f"this actor searches {'layer paths' if self.path_search else 'weight merges'} "
                                 f"and cannot materialise a {type(recipe).__name__}")
            key = recipe.content_hash()
            t0 = time.perf_counter()
            if key != self._current:
                self._current = None  # a merge that fails half-way leaves the model undefined
                if self.path_search:  # layers shared by reference, no weight copied
                    self.model = self.paths.apply(recipe)
                else:
                    self.merger.apply(recipe)
                self._current = key
            t1 = time.perf_counter()
            stage = "evaluation"
            if self.faults and split == "selection":
                _inject_fault(self.faults, candidate_id)
            with torch.inference_mode():
                scores = self.objectives.evaluate(self.model, split=split, items=items)
            t2 = time.perf_counter()
            result["timings"] = {"merge_s": t1 - t0, "eval_s": t2 - t1}
            result["scores"] = {k: float(v) for k, v in scores.items()}
            if self.objectives.last_items:
                result["items"] = {k: list(v) for k, v in self.objectives.last_items.items()}
            if items is not None and getattr(self.objectives, "last_doc_ids", None):
                result["doc_ids"] = {k: list(v) for k, v in self.objectives.last_doc_ids.items()}
            bad = [k for k, v in result["scores"].items() if v != v]  # NaN
            if bad:
                raise ValueError(f"objective(s) {', '.join(bad)} returned NaN")
        except Exception as err:  # noqa: BLE001 - a candidate must never crash the actor
            log.warning("candidate %s failed in %s:\n%s", candidate_id, stage, traceback.format_exc())
            result.update(status=Status.FAILED.value, error=f"{stage}: {one_line(err)}", scores={})
        return result


def ray_node_id() -> str | None:
    """The Ray node this process runs on (hex id), or None outside Ray."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001
        return None


def node_label() -> str:
    """``host`` plus the first characters of the Ray node id: hosts alone do not tell apart two
    nodes on one machine (containers, tests), and ids alone do not tell a user which machine."""
    node_id = ray_node_id()
    return f"{socket.gethostname()}/{node_id[:8]}" if node_id else socket.gethostname()


def _inject_fault(faults: dict[str, Any], candidate_id: str) -> None:
    """Test hook (env ``EVOMERGE_TEST_FAULTS``, JSON, read by the driver): simulate failures.

    ``raise: [ids]`` -> the evaluation raises; ``sleep: {id: s}`` -> it hangs for s seconds;
    ``die_once: {id: marker_path}`` -> the actor process exits mid-evaluation the first
    time (the marker file records that it happened); ``announce: folder`` -> write
    ``folder/<id>.pid`` when an evaluation starts (so a test can kill that very process
    mid-evaluation). Never set outside tests.
    """
    if faults.get("announce"):
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in candidate_id)
        with open(os.path.join(faults["announce"], f"{safe}.pid"), "w") as fh:
            fh.write(str(os.getpid()))
    if candidate_id in faults.get("raise", []):
        raise RuntimeError(f"injected evaluator failure for {candidate_id}")
    if candidate_id in faults.get("sleep", {}):
        time.sleep(float(faults["sleep"][candidate_id]))
    marker = faults.get("die_once", {}).get(candidate_id)
    if marker and not os.path.exists(marker):
        with open(marker, "w") as fh:
            fh.write(str(os.getpid()))
        os._exit(1)


def actor_options(cfg: Any, use_gpu: bool, memory_bytes: int | None = None) -> dict[str, Any]:
    """Ray resource options of one actor: a whole GPU, or ``num_cpus_per_actor`` CPUs, the host
    memory its plan holds (``memory_bytes``: so Ray never packs two that cannot fit), and where
    it goes (``ray.placement``). Scheduling strategies, not placement groups: a placement group
    pins its bundles to nodes, and a bundle on a dead node blocks its actor until the group is
    rescheduled, while a plain actor is restarted wherever the cluster has room."""
    opts: dict[str, Any] = {"max_restarts": cfg.ray.max_restarts, "max_task_retries": 0}
    if getattr(cfg.ray, "placement", "spread") == "spread":  # pack: Ray's default (fill a node, then the next)
        opts["scheduling_strategy"] = "SPREAD"
    if use_gpu:
        opts.update(num_gpus=1, num_cpus=min(1.0, cfg.ray.num_cpus_per_actor))
    else:
        opts.update(num_gpus=0, num_cpus=cfg.ray.num_cpus_per_actor)
    if memory_bytes:
        opts["memory"] = int(memory_bytes)
    return opts


def make_actor(cfg: Any, cfg_data: dict[str, Any], index: int, use_gpu: bool,
               faults: dict[str, Any] | None = None, memory_bytes: int | None = None) -> Any:
    """Start one ``CandidateEvaluator`` actor (returns its handle at once; ``ready`` waits)."""
    import ray

    remote_cls = ray.remote(CandidateEvaluator)
    device = "cuda" if use_gpu else "cpu"
    return remote_cls.options(**actor_options(cfg, use_gpu, memory_bytes)).remote(cfg_data, index, device, os.getcwd(), faults)
