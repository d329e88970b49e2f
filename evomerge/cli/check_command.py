"""``evomerge check CONFIG``: every check a search would run before Ray, and the plan it would follow.

Why a command of its own: a 7B search learns that a hub id is misspelt, a task does not
exist or the actors do not fit in memory only after minutes of start-up, or worse after
an out-of-memory crash. ``check`` runs the search's own plan (``search.plan.plan_search``:
config, models from safetensors headers and ``config.json`` only, the space, the tasks
and metrics, the optimizer) and the engine's memory plan for one actor, then prints what
the search would do. It loads no weights, works offline (hub ids resolve through the
local Hugging Face cache), never starts Ray and never touches a run directory; a
failure is the usual one line and exit status 2.
"""

from __future__ import annotations

import argparse
import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

from evomerge.config import ObjectiveConfig, SearchConfig, load_config
from evomerge.errors import ConfigError
from evomerge.merge.sources import ModelSource
from evomerge.search.plan import SearchPlan, plan_search
from evomerge.search.ray_cluster import actor_count, local_gpus

GB = 1024**3
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class ActorPlan:
    """How many actors the search would start and on what, decided the way ``plan_actors`` decides."""

    device: str  # "cpu" | "cuda"
    count: int
    why: str  # one line: where the count comes from and what it assumes


def check_command(args: argparse.Namespace) -> int:
    """Validate ``args.config`` (with ``--set``), print the plan; a failed check raises a one-line error."""
    cfg = load_config(args.config, getattr(args, "overrides", None) or [])
    memory_gb = getattr(args, "memory_gb", None)
    if memory_gb is not None:
        if not (math.isfinite(memory_gb) and memory_gb > 0):
            raise ConfigError(f"--memory-gb {memory_gb:g}: give the memory of one actor in GiB, a number > 0")
        cfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"actor_memory_gb": float(memory_gb)})})
    plan = plan_search(cfg)
    actors = plan_actor_count(cfg, getattr(args, "device", None))
    memory = memory_lines(plan, actors)  # may raise the memory plan's one-line error
    print(f"evomerge check {args.config}: OK (no weights read, Ray not started)")
    for line in (model_lines(plan) + gene_lines(plan) + optimizer_lines(plan) + objective_lines(plan)
                 + actor_lines(actors) + memory):
        print(line)
    return 0


# -- models ---------------------------------------------------------------------------------
def parameter_count(model: ModelSource) -> int:
    """Elements of every tensor in the model's files, from the headers."""
    return sum(math.prod(model.shape(n)) for n in model.tensor_names())


def _dtype_of(model: ModelSource) -> str:
    counts = Counter(model.dtype(n) for n in model.tensor_names())
    return counts.most_common(1)[0][0] if counts else "?"


def model_lines(plan: SearchPlan) -> list[str]:
    """Each model with its role, size and folder: the folder shows which cache or path a hub id resolved to."""
    ms = plan.model_set
    ref = ms.reference
    lines = [f"models: {len(ms.sources)} source(s)"
             f"{' on base ' + ms.base.ref if ms.base is not None else ', no base'}; {ref.model_type or '?'}, "
             f"{ms.num_layers} layers, {len(ms.tensor_names)} tensors; tokenizer from {ms.tokenizer_path}"]
    roles = ([("base", ms.base)] if ms.base is not None else []) + [("source", s) for s in ms.sources]
    width = max(len(m.ref) for _, m in roles)
    for role, m in roles:
        files = len({m.info(n).file for n in m.tensor_names()})
        lines.append(f"  {role:<6}  {m.ref:<{width}}  {parameter_count(m):>15,} parameters  {_dtype_of(m)}, "
                     f"{files} file{'s' if files != 1 else ''}  ({m.path})")
    return lines


