"""Ray start-up: connect to a cluster or start an embedded one, and size the actor pool.

Joining a cluster copes with Ray's token authentication (``enable_token_auth``) and
turns a failed join into one line (``connection_error_line``).

Kept apart from the loop so that the one place that decides *where* the search runs
(local Ray with as many CPUs as actors need, or ``--address`` / ``ray.address`` /
``RAY_ADDRESS``, which a Ray Job sets) is small enough to read at a glance.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import tempfile
from typing import Iterator

from evomerge.config import SearchConfig
from evomerge.errors import ClusterError, EvomergeError

log = logging.getLogger("evomerge.search")


#: where Ray looks for a token when none is in the environment (``ray start --head`` writes it)
DEFAULT_TOKEN_PATH = "~/.ray/auth_token"

#: True when ``init_ray`` started an embedded local Ray (sized for the actors), False when it joined one
_embedded = False


def token_source() -> str | None:
    """Where a Ray auth token is available to this driver (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``,
    ``~/.ray/auth_token``), or None. Names the source only: the token itself is never read out here,
    printed or logged."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return "RAY_AUTH_TOKEN"
    custom = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if custom:
        return f"RAY_AUTH_TOKEN_PATH={custom}" if os.path.isfile(os.path.expanduser(custom)) else None
    return DEFAULT_TOKEN_PATH if os.path.isfile(os.path.expanduser(DEFAULT_TOKEN_PATH)) else None


def enable_token_auth() -> str | None:
    """Turn on Ray's token auth for this driver when a token is available and ``RAY_AUTH_MODE`` is unset.

    Why: ``ray start --head`` enables token authentication by default when a token exists,
    but Ray 2.60's ``ray.init(address=...)`` with an explicit address never does (only
    ``address="auto"`` does), so a driver with the right token is still refused
    (``InvalidAuthToken``). Setting ``RAY_AUTH_MODE=token`` is what Ray itself does for a
    head node; an explicit ``RAY_AUTH_MODE`` (``disabled`` included) is respected.
    Returns where the token comes from, or None.
    """
    source = token_source()
    if source and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
        try:  # Ray caches its config at import: make this process see the mode (as Ray's own setup does)
            from ray._raylet import Config

            Config.initialize("")
        except Exception:  # noqa: BLE001 - an older Ray without token auth: nothing to refresh
            pass
        log.info("Ray token authentication on for this driver (token from %s)", source)
    return source


def connection_error_line(address: str, err: BaseException, source: str | None) -> str:
    """Why joining the cluster at ``address`` failed and what to do, in one line (never the token)."""
    chain, e = [], err
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = " ".join(f"{type(x).__name__} {x}" for x in chain)
    if "AuthenticationError" in text or "InvalidAuthToken" in text or "Unauthenticated" in text:
        if source is None:
            return (f"cannot join the Ray cluster at {address}: it requires token authentication and this "
                    f"driver has no token; copy the cluster's token (the head's {DEFAULT_TOKEN_PATH}) and set "
                    f"RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or {DEFAULT_TOKEN_PATH} here")
        if os.environ.get("RAY_AUTH_MODE", "").lower() not in ("", "token"):
            return (f"cannot join the Ray cluster at {address}: it requires token authentication but "
                    f"RAY_AUTH_MODE={os.environ['RAY_AUTH_MODE']} here; set RAY_AUTH_MODE=token")
        return (f"cannot join the Ray cluster at {address}: it rejected the token from {source}; use the "
                f"token of that cluster (the head's {DEFAULT_TOKEN_PATH})")
    return (f"cannot join the Ray cluster at {address}: nothing answered there ({type(err).__name__}); start it "
            f"with `ray start --head --port PORT` or fix --address / ray.address / RAY_ADDRESS")


class _Captured:
    text = ""


@contextlib.contextmanager
def captured_stderr() -> Iterator[_Captured]:
    """Hold back what is written to file descriptor 2 (Python and Ray's C++ alike) while inside.

    Why: a failed join makes Ray's C++ GCS client log a warning line a second for its whole
    retry window, then Python raises; the user must see one line. The caller replays the
    text when the join succeeded, and sends it to the debug log when it failed.
    """
    out = _Captured()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.text = tmp.read().decode("utf-8", "replace")


