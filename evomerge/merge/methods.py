"""Merge methods: pure tensor functions with mergekit 0.1.5's meaning and parameter names.

Every method merges ONE tensor. Inputs are the base tensor and the task vectors
``deltas = source_i - base`` stacked as ``(N, *shape)`` (the actors precompute task
vectors once and reuse them for every candidate, so methods never modify their inputs).
Methods that mix whole models (linear, slerp, model_stock) rebuild ``source_i = base +
delta_i``. Without a base model the caller passes zeros and the sources as deltas.

Each method is one function registered with :func:`merge_method`; its signature IS its
parameter table: positional ``base, deltas``, then keyword-only parameters, where those
annotated :data:`PerSource` take one value per source (mergekit's per-model
``parameters:``: weight, density, gamma, epsilon) and the others are method-level
(mergekit's top-level ``parameters:``: normalize, rescale, lambda, t, filter_wise).
Defaults are mergekit's per-method defaults; the two mergekit leaves required
(``weight``, slerp's ``t``) default to 1.0 and 0.5 here.

Numerics follow mergekit 0.1.5 (``mergekit/merge_methods/*.py``, ``mergekit/sparsify.py``):

* TIES / breadcrumbs / DARE / DELLA sparsify each delta independently, multiply by
  ``weight``, elect a sign per element from the sign of the weighted sum (ties at 0
  elect +), keep only agreeing entries ("disjoint merge"), divide by the sum of the
  agreeing weights when ``normalize`` (a zero sum divides by 1), scale by ``lambda``.
  Without sign election the divisor is the plain weight sum (|sum| < 1e-8 divides by 1).
* ``rescale`` restores each sparsified delta's L1 norm (mergekit 0.1.5 rescales by the
  norm ratio, not by 1/density), skipped when either norm is below 1e-7.
* Random masks come from :mod:`evomerge.merge.rng` (same bits on CPU and GPU), not from
  ``torch.bernoulli``: DARE/DELLA agree with mergekit in distribution, not in bits.
* Exact-count selections (TIES top-k, breadcrumbs' band) break magnitude ties by
  element index, so they are deterministic on every device.

dtype: math runs in the dtype of ``base``/``deltas`` (the recipe's compute dtype) and
the result is returned in it; callers cast to the output dtype. As in mergekit, linear
and slerp (and here model_stock) accumulate in at least float32, and magnitude rankings
of 16-bit tensors are taken in float32 (exactly).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import sys
import typing
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Annotated, Any, Callable, Mapping, Sequence

import torch

from evomerge.errors import MethodError
from evomerge.merge import rng

Tensor = torch.Tensor

#: Marker for per-source parameters in a method's signature.
PER_SOURCE = "per_source"
PerSource = Annotated[Sequence[float], PER_SOURCE]

#: Keyword a random method receives: one 63-bit stream seed per source.
_SEEDS_ARG = "seeds"
#: mergekit's slerp: |cos| above this interpolates linearly (a fixed constant there too).
SLERP_DOT_THRESHOLD = 0.9995
#: mergekit's rescale tolerance (sparsify.rescaled_masked_tensor).
_RESCALE_EPS = 1e-7


@dataclass(frozen=True)
class MergeMethod:
    """One registered method and its parameter table (see module docstring)."""

    name: str
    fn: Callable[..., Tensor]
    paper: str | None
    source_params: Mapping[str, float]  # per-source params and defaults
    params: Mapping[str, float | bool]  # method-level params and defaults
    uses_base: bool
    min_sources: int
    max_sources: int | None
    random: bool
    #: Names mergekit accepts for this method but that change nothing (e.g. density on
    #: task_arithmetic, int8_mask): accepted and dropped, so mergekit YAML imports.
    ignored_source_params: frozenset[str] = frozenset()
    ignored_params: frozenset[str] = frozenset()
    summary: str = ""
    #: Python parameter name for each public name ("lambda" -> "lambda_").
    _arg_names: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    def is_bool(self, param: str) -> bool:
        return isinstance(self.params.get(param), bool)


METHODS: dict[str, MergeMethod] = {}


def merge_method(
    name: str,
    *,
    paper: str | None,
    uses_base: bool = True,
    min_sources: int = 1,
    max_sources: int | None = None,
    random: bool = False,
    ignored_source_params: Sequence[str] = (),
    ignored_params: Sequence[str] = (),
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register ``fn(base, deltas, *, <params>)`` under ``name``; its signature is the table."""

    def register(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} registered twice")
        hints = typing.get_type_hints(fn, include_extras=True)
        source_params: dict[str, float] = {}
        params: dict[str, float | bool] = {}
        arg_names: dict[str, str] = {}
        for p in inspect.signature(fn).parameters.values():
            if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.name in (_SEEDS_ARG, _CTX_ARG):
                continue
            public = p.name.rstrip("_")  # lambda_ -> lambda
            arg_names[public] = p.name
            if p.default is inspect.Parameter.empty:
                raise TypeError(f"{fn.__name__}: parameter {p.name} needs a default")
            if PER_SOURCE in getattr(hints.get(p.name), "__metadata__", ()):
                source_params[public] = float(p.default)
            else:
                params[public] = p.default
        METHODS[name] = MergeMethod(
            name=name,
            fn=fn,
            paper=paper,
            source_params=MappingProxyType(source_params),
            params=MappingProxyType(params),
            uses_base=uses_base,
            min_sources=min_sources,
            max_sources=max_sources,
            random=random,
            ignored_source_params=frozenset(ignored_source_params),
            ignored_params=frozenset(ignored_params),
            summary=(inspect.getdoc(fn) or "").split("\n")[0],
            _arg_names=MappingProxyType(arg_names),
        )
        return fn

    return register


# --------------------------------------------------------------------------------------
# Lookup and validation
# --------------------------------------------------------------------------------------