# -- genome, optimizer ------------------------------------------------------------------------
def gene_lines(plan: SearchPlan) -> list[str]:
    """The genome as the space describes it, and the config keys that shaped it."""
    space = plan.space
    line = f"genes: {space.describe()}"
    try:
        dim = int(space.parametrization().dimension)
        line += f" (dimension {dim})"
    except Exception:  # noqa: BLE001 - a plug-in space may not say; the describe line is enough
        pass
    cfg = plan.cfg
    if not getattr(space, "parameter_space", True):  # a data-flow space: its describe line says it all
        return [line, f"  models' layers live in {cfg.merge.dtype}; scales in [{cfg.space.scale_bounds[0]:g}, "
                      f"{cfg.space.scale_bounds[1]:g}]"]
    bounds = ", ".join(f"{k} [{lo:g}, {hi:g}]" for k, (lo, hi) in cfg.space.bounds.items())
    return [line, f"  methods {', '.join(cfg.merge.methods)} ({cfg.merge.method_gene}); layer groups of "
                  f"{cfg.space.layer_group_size}; bounds {bounds}; merge in {cfg.merge.compute_dtype}, "
                  f"live model in {cfg.merge.dtype}"]


def optimizer_lines(plan: SearchPlan) -> list[str]:
    """The optimizer as resolved (the default depends on the number of objectives) and the budget."""
    cfg = plan.cfg
    pop = cfg.optimizer.popsize if cfg.optimizer.popsize is not None else "the number of actors"
    budget = []
    if cfg.budget.evaluations is not None:
        budget.append(f"{cfg.budget.evaluations} evaluations")
    if cfg.budget.wall_clock_s is not None:
        budget.append(f"{cfg.budget.wall_clock_s:g} s of wall clock")
    either = ", whichever ends first" if len(budget) > 1 else ""
    return [f"optimizer: {plan.optimizer} (seed {cfg.optimizer.seed}, population {pop}); "
            f"budget {' or '.join(budget)}{either}"]


# -- objectives ---------------------------------------------------------------------------------
def _task_entry(cfg: SearchConfig, name: str) -> Any:
    """lm-eval's index entry of ``name`` (the index the config check built already; no task is built)."""
    from evaluators import task_index as ti

    paths = ti.include_paths(cfg.evaluation.include_paths)
    return ti.entry(ti.manager_for([name], paths), name)


def _task_exists(cfg: SearchConfig, name: str) -> bool:
    return _task_entry(cfg, name) is not None


def item_count(cfg: SearchConfig, task: str) -> int | None:
    """Items in ``task``'s evaluation split when that is cheap to know: a local JSON-lines file.

    Hub datasets would have to be loaded (or downloaded) to be counted: None for them.
    """
    from pathlib import Path

    from evaluators import task_index as ti

    e = _task_entry(cfg, task)
    conf = (e.cfg or {}) if e is not None else {}
    split = conf.get("test_split") or conf.get("validation_split")
    files = (conf.get("dataset_kwargs") or {}).get("data_files")
    value = files.get(split) if isinstance(files, dict) and isinstance(split, str) else None
    if e is None or e.yaml_path is None or not isinstance(value, str) or not value.endswith(".jsonl"):
        return None
    path = ti.resolve_data_path(value, Path(e.yaml_path).parent)
    try:
        with open(path or "", "rb") as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return None


def _items(n: int | None, total: int | None = None) -> str:
    if n is None or (total is not None and n >= total):
        return "every item" + (f" ({total})" if total is not None else "")
    return f"{n} item{'s' if n != 1 else ''}" + (f" of {total}" if total is not None else "")


def _heldout_line(cfg: SearchConfig, obj: ObjectiveConfig, task: str) -> str:
    """Which items the final front is re-scored on, by the rule of ``evaluators.lm_eval_evaluator``."""
    from evaluators.lm_eval_evaluator import heldout_limit

    if not cfg.evaluation.rescore_heldout:
        return "held-out re-score off (evaluation.rescore_heldout: false)"
    twin = obj.heldout_task if (obj.heldout_task and not obj.components) else f"{task}_heldout"
    if _task_exists(cfg, twin):
        return f"held-out: task {twin}, {_items(heldout_limit(obj), item_count(cfg, twin))}"
    if obj.limit is None:
        return "held-out: none left (no limit: every item is a selection item; the re-score reuses them)"
    count = heldout_limit(obj)
    total = item_count(cfg, task)
    rest = None if total is None else max(0, total - obj.limit)
    return (f"held-out: {_items(count, rest)} of {task} outside the selection sample (no task {twin}; "
            f"heldout_limit {obj.heldout_limit if obj.heldout_limit is not None else 'unset: as many as limit'})")


