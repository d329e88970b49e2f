"""The search's hot path: merge recipe after recipe into one live model, in place.

``InPlaceMerger`` computes the task vectors once per actor and keeps them resident (device
or pinned host memory); ``apply`` does no disk I/O, reuses one scratch workspace (no
per-candidate allocations), and copies into the live parameters under ``torch.no_grad``.
It feeds ``methods.merge_tensor`` exactly what the folder writer
(:mod:`evomerge.merge.materialise`) feeds it - the base and the deltas in compute dtype,
the plan of :func:`evomerge.merge.validate.plan_group`, the recipe seed and the tensor
name - so a folder written later holds bit for bit what the search scored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from evomerge.errors import ConfigError, RecipeError, SourceError
from evomerge.merge.dtypes import FLOATS, dtype_name, torch_dtype
from evomerge.merge.family import USES_SORTED_MAGNITUDES
from evomerge.merge.groups import TensorGroup
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
    base: "torch.Tensor"  # compute dtype, on the store (device or host)
    deltas: "torch.Tensor"  # (N, *shape), compute dtype, on the store
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
    """

    def __init__(self, model: "torch.nn.Module", model_set: "ModelSet", *, device: "str | torch.device",
                 compute_dtype: "str | torch.dtype" = "float32", task_vectors_on: str = "device",
                 presort: bool | None = None, threads: int | None = None, fused: bool | None = None) -> None:
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
        self.task_vectors_on = task_vectors_on
        self.presort = (self.device.type == "cpu") if presort is None else bool(presort)
        self.threads = threads
        self._workspace = scratch.Workspace()
        store = self.device if task_vectors_on == "device" else torch.device("cpu")
        pin = store.type == "cpu" and self.device.type == "cuda"
        live = model.state_dict(keep_vars=True)  # tied names both present, sharing storage
        n = len(model_set.sources)
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
                shape = tuple(target.shape)
                if model_set.base is not None:
                    base = model_set.base.get_tensor(name).to(store, self.compute_dtype)
                else:
                    if shape not in zeros:
                        zeros[shape] = torch.zeros(shape, dtype=self.compute_dtype, device=store, pin_memory=pin)
                    base = zeros[shape]  # shared by every tensor of this shape (pinned once)
                deltas = torch.empty((n, *shape), dtype=self.compute_dtype, device=store)
                for i, src in enumerate(model_set.sources):
                    deltas[i].copy_(src.get_tensor(name))
                    if model_set.base is not None:
                        deltas[i].sub_(base)
                if pin:
                    deltas = deltas.pin_memory()
                    if model_set.base is not None:
                        base = base.pin_memory()
                self._entries.append(_Entry(name, model_set.groups[name], target, base, deltas))
        self.fused = self._fused_default() if fused is None else bool(fused)
        written = set(claimed)
        for pname, p in model.named_parameters():
            if p.data_ptr() not in written:
                raise SourceError(f"the live model's parameter {pname!r} is in none of the models' files; "
                                  f"build the live model from the same architecture")
        self.setup_s = time.perf_counter() - t0

    def _fused_default(self) -> bool:
        import torch

        elements = sum(e.deltas.numel() for e in self._entries)
        return (self.device.type == "cpu" and self.compute_dtype in (torch.float32, torch.float64)
                and elements >= FUSED_AUTO_MIN_ELEMENTS)

    def task_vector_bytes(self) -> int:
        return sum(e.deltas.numel() * e.deltas.element_size() for e in self._entries)

    def prepared_bytes(self) -> int:
        """Memory held by magnitude orders (``presort``) and the reusable scratch."""
        return self._workspace.nbytes() + sum(e.prepared.nbytes() for e in self._entries if e.prepared is not None)

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
                    base, deltas = e.base, e.deltas
                    prepared = self._prepared(e, plan.method)
                    if host:
                        base = base.to(self.device, non_blocking=True)
                        deltas = deltas.to(self.device, non_blocking=True)
                        if prepared is not None:
                            prepared = prepared.to(self.device, non_blocking=True)
                    if select is not None:
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


#: Task-vector elements (all sources) from which ``InPlaceMerger`` fuses by default.
FUSED_AUTO_MIN_ELEMENTS = 2**24
