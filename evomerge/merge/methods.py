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
    if n < m.min_sources or (m.max_sources is not None and n > m.max_sources):
        raise MethodError(f"tensor {tensor_name}: method {m.name!r} {_source_count_rule(m)}, got {n}")

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
    if base.numel() == 0:
        return base.clone()
    if _takes_scratch(m.fn):
        if prepared is not None and (len(prepared.sorted_abs) != n or any(
                s.numel() != base.numel() or s.dtype != base.dtype for s in prepared.sorted_abs)):
            raise ValueError(f"{tensor_name}: prepared deltas do not match the deltas' sources, size or dtype")
        kwargs[_CTX_ARG] = _Scratch(workspace or Workspace(), prepared.sorted_abs if prepared is not None else None)
    return m.fn(base, deltas, **kwargs)


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
    """What candidates never change about one tensor's task vectors: each |delta_i|, sorted.

    Why: rank-based sparsifiers (TIES, breadcrumbs) need order statistics of |delta_i|
    at a density every candidate changes. With the magnitudes sorted once, a threshold
    is an index lookup and its tie count a binary search, instead of a selection over
    the whole tensor per candidate. The values are exactly those a selection returns,
    so results are bit-identical with or without this. Costs one task vector's memory
    (in the deltas' dtype) per source.
    """

    def __init__(self, sorted_abs: Sequence[Tensor]) -> None:
        self.sorted_abs = list(sorted_abs)

    @classmethod
    def build(cls, deltas: Tensor) -> "PreparedDeltas":
        return cls([sorted_magnitudes(deltas[i]) for i in range(deltas.shape[0])])

    def select(self, index: Sequence[int]) -> "PreparedDeltas":
        """The same, for the sources picked (in this order) by ``index``."""
        return PreparedDeltas([self.sorted_abs[i] for i in index])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PreparedDeltas":
        return PreparedDeltas([s.to(device, non_blocking=non_blocking) for s in self.sorted_abs])

    def pin_memory(self) -> "PreparedDeltas":
        return PreparedDeltas([s.pin_memory() for s in self.sorted_abs])

    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.sorted_abs)


_SIXTEEN_BIT = (torch.float16, torch.bfloat16)


def sorted_magnitudes(x: Tensor) -> Tensor:
    """Flat ascending |x| in x's dtype (NaN last, as kthvalue ranks it).

    On CPU numpy's SIMD sort is ~25x faster than torch.sort; 16-bit floats are sorted
    as int16 bit patterns, which order non-negative floats exactly as their values.
    """
    mag = x.detach().abs().reshape(-1)
    if mag.device.type == "cpu":
        view = mag.view(torch.int16) if mag.dtype in _SIXTEEN_BIT else mag
        view.numpy().sort()  # in place: mag is a fresh tensor
        return mag
    if mag.dtype in _SIXTEEN_BIT:
        return torch.sort(mag.float()).values.to(mag.dtype)
    return torch.sort(mag).values


@dataclass
class _Scratch:
    """What a GTA method needs besides its parameters (see merge_tensor)."""

    ws: Workspace
    sorted_abs: Sequence[Tensor] | None = None


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


def _rank_window(mag: Tensor, lo: int, hi: int, sorted_mag: Tensor | None = None,
                 out: Tensor | None = None, scratch: Tensor | None = None) -> Tensor:
    """Boolean mask of the elements of flat ``mag`` whose ascending rank is in [lo, hi).

    Ranks order by value, equal values by element index, so the kept count is exactly
    ``hi - lo`` and the choice is the same on every device. The two threshold values
    come from ``sorted_mag`` (``mag`` sorted, see :class:`PreparedDeltas`) when given,
    else from a linear-time selection (a full sort per call is ~10x slower on CPU).
    ``out``/``scratch``: buffers shaped like ``mag`` to write into (no allocation); a
    floating ``out`` gets a 1/0 mask, which multiplies ~3x faster than a bool one.
    """
    n = mag.numel()
    lo, hi = max(0, lo), min(n, hi)
    keep = torch.empty_like(mag, dtype=torch.bool) if out is None else out
    if lo >= hi:
        return keep.zero_()
    if lo == 0 and hi == n:
        return keep.fill_(1)
    ks = [k for k, inner in ((lo, lo > 0), (hi - 1, hi < n)) if inner]
    below: dict[float, int] = {}  # threshold value -> #elements strictly below it
    inclusive: dict[float, bool] = {}
    if sorted_mag is not None:
        values = [float(sorted_mag[k]) for k in ks]
        for v in values:
            if math.isnan(v):  # NaN thresholds: binary search is meaningless; select instead
                sorted_mag = None
                break
    if sorted_mag is not None:
        probe = sorted_mag.new_tensor(values)
        left = torch.searchsorted(sorted_mag, probe, side="left").tolist()
        right = torch.searchsorted(sorted_mag, probe, side="right").tolist()
        for v, a, b in zip(values, left, right):
            below[v] = a
            # A value held by one element only: its rank is `a`, the index it was read
            # at, inside [lo, hi) - so an inclusive comparison keeps exactly it.
            inclusive[v] = b - a == 1
    else:
        values = _order_stats(mag, ks)
    v_lo = values[0] if lo > 0 else None
    v_hi = values[-1] if hi < n else None
    # Strictly inside the two threshold values (or inclusive of a unique one): kept
    # whatever the tie order.
    if v_lo is not None:
        (torch.ge if inclusive.get(v_lo) else torch.gt)(mag, v_lo, out=keep)
    if v_hi is not None:
        if v_lo is None:
            (torch.le if inclusive.get(v_hi) else torch.lt)(mag, v_hi, out=keep)
        else:
            extra = torch.empty_like(keep) if scratch is None else scratch
            (torch.le if inclusive.get(v_hi) else torch.lt)(mag, v_hi, out=extra)
            keep.logical_and_(extra) if keep.dtype == torch.bool else keep.mul_(extra)
    # Elements equal to a shared threshold: rank = (#elements below it) + (#equal ones
    # before it in index order); usually few elements, so index lists beat a cumsum.
    for v in {v for v in (v_lo, v_hi) if v is not None and not inclusive.get(v)}:
        at = torch.nonzero(mag == v).reshape(-1)
        first = below[v] if v in below else (mag < v).sum()
        ranks = torch.arange(at.numel(), device=mag.device) + first
        keep[at[(ranks >= lo) & (ranks < hi)]] = 1
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
    small = (before < _RESCALE_EPS) | (after < _RESCALE_EPS)
    scale = torch.where(small, torch.ones_like(before), before / torch.where(small, torch.ones_like(after), after))
    return masked.mul_(scale)


