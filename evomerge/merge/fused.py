"""The search's hot path for rank-window methods, compiled into one pass per tensor.

Why: eager TIES walks every tensor some 40 times (|delta|, the window test, the mask
product, the weight, the sign sum, the agreement, the disjoint sum, the divisor, ...),
each pass a full trip through memory. TorchInductor fuses the whole formula - window
test from the presorted order, weights, sign election, disjoint sum, normalisation,
lambda, base add, rounding to the output dtype and the write into the live parameter -
into one loop that reads each task vector once. On a 297M-parameter model that is the
difference between a few seconds and a few tenths of a second per candidate.

Bits: :func:`gta_window_merge` spells :func:`methods._task_arithmetic`'s operations in
the same order with the same roundings (masks are exact 1/0 products, sums run source
by source from +0), so the compiled kernel's result equals ``methods.merge_tensor``'s
bit for bit; ``tests/test_fused.py`` checks that over random cases with magnitude ties,
zeros and -0.0. Covered: task_arithmetic, ties, breadcrumbs, breadcrumbs_ties in a
float32/float64 compute dtype without ``rescale``; everything else stays eager.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from evomerge.merge import methods

Tensor = torch.Tensor
log = logging.getLogger(__name__)

#: Methods whose sparsifier is a magnitude-rank window (or none): what the kernel covers.
FUSED_METHODS = frozenset({"task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"})
_CONSENSUS = frozenset({"ties", "breadcrumbs_ties"})
_COMPUTE_DTYPES = (torch.float32, torch.float64)
_GRAPH_LIMIT = 64


def gta_window_merge(
    target: Tensor,
    base: Tensor,
    deltas: Tensor,
    weight: Tensor,
    lo_value: Tensor,
    lo_index: Tensor,
    hi_value: Tensor,
    hi_index: Tensor,
    divisor: Tensor,
    lambda_: Tensor,
    zero: Tensor,
    *,
    consensus: bool,
    round_to: torch.dtype | None,
) -> None:
    """Writes ``base + lambda * mix(window(delta_i) * w_i) / divisor`` into flat ``target``.

    All tensors flat: ``base`` (S), ``deltas`` (N, S), ``target`` (S, any float dtype);
    per source (N): ``weight``, the window edges ``lo_value``/``lo_index`` and
    ``hi_value``/``hi_index`` (see :class:`methods.WindowEdges`; a missing lower edge is
    value -1, a missing upper one +inf with index S). ``divisor``: the weight sum without
    sign election, or 0 to divide by the agreeing weights (``consensus``), or 1 for no
    normalisation; ``zero``: a +0.0 the sums start from, as the eager buffers do (a
    runtime value, so no compiler folds it away). ``round_to``: the output dtype to round
    through before widening into ``target``, as an exported file would.
    """
    j = torch.arange(base.shape[0], device=base.device)
    weighted = []
    for i in range(deltas.shape[0]):
        d = deltas[i]
        a = d.abs()
        keep = ((a > lo_value[i]) | ((a == lo_value[i]) & (j >= lo_index[i]))) & (
            (a < hi_value[i]) | ((a == hi_value[i]) & (j <= hi_index[i])))
        weighted.append((d * keep.to(d.dtype)) * weight[i])
    mixed = zero
    if consensus:
        total = zero
        for w in weighted:
            total = total + w
        sign = (total >= 0).to(base.dtype) * 2 - 1
        agreeing_weight = zero
        for i, w in enumerate(weighted):
            agree = ((w * sign) > 0).to(base.dtype)
            mixed = mixed + w * agree
            agreeing_weight = agreeing_weight + agree * weight[i]
        agreeing_weight = torch.where(agreeing_weight == 0, torch.ones_like(agreeing_weight), agreeing_weight)
        divide_by = torch.where(divisor == 0, agreeing_weight, divisor)
    else:
        for w in weighted:
            mixed = mixed + w
        divide_by = divisor
    merged = base + (mixed / divide_by) * lambda_
    if round_to is not None:
        merged = merged.to(round_to)
    target.copy_(merged.to(target.dtype))


@dataclass(frozen=True)
class FusedCall:
    """One tensor's merge, ready for the kernel (see :func:`prepare_call`)."""

    args: tuple[Tensor, ...]
    consensus: bool


