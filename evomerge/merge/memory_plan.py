"""How much memory one merging actor needs in each residency mode, from safetensors headers only.

Why: the most reported failure of evolutionary merging tools is an out-of-memory crash
after minutes of loading. Every byte the in-place merger (:mod:`evomerge.merge.inplace`)
will hold is known from the tensor shapes and dtypes before a weight is read, so the
choice between keeping task vectors resident (fast) and streaming them from the
memory-mapped files per merge (small) is made up front, and a machine that cannot hold
even the smallest plan is refused in one line naming the fix.

The modes, fastest first:

- ``resident_sorted``: base copy + task vectors ``source - base`` (compute dtype) + each
  task vector's magnitude rank order (int32 per element) resident; TIES-like windows are
  lookups. The CPU default when it fits (the GPU keeps presort off: sorting is its
  bottleneck less than memory is).
- ``resident``: base copy + task vectors resident, no orders.
- ``host`` (GPU only): base copy + task vectors in pinned host memory, copied to the GPU
  tensor by tensor and merged there.
- ``streaming``: no copy at all. Per tensor, base and sources are read from the
  memory-mapped files, the deltas built in compute dtype and merged into the live model:
  the same inputs as the resident path, so the same bits.

What is counted (one actor): the live model (its dtype, on the device), the base copy and
task vectors where the mode keeps them, the orders, the merge workspace
(:class:`evomerge.merge.scratch.Workspace`: one buffer per slot grown to the largest
tensor; see :func:`workspace_bytes`), a bound on one tensor's fresh temporaries, and the
evaluator headroom the caller passes. Not counted: pages of the memory-mapped source files
(clean page cache, which the kernel reclaims under pressure), torch's own runtime, and the
small non-floating buffers. Pure: no torch is needed to compute a plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

from evomerge.errors import MemoryPlanError
from evomerge.merge.dtypes import FLOATS, ITEMSIZE

if TYPE_CHECKING:
    import torch

    from evomerge.merge.sources import ModelSet

#: Bytes in the GB figures this module prints (what ``ray.actor_memory_gb`` is read as).
GB = 1024**3
#: Every mode, fastest first (which apply depends on the device; see :func:`residency_options`).
MODES = ("resident_sorted", "resident", "host", "streaming")
#: Modes for a CPU and for a GPU actor, fastest first.
CPU_MODES = ("resident_sorted", "resident", "streaming")
GPU_MODES = ("resident", "host", "streaming")
#: Fresh (non-workspace) temporaries of one tensor's eager merge, bytes per element of the
#: largest tensor: della's int64 argsort order and int64 ranks alive together (16), its
#: float32 probabilities and uniforms (8); slerp and the Bernoulli masks of DARE need less.
TRANSIENT_BYTES_PER_ELEMENT = 24
#: Workspace slots of one eager TIES-like merge, in elements of the tensor, besides the
#: N-source "weighted" slot: mixed, total, sign, divisor, agree (gta.combine) + mag, keep,
#: keep2 (sparsify); plus one bool "zero" slot. A weighted-sum merge needs fewer (6).
_WORKSPACE_SLOTS = 8


def _itemsize(dtype: "str | torch.dtype") -> int:
    name = str(dtype).removeprefix("torch.")
    if name not in ITEMSIZE:
        raise MemoryPlanError(f"unknown dtype {dtype!r} for the memory plan; use one of {', '.join(sorted(FLOATS))}")
    return ITEMSIZE[name]


@dataclass(frozen=True)
class ModelSizes:
    """The numbers of one model set that decide every mode's memory (read from headers only).

    ``elements``: floating-point elements of one model (tensors as the files list them; a
    tied lm_head the live model shares is counted once only when the files omit it);
    ``largest``: elements of its largest floating tensor; ``sources``: task vectors;
    ``zero_elements``: the elements of one zero tensor per distinct shape (the base the merger
    keeps when there is no base model); ``source_itemsize``: widest item in the files.
    """

    elements: int
    largest: int
    sources: int
    has_base: bool
    live_itemsize: int
    compute_itemsize: int
    source_itemsize: int = 4
    zero_elements: int = 0

    @classmethod
    def from_model_set(cls, model_set: "ModelSet", *, live_dtype: "str | torch.dtype",
                       compute_dtype: "str | torch.dtype") -> "ModelSizes":
        """The sizes of ``model_set`` merged into a live model of ``live_dtype`` in ``compute_dtype``."""
        ref = model_set.reference
        elements = largest = 0
        shapes: set[tuple[int, ...]] = set()
        widest = 1
        for name in model_set.tensor_names:
            if ref.dtype(name) not in FLOATS:
                continue
            shape = tuple(ref.shape(name))
            numel = math.prod(shape)
            elements += numel
            largest = max(largest, numel)
            shapes.add(shape)
            widest = max([widest] + [ITEMSIZE[m.dtype(name)] for m in model_set.models])
        return cls(elements=elements, largest=largest, sources=len(model_set.sources),
                   has_base=model_set.base is not None, live_itemsize=_itemsize(live_dtype),
                   compute_itemsize=_itemsize(compute_dtype), source_itemsize=widest,
                   zero_elements=sum(math.prod(s) for s in shapes))


def workspace_bytes(sizes: ModelSizes) -> int:
    """The merge workspace after a model is merged: ``(8 + N)`` compute-dtype buffers plus
    one bool buffer of the largest tensor (the TIES-like worst case; tests check it is what
    :class:`~evomerge.merge.scratch.Workspace` reaches)."""
    return (_WORKSPACE_SLOTS + sizes.sources) * sizes.largest * sizes.compute_itemsize + sizes.largest


def input_bytes(sizes: ModelSizes) -> int:
    """One tensor's base + N deltas in compute dtype: the buffers a streaming merge reads
    into (kept in the workspace) and the copies a host-mode merge moves to the GPU."""
    return (sizes.sources + 1) * sizes.largest * sizes.compute_itemsize


def transient_bytes(sizes: ModelSizes) -> int:
    """A bound on one tensor's fresh temporaries: the eager methods' own allocations, or the
    fused kernel's per-source rescale buffer (a tensor takes one path or the other)."""
    return sizes.largest * max(TRANSIENT_BYTES_PER_ELEMENT, sizes.sources * sizes.compute_itemsize)