def init_ray(cfg: SearchConfig, address: str | None) -> bool:
    """Connect to (or start) Ray. Returns True if this call started it (and must stop it).

    Joining a cluster that fails (no token, a wrong token, nothing listening) is one
    ``ClusterError`` line naming the address, the likely cause and the fix: Ray's own
    failure is three chained tracebacks that bury the cause.
    """
    import ray

    global _embedded
    if ray.is_initialized():
        return False
    address = address or cfg.ray.address or os.environ.get("RAY_ADDRESS")
    quiet = dict(log_to_driver=log.isEnabledFor(logging.DEBUG), logging_level=logging.WARNING)
    if address:
        log.info("connecting to Ray at %s", address)
        source = enable_token_auth()
        with captured_stderr() as captured:
            try:
                ray.init(address=address, **quiet)
                failure = None
            except Exception as err:  # noqa: BLE001 - Ray raises ConnectionError, AuthenticationError, ...
                failure = err
        if failure is not None:
            with contextlib.suppress(Exception):
                ray.shutdown()
            log.debug("Ray's output while failing to connect:\n%s", captured.text)
            raise ClusterError(connection_error_line(address, failure, source)) from None
        if captured.text:
            sys.stderr.write(captured.text)
        _embedded = False
    else:
        use_gpu = local_gpus() > 0 if cfg.ray.use_gpu is None else cfg.ray.use_gpu
        n_actors = cfg.ray.actors or (local_gpus() if use_gpu else 1)
        num_cpus = None if use_gpu else max(1, math.ceil(n_actors * cfg.ray.num_cpus_per_actor))
        log.info("starting an embedded local Ray (%s CPUs)", num_cpus or "all")
        ray.init(num_cpus=num_cpus, include_dashboard=False,
                 object_store_memory=cfg.ray.object_store_memory or 128 * 1024**2, **quiet)
        _embedded = True
    return True


def local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        return 0


def actor_count(cfg: SearchConfig, *, use_gpu: bool, gpus: int, cpus: float, embedded: bool) -> int:
    """How many actors a search starts (pure: ``plan_actors`` feeds it the cluster, ``evomerge check`` this machine).

    Default (``ray.actors`` unset): one actor per GPU; on CPU, one per
    ``ray.num_cpus_per_actor`` CPUs of a *joined* cluster (every node's CPUs count: the
    point of joining one is to use it), but 1 for the embedded local Ray, because each
    CPU actor holds its own copy of the models and a laptop has the memory for one.
    """
    if cfg.ray.actors:
        return cfg.ray.actors
    if use_gpu:
        return max(1, gpus)
    if embedded:
        return 1
    return max(1, int(cpus // cfg.ray.num_cpus_per_actor))


def plan_actors(cfg: SearchConfig) -> tuple[int, bool]:
    """(number of actors, on GPU?) for the connected cluster (``actor_count`` of its resources)."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    use_gpu = gpus > 0 if cfg.ray.use_gpu is None else cfg.ray.use_gpu
    if use_gpu and gpus == 0:
        raise EvomergeError("ray.use_gpu is true but the Ray cluster has no GPU; set ray.use_gpu: false")
    count = actor_count(cfg, use_gpu=use_gpu, gpus=gpus, cpus=float(resources.get("CPU", 0)), embedded=_embedded)
    return count, use_gpu


def can_host_actor(cfg: SearchConfig, use_gpu: bool) -> bool:
    """Whether any alive node of the cluster has the resources of one actor (free or not).

    Why total, not available: a node whose actors are busy can still host them when they
    restart; what the search must wait for is a node that *could* ever host one.
    """
    import ray

    need_cpu = min(1.0, cfg.ray.num_cpus_per_actor) if use_gpu else cfg.ray.num_cpus_per_actor
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = node.get("Resources") or {}
        if float(res.get("CPU", 0)) >= need_cpu and (not use_gpu or float(res.get("GPU", 0)) >= 1):
            return True
    return False


def ray_error_line(err: BaseException) -> str:
    """A Ray exception as ``Type: message`` on one line, for the log and the console."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}"
