"""Recipe -> weights: in place into a live model (the search), or streamed to a HF folder (export).

Both paths feed ``evomerge.merge.methods.merge_tensor`` exactly the same inputs for every
tensor: the base in compute dtype, the stacked deltas ``source_i - base`` computed in
compute dtype, the per-source parameters as 1-D tensors in the recipe's source order,
the method-level parameters with defaults filled, the recipe seed and the tensor name.
So a folder written by ``merge_to_folder`` holds bit for bit what the search scored.

``InPlaceMerger`` is the hot path of the search: task vectors are computed once per actor
and kept resident (device or pinned host memory); ``apply`` does no disk I/O, reuses one
scratch workspace (no per-candidate allocations), and copies into the live parameters under
``torch.no_grad``. ``merge_to_folder`` plans the shards from the tensor shapes up front
and streams each merged tensor straight into its shard file, so memory stays at about
one tensor per source however large the model is.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from evomerge.errors import ConfigError, EvomergeError, RecipeError, SourceError, read_utf8
from evomerge.merge.groups import TensorGroup
from evomerge.merge.recipe import MergeRecipe

if TYPE_CHECKING:
    import argparse

    import torch

    from evomerge.sources import ModelSet

log = logging.getLogger(__name__)

OUTPUT_DTYPES = ("float32", "bfloat16", "float16")
COMPUTE_DTYPES = ("float32", "float64", "bfloat16", "float16")
#: torch dtype name -> safetensors header code.
_ST_CODE = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
            "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
            "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}
_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
             "int8": 1, "uint8": 1, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1}
_FLOATS = {"float64", "float32", "float16", "bfloat16"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json")
SAFE_INDEX = "model.safetensors.index.json"
_WEIGHT_FILE = re.compile(r"^(model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|"
                          r"pytorch_model(-\d{5}-of-\d{5})?\.bin|pytorch_model\.bin\.index\.json)$")


def _methods():
    """The merge-method registry, imported late (and so replaceable in tests)."""
    import evomerge.merge.methods as methods

    return methods


def _torch_dtype(name: "str | torch.dtype") -> "torch.dtype":
    import torch

    if isinstance(name, torch.dtype):
        return name
    dt = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise RecipeError(f"unknown dtype {name!r}; use one of {', '.join(COMPUTE_DTYPES)}")
    return dt


def _dtype_name(dt: "str | torch.dtype") -> str:
    return str(dt).removeprefix("torch.")


# -- recipe validation ---------------------------------------------------------------------
@dataclass(frozen=True)
class GroupPlan:
    """What ``merge_tensor`` gets for every tensor of one recipe group (params with defaults)."""

    method: str
    params: dict[str, Any]
    #: param -> one Python float per recipe source, in recipe order. Floats, not float32 tensors:
    #: density counts are int(density * numel), and float32 rounding of 0.7 would change them.
    source_params: dict[str, list[float]]


def plan_group(recipe: MergeRecipe, key: str) -> GroupPlan:
    """Fill a group's parameters with the method's defaults; a missing required value is an error."""
    grp = recipe.groups[key]
    method = _methods().get_method(grp.method)
    params = {**dict(method.params), **grp.params}
    names = list(method.source_params) + sorted(
        {p for sp in grp.source_params.values() for p in sp} - set(method.source_params))
    sp: dict[str, list[float]] = {}
    for p in names:
        default = method.source_params.get(p)
        values = []
        for src in recipe.sources:
            v = grp.source_params.get(src, {}).get(p, default)
            if v is None:
                raise RecipeError(f"recipe group {key!r}: model {src} has no {p!r} for method {grp.method}; "
                                  f"add it to source_params")
            values.append(float(v))
        sp[p] = values
    return GroupPlan(grp.method, params, sp)


def _lookup_keys(model_set: "ModelSet") -> set[str]:
    """Every recipe key some tensor of the model would look up (plus kind keys always)."""
    keys = {"default", "embed", "final_norm", "lm_head"}
    for g in model_set.groups.values():
        if g.kind == "layer":
            keys.add(f"layers.{g.layer}")
            keys.update(f"layers.{g.layer}.{p}" for p in ("attn", "mlp", "norm"))
    return keys


def _source_indices(recipe: MergeRecipe, model_set: "ModelSet") -> list[int]:
    """Index in ``model_set.sources`` of each recipe source; one-line error for a stranger."""
    if (recipe.base is None) != (model_set.base is None):
        have = model_set.base.ref if model_set.base is not None else "none"
        raise RecipeError(f"recipe base is {recipe.base or 'none'} but the loaded models' base is {have}; "
                          f"use a recipe made for these models")
    if recipe.base is not None and model_set.by_ref(recipe.base) is not model_set.base:
        raise RecipeError(f"recipe base {recipe.base} is not the loaded base {model_set.base.ref}")
    out = []
    for ref in recipe.sources:
        hit = [i for i, s in enumerate(model_set.sources) if s.ref == ref]
        if not hit:
            try:
                m = model_set.by_ref(ref)
            except SourceError:
                m = None
            hit = [i for i, s in enumerate(model_set.sources) if s is m]
        if not hit:
            known = ", ".join(s.ref for s in model_set.sources)
            raise RecipeError(f"recipe names model {ref}, which is not a source (sources: {known}); "
                              f"name models exactly as in models.sources")
        out.append(hit[0])
    if len(set(out)) != len(out):
        raise RecipeError("recipe lists the same source model twice; list each source once")
    return out


def validate_recipe(recipe: MergeRecipe, model_set: "ModelSet") -> None:
    """Check a recipe against the loaded models before any work; the first problem is one line."""
    methods = _methods()
    _source_indices(recipe, model_set)
    if recipe.dtype not in OUTPUT_DTYPES:
        raise RecipeError(f"recipe dtype {recipe.dtype!r} is not supported; use one of {', '.join(OUTPUT_DTYPES)}")
    if recipe.compute_dtype not in COMPUTE_DTYPES:
        raise RecipeError(f"recipe compute_dtype {recipe.compute_dtype!r} is not supported; use one of "
                          f"{', '.join(COMPUTE_DTYPES)}")
    valid = _lookup_keys(model_set)
    for key in recipe.groups:
        if key not in valid:
            raise RecipeError(f"recipe group {key!r} matches no tensor of the model ({model_set.num_layers} layers: "
                              f"layers.0 .. layers.{model_set.num_layers - 1}); fix or remove it")
    seen: set[str] = set()
    for group in model_set.groups.values():
        key, _ = recipe.group_for(group)  # no 'default' and a group uncovered -> RecipeError
        seen.add(key)
    for key, grp in recipe.groups.items():
        where = f"recipe group {key!r}"
        methods.check_methods_usable([grp.method], n_sources=len(recipe.sources), has_base=recipe.base is not None,
                                     where=where)
        plan = plan_group(recipe, key)
        methods.check_params(methods.get_method(grp.method), plan.source_params, plan.params, where)


# -- in place: the search's hot path ---------------------------------------------------------
@dataclass
class _Entry:
    name: str
    group: TensorGroup
    target: "torch.Tensor"  # the live parameter's data
    base: "torch.Tensor"  # compute dtype, on the store (device or host)
    deltas: "torch.Tensor"  # (N, *shape), compute dtype, on the store
    prepared: Any = None  # methods.PreparedDeltas, built on first use by a rank-based method
    l1: dict = field(default_factory=dict)  # source index -> |delta|.sum(), for fused DARE rescaling


class InPlaceMerger:
    """Writes merges of one fixed model set into one live model, many times over.

    Built once per actor: reads every source once, keeps ``source - base`` (compute dtype)
    resident on ``device`` (or in pinned host memory with ``task_vectors_on="host"``, for
    models whose task vectors do not fit next to the live model), then ``apply`` merges
    without touching the disk. Tied parameters (lm_head sharing the embedding) are written
    once. ``setup_s`` is the time the precomputation took.

    Speed (none of it changes a bit of the result): scratch memory is reused across
    candidates (a ``methods.Workspace``); with ``presort`` (default: on when merging on
    CPU) each task vector's magnitude rank order is kept (``methods.PreparedDeltas``),
    built the first time a rank-based method (``methods.USES_SORTED_MAGNITUDES``) merges
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

        t0 = time.perf_counter()
        if threads is not None and threads < 1:
            raise ConfigError(f"threads={threads}; use a positive number of merge threads or None")
        if task_vectors_on not in ("device", "host"):
            raise ConfigError(f"task_vectors_on={task_vectors_on!r}; use 'device' or 'host'")
        self.model_set = model_set
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # "cuda" -> "cuda:0", as parameters report
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.compute_dtype = _torch_dtype(compute_dtype)
        self.task_vectors_on = task_vectors_on
        self.presort = (self.device.type == "cpu") if presort is None else bool(presort)
        self.threads = threads
        self._workspace = _methods().Workspace()
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
                if model_set.reference.dtype(name) not in _FLOATS:
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

    @property
    def num_tensors(self) -> int:
        return len(self._entries)

    def task_vector_bytes(self) -> int:
        return sum(e.deltas.numel() * e.deltas.element_size() for e in self._entries)

    def prepared_bytes(self) -> int:
        """Memory held by magnitude orders (``presort``) and the reusable scratch."""
        return self._workspace.nbytes() + sum(e.prepared.nbytes() for e in self._entries if e.prepared is not None)

    def _prepared(self, e: _Entry, method: str) -> Any:
        methods = _methods()
        if not self.presort or method not in methods.USES_SORTED_MAGNITUDES:
            return None
        if e.prepared is None:
            import torch

            e.prepared = methods.PreparedDeltas.build(e.deltas, workers=torch.get_num_threads())
            if e.deltas.is_pinned():
                e.prepared = e.prepared.pin_memory()
        return e.prepared

    def apply(self, recipe: MergeRecipe) -> dict[str, float]:
        """Merge ``recipe`` into the live model in place; returns ``{"merge_s", "tensors",
        "fused_tensors"}`` (how many went through the compiled kernel)."""
        import torch

        merge_tensor = _methods().merge_tensor
        t0 = time.perf_counter()
        if _torch_dtype(recipe.compute_dtype) != self.compute_dtype:
            raise RecipeError(f"recipe compute_dtype {recipe.compute_dtype} differs from the merger's "
                              f"{_dtype_name(self.compute_dtype)}; set merge.compute_dtype to match")
        idx = _source_indices(recipe, self.model_set)
        select = None if idx == list(range(len(self.model_set.sources))) else torch.tensor(idx, device=self.device)
        out_dtype = _torch_dtype(recipe.dtype)
        host = self.task_vectors_on == "host"
        methods = _methods()
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
                    merged = merge_tensor(plan.method, base, deltas, plan.source_params, plan.params,
                                          seed=recipe.seed, tensor_name=e.name, prepared=prepared,
                                          workspace=self._workspace)
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
        from evomerge.merge import fused

        if plan.method not in fused.FUSED_METHODS:
            return False
        methods = _methods()
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