@dataclass(frozen=True)
class Residency:
    """One residency mode's memory for one actor: bytes on the device and in host memory.

    On a CPU the device is host memory: everything is in ``device_bytes``, ``host_bytes`` is 0.
    ``parts``: (what, bytes) in the order :meth:`describe` lists them.
    """

    mode: str
    device_type: str
    device_bytes: int
    host_bytes: int
    parts: tuple[tuple[str, int], ...] = ()

    @property
    def total_bytes(self) -> int:
        return self.device_bytes + self.host_bytes

    def part(self, what: str) -> int:
        """Bytes of one part ("live model", "base copy", "task vectors", ...); 0 when absent."""
        return sum(b for name, b in self.parts if name == what)

    def describe(self) -> str:
        """One line: ``resident: 12.3 GB on cpu (live model 3.1 + base copy 3.1 + ...)``."""
        inner = " + ".join(f"{name} {b / GB:.2f}" for name, b in self.parts if b)
        where = f"{self.device_bytes / GB:.2f} GB on {self.device_type}"
        if self.device_type != "cpu":
            where += f" + {self.host_bytes / GB:.2f} GB host"
        return f"{self.mode}: {where} ({inner})"


def plan_mode(sizes: ModelSizes, mode: str, *, device_type: str, headroom_bytes: int = 0) -> Residency:
    """``mode``'s :class:`Residency` for one actor on ``device_type`` ("cpu" or "cuda")."""
    device_type = _device_type(device_type)
    if mode not in MODES:
        raise MemoryPlanError(f"memory mode {mode!r} is unknown; use auto or one of {', '.join(MODES)}")
    if mode == "host" and device_type == "cpu":
        raise MemoryPlanError("memory mode 'host' keeps task vectors in host memory for a GPU merge; "
                              "on a CPU use resident or streaming")
    n, p, c = sizes.sources, sizes.elements, sizes.compute_itemsize
    live = p * sizes.live_itemsize
    base = (p if sizes.has_base else sizes.zero_elements) * c
    vectors = n * p * c
    orders = n * p * (4 if sizes.largest < 2**31 else 8)
    work = workspace_bytes(sizes)
    temp = transient_bytes(sizes)
    dev: list[tuple[str, int]] = [("live model", live)]
    host: list[tuple[str, int]] = []
    if mode in ("resident_sorted", "resident"):
        dev += [("base copy", base), ("task vectors", vectors)]
        if mode == "resident_sorted":
            dev.append(("magnitude orders", orders))
        dev.append(("workspace", work))
    elif mode == "host":
        host += [("base copy", base), ("task vectors", vectors)]
        dev += [("workspace", work), ("transfers", input_bytes(sizes))]
    else:  # streaming: the inputs live in the workspace; the files' reads are one tensor each
        dev.append(("workspace", work + input_bytes(sizes)))
        (dev if device_type == "cpu" else host).append(("reads", 2 * sizes.largest * sizes.source_itemsize))
    dev += [("temporaries", temp), ("headroom", int(headroom_bytes))]
    if device_type == "cpu":
        dev, host = dev + host, []
    return Residency(mode=mode, device_type=device_type, device_bytes=sum(b for _, b in dev),
                     host_bytes=sum(b for _, b in host), parts=tuple(dev + host))