def prepare_call(method: str, base: Tensor, deltas: Tensor, kwargs: Mapping[str, Any],
                 orders: Sequence[Tensor] | None) -> FusedCall | None:
    """The kernel's per-source inputs for ``method`` with ``kwargs`` (from
    :func:`methods.method_arguments`), or None when the kernel does not cover the case:
    another method, ``rescale`` with a window that drops entries, a 16-bit compute dtype
    (eager rounds every step there), no presorted ``orders`` for a window that needs them,
    or a NaN at a window edge."""
    if method not in FUSED_METHODS or base.dtype not in _COMPUTE_DTYPES or base.numel() == 0:
        return None
    numel, n = base.numel(), deltas.shape[0]
    flat = deltas.reshape(n, numel)
    weight = kwargs["weight"]
    windows = [(0, numel)] * n
    if method == "ties":
        windows = [methods.magnitude_window(numel, d) for d in kwargs["density"]]
    elif method.startswith("breadcrumbs"):
        windows = [methods.outlier_window(numel, d, g) for d, g in zip(kwargs["density"], kwargs["gamma"])]
    sparse = any(w != (0, numel) for w in windows)
    if sparse and (kwargs.get("rescale") or orders is None):
        return None
    lo_v, lo_i, hi_v, hi_i = [], [], [], []
    for i, (lo, hi) in enumerate(windows):
        if lo >= hi:  # an empty window keeps nothing: lower edge above every magnitude
            lo_v.append(float("inf")), lo_i.append(numel), hi_v.append(float("inf")), hi_i.append(numel)
            continue
        e = methods.window_edges(flat[i], orders[i], lo, hi) if (lo, hi) != (0, numel) else \
            methods.WindowEdges(None, 0, False, None, numel, False)
        if e is None:
            return None
        lo_v.append(-1.0 if e.lo_value is None else e.lo_value)
        lo_i.append(e.lo_index)
        hi_v.append(float("inf") if e.hi_value is None else e.hi_value)
        hi_i.append(e.hi_index)
    consensus = method in _CONSENSUS
    normalize = bool(kwargs["normalize"])
    if not normalize:
        divisor = 1.0
    elif consensus:
        divisor = 0.0
    else:
        total = sum(weight)
        divisor = total if abs(total) >= 1e-8 else 1.0
    dev, dt = base.device, base.dtype
    values = lambda xs: torch.tensor(xs, dtype=dt, device=dev)  # noqa: E731 - rounded as eager rounds scalars
    indices = lambda xs: torch.tensor(xs, dtype=torch.int64, device=dev)  # noqa: E731
    args = (base.reshape(numel), flat, values(weight), values(lo_v), indices(lo_i), values(hi_v),
            indices(hi_i), values(divisor), values(kwargs["lambda_"]), torch.zeros((), dtype=dt, device=dev))
    return FusedCall(args, consensus)


class FusedMerger:
    """Runs :func:`gta_window_merge` compiled (eagerly with ``compile=False``, for tests).

    The first call per (source count, consensus, dtypes) compiles: ~20 s cold on a small
    CPU, a few seconds from Inductor's on-disk cache. If compiling fails (no C++ compiler,
    say), it logs once and reports ``available = False``; callers then merge eagerly,
    which gives the same bits.
    """

    def __init__(self, compile: bool = True) -> None:
        self.available = True
        self._kernel: Callable[..., None] = gta_window_merge
        if compile:
            import torch._dynamo.config as dynamo_config

            # One graph per (source count, consensus, output rounding, target dtype): a
            # search uses a handful, tests a few more; dynamo's default cap is 8.
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, _GRAPH_LIMIT)
            # emulate_precision_casts: keep the rounding to a 16-bit output dtype that
            # Inductor would otherwise skip inside a fused float32 computation.
            self._kernel = torch.compile(gta_window_merge, dynamic=True, fullgraph=True,
                                         options={"emulate_precision_casts": True})

    def merge_into(self, target: Tensor, call: FusedCall, round_to: torch.dtype | None) -> bool:
        """Writes the merge into ``target`` (contiguous); False when the kernel is unavailable."""
        if not self.available or not target.is_contiguous():
            return False
        try:
            self._kernel(target.view(-1), *call.args, consensus=call.consensus, round_to=round_to)
        except Exception as err:  # noqa: BLE001 - any compiler failure means: merge eagerly
            if self._kernel is gta_window_merge:
                raise
            log.warning("fused merge kernel unavailable (%s: %s); merging eagerly (same results, slower)",
                        type(err).__name__, str(err).splitlines()[0] if str(err) else "")
            self.available = False
            return False
        return True


@functools.lru_cache(maxsize=1)
def shared_merger() -> FusedMerger:
    """One compiled kernel per process (compilation is per process; its cache is on disk)."""
    return FusedMerger()