def objective_lines(plan: SearchPlan) -> list[str]:
    """Each objective: direction (read from the task configs), items per candidate, held-out items."""
    cfg = plan.cfg
    lines = [f"objectives: {len(plan.directions)} ({', '.join(f'{k} {v}' for k, v in plan.directions.items())})"]
    for obj in cfg.objectives:
        head = f"  {obj.name} ({plan.directions[obj.name]}, {obj.evaluator})"
        if obj.evaluator == "perplexity":
            lines.append(f"{head}: {len(obj.files or [])} file(s), "
                         f"{obj.max_tokens if obj.max_tokens is not None else 'all'} tokens per candidate")
            continue
        if obj.evaluator != "lm_eval":
            lines.append(f"{head}: {obj.task or ''} {obj.metric or ''}".rstrip())
            continue
        terms = ([(c.task, c.metric, c.weight) for c in obj.components] if obj.components
                 else [(obj.task or "", obj.metric or "", 1.0)])
        shots = f", {obj.num_fewshot}-shot" if obj.num_fewshot is not None else ""
        totals = {task: item_count(cfg, task) for task, _, _ in terms}
        one_total = totals[terms[0][0]] if len(terms) == 1 else None
        lines.append(f"{head}{shots}, {_items(obj.limit, one_total)} per candidate"
                     f"{' (a seeded sample, the same for every candidate)' if obj.limit is not None else ''}")
        for task, metric, weight in terms:
            w = f"{weight:g} x " if obj.components else ""
            lines.append(f"    {w}{task} {metric}; {_heldout_line(cfg, obj, task)}")
    return lines


# -- actors -------------------------------------------------------------------------------------
def _local_gpus() -> int:
    return local_gpus()


def plan_actor_count(cfg: SearchConfig, device: str | None) -> ActorPlan:
    """The actor count ``ray_cluster.plan_actors`` would choose, from the config and this machine.

    ``plan_actors`` asks the running cluster for its GPUs; without Ray the only GPUs known
    are this machine's (torch), so the line says what is assumed: the embedded local Ray,
    or per node of the cluster named by ``ray.address``/``RAY_ADDRESS``.
    """
    if device is not None and device not in DEVICES:
        raise ConfigError(f"--device {device}: use one of {', '.join(DEVICES)}")
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    where = (f"the cluster at {address} (counted per node, as this machine)" if address
             else "the embedded local Ray on this machine")
    gpus = _local_gpus()
    if device is None:
        use_gpu = gpus > 0 if cfg.ray.use_gpu is None else cfg.ray.use_gpu
        device = "cuda" if use_gpu else "cpu"
        how = ("ray.use_gpu" if cfg.ray.use_gpu is not None
               else f"ray.use_gpu unset and this machine has {gpus} GPU{'s' if gpus != 1 else ''}")
    else:
        how = f"--device {device}"
    cpus_here = float(os.cpu_count() or 1)
    count = actor_count(cfg, use_gpu=device == "cuda", gpus=gpus, cpus=cpus_here, embedded=address is None)
    if cfg.ray.actors is not None:
        why = f"ray.actors: {cfg.ray.actors}"
    elif device == "cuda":
        why = (f"one per GPU: {gpus} GPU{'s' if gpus != 1 else ''} here" if gpus
               else "one per GPU; this machine has none, so the plan below is for one GPU actor")
    elif address is None:
        why = "ray.actors unset, no GPU, the embedded local Ray: one CPU actor"
    else:
        why = (f"ray.actors unset and no GPU: one per {cfg.ray.num_cpus_per_actor:g} CPU(s) of the cluster, "
               f"counted as this machine's {cpus_here:g}")
    cpus = count * cfg.ray.num_cpus_per_actor
    return ActorPlan(device, count, f"{why} ({how}; {cpus:g} CPU(s) for actors; assumes {where})")


def actor_lines(actors: ActorPlan) -> list[str]:
    return [f"actors: {actors.count} on {actors.device}: {actors.why}"]