def path_residency(sizes: ModelSizes, *, device_type: str, headroom_bytes: int = 0) -> Residency:
    """A data-flow actor's memory: every source loaded once (layers are shared by reference
    between candidate paths, so a path adds nothing), plus the evaluation headroom."""
    device_type = _device_type(device_type)
    models = sizes.sources * sizes.elements * sizes.live_itemsize
    parts = (("models", models), ("headroom", int(headroom_bytes)))
    return Residency(mode="paths", device_type=device_type, device_bytes=models + int(headroom_bytes),
                     host_bytes=0, parts=parts)


def residency_options(sizes: ModelSizes, *, device_type: str, headroom_bytes: int) -> list[Residency]:
    """Every mode ``device_type`` offers, fastest first (CPU: resident_sorted, resident,
    streaming; GPU: resident, host, streaming - presort stays off on GPUs by default)."""
    device_type = _device_type(device_type)
    modes = CPU_MODES if device_type == "cpu" else GPU_MODES
    return [plan_mode(sizes, m, device_type=device_type, headroom_bytes=headroom_bytes) for m in modes]


def _device_type(device: "str | torch.device") -> str:
    kind = str(getattr(device, "type", device)).split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise MemoryPlanError(f"device {device!r}: the memory plan knows cpu and cuda")
    return kind


def _meminfo_available(path: str = "/proc/meminfo") -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_available() -> int | None:
    """What the cgroup (v2) still allows this process, when it sets a limit (containers,
    where MemAvailable reports the whole machine)."""
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        return max(0, int(limit) - used)
    except (OSError, ValueError):
        return None


def host_available() -> int:
    """Host memory a new allocation can get: MemAvailable, capped by the cgroup's limit."""
    found = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    if not found:
        import psutil  # Ray installs it; only reached off Linux

        found = [int(psutil.virtual_memory().available)]
    return min(found)


def available_memory(device: "str | torch.device") -> tuple[int, int]:
    """(device free bytes, host free bytes) now; on a CPU both are the host's."""
    host = host_available()
    if _device_type(device) == "cpu":
        return host, host
    import torch

    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return int(free), host


def _fits(r: Residency, device_free: int, host_free: int) -> bool:
    if r.device_type == "cpu":
        return r.total_bytes <= device_free
    return r.device_bytes <= device_free and r.host_bytes <= host_free


def choose_residency(options: Sequence[Residency], *, device_free: int, host_free: int,
                     cap_bytes: int | None = None, mode: str = "auto") -> Residency:
    """The fastest of ``options`` (fastest first) that fits, or ``mode``'s when forced.

    ``cap_bytes`` (e.g. ``ray.actor_memory_gb``) replaces the measured free memory of the
    device (host memory on a CPU; the GPU's memory on a GPU actor). When nothing fits (or
    the forced mode does not): a one-line :class:`MemoryPlanError` with the sizes and the fixes.
    """
    if not options:
        raise MemoryPlanError("no memory plan to choose from")
    if cap_bytes is not None:
        device_free = int(cap_bytes)
        if options[0].device_type == "cpu":
            host_free = int(cap_bytes)
    if mode != "auto":
        picked = [r for r in options if r.mode == mode]
        if not picked:
            raise MemoryPlanError(f"memory mode {mode!r} is not one of this {options[0].device_type} actor's "
                                  f"({', '.join(r.mode for r in options)}); choose one of them or auto")
        candidates: Iterable[Residency] = picked
    else:
        candidates = options
    for r in candidates:
        if _fits(r, device_free, host_free):
            return r
    smallest = min(candidates, key=lambda r: (r.device_bytes, r.host_bytes))
    what = "the smallest memory plan" if mode == "auto" else "memory mode"
    if smallest.device_type == "cpu" or smallest.device_bytes > device_free:
        need, have, where = (smallest.total_bytes if smallest.device_type == "cpu" else smallest.device_bytes,
                             device_free, smallest.device_type if smallest.device_type == "cpu" else "the GPU")
    else:
        need, have, where = smallest.host_bytes, host_free, "host memory"
    have_text = (f"the ray.actor_memory_gb cap allows {have / GB:.2f} GB" if cap_bytes is not None and where != "host memory"
                 else f"{have / GB:.2f} GB is free")
    raise MemoryPlanError(
        f"{what} ({smallest.mode}) needs {need / GB:.2f} GB on {where} but {have_text}; use a bigger machine or GPU, raise ray.actor_memory_gb, merge fewer sources, or set "
        f"merge.compute_dtype to bfloat16 or float16")