def get_method(name: str | MergeMethod) -> MergeMethod:
    """The registered method called ``name``; MethodError listing the known ones otherwise."""
    if isinstance(name, MergeMethod):
        return name
    method = METHODS.get(name)
    if method is None:
        close = difflib.get_close_matches(str(name), METHODS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise MethodError(f"unknown merge method {name!r}; {hint}known methods: {', '.join(sorted(METHODS))}")
    return method


def check_methods_usable(names: Sequence[str], n_sources: int, has_base: bool, where: str) -> None:
    """Every method in ``names`` exists and can merge ``n_sources`` sources (with/without a base)."""
    for name in names:
        try:
            method = get_method(name)
        except MethodError as err:
            raise MethodError(f"{where}: {err}") from None
        if method.uses_base and not has_base:
            raise MethodError(
                f"{where}: method {name!r} needs a base model (the model the sources were fine-tuned "
                f"from); set models.base, or use 'linear'"
            )
        if n_sources < method.min_sources or (method.max_sources is not None and n_sources > method.max_sources):
            raise MethodError(f"{where}: method {name!r} {_source_count_rule(method)}, got {n_sources}; "
                              f"change models.sources or drop {name!r}")


def _source_count_rule(method: MergeMethod) -> str:
    lo, hi = method.min_sources, method.max_sources
    if hi == lo:
        return f"merges the base with exactly {lo} source{'s' if lo != 1 else ''}"
    if hi is None:
        return f"needs at least {lo} source{'s' if lo != 1 else ''}"
    return f"needs {lo} to {hi} sources"


def check_params(
    method: str | MergeMethod,
    source_params: Mapping[str, Sequence[float]],
    params: Mapping[str, Any],
    where: str,
) -> None:
    """Names and values of a method's parameters: one-line MethodError at the first problem.

    ``source_params`` maps a per-source parameter to its values (one per source, any
    order); ``params`` holds method-level values. Missing names take their defaults.
    """
    m = get_method(method)
    for key in source_params:
        if key not in m.source_params and key not in m.ignored_source_params:
            raise MethodError(f"{where}: {_unknown_param(m, key, per_source=True)}")
    for key in params:
        if key not in m.params and key not in m.ignored_params:
            raise MethodError(f"{where}: {_unknown_param(m, key, per_source=False)}")

    for key, value in params.items():
        if key not in m.params:
            continue
        if m.is_bool(key):
            if not (isinstance(value, bool) or value in (0, 1)):
                raise MethodError(f"{where}: {m.name} parameter {key!r} must be true or false, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise MethodError(f"{where}: {m.name} parameter {key!r} must be a finite number, got {value!r}")

    values = {k: [float(x) for x in v] for k, v in source_params.items() if k in m.source_params}
    for key, vals in values.items():
        for i, v in enumerate(vals):
            if not math.isfinite(v):
                raise MethodError(f"{where}: {m.name} {key} of source {i} must be a finite number, got {v}")
            if key == "density" and not 0.0 < v <= 1.0:
                raise MethodError(f"{where}: {m.name} density of source {i} is {v}; it must lie in (0, 1] "
                                  f"(the fraction of delta entries kept)")
            if key == "gamma" and not 0.0 <= v <= 1.0:
                raise MethodError(f"{where}: {m.name} gamma of source {i} is {v}; it must lie in [0, 1] "
                                  f"(the fraction of largest entries dropped)")
            if key == "epsilon" and v < 0.0:
                raise MethodError(f"{where}: {m.name} epsilon of source {i} is {v}; it must be >= 0")
    lengths = {len(v) for v in values.values()}
    if len(lengths) > 1:
        raise MethodError(f"{where}: per-source parameters of {m.name} have different lengths "
                          f"({', '.join(f'{k}: {len(v)}' for k, v in values.items())}); give one value per source")

    if "epsilon" in m.source_params:
        n = max(lengths, default=1)
        dens = values.get("density", [m.source_params["density"]] * n)
        eps = values.get("epsilon", [m.source_params["epsilon"]] * n)
        for i, (d, e) in enumerate(zip(dens, eps)):
            # mergekit's della_magprune: keep probabilities density +/- epsilon must lie
            # strictly inside (0, 1) unless density >= 1 (then nothing is pruned).
            if d < 1.0 and (d - e <= 0.0 or d + e >= 1.0):
                raise MethodError(
                    f"{where}: {m.name} source {i}: density {d:g} +/- epsilon {e:g} leaves (0, 1); "
                    f"use epsilon < {min(d, 1.0 - d):g} or move density away from 0 and 1"
                )


def _unknown_param(m: MergeMethod, key: str, per_source: bool) -> str:
    own = m.source_params if per_source else m.params
    other = m.params if per_source else m.source_params
    kind = "per-source" if per_source else "method-level"
    if key in other:
        where_else = "method-level (group params)" if per_source else "per-source (source_params)"
        return f"{m.name} parameter {key!r} is {where_else}, not {kind}; move it there"
    known = ", ".join(sorted(own)) or "none"
    return f"{m.name} has no {kind} parameter {key!r}; its {kind} parameters: {known}"


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def merge_tensor(
    method: str | MergeMethod,
    base: Tensor,
    deltas: Tensor,
    source_params: Mapping[str, Tensor | Sequence[float] | float],
    params: Mapping[str, Any],
    *,
    seed: int,
    tensor_name: str,
    prepared: "PreparedDeltas | None" = None,
    workspace: "Workspace | None" = None,
) -> Tensor:
    """Merge one tensor: ``base`` (shape S), ``deltas`` (N, *S) -> merged tensor (S).

    ``source_params[p]`` is one value per source (a 1-D tensor, a sequence, or a scalar
    for all); pass Python floats or float64 tensors, since density counts are
    ``int(density * numel)`` and float32 rounding of e.g. 0.7 changes them. Missing
    parameters take the method's defaults. Random masks are seeded by
    ``rng.tensor_seed(seed, tensor_name, i)`` for source ``i``. Inputs are not modified.

    Speed-ups that never change a bit of the result (the search passes them, a one-off
    export need not): ``prepared``, this tensor's :class:`PreparedDeltas` for the same
    deltas (rank thresholds become lookups), and ``workspace``, a :class:`Workspace`
    reused across calls (no fresh allocations). With a workspace the returned tensor
    may be one of its buffers: use or copy it before the next call.
    """
    m = get_method(method)
    if deltas.dim() != base.dim() + 1 or deltas.shape[1:] != base.shape:
        raise ValueError(f"{tensor_name}: deltas {tuple(deltas.shape)} must be (N, *{tuple(base.shape)})")
    if deltas.dtype != base.dtype or deltas.device != base.device:
        raise ValueError(f"{tensor_name}: base and deltas must share dtype and device")
    n = deltas.shape[0]
    check_source_count(m, n, tensor_name)

    kwargs = method_arguments(m, n, source_params, params, seed=seed, tensor_name=tensor_name)
    if base.numel() == 0:
        return base.clone()
    if _takes_scratch(m.fn):
        if prepared is not None and (len(prepared.orders) != n or any(
                o.numel() != base.numel() for o in prepared.orders)):
            raise ValueError(f"{tensor_name}: prepared deltas do not match the deltas' sources or size")
        kwargs[_CTX_ARG] = _Scratch(workspace or Workspace(), prepared.orders if prepared is not None else None)
    return m.fn(base, deltas, **kwargs)


def check_source_count(method: str | MergeMethod, n: int, tensor_name: str) -> None:
    """A :class:`MethodError` when ``method`` cannot merge ``n`` sources."""
    m = get_method(method)
    if n < m.min_sources or (m.max_sources is not None and n > m.max_sources):
        raise MethodError(f"tensor {tensor_name}: method {m.name!r} {_source_count_rule(m)}, got {n}")


def method_arguments(
    method: str | MergeMethod,
    n: int,
    source_params: Mapping[str, Tensor | Sequence[float] | float],
    params: Mapping[str, Any],
    *,
    seed: int,
    tensor_name: str,
) -> dict[str, Any]:
    """The keyword arguments ``method``'s function gets for one tensor with ``n`` sources:
    per-source lists, method-level values (defaults filled in), and random methods' seeds.

    Checked first (unknown or misplaced parameters, ranges): a :class:`MethodError`.
    Shared by :func:`merge_tensor` and the fused hot path, so both read a recipe alike.
    """
    m = get_method(method)
    per_source = {k: _per_source_values(v, n, k, tensor_name) for k, v in source_params.items()}
    check_params(m, per_source, params, where=f"tensor {tensor_name}")
    kwargs: dict[str, Any] = {}
    for key, default in m.source_params.items():
        kwargs[m._arg_names[key]] = per_source.get(key, [default] * n)
    for key, default in m.params.items():
        value = params.get(key, default)
        kwargs[m._arg_names[key]] = bool(value) if isinstance(default, bool) else float(value)
    if m.random:
        kwargs[_SEEDS_ARG] = [rng.tensor_seed(seed, tensor_name, i) for i in range(n)]
    return kwargs


@functools.lru_cache(maxsize=None)
def _takes_scratch(fn: Callable[..., Tensor]) -> bool:
    return _CTX_ARG in inspect.signature(fn).parameters


def _per_source_values(value: Any, n: int, key: str, tensor_name: str) -> list[float]:
    if isinstance(value, Tensor):
        value = value.detach().double().cpu().reshape(-1).tolist()
        if len(value) == 1:
            value = value * n
    elif isinstance(value, (int, float)):
        value = [float(value)] * n
    vals = [float(v) for v in value]
    if len(vals) != n:
        raise MethodError(f"tensor {tensor_name}: {key} has {len(vals)} values for {n} sources; give one per source")
    return vals


# --------------------------------------------------------------------------------------
# Reusable state: scratch memory and per-source precomputation
# --------------------------------------------------------------------------------------


class Workspace:
    """Scratch tensors reused by every :func:`merge_tensor` call that is handed this object.

    Why: the search re-merges the same tensors hundreds of times, and on CPU a fresh
    multi-MB tensor costs page faults on every first touch (measured ~20 ms for an
    allocating 2816x1024 op vs ~1.5 ms for the same op into memory already mapped). A
    workspace keeps one flat buffer per slot, grown to the largest tensor seen, so
    after the first candidate merges allocate nothing. The tensor ``merge_tensor``
    returns may live here: it is valid until the next call with the same workspace.
    Not thread-safe: one workspace per merging thread.
    """

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}

    def take(self, slot: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A tensor of ``shape`` in ``slot`` (uninitialised; earlier contents of the slot are lost)."""
        numel = math.prod(shape)
        key = (slot, dtype, torch.device(device))
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._bufs[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(tuple(shape))

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values())


class PreparedDeltas:
    """What candidates never change about one tensor's task vectors: each |delta_i|'s rank order.

    Why: rank-based sparsifiers (TIES, breadcrumbs) keep the elements whose magnitude
    rank falls in a window that every candidate moves (through density / gamma). With
    the order kept - flat element indices sorted by (|delta|, index), the very ranking
    the selection uses - a window's edges are two lookups, and the fused hot path can
    test membership element by element in one pass, ties included, instead of selecting
    over the whole tensor per candidate. Results are bit-identical with or without this.
    Costs one int32 (int64 past 2**31 elements) per task-vector element.
    """

    def __init__(self, orders: Sequence[Tensor]) -> None:
        self.orders = list(orders)

    @classmethod
    def build(cls, deltas: Tensor, workers: int = 1) -> "PreparedDeltas":
        """Sorts each source's magnitudes; on CPU ``workers`` threads sort sources side by
        side (numpy's sort releases the GIL; measured 1.7x with 2 threads)."""
        sources = list(deltas.unbind(0))
        if workers > 1 and len(sources) > 1 and deltas.device.type == "cpu":
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(workers, len(sources))) as pool:
                return cls(list(pool.map(magnitude_order, sources)))
        return cls([magnitude_order(d) for d in sources])

    def select(self, index: Sequence[int]) -> "PreparedDeltas":
        """The same, for the sources picked (in this order) by ``index``."""
        return PreparedDeltas([self.orders[i] for i in index])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PreparedDeltas":
        return PreparedDeltas([o.to(device, non_blocking=non_blocking) for o in self.orders])

    def pin_memory(self) -> "PreparedDeltas":
        return PreparedDeltas([o.pin_memory() for o in self.orders])

    def nbytes(self) -> int:
        return sum(o.numel() * o.element_size() for o in self.orders)


_SIXTEEN_BIT = (torch.float16, torch.bfloat16)
_BITS_AS_INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def magnitude_order(x: Tensor) -> Tensor:
    """Flat indices of ``x`` by ascending |x|, equal magnitudes by index (NaN last).

    int32 when the tensor has fewer than 2**31 elements, else int64. On CPU the
    (magnitude bits, index) pairs are packed into one int64 and sorted with numpy's SIMD
    sort, ~20x faster than a stable argsort: the bit patterns of non-negative floats
    order exactly as their values, and NaN's pattern sorts after +inf's.
    """
    mag = x.detach().abs().reshape(-1)
    n = mag.numel()
    index_dtype = torch.int32 if n < 2**31 else torch.int64
    if mag.device.type == "cpu" and mag.dtype in _BITS_AS_INT and n < 2**31 and sys.byteorder == "little":
        import numpy as np

        key = np.empty(n, dtype=np.int64)
        halves = key.view(np.int32).reshape(n, 2)  # little-endian: [low = index, high = magnitude bits]
        halves[:, 1] = mag.view(_BITS_AS_INT[mag.dtype]).numpy()  # 16-bit patterns widen, order kept
        halves[:, 0] = np.arange(n, dtype=np.int32)
        key.sort()
        return torch.from_numpy(halves[:, 0].copy())
    ranked = mag.float() if mag.dtype in _SIXTEEN_BIT else mag
    return torch.sort(ranked, stable=True).indices.to(index_dtype)


@dataclass(frozen=True)
class WindowEdges:
    """Where a rank window [lo, hi) of a flat magnitude tensor starts and ends.

    ``lo_value``/``lo_index``: magnitude and element index of rank ``lo`` (None when the
    window starts at rank 0); ``hi_value``/``hi_index`` the same for rank ``hi - 1``
    (None when it ends at the top). Since ranks order by (magnitude, index), element j
    is in the window exactly when (|x_j|, j) lies between the two edges' pairs:
    ``|x_j| > lo_value or (|x_j| == lo_value and j >= lo_index)``, and likewise below.
    ``lo_shared``/``hi_shared``: whether equal magnitudes fall on both sides of the edge,
    i.e. whether the index part of the test matters at all.
    """

    lo_value: float | None
    lo_index: int
    lo_shared: bool
    hi_value: float | None
    hi_index: int
    hi_shared: bool


def window_edges(x: Tensor, order: Tensor, lo: int, hi: int) -> WindowEdges | None:
    """The edges of magnitude ranks [lo, hi) (0 <= lo < hi <= numel) of flat ``x`` (or of
    |x|), sorted by ``order`` (see :func:`magnitude_order`); reads only the few elements at
    the edges. None when an edge's magnitude is NaN (rank it by selection)."""
    n = x.numel()
    lo_value = hi_value = None
    lo_index = lo_shared = hi_index = hi_shared = 0
    probes = ([lo - 1, lo] if lo > 0 else []) + ([hi - 1, hi] if hi < n else [])
    if not probes:
        return WindowEdges(None, 0, False, None, n, False)
    at = order[torch.tensor(probes, device=order.device)].to(torch.int64)
    values = x[at].abs().tolist()
    indices = at.tolist()
    if any(math.isnan(v) for v in values):
        return None
    if lo > 0:
        below, lo_value = values[0], values[1]
        lo_index, lo_shared = indices[1], below == lo_value
        values, indices = values[2:], indices[2:]
    if hi < n:
        hi_value, above = values[0], values[1]
        hi_index, hi_shared = indices[0], above == hi_value
    return WindowEdges(lo_value, lo_index, bool(lo_shared), hi_value, hi_index, bool(hi_shared))


def magnitude_window(numel: int, density: float) -> tuple[int, int]:
    """TIES trim as a rank window: the ``max(1, int(density * numel))`` largest magnitudes
    (all of them when density >= 1)."""
    if density >= 1:
        return 0, numel
    return numel - max(1, int(density * numel)), numel


def outlier_window(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """Breadcrumbs as a rank window: ``int(density * numel)`` magnitudes kept after the
    ``int(gamma * numel)`` largest are dropped (the top cut shrinks when both do not fit;
    all of them when density >= 1)."""
    if density >= 1:
        return 0, numel
    target = int(density * numel)
    n_bot = max(0, numel - target - int(gamma * numel))
    return n_bot, n_bot + target


@dataclass
class _Scratch:
    """What a GTA method needs besides its parameters (see merge_tensor)."""

    ws: Workspace
    orders: Sequence[Tensor] | None = None


_CTX_ARG = "scratch"
#: Methods that read :class:`PreparedDeltas` (the rank-based sparsifiers).
USES_SORTED_MAGNITUDES = frozenset({"ties", "breadcrumbs", "breadcrumbs_ties"})


# --------------------------------------------------------------------------------------
# Sparsification (mergekit/sparsify.py semantics)
# --------------------------------------------------------------------------------------


def _ranking_view(x: Tensor) -> Tensor:
    """|x| in a dtype where ranking is exact and kthvalue/sort are implemented."""
    mag = x.abs()
    return mag.float() if mag.dtype in _SIXTEEN_BIT else mag


def _order_stats(mag: Tensor, ks: Sequence[int]) -> list[float]:
    """The ascending order statistics ``ks`` (0-based) of flat non-negative ``mag``.

    Exact values, as kthvalue gives; on CPU via numpy's introselect (~10x faster).
    """
    if mag.device.type != "cpu":
        view = mag.float() if mag.dtype in _SIXTEEN_BIT else mag
        return [float(view.kthvalue(k + 1).values) for k in ks]
    import numpy as np

    bits = mag.dtype in _SIXTEEN_BIT  # non-negative 16-bit floats order as their bit patterns
    arr = (mag.view(torch.int16) if bits else mag).numpy()
    stats = torch.from_numpy(np.partition(arr, list(ks))[list(ks)].copy())
    return (stats.view(mag.dtype) if bits else stats).tolist()


def _edges_by_selection(mag: Tensor, lo: int, hi: int) -> WindowEdges | None:
    """:class:`WindowEdges` without a presorted order: order statistics, then the index of
    the edge element among its equals (only when equal magnitudes straddle the edge).
    None when an edge's magnitude is NaN."""
    n = mag.numel()
    ks = ([lo - 1, lo] if lo > 0 else []) + ([hi - 1, hi] if hi < n else [])
    values = _order_stats(mag, ks)
    if any(math.isnan(v) for v in values):
        return None
    lo_value = hi_value = None
    lo_index, hi_index, lo_shared, hi_shared = 0, n, False, False

    def index_of_rank(value: float, rank: int) -> int:
        equal = torch.nonzero(mag == value).reshape(-1)
        first = int((mag < value).sum())  # rank of the first element equal to value
        return int(equal[rank - first])

    if lo > 0:
        lo_value, lo_shared = values[1], values[0] == values[1]
        lo_index = index_of_rank(lo_value, lo) if lo_shared else 0
        values = values[2:]
    if hi < n:
        hi_value, hi_shared = values[0], values[0] == values[1]
        hi_index = index_of_rank(hi_value, hi - 1) if hi_shared else n
    return WindowEdges(lo_value, lo_index, lo_shared, hi_value, hi_index, hi_shared)


def _rank_window(mag: Tensor, lo: int, hi: int, order: Tensor | None = None,
                 out: Tensor | None = None, scratch: Tensor | None = None) -> Tensor:
    """Mask of the elements of flat ``mag`` whose ascending rank is in [lo, hi).

    Ranks order by value, equal values by element index, so the kept count is exactly
    ``hi - lo`` and the choice is the same on every device. The edges come from
    ``order`` (see :class:`PreparedDeltas`) when given, else from a linear-time
    selection (a full sort per call is ~10x slower on CPU). ``out``/``scratch``: buffers
    shaped like ``mag`` to write into (no allocation); a floating ``out`` gets a 1/0
    mask, which multiplies ~3x faster than a bool one.
    """
    n = mag.numel()
    lo, hi = max(0, lo), min(n, hi)
    keep = torch.empty_like(mag, dtype=torch.bool) if out is None else out
    if lo >= hi:
        return keep.zero_()
    if lo == 0 and hi == n:
        return keep.fill_(1)
    e = window_edges(mag, order, lo, hi) if order is not None else _edges_by_selection(mag, lo, hi)
    if e is None:
        return _rank_window_nan(mag, lo, hi, keep)
    # Strictly inside the two edge values (or inclusive where no equal value lies outside
    # the window): kept whatever the tie order.
    if e.lo_value is not None:
        (torch.gt if e.lo_shared else torch.ge)(mag, e.lo_value, out=keep)
    if e.hi_value is not None:
        if e.lo_value is None:
            (torch.lt if e.hi_shared else torch.le)(mag, e.hi_value, out=keep)
        else:
            extra = torch.empty_like(keep) if scratch is None else scratch
            (torch.lt if e.hi_shared else torch.le)(mag, e.hi_value, out=extra)
            keep.logical_and_(extra) if keep.dtype == torch.bool else keep.mul_(extra)
    # Elements equal to a shared edge value: in the window by their index (usually few
    # elements, so index lists beat a full-tensor test).
    shared = {v for v, s in ((e.lo_value, e.lo_shared), (e.hi_value, e.hi_shared)) if s}
    for v in shared:
        at = torch.nonzero(mag == v).reshape(-1)
        ok = torch.ones_like(at, dtype=torch.bool)
        if e.lo_value is not None and v <= e.lo_value:
            ok &= at >= e.lo_index
        if e.hi_value is not None and v >= e.hi_value:
            ok &= at <= e.hi_index
        keep[at[ok]] = 1
    return keep


def _rank_window_nan(mag: Tensor, lo: int, hi: int, keep: Tensor) -> Tensor:
    """Rank window when NaN magnitudes reach an edge: NaN ranks above +inf, by index."""
    order = torch.sort(_ranking_view(mag), stable=True).indices
    keep.zero_()
    keep[order[lo:hi]] = 1
    return keep


def _abs_into(x: Tensor, ws: Workspace, slot: str = "mag") -> Tensor:
    return torch.abs(x, out=ws.take(slot, x.shape, x.dtype, x.device))


def _rescale_l1_(x_abs: Tensor, masked: Tensor, rescale: bool, ws: Workspace) -> Tensor:
    """mergekit's rescaled_masked_tensor with the L1 norm, in place on ``masked``.

    ``x_abs`` is |x| (x: the unmasked tensor); it is overwritten.
    """
    if not rescale:
        return masked
    before = x_abs.sum()
    after = torch.abs(masked, out=x_abs).sum()
    return masked.mul_(l1_rescale_factor(before, after))


def l1_rescale_factor(before: Tensor, after: Tensor) -> Tensor:
    """before / after (0-d L1 norms of a delta and of its sparsified self), or 1 where
    either is below mergekit's tolerance."""
    small = (before < _RESCALE_EPS) | (after < _RESCALE_EPS)
    return torch.where(small, torch.ones_like(before), before / torch.where(small, torch.ones_like(after), after))


def _keep_into(x: Tensor, keep: Tensor, out: Tensor | None) -> Tensor:
    """x * keep (x where kept, a signed zero elsewhere), into ``out``; keep: bool or 1/0."""
    return torch.mul(x, keep, out=out) if out is not None else x * keep


def _sparsify_window(x: Tensor, window: tuple[int, int], rescale: bool, ws: Workspace, out: Tensor | None,
                     order: Tensor | None) -> Tensor:
    n = x.numel()
    if window == (0, n):
        return x
    mag = _abs_into(x, ws)
    keep = _rank_window(mag.reshape(-1), *window, order=order,
                        out=ws.take("keep", (n,), x.dtype, x.device),
                        scratch=ws.take("keep2", (n,), x.dtype, x.device))
    masked = _keep_into(x, keep.view(x.shape), out)
    return _rescale_l1_(mag, masked, rescale, ws)


def sparsify_magnitude(x: Tensor, density: float, rescale: bool = False, *, ws: Workspace | None = None,
                       out: Tensor | None = None, order: Tensor | None = None) -> Tensor:
    """TIES trim: keep the ``max(1, int(density * numel))`` largest-magnitude entries.

    ``out``: where to write (default: a new tensor); ``order``: x's :func:`magnitude_order`.
    """
    return _sparsify_window(x, magnitude_window(x.numel(), density), rescale, ws or Workspace(), out, order)


def sparsify_outliers(x: Tensor, density: float, gamma: float, rescale: bool = False, *,
                      ws: Workspace | None = None, out: Tensor | None = None,
                      order: Tensor | None = None) -> Tensor:
    """Breadcrumbs: drop the ``int(gamma * numel)`` largest entries, then the smallest,
    keeping ``int(density * numel)`` (the top cut shrinks when both do not fit)."""
    return _sparsify_window(x, outlier_window(x.numel(), density, gamma), rescale, ws or Workspace(), out, order)


def sparsify_bernoulli(x: Tensor, density: float, seed: int, rescale: bool = False, *,
                       ws: Workspace | None = None, out: Tensor | None = None) -> Tensor:
    """DARE: keep each entry independently with probability ``density``."""
    if density >= 1:
        return x
    ws = ws or Workspace()
    keep = rng.bernoulli_mask(seed, x.shape, density, device=x.device)
    masked = _keep_into(x, keep, out)
    if not rescale:
        return masked
    return _rescale_l1_(_abs_into(x, ws), masked, rescale, ws)


def sparsify_della(x: Tensor, density: float, epsilon: float, seed: int, rescale: bool = False, *,
                   ws: Workspace | None = None, out: Tensor | None = None) -> Tensor:
    """DELLA MagPrune: keep probability rises linearly with magnitude rank along dim 1
    (rows of a matrix; the whole vector for 1-D), from density-epsilon to density+epsilon."""
    if density >= 1:
        return x
    ws = ws or Workspace()
    rows = x.reshape(1, -1) if x.dim() < 2 else x
    width = rows.shape[1]
    prob_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    order = _ranking_view(rows).argsort(dim=1, stable=True)
    positions = torch.arange(width, device=x.device, dtype=torch.int64)
    positions = positions.view([1, width] + [1] * (rows.dim() - 2)).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, positions)  # 0 .. width-1
    del order
    rank_norm = ranks.to(prob_dtype) / max(width - 1, 1)
    del ranks
    probs = (density - epsilon) + rank_norm * (2 * epsilon)
    keep = rng.uniform(seed, rows.shape, device=x.device).to(prob_dtype) < probs
    masked = _keep_into(x, keep.reshape(x.shape), out)
    if not rescale:
        return masked
    return _rescale_l1_(_abs_into(x, ws), masked, rescale, ws)


# --------------------------------------------------------------------------------------
# Generalized task arithmetic (mergekit/merge_methods/generalized_task_arithmetic.py)
# --------------------------------------------------------------------------------------

#: sparsify(i, delta_i, out, scratch) -> sparsified delta_i: ``out`` (written) or delta_i itself.
Sparsify = Callable[[int, Tensor, Tensor, _Scratch], Tensor]


def _task_arithmetic(
    base: Tensor,
    deltas: Tensor,
    weight: Sequence[float],
    sparsify: Sparsify | None,
    consensus: bool,
    normalize: bool,
    lambda_: float,
    scratch: _Scratch | None,
) -> Tensor:
    """base + lambda * (sum_i w_i * sparsify(delta_i)) [/ divisor], optional TIES sign election.

    Every intermediate lives in the workspace and is updated in place, with exactly the
    operations (and so the roundings) of the plain formulas: x * keep, * scale, * w_i,
    sum over sources, agreement masks, disjoint sum, / divisor, * lambda, + base.
    """
    sc = scratch or _Scratch(Workspace())
    ws = sc.ws
    n = deltas.shape[0]
    dt, dev, shape = base.dtype, base.device, base.shape
    take = lambda slot, shp=shape, dtype=dt: ws.take(slot, shp, dtype, dev)  # noqa: E731
    mixed = take("mixed").zero_()
    if not consensus:
        sparse_buf, term = take("sparse"), take("term")
        for i in range(n):
            s = deltas[i] if sparsify is None else sparsify(i, deltas[i], sparse_buf, sc)
            mixed.add_(torch.mul(s, weight[i], out=term))
        divisor: Tensor | float = weight_sum_divisor(weight)
    else:
        weighted = take("weighted", deltas.shape)
        for i in range(n):
            s = deltas[i] if sparsify is None else sparsify(i, deltas[i], weighted[i], sc)
            torch.mul(s, weight[i], out=weighted[i])
        # Summed source by source, not torch.sum(dim=0): that reduction's association
        # varies with the tensor's width and the SIMD path (measured on CPU), which can flip
        # the elected sign where the weighted deltas nearly cancel; a fixed order gives the
        # same election here, in the fused kernel and on any device.
        total = take("total").zero_()
        for i in range(n):
            total.add_(weighted[i])
        # sign: +1 where + is elected (a zero sum elects +), -1 elsewhere; then
        # w * sign > 0 <=> w agrees with the elected sign (exact: a sign flip).
        sign = torch.ge(total, 0, out=take("sign")).mul_(2).sub_(1)
        divisor = take("divisor").zero_()
        agree, flipped = take("agree"), total  # agree: 1/0 in the compute dtype; total is spent
        for i in range(n):
            torch.gt(torch.mul(weighted[i], sign, out=flipped), 0, out=agree)
            mixed.add_(weighted[i].mul_(agree))
            divisor.add_(agree.mul_(weight[i]))  # == agree.to(dtype) * weight[i]
        divisor.masked_fill_(torch.eq(divisor, 0, out=take("zero", dtype=torch.bool)), 1)
    if normalize:
        mixed.div_(divisor)
    if lambda_ != 1:
        mixed.mul_(lambda_)
    return torch.add(base, mixed, out=mixed)


def weight_sum_divisor(weight: Sequence[float]) -> float:
    """The divisor of a normalised merge without sign election: the weight sum, or 1 when
    it is below 1e-8 in magnitude (mergekit's rule)."""
    total = sum(weight)
    return total if abs(total) >= 1e-8 else 1.0


_GTA_IGNORED = ("int8_mask",)  # mergekit memory option, no effect on results


def _order(sc: _Scratch, i: int) -> Tensor | None:
    return sc.orders[i] if sc.orders is not None else None


@merge_method("task_arithmetic", paper="https://arxiv.org/abs/2212.04089",
              ignored_source_params=("density",), ignored_params=("rescale",) + _GTA_IGNORED)
def task_arithmetic(
    base: Tensor, deltas: Tensor, *, weight: PerSource = 1.0, normalize: bool = False, lambda_: float = 1.0,
    scratch: _Scratch | None = None,
) -> Tensor:
    """base + lambda * sum_i weight_i * delta_i (divided by sum of weights when normalize).

    mergekit defaults: normalize=false, lambda=1.0 (weight required there).
    """
    return _task_arithmetic(base, deltas, weight, None, False, normalize, lambda_, scratch)


@merge_method("ties", paper="https://arxiv.org/abs/2306.01708", ignored_params=_GTA_IGNORED)
def ties(
    base: Tensor,
    deltas: Tensor,
    *,
    weight: PerSource = 1.0,
    density: PerSource = 1.0,
    normalize: bool = True,
    rescale: bool = False,
    lambda_: float = 1.0,
    scratch: _Scratch | None = None,
) -> Tensor:
    """TIES: trim each delta to its top ``density`` by magnitude, elect signs, disjoint mean.

    mergekit defaults: density=1.0, normalize=true, rescale=false, lambda=1.0.
    """
    trim = lambda i, d, out, sc: sparsify_magnitude(  # noqa: E731
        d, density[i], rescale, ws=sc.ws, out=out, order=_order(sc, i))
    return _task_arithmetic(base, deltas, weight, trim, True, normalize, lambda_, scratch)


@merge_method("dare_ties", paper="https://arxiv.org/abs/2311.03099", random=True, ignored_params=_GTA_IGNORED)
def dare_ties(
    base: Tensor,
    deltas: Tensor,
    *,
    weight: PerSource = 1.0,
    density: PerSource = 1.0,
    normalize: bool = False,
    rescale: bool = True,
    lambda_: float = 1.0,
    seeds: Sequence[int] = (),
    scratch: _Scratch | None = None,
) -> Tensor:
    """DARE + TIES sign election: random keep with p=density, L1 rescale, disjoint sum.

    mergekit defaults: density=1.0, normalize=false, rescale=true, lambda=1.0.
    """
    drop = lambda i, d, out, sc: sparsify_bernoulli(d, density[i], seeds[i], rescale, ws=sc.ws, out=out)  # noqa: E731
    return _task_arithmetic(base, deltas, weight, drop, True, normalize, lambda_, scratch)


@merge_method("dare_linear", paper="https://arxiv.org/abs/2311.03099", random=True, ignored_params=_GTA_IGNORED)
def dare_linear(
    base: Tensor,
    deltas: Tensor,
    *,
    weight: PerSource = 1.0,
    density: PerSource = 1.0,
    normalize: bool = False,
    rescale: bool = True,
    lambda_: float = 1.0,
    seeds: Sequence[int] = (),
    scratch: _Scratch | None = None,
) -> Tensor:
    """DARE without sign election: random keep with p=density, L1 rescale, weighted sum.

    mergekit defaults: density=1.0, normalize=false, rescale=true, lambda=1.0.
    """
    drop = lambda i, d, out, sc: sparsify_bernoulli(d, density[i], seeds[i], rescale, ws=sc.ws, out=out)  # noqa: E731
    return _task_arithmetic(base, deltas, weight, drop, False, normalize, lambda_, scratch)


@merge_method("breadcrumbs", paper="https://arxiv.org/abs/2312.06795", ignored_params=_GTA_IGNORED)
def breadcrumbs(
    base: Tensor,
    deltas: Tensor,
    *,
    weight: PerSource = 1.0,
    density: PerSource = 1.0,
    gamma: PerSource = 0.01,
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
    scratch: _Scratch | None = None,
) -> Tensor:
    """Model Breadcrumbs: drop the largest ``gamma`` and the smallest entries, keep ``density``.

    mergekit defaults: density=1.0, gamma=0.01, normalize=false, rescale=false, lambda=1.0.
    """
    band = lambda i, d, out, sc: sparsify_outliers(  # noqa: E731
        d, density[i], gamma[i], rescale, ws=sc.ws, out=out, order=_order(sc, i))
    return _task_arithmetic(base, deltas, weight, band, False, normalize, lambda_, scratch)


@merge_method("breadcrumbs_ties", paper="https://arxiv.org/abs/2312.06795", ignored_params=_GTA_IGNORED)
def breadcrumbs_ties(
    base: Tensor,
    deltas: Tensor,
    *,
    weight: PerSource = 1.0,
    density: PerSource = 1.0,
    gamma: PerSource = 0.01,
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
    scratch: _Scratch | None = None,
) -> Tensor:
    """Breadcrumbs band + TIES sign election and disjoint sum.

    mergekit defaults: density=1.0, gamma=0.01, normalize=false, rescale=false, lambda=1.0.
    """
    band = lambda i, d, out, sc: sparsify_outliers(  # noqa: E731
        d, density[i], gamma[i], rescale, ws=sc.ws, out=out, order=_order(sc, i))
    return _task_arithmetic(base, deltas, weight, band, True, normalize, lambda_, scratch)


@merge_method("della", paper="https://arxiv.org/abs/2406.11617", random=True, ignored_params=_GTA_IGNORED)
def della(
    base: Tensor,
    deltas: Tensor,
    *,
    weight: PerSource = 1.0,
    density: PerSource = 1.0,
    epsilon: PerSource = 0.15,
    normalize: bool = True,
    rescale: bool = True,
    lambda_: float = 1.0,
    seeds: Sequence[int] = (),
    scratch: _Scratch | None = None,
) -> Tensor:
    """DELLA: magnitude-ranked keep probabilities in density +/- epsilon, TIES sign election.

    mergekit defaults: density=1.0, epsilon=0.15, normalize=true, rescale=true, lambda=1.0.
    density < 1 needs 0 < density - epsilon and density + epsilon < 1.
    """
    prune = lambda i, d, out, sc: sparsify_della(  # noqa: E731
        d, density[i], epsilon[i], seeds[i], rescale, ws=sc.ws, out=out)
    return _task_arithmetic(base, deltas, weight, prune, True, normalize, lambda_, scratch)


@merge_method("della_linear", paper="https://arxiv.org/abs/2406.11617", random=True, ignored_params=_GTA_IGNORED)
def della_linear(
    base: Tensor,
    deltas: Tensor,
    *,
    weight: PerSource = 1.0,
    density: PerSource = 1.0,
    epsilon: PerSource = 0.15,
    normalize: bool = False,
    rescale: bool = True,
    lambda_: float = 1.0,
    seeds: Sequence[int] = (),
    scratch: _Scratch | None = None,
) -> Tensor:
    """DELLA pruning without sign election: weighted sum of pruned deltas.

    mergekit defaults: density=1.0, epsilon=0.15, normalize=false, rescale=true, lambda=1.0.
    """
    prune = lambda i, d, out, sc: sparsify_della(  # noqa: E731
        d, density[i], epsilon[i], seeds[i], rescale, ws=sc.ws, out=out)
    return _task_arithmetic(base, deltas, weight, prune, False, normalize, lambda_, scratch)


# --------------------------------------------------------------------------------------
# Whole-model methods: linear, slerp, model_stock
# --------------------------------------------------------------------------------------


def _work_dtype(x: Tensor) -> torch.dtype:
    """mergekit's linear/slerp accumulate in float32 unless the inputs are float64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@merge_method("linear", paper="https://arxiv.org/abs/2203.05482", uses_base=False)
def linear(base: Tensor, deltas: Tensor, *, weight: PerSource = 1.0, normalize: bool = True) -> Tensor:
    """Weighted average of the sources (``base + delta_i``); the base itself gets no weight.

    mergekit defaults: normalize=true (weight required there). Differs from mergekit
    only when the weights sum to ~0 with normalize on: mergekit divides (inf/NaN), here
    the sum is left undivided as task arithmetic does.
    """
    work = _work_dtype(base)
    b = base.to(work)
    out = torch.zeros_like(b)
    for i in range(deltas.shape[0]):
        out.add_((b + deltas[i].to(work)) * weight[i])
    total = sum(weight)
    if normalize and abs(total) >= 1e-8:
        out.div_(total)
    return out.to(base.dtype)


@merge_method("slerp", paper="https://en.wikipedia.org/wiki/Slerp", min_sources=1, max_sources=1)
def slerp(base: Tensor, deltas: Tensor, *, t: float = 0.5) -> Tensor:
    """Spherical interpolation from the base (t=0) to the one source (t=1), whole tensor.

    As mergekit: norms below 1e-8 count as 1; when |cos| of the angle exceeds
    ``SLERP_DOT_THRESHOLD`` (0.9995: nearly parallel or antiparallel) it falls back to lerp.
    mergekit requires t; the default here is 0.5.
    """
    work = _work_dtype(base)
    a = base.reshape(-1).to(work)
    b = a + deltas[0].reshape(-1).to(work)
    norm_a = torch.linalg.vector_norm(a)
    norm_b = torch.linalg.vector_norm(b)
    norm_a = torch.where(norm_a > 1e-8, norm_a, torch.ones_like(norm_a))
    norm_b = torch.where(norm_b > 1e-8, norm_b, torch.ones_like(norm_b))
    dot = ((a / norm_a) * (b / norm_b)).sum().clamp(-1, 1)
    parallel = dot.abs() > SLERP_DOT_THRESHOLD
    theta = torch.acos(torch.where(parallel, torch.zeros_like(dot), dot))
    sin_theta = torch.sin(theta)
    tt = torch.tensor(t, dtype=work, device=base.device)
    coef_a = torch.where(parallel, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(parallel, tt, torch.sin(tt * theta) / sin_theta)
    return (coef_a * a + coef_b * b).reshape(base.shape).to(base.dtype)


@merge_method("model_stock", paper="https://arxiv.org/abs/2403.19522", min_sources=2)
def model_stock(base: Tensor, deltas: Tensor, *, filter_wise: bool = False) -> Tensor:
    """Model Stock: pull the sources' average towards the base by the mean pairwise cosine.

    t = N cos / (1 + (N - 1) cos) with cos the mean pairwise cosine of the deltas (over
    the whole tensor, or per row - last dim - when ``filter_wise``); merged =
    t * mean(sources) + (1 - t) * base, and the base where 1 + (N-1) cos ~ 0.
    mergekit default: filter_wise=false.
    """
    work = _work_dtype(base)
    w0 = base.to(work)
    offsets = deltas.to(work)
    if filter_wise:
        if w0.dim() <= 1:
            w0 = w0.reshape(1, -1)
            offsets = offsets.reshape(offsets.shape[0], 1, -1)
    else:
        w0 = w0.reshape(-1)
        offsets = offsets.reshape(offsets.shape[0], -1)
    n = offsets.shape[0]
    norms = torch.linalg.vector_norm(offsets, dim=-1)
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            dot = (offsets[i] * offsets[j]).sum(dim=-1)
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), (n * cos) / torch.where(singular, torch.ones_like(cos), denominator))
    average = w0 + offsets.mean(dim=0)
    return (t * average + (1 - t) * w0).reshape(base.shape).to(base.dtype)
