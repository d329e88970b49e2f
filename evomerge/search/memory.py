"""How much memory one actor of a search needs, decided before anything is loaded.

The most reported failure of evolutionary merging tools is an out-of-memory crash
after minutes of loading. Here the engine's plan (``evomerge.merge.memory_plan``: the
bytes of every residency option, from safetensors headers only) meets the config: the
mode (``ray.memory_mode``, with the older ``ray.task_vectors_on: host`` meaning "host" on
GPU actors), the cap (``ray.actor_memory_gb``, else the memory free where the actor
runs) and the evaluation headroom (``ray.eval_headroom_gb``). The driver plans once
before it starts actors (and asks Ray for that much memory per actor, so the scheduler
never packs two actors that cannot fit together); each actor plans again on its own node
before it loads a weight, and refuses in one line when nothing fits.
"""

from __future__ import annotations

from typing import Any

from evomerge.config import SearchConfig
from evomerge.merge.memory_plan import (ModelSizes, Residency, available_memory, choose_residency, path_residency,
                                       residency_options)
from evomerge.merge.sources import ModelSet

GB = 1024**3


def is_path_search(cfg: SearchConfig) -> bool:
    """True when the configured space searches layer paths (``PathRecipe``), not weight merges."""
    from search_spaces import SPACES

    return not getattr(SPACES.get(cfg.space.name, where="space.name"), "parameter_space", True)


def configured_mode(cfg: SearchConfig, device_type: str) -> str:
    """The residency mode the config asks for on ``device_type`` ("auto": the fastest that fits)."""
    if cfg.ray.memory_mode == "auto" and cfg.ray.task_vectors_on == "host" and device_type == "cuda":
        return "host"
    return cfg.ray.memory_mode


def plan_residency(cfg: SearchConfig, model_set: ModelSet, device_type: str, *, share: int = 1,
                   free: tuple[int, int] | None = None) -> tuple[Residency, list[Residency]]:
    """(the chosen residency, every option) for one actor; a one-line MemoryPlanError when none fits.

    ``share``: how many actors divide the measured free memory (local actors on one machine);
    ignored when ``ray.actor_memory_gb`` caps each actor. ``free``: (device, host) free bytes,
    measured here when not given.
    """
    sizes = ModelSizes.from_model_set(model_set, live_dtype=cfg.merge.dtype, compute_dtype=cfg.merge.compute_dtype)
    headroom = int(cfg.ray.eval_headroom_gb * GB)
    mode = configured_mode(cfg, device_type)
    if is_path_search(cfg):  # no task vectors: every source once, whatever ray.memory_mode says
        options = [path_residency(sizes, device_type=device_type, headroom_bytes=headroom)]
        mode = "auto"
    else:
        options = residency_options(sizes, device_type=device_type, headroom_bytes=headroom)
    device_free, host_free = free if free is not None else available_memory(device_type)
    cap = int(cfg.ray.actor_memory_gb * GB) if cfg.ray.actor_memory_gb is not None else None
    if cap is None and share > 1:
        device_free, host_free = device_free // share, host_free // share
    chosen = choose_residency(options, device_free=device_free, host_free=host_free, cap_bytes=cap, mode=mode)
    return chosen, options


def ray_memory_bytes(res: Residency, device_type: str) -> int:
    """What to ask Ray's ``memory`` resource for: the host memory the actor will hold."""
    return int(res.host_bytes + (res.device_bytes if device_type == "cpu" else 0))


def plan_record(chosen: Residency, options: list[Residency], *, device_type: str, actors: int,
                cap_gb: float | None) -> dict[str, Any]:
    """The plan as ``memory_plan.json`` records it (``status`` shows it)."""
    def row(r: Residency) -> dict[str, Any]:
        return {"mode": r.mode, "device_bytes": int(r.device_bytes), "host_bytes": int(r.host_bytes),
                "describe": r.describe()}

    return {"device": device_type, "actors": actors, "actor_memory_gb": cap_gb, "chosen": row(chosen),
            "options": [row(r) for r in options], "per_actor": {}}


def plan_for_pool(cfg: SearchConfig, model_set: ModelSet, n_actors: int, use_gpu: bool) -> dict[str, Any] | None:
    """The driver's plan for its actors, or None when it cannot know their memory.

    It knows it when the cluster is this one machine (the free memory measured here,
    divided among the local actors) or when ``ray.actor_memory_gb`` caps each actor. Then
    the record's ``ray_memory_bytes`` is what each actor asks Ray for; otherwise each actor
    only checks its own node when it starts.
    """
    import ray

    device_type = "cuda" if use_gpu else "cpu"
    alive = [n for n in ray.nodes() if n.get("Alive")]
    if len(alive) > 1 and cfg.ray.actor_memory_gb is None:
        return None
    share = n_actors if device_type == "cpu" else 1  # CPU actors share the host; one GPU each
    chosen, options = plan_residency(cfg, model_set, device_type, share=share)
    record = plan_record(chosen, options, device_type=device_type, actors=n_actors, cap_gb=cfg.ray.actor_memory_gb)
    record["ray_memory_bytes"] = ray_memory_bytes(chosen, device_type)
    return record