def _keep_into(x: Tensor, keep: Tensor, out: Tensor | None) -> Tensor:
    """x * keep (x where kept, a signed zero elsewhere), into ``out``; keep: bool or 1/0."""
    return torch.mul(x, keep, out=out) if out is not None else x * keep


def _sparsify_window(x: Tensor, lo: int, hi: int, rescale: bool, ws: Workspace, out: Tensor | None,
                     sorted_abs: Tensor | None) -> Tensor:
    mag = _abs_into(x, ws)
    n = x.numel()
    keep = _rank_window(mag.reshape(-1), lo, hi, sorted_mag=sorted_abs,
                        out=ws.take("keep", (n,), x.dtype, x.device),
                        scratch=ws.take("keep2", (n,), x.dtype, x.device))
    masked = _keep_into(x, keep.view(x.shape), out)
    return _rescale_l1_(mag, masked, rescale, ws)


def sparsify_magnitude(x: Tensor, density: float, rescale: bool = False, *, ws: Workspace | None = None,
                       out: Tensor | None = None, sorted_abs: Tensor | None = None) -> Tensor:
    """TIES trim: keep the ``max(1, int(density * numel))`` largest-magnitude entries.

    ``out``: where to write (default: a new tensor); ``sorted_abs``: flat ascending |x|.
    """
    if density >= 1:
        return x
    n = x.numel()
    k = max(1, int(density * n))
    return _sparsify_window(x, n - k, n, rescale, ws or Workspace(), out, sorted_abs)


def sparsify_outliers(x: Tensor, density: float, gamma: float, rescale: bool = False, *,
                      ws: Workspace | None = None, out: Tensor | None = None,
                      sorted_abs: Tensor | None = None) -> Tensor:
    """Breadcrumbs: drop the ``int(gamma * numel)`` largest entries, then the smallest,
    keeping ``int(density * numel)`` (the top cut shrinks when both do not fit)."""
    if density >= 1:
        return x
    n = x.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    return _sparsify_window(x, n_bot, n_bot + target, rescale, ws or Workspace(), out, sorted_abs)


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
        divisor_value = sum(weight)
        divisor: Tensor | float = divisor_value if abs(divisor_value) >= 1e-8 else 1.0
    else:
        weighted = take("weighted", deltas.shape)
        for i in range(n):
            s = deltas[i] if sparsify is None else sparsify(i, deltas[i], weighted[i], sc)
            torch.mul(s, weight[i], out=weighted[i])
        total = torch.sum(weighted, dim=0, out=take("total"))
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


_GTA_IGNORED = ("int8_mask",)  # mergekit memory option, no effect on results


def _sorted(sc: _Scratch, i: int) -> Tensor | None:
    return sc.sorted_abs[i] if sc.sorted_abs is not None else None


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
        d, density[i], rescale, ws=sc.ws, out=out, sorted_abs=_sorted(sc, i))
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
        d, density[i], gamma[i], rescale, ws=sc.ws, out=out, sorted_abs=_sorted(sc, i))
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
        d, density[i], gamma[i], rescale, ws=sc.ws, out=out, sorted_abs=_sorted(sc, i))
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