# -- streamed to a folder --------------------------------------------------------------------
def parse_size(size: str | int) -> int:
    """'2GB' -> 2_000_000_000, '500MiB' -> 524_288_000 (as transformers reads max_shard_size)."""
    if isinstance(size, int) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(size), re.IGNORECASE)
    if not m:
        raise ConfigError(f"max_shard_size {size!r} is not a size; write e.g. 2GB, 500MB or 1GiB")
    unit = m.group(2).upper().rstrip("B")
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    value = float(m.group(1)) * ((1024 if unit.endswith("I") else 1000) ** power)
    if value < 1:
        raise ConfigError(f"max_shard_size {size!r} must be positive")
    return int(value)


@contextmanager
def _atomic_file(path: Path, mode: str = "wb") -> Iterator[Any]:
    """Write ``path`` via a temp file in the same folder, fsync, then rename over it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    f = open(tmp, mode)
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
    except BaseException:
        f.close()
        tmp.unlink(missing_ok=True)
        raise


def _write_json(path: Path, data: Any) -> None:
    with _atomic_file(path, "w") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _copy_file(src: Path, dst: Path) -> None:
    with open(src, "rb") as fin, _atomic_file(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_device(device: str) -> "torch.device":
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device {device!r} is not a torch device; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is visible; use --device cpu")
    return dev


#: what a streamed merge writes; a folder holding only these holds an earlier merge and may be rewritten
_MERGE_FILE = re.compile(r"^(config\.json|generation_config\.json|" + "|".join(re.escape(f) for f in TOKENIZER_FILES)
                         + r"|\..+\.tmp-\d+)$")


def _foreign_files(out: Path) -> list[str]:
    """Entries of ``out`` that no merge writes (their presence means the folder is someone else's)."""
    return sorted(p.name for p in out.iterdir()
                  if not (p.is_file() and (_WEIGHT_FILE.match(p.name) or _MERGE_FILE.match(p.name))))


def file_in_the_way(out: Path) -> Path | None:
    """The nearest existing path at or above ``out`` when it is a file (mkdir would fail deep inside)."""
    for parent in [out, *out.parents]:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def _check_out_dir(out: Path, model_set: "ModelSet") -> None:
    """--out must be a new folder, an empty one, or one holding an earlier merge (rewritten in place).

    A folder with anything else in it is refused: a merge would leave those files next to
    its weights (a stale adapter or README mixed into the new model), and export refuses the same.
    """
    blocker = file_in_the_way(out)
    if blocker is not None:
        raise ConfigError(f"--out {out}: {blocker} is a file, not a folder; pass a folder path")
    if out.is_dir():
        foreign = _foreign_files(out)
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise ConfigError(f"--out {out} is not empty and does not hold an earlier merge ({shown}); "
                              f"remove those files or choose another folder")
    target = out.expanduser().resolve()
    for m in model_set.models:
        p = m.path.resolve()
        if target == p or p in target.parents:
            raise ConfigError(f"--out {out} is inside model {m.ref}'s folder; write the merge elsewhere")
    if target == model_set.tokenizer_path.resolve():
        raise ConfigError(f"--out {out} is the tokenizer source's folder; write the merge elsewhere")


def _plan_shards(sizes: list[tuple[str, int]], limit: int) -> list[list[str]]:
    """Greedy, in order, like transformers: start a new shard when the next tensor would overflow."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > limit:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def _tensor_bytes(t: "torch.Tensor") -> memoryview:
    import torch

    t = t.detach().to("cpu").contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())


def stream_merge(recipe: MergeRecipe, model_set: "ModelSet", out: Path, *, max_shard_size: str | int = "2GB",
                 dtype: str | None = None, device: str = "cpu") -> Path:
    """Write the merged weights and metadata of a validated recipe into ``out``."""
    import torch

    merge_tensor = _methods().merge_tensor
    limit = parse_size(max_shard_size)
    dev = _check_device(device)
    out_name = dtype or recipe.dtype
    if out_name not in OUTPUT_DTYPES:
        raise RecipeError(f"output dtype {out_name!r} is not supported; use one of {', '.join(OUTPUT_DTYPES)}")
    out_dtype = _torch_dtype(out_name)
    cd = _torch_dtype(recipe.compute_dtype)
    ref = model_set.reference
    idx = _source_indices(recipe, model_set)
    srcs = [model_set.sources[i] for i in idx]
    names = model_set.tensor_names
    dtypes = {n: (out_name if ref.dtype(n) in _FLOATS else ref.dtype(n)) for n in names}
    sizes = []
    for n in names:
        numel = 1
        for s in ref.shape(n):
            numel *= s
        sizes.append((n, numel * _ITEMSIZE[dtypes[n]]))
    shards = _plan_shards(sizes, limit)
    files = (["model.safetensors"] if len(shards) == 1
             else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    size_of = dict(sizes)

    out.mkdir(parents=True, exist_ok=True)
    # Weights of an earlier merge in this folder go first: were this merge interrupted after
    # replacing some shards, the old index and the other old shards would load as a silent
    # mix of two merges; an incomplete set fails to load instead.
    for stale in out.iterdir():
        if _WEIGHT_FILE.match(stale.name):
            stale.unlink()
    _fsync_dir(out)
    plans: dict[str, GroupPlan] = {}
    weight_map: dict[str, str] = {}
    with torch.no_grad():
        for file, shard in zip(files, shards):
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for n in shard:
                header[n] = {"dtype": _ST_CODE[dtypes[n]], "shape": list(ref.shape(n)),
                             "data_offsets": [offset, offset + size_of[n]]}
                offset += size_of[n]
                weight_map[n] = file
            hbytes = json.dumps(header, separators=(",", ":")).encode()
            hbytes += b" " * (-len(hbytes) % 8)
            with _atomic_file(out / file) as f:
                f.write(struct.pack("<Q", len(hbytes)))
                f.write(hbytes)
                for n in shard:
                    t = _merge_one(n, recipe, model_set, srcs, plans, cd, dev, merge_tensor)
                    t = t.to(out_dtype) if dtypes[n] == out_name else t
                    data = _tensor_bytes(t)
                    if data.nbytes != size_of[n]:
                        raise RuntimeError(f"internal error: {n} has {data.nbytes} bytes, planned {size_of[n]}")
                    f.write(data)
    if len(files) > 1:
        _write_json(out / SAFE_INDEX, {"metadata": {"total_size": sum(size_of.values())}, "weight_map": weight_map})

    config = dict(ref.config)
    config["dtype"] = out_name
    if "torch_dtype" in config:
        config["torch_dtype"] = out_name
    _write_json(out / "config.json", config)
    if (ref.path / "generation_config.json").is_file():
        _copy_file(ref.path / "generation_config.json", out / "generation_config.json")
    for tf in TOKENIZER_FILES:
        if (model_set.tokenizer_path / tf).is_file():
            _copy_file(model_set.tokenizer_path / tf, out / tf)
    _fsync_dir(out)
    return out


def _merge_one(name: str, recipe: MergeRecipe, model_set: "ModelSet", srcs: list[Any],
               plans: dict[str, GroupPlan], cd: "torch.dtype", dev: "torch.device", merge_tensor: Any) -> "torch.Tensor":
    """One merged tensor (compute dtype), from one tensor per source read off the mmap."""
    import torch

    ref = model_set.reference
    if ref.dtype(name) not in _FLOATS:
        return ref.get_tensor(name)
    key, _ = recipe.group_for(model_set.groups[name])
    gp = plans.get(key)
    if gp is None:
        gp = plans[key] = plan_group(recipe, key)
    if model_set.base is not None:
        base = model_set.base.get_tensor(name).to(dev, cd)
    else:
        base = torch.zeros(ref.shape(name), dtype=cd, device=dev)
    deltas = torch.empty((len(srcs), *ref.shape(name)), dtype=cd, device=dev)
    for i, src in enumerate(srcs):
        deltas[i].copy_(src.get_tensor(name))
        if model_set.base is not None:
            deltas[i].sub_(base)
    return merge_tensor(gp.method, base, deltas, gp.source_params, gp.params, seed=recipe.seed, tensor_name=name)


def merge_to_folder(recipe: MergeRecipe, out_dir: str | Path, *, max_shard_size: str | int = "2GB",
                    dtype: str | None = None, device: str = "cpu", allow_pickle: bool = False,
                    revision: str | None = None) -> Path:
    """Merge ``recipe`` into a Hugging Face folder; everything is checked before ``out_dir`` is touched.

    ``revision``: the hub revision of models given as hub ids (the search config's
    ``models.revision``; recipes name models, not revisions)."""
    from evomerge.sources import load_model_set

    out = Path(out_dir)
    parse_size(max_shard_size)
    _check_device(device)
    if dtype is not None and dtype not in OUTPUT_DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not supported; use one of {', '.join(OUTPUT_DTYPES)}")
    model_set = load_model_set(recipe.base, recipe.sources, tokenizer_source=recipe.tokenizer_source,
                               allow_pickle=allow_pickle, revision=revision)
    validate_recipe(recipe, model_set)
    _check_out_dir(out, model_set)
    try:
        return stream_merge(recipe, model_set, out, max_shard_size=max_shard_size, dtype=dtype, device=device)
    finally:
        for m in model_set.models:
            m.close()


# -- files and the command line ---------------------------------------------------------------
def load_recipe_file(path: str | Path) -> MergeRecipe:
    """A recipe from ``recipe.json`` or a mergekit YAML (model paths relative to the YAML's folder)."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe file {p} does not exist; pass a recipe.json or a mergekit YAML")
    text = read_utf8(p, RecipeError)  # bad bytes: one line, not a UnicodeDecodeError traceback
    if p.suffix.lower() in (".yaml", ".yml"):
        from evomerge.merge.mergekit_yaml import from_mergekit_yaml

        return from_mergekit_yaml(text, base_dir=p.parent)
    try:
        return MergeRecipe.from_json(text)
    except RecipeError as err:
        raise RecipeError(f"{p}: {err}") from None


def merge_command(args: "argparse.Namespace") -> int:
    """``evomerge merge RECIPE --out DIR``: one merge, streamed to a HF folder."""
    t0 = time.perf_counter()
    recipe = load_recipe_file(args.recipe)
    try:
        out = merge_to_folder(recipe, args.out, max_shard_size=args.max_shard_size, dtype=args.dtype,
                              device=args.device, allow_pickle=args.allow_pickle)
    except EvomergeError:
        raise
    except (OSError, MemoryError) as err:
        raise SourceError(f"merge into {args.out} failed: {type(err).__name__}: {err}") from None
    files = sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors")
    print(f"merged {len(recipe.sources)} source(s) into {out} ({len(files)} weight file(s), "
          f"{time.perf_counter() - t0:.1f}s)")
    return 0
