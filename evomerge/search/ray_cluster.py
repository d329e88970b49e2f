"""Ray start-up: connect to a cluster or start an embedded one, and size the actor pool.

Kept apart from the loop so that the one place that decides *where* the search runs
(local Ray with as many CPUs as actors need, or ``--address`` / ``ray.address`` /
``RAY_ADDRESS``, which a Ray Job sets) is small enough to read at a glance.
"""

from __future__ import annotations

import logging
import math
import os

from evomerge.config import SearchConfig
from evomerge.errors import EvomergeError

log = logging.getLogger("evomerge.search")


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
        use_gpu = local_gpus() > 0 if cfg.ray.use_gpu is None else cfg.ray.use_gpu
        n_actors = cfg.ray.actors or (local_gpus() if use_gpu else 1)
        num_cpus = None if use_gpu else max(1, math.ceil(n_actors * cfg.ray.num_cpus_per_actor))
        log.info("starting an embedded local Ray (%s CPUs)", num_cpus or "all")
        ray.init(num_cpus=num_cpus, include_dashboard=False,
                 object_store_memory=cfg.ray.object_store_memory or 128 * 1024**2, **quiet)
    return True


def local_gpus() -> int:
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


def ray_error_line(err: BaseException) -> str:
    """A Ray exception as ``Type: message`` on one line, for the log and the console."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}"
