"""Exact magnitude-rank windows: which entries of a task vector TIES and breadcrumbs keep.

Why a module of its own: TIES keeps the top-k magnitudes and breadcrumbs a band of them,
and both must pick *exactly* k entries, the same ones on every device, also when
magnitudes tie. Ranks here order by (|x|, element index), so a window of ranks [lo, hi)
is a deterministic set. The eager sparsifiers (:mod:`evomerge.merge.sparsify`) test it
with :func:`rank_window`; the fused kernel (:mod:`evomerge.merge.fused`) tests it
element by element from the two :class:`WindowEdges`; both read the same edges.
Magnitudes of 16-bit tensors are ranked in float32 (exactly).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Sequence

import torch

Tensor = torch.Tensor

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



def ranking_view(x: Tensor) -> Tensor:
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


def rank_window(mag: Tensor, lo: int, hi: int, order: Tensor | None = None,
                 out: Tensor | None = None, scratch: Tensor | None = None) -> Tensor:
    """Mask of the elements of flat ``mag`` whose ascending rank is in [lo, hi).

    Ranks order by value, equal values by element index, so the kept count is exactly
    ``hi - lo`` and the choice is the same on every device. The edges come from
    ``order`` (see :class:`evomerge.merge.scratch.PreparedDeltas`) when given, else from a linear-time
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
    order = torch.sort(ranking_view(mag), stable=True).indices
    keep.zero_()
    keep[order[lo:hi]] = 1
    return keep

