"""The search's hot path: merge recipe after recipe into one live model, in place.

``InPlaceMerger`` computes the task vectors once per actor and keeps them resident (device
or pinned host memory); ``apply`` does no disk I/O, reuses one scratch workspace (no
per-candidate allocations), and copies into the live parameters under ``torch.no_grad``.
When they do not fit (:mod:`evomerge.merge.memory_plan`), the ``streaming`` residency
keeps no copy and reads each tensor's base and sources from the memory-mapped files
during ``apply`` instead. Either way it feeds ``methods.merge_tensor`` exactly what the
folder writer (:mod:`evomerge.merge.materialise`) feeds it - the base and the deltas in
compute dtype (both read by :func:`evomerge.merge.inputs.read_inputs`), the plan of
:func:`evomerge.merge.validate.plan_group`, the recipe seed and the tensor name - so a
folder written later holds bit for bit what the search scored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from evomerge.errors import ConfigError, RecipeError, SourceError
from evomerge.merge.dtypes import FLOATS, dtype_name, torch_dtype
from evomerge.merge.family import USES_SORTED_MAGNITUDES
from evomerge.merge.groups import TensorGroup
from evomerge.merge.inputs import read_inputs
from evomerge.merge.memory_plan import (CPU_MODES, GPU_MODES, ModelSizes, Residency, available_memory,
                                        choose_residency, plan_mode)
from evomerge.merge.recipe import MergeRecipe
from evomerge.merge.validate import GroupPlan, plan_group, source_indices

if TYPE_CHECKING:
    import torch

    from evomerge.merge.sources import ModelSet


@dataclass
class _Entry:
    name: str
    group: TensorGroup
    target: "torch.Tensor"  # the live parameter's data
    base: "torch.Tensor | None"  # compute dtype, on the store (device or host); None when streaming
    deltas: "torch.Tensor | None"  # (N, *shape), compute dtype, on the store; None when streaming
    prepared: Any = None  # scratch.PreparedDeltas, built on first use by a rank-based method
    l1: dict = field(default_factory=dict)  # source index -> |delta|.sum(), for fused DARE rescaling


class InPlaceMerger:
    """Writes merges of one fixed model set into one live model, many times over.

    Built once per actor: reads every source once, keeps ``source - base`` (compute dtype)
    resident on ``device`` (or in pinned host memory with ``task_vectors_on="host"``, for
    models whose task vectors do not fit next to the live model), then ``apply`` merges
    without touching the disk. Tied parameters (lm_head sharing the embedding) are written
    once. ``setup_s`` is the time the precomputation took.

    Speed (none of it changes a bit of the result): scratch memory is reused across
    candidates (a ``scratch.Workspace``); with ``presort`` (default: on when merging on
    CPU) each task vector's magnitude rank order is kept (``scratch.PreparedDeltas``),
    built the first time a rank-based method (``family.USES_SORTED_MAGNITUDES``) merges
    that tensor, so TIES / breadcrumbs window edges are lookups - this doubles
    task-vector memory for those tensors (int32 per float32 element) and makes the first
    such merge slow (a sort: ~80 s for 3 x 297M elements on one core); ``presort=False``
    turns it off. ``threads``: torch intra-op threads while
    merging (default: leave torch's setting); on a busy CPU 1 thread can be several
    times faster than OpenMP's fork/join over shared cores.

    ``fused``: merge task_arithmetic / TIES / breadcrumbs tensors with the compiled
    one-pass kernel of :mod:`evomerge.merge.fused` (same bits, several times faster; the
    first candidate pays the compile). Default: on when merging on CPU in float32/64 a
    model set with at least ``FUSED_AUTO_MIN_ELEMENTS`` task-vector elements, where the
    compile pays for itself within a few dozen candidates. Not yet the default on GPU:
    its Triton path has not been measured.

    ``residency`` (see :mod:`evomerge.merge.memory_plan`): ``"resident_sorted"``,
    ``"resident"``, ``"host"`` (GPU only), ``"streaming"`` (no base or task-vector copy:
    ``apply`` reads each tensor from the memory-mapped files; same bits, slower), or
    ``"auto"`` (the fastest that fits ``memory_cap_bytes``, else the memory free now).
    None (the default) keeps the older arguments' meaning: ``task_vectors_on`` and
    ``presort`` pick the mode. An explicit mode that contradicts them is refused in one
    line. With ``memory_cap_bytes`` (or ``"auto"``) the plan is checked before a tensor is
    read, and a plan that does not fit is a one-line ``MemoryPlanError``; ``headroom_bytes``
    is the memory the plan keeps free for evaluation. ``residency`` (attribute): the mode
    in use; ``plan``: its :class:`~evomerge.merge.memory_plan.Residency`; ``resident_bytes()``:
    what the merger holds now, against ``planned_resident_bytes()``.
    """

    def __init__(self, model: "torch.nn.Module", model_set: "ModelSet", *, device: "str | torch.device",
                 compute_dtype: "str | torch.dtype" = "float32", task_vectors_on: str = "device",
                 presort: bool | None = None, threads: int | None = None, fused: bool | None = None,
                 residency: str | None = None, memory_cap_bytes: int | None = None,
                 headroom_bytes: int = 0) -> None:
        import torch

        from evomerge.merge import scratch

        t0 = time.perf_counter()
        if threads is not None and threads < 1:
            raise ConfigError(f"threads={threads}; use a positive number of merge threads or None")
        if task_vectors_on not in ("device", "host"):
            raise ConfigError(f"task_vectors_on={task_vectors_on!r}; use 'device' or 'host'")
        self.model_set = model_set
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # "cuda" -> "cuda:0", as parameters report
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.compute_dtype = torch_dtype(compute_dtype)
        self.threads = threads
        mode = _residency_mode(residency, task_vectors_on, presort, self.device.type)
        # the plan, from headers only: checked (when asked) before a single tensor is read
        live_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), self.compute_dtype)
        sizes = ModelSizes.from_model_set(model_set, live_dtype=live_dtype, compute_dtype=self.compute_dtype)
        self.plan = self._plan(sizes, mode, memory_cap_bytes, headroom_bytes, model)
        self.residency = self.plan.mode
        self.presort = self.residency == "resident_sorted" or (self.residency == "host" and bool(presort))
        self.task_vectors_on = "host" if self.residency == "host" else task_vectors_on if residency is None \
            else "device"
        self._workspace = scratch.Workspace()
        streaming = self.residency == "streaming"
        store = torch.device("cpu") if self.task_vectors_on == "host" else self.device
        pin = store.type == "cpu" and self.device.type == "cuda"
        live = model.state_dict(keep_vars=True)  # tied names both present, sharing storage
        claimed: dict[int, str] = {}
        zeros: dict[tuple[int, ...], torch.Tensor] = {}
        self._entries: list[_Entry] = []
        with torch.no_grad():
            for name in model_set.tensor_names:
                target = live.get(name)
                if target is None:
                    raise SourceError(f"the live model has no parameter {name!r} that {model_set.reference.ref} "
                                      f"has; build it from the same architecture and config")
                target = target.data
                if tuple(target.shape) != tuple(model_set.reference.shape(name)):
                    raise SourceError(f"the live model's {name!r} has shape {list(target.shape)}, the models have "
                                      f"{list(model_set.reference.shape(name))}; build it from the same config")
                if target.device != self.device:
                    raise SourceError(f"the live model's {name!r} is on {target.device}, not {self.device}; "
                                      f"move the model to the merge device first")
                if target.data_ptr() in claimed:  # tied to a tensor already written
                    continue
                claimed[target.data_ptr()] = name
                if model_set.reference.dtype(name) not in FLOATS:
                    continue  # integer buffers are not merged; the live model keeps the base's
                if streaming:  # read during apply, from the files
                    self._entries.append(_Entry(name, model_set.groups[name], target, None, None))
                    continue
                # a zero base (no base model) is shared by every tensor of its shape, pinned once
                base, deltas = read_inputs(model_set, name, model_set.sources, self.compute_dtype, store, zeros=zeros)
                if pin:
                    deltas = deltas.pin_memory()
                    if not base.is_pinned():
                        base = base.pin_memory()
                        if model_set.base is None:
                            zeros[tuple(target.shape)] = base
                self._entries.append(_Entry(name, model_set.groups[name], target, base, deltas))
        self._n_elements = sum(e.target.numel() for e in self._entries)
        self.fused = self._fused_default() if fused is None else bool(fused)
        written = set(claimed)
        for pname, p in model.named_parameters():
            if p.data_ptr() not in written:
                raise SourceError(f"the live model's parameter {pname!r} is in none of the models' files; "
                                  f"build the live model from the same architecture")
        self.setup_s = time.perf_counter() - t0

    def _plan(self, sizes: ModelSizes, mode: str, cap_bytes: int | None, headroom_bytes: int,
              model: "torch.nn.Module") -> Residency:
        """The plan of ``mode`` ("auto": the fastest that fits); checked against the cap, or
        against the memory free now when choosing, before a tensor is read."""
        device_type = self.device.type
        if mode == "auto":
            options = [plan_mode(sizes, m, device_type=device_type, headroom_bytes=headroom_bytes)
                       for m in (CPU_MODES if device_type == "cpu" else GPU_MODES)]
        else:
            options = [plan_mode(sizes, mode, device_type=device_type, headroom_bytes=headroom_bytes)]
        if cap_bytes is None and mode != "auto":
            return options[0]  # the caller planned (or asked for this mode): not measured again
        device_free, host_free = available_memory(self.device)  # the cap, when given, replaces the device's
        if cap_bytes is None:  # the live model is already allocated: free memory no longer holds it
            live = sum(p.numel() * p.element_size() for p in model.parameters())
            device_free += live
            host_free += live if device_type == "cpu" else 0
        return choose_residency(options, device_free=device_free, host_free=host_free, cap_bytes=cap_bytes,
                                mode="auto" if mode == "auto" else mode)

    def _fused_default(self) -> bool:
        import torch

        elements = len(self.model_set.sources) * self._n_elements
        return (self.device.type == "cpu" and self.compute_dtype in (torch.float32, torch.float64)
                and elements >= FUSED_AUTO_MIN_ELEMENTS)

    def task_vector_bytes(self) -> int:
        """Bytes of the resident task vectors (0 when streaming)."""
        return sum(e.deltas.numel() * e.deltas.element_size() for e in self._entries if e.deltas is not None)

    def prepared_bytes(self) -> int:
        """Memory held by magnitude orders (``presort``) and the reusable scratch."""
        return self._workspace.nbytes() + sum(e.prepared.nbytes() for e in self._entries if e.prepared is not None)

    def resident_bytes(self) -> int:
        """What the merger holds now besides the live model: base copies (a shared zero base
        once), task vectors, magnitude orders (built lazily) and the workspace."""
        bases = {e.base.data_ptr(): e.base.numel() * e.base.element_size() for e in self._entries
                 if e.base is not None}
        return sum(bases.values()) + self.task_vector_bytes() + self.prepared_bytes()

    def planned_resident_bytes(self) -> int:
        """The plan's figure for :meth:`resident_bytes` (its base copy, task vectors, orders
        and workspace); the plan is an upper bound for it once every tensor has merged."""
        return sum(self.plan.part(p) for p in ("base copy", "task vectors", "magnitude orders", "workspace"))

    def _prepared(self, e: _Entry, method: str) -> Any:
        if not self.presort or method not in USES_SORTED_MAGNITUDES:
            return None
        if e.prepared is None:
            import torch

            from evomerge.merge import scratch

            e.prepared = scratch.PreparedDeltas.build(e.deltas, workers=torch.get_num_threads())
            if e.deltas.is_pinned():
                e.prepared = e.prepared.pin_memory()
        return e.prepared

    def apply(self, recipe: MergeRecipe) -> dict[str, float]:
        """Merge ``recipe`` into the live model in place; returns ``{"merge_s", "tensors",
        "fused_tensors"}`` (how many went through the compiled kernel)."""
        import torch

        from evomerge.merge import methods

        t0 = time.perf_counter()
        if torch_dtype(recipe.compute_dtype) != self.compute_dtype:
            raise RecipeError(f"recipe compute_dtype {recipe.compute_dtype} differs from the merger's "
                              f"{dtype_name(self.compute_dtype)}; set merge.compute_dtype to match")
        idx = source_indices(recipe, self.model_set)
        select = None if idx == list(range(len(self.model_set.sources))) else torch.tensor(idx, device=self.device)
        out_dtype = torch_dtype(recipe.dtype)
        host = self.task_vectors_on == "host"
        streaming = self.residency == "streaming"
        picked = [self.model_set.sources[i] for i in idx]  # streaming reads only these, in recipe order
        keys = [recipe.group_for(e.group)[0] for e in self._entries]
        plans: dict[str, GroupPlan] = {}
        for key in keys:  # every group checked before the first write: a bad recipe leaves the model intact
            if key not in plans:
                plan = plans[key] = plan_group(recipe, key)
                methods.check_params(plan.method, plan.source_params, plan.params, f"recipe group {key!r}")
        threads = torch.get_num_threads()
        fused_count = 0
        try:
            if self.threads is not None:
                torch.set_num_threads(self.threads)
            with torch.no_grad():
                for e, key in zip(self._entries, keys):
                    plan = plans[key]
                    if streaming:  # this tensor's inputs, read into the workspace: nothing kept
                        base, deltas = read_inputs(self.model_set, e.name, picked, self.compute_dtype, self.device,
                                                   workspace=self._workspace)
                        prepared = None
                    else:
                        base, deltas = e.base, e.deltas
                        prepared = self._prepared(e, plan.method)
                    if host:
                        base = base.to(self.device, non_blocking=True)
                        deltas = deltas.to(self.device, non_blocking=True)
                        if prepared is not None:
                            prepared = prepared.to(self.device, non_blocking=True)
                    if select is not None and not streaming:
                        deltas = deltas.index_select(0, select)
                        if prepared is not None:
                            prepared = prepared.select(idx)
                    if self.fused and self._merge_fused(e, plan, base, deltas, prepared, idx, recipe.seed,
                                                        out_dtype):
                        fused_count += 1
                        continue
                    merged = methods.merge_tensor(plan.method, base, deltas, plan.source_params, plan.params,
                                          seed=recipe.seed, tensor_name=e.name, prepared=prepared,
                                          workspace=self._workspace, has_base=self.model_set.base is not None)
                    if out_dtype != e.target.dtype and out_dtype != merged.dtype:
                        merged = merged.to(out_dtype)  # round as the exported file would, then widen
                    e.target.copy_(merged)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        finally:
            if self.threads is not None:
                torch.set_num_threads(threads)
        return {"merge_s": time.perf_counter() - t0, "tensors": float(len(self._entries)),
                "fused_tensors": float(fused_count)}


    def _merge_fused(self, e: _Entry, plan: GroupPlan, base: "torch.Tensor", deltas: "torch.Tensor",
                     prepared: Any, sources: list[int], seed: int, out_dtype: "torch.dtype") -> bool:
        """One tensor through the compiled kernel, written straight into the live parameter;
        False (nothing written) when the kernel does not cover this case."""
        from evomerge.merge import fused, methods

        if plan.method not in fused.FUSED_METHODS:
            return False
        methods.check_source_count(plan.method, deltas.shape[0], e.name)
        kwargs = methods.method_arguments(plan.method, deltas.shape[0], plan.source_params, plan.params,
                                          seed=seed, tensor_name=e.name)
        call = fused.plan_call(plan.method, base, deltas, kwargs, prepared.orders if prepared else None)
        if call is None:
            return False
        round_to = out_dtype if out_dtype not in (e.target.dtype, self.compute_dtype) else None

        def l1_norm(i: int) -> "torch.Tensor":  # a constant of the task vector: summed once
            k = sources[i]
            if k not in e.l1:
                e.l1[k] = deltas[i].abs().sum()
            return e.l1[k]

        return fused.shared_merger().merge_into(e.target, call, round_to, l1_norm)


def _residency_mode(residency: str | None, task_vectors_on: str, presort: bool | None, device_type: str) -> str:
    """The mode ``InPlaceMerger`` runs in ("auto" still to be chosen), from its arguments.

    None: the older arguments decide, as they did before modes existed (``task_vectors_on="host"``
    is the host mode on a GPU and changes nothing on a CPU; presort defaults to on on CPUs).
    An explicit mode that the older arguments contradict is refused: silently preferring one
    would run a mode the caller's memory plan did not budget for.
    """
    if residency is None:
        if task_vectors_on == "host" and device_type == "cuda":
            return "host"
        return "resident_sorted" if (device_type == "cpu" if presort is None else presort) else "resident"
    modes = ("auto", *dict.fromkeys(CPU_MODES + GPU_MODES))
    if residency not in modes:
        raise ConfigError(f"residency={residency!r}; use one of {', '.join(modes)}")
    if residency == "host" and device_type == "cpu":
        raise ConfigError("residency='host' keeps task vectors in pinned host memory for a GPU merge; "
                          "on a CPU use resident or streaming")
    if task_vectors_on == "host" and residency != "host":
        raise ConfigError(f"residency={residency!r} contradicts task_vectors_on='host'; pass only residency")
    if presort is not None and (residency == "auto" or (presort != (residency == "resident_sorted")
                                                        and residency != "host")):
        raise ConfigError(f"residency={residency!r} contradicts presort={presort}; pass only residency "
                          f"(resident_sorted keeps the magnitude orders, the other modes do not)")
    return residency


#: Task-vector elements (all sources) from which ``InPlaceMerger`` fuses by default.
FUSED_AUTO_MIN_ELEMENTS = 2**24