# -- memory -------------------------------------------------------------------------------------
def _bytes(n: int | float) -> str:
    return f"{int(n):,} B ({n / GB:.1f} GiB)"


def size_lines(plan: SearchPlan) -> list[str]:
    """The sizes every memory plan starts from, as a hand computation a reader can redo.

    They are the engine's own (``memory_plan.ModelSizes``, from the headers): the live
    model holds every floating tensor in ``merge.dtype``, and each source one task vector
    (source - base) of every floating tensor in ``merge.compute_dtype``.
    """
    from evomerge.merge.memory_plan import ModelSizes

    cfg = plan.cfg
    s = ModelSizes.from_model_set(plan.model_set, live_dtype=cfg.merge.dtype, compute_dtype=cfg.merge.compute_dtype)
    if not getattr(plan.space, "parameter_space", True):
        return [f"  models: {s.sources} x {s.elements:,} parameters x {s.live_itemsize} B ({cfg.merge.dtype}) = "
                f"{_bytes(s.sources * s.elements * s.live_itemsize)}, each loaded once; a path shares their layers"]
    return [f"  live model: {s.elements:,} parameters x {s.live_itemsize} B ({cfg.merge.dtype}) = "
            f"{_bytes(s.elements * s.live_itemsize)}",
            f"  task vectors: {s.sources} x {s.elements:,} parameters x {s.compute_itemsize} B "
            f"({cfg.merge.compute_dtype}) = {_bytes(s.sources * s.elements * s.compute_itemsize)}"]


def _free_memory(cfg: SearchConfig, actors: ActorPlan) -> tuple[tuple[int, int], int, str]:
    """((device free, host free) bytes for the plan, how many actors share them, what that assumes)."""
    from evomerge.merge.memory_plan import available_memory

    cap = cfg.ray.actor_memory_gb
    if actors.device == "cuda":
        if cap is None and _local_gpus() == 0:
            raise ConfigError("--device cuda: this machine has no GPU whose free memory could be measured; "
                              "pass --memory-gb N (the GPU memory of one actor) or set ray.actor_memory_gb")
        host_free = available_memory("cpu")[1]
        if cap is not None:
            return ((int(cap * GB), host_free), 1,
                    f"{cap:g} GiB of GPU memory per actor (ray.actor_memory_gb / --memory-gb); host memory "
                    f"as free on this machine ({host_free / GB:.1f} GiB)")
        device_free, host_free = available_memory("cuda")
        return ((device_free, host_free), 1, f"memory free on this machine: GPU {device_free / GB:.1f} GiB, "
                                              f"host {host_free / GB:.1f} GiB")
    if cap is not None:
        return ((int(cap * GB), int(cap * GB)), 1, f"{cap:g} GiB per actor (ray.actor_memory_gb / --memory-gb)")
    device_free, host_free = available_memory("cpu")
    share = actors.count
    return ((device_free, host_free), share,
            f"host memory free on this machine ({host_free / GB:.1f} GiB), shared by {share} CPU actor(s)")


def memory_lines(plan: SearchPlan, actors: ActorPlan) -> list[str]:
    """Every residency option for one actor with its bytes, and the one the search would choose."""
    from evomerge.search.memory import configured_mode, plan_residency

    free, share, assumed = _free_memory(plan.cfg, actors)
    chosen, options = plan_residency(plan.cfg, plan.model_set, actors.device, share=share, free=free)
    lines = [f"memory plan per actor ({actors.device}; {assumed}):"] + size_lines(plan)
    lines.append("  options, fastest first:")
    for r in options:
        mark = "*" if r is chosen or r.mode == chosen.mode else " "
        where = (f"memory {_bytes(r.device_bytes)}" if r.device_type == "cpu"
                 else f"GPU {_bytes(r.device_bytes)}, host {_bytes(r.host_bytes)}")
        lines.append(f"  {mark} {r.mode:<16} {where}")
        lines.append("        " + " + ".join(f"{what} {b:,}" for what, b in r.parts if b))
    mode = configured_mode(plan.cfg, actors.device)
    how = "the fastest that fits" if mode == "auto" else "forced by the config"
    lines.append(f"  chosen: {chosen.mode} (memory mode {mode}: {how})")
    return lines

