"""The search's hot path for task-arithmetic-family methods, compiled into one pass per tensor.

Why: eager TIES walks every tensor some 40 times (|delta|, the window test, the mask
product, the weight, the sign sum, the agreement, the disjoint sum, the divisor, ...),
each pass a full trip through memory; eager DARE adds a hash pass per source. TorchInductor
fuses the whole formula - the keep test (a magnitude-rank window from the presorted order,
or DARE's counter-based hash), weights, sign election, disjoint sum, normalisation, lambda,
base add, rounding to the output dtype and the write into the live parameter - into one
loop that reads each task vector once. On a 297M-parameter model that is the difference
between seconds and a few tenths of a second per candidate.

Bits: :func:`gta_merge` spells :func:`gta.combine`'s operations in the same
order with the same roundings (masks are exact 1/0 products, sums run source by source
from +0, DARE's L1 sums are taken by the same eager ``sum``), so the compiled kernel's
result equals ``methods.merge_tensor``'s bit for bit; ``tests/test_fused.py`` checks that
over random cases with magnitude ties, zeros and -0.0. Covered, in a float32/float64
compute dtype: the :mod:`family` rows whose sparsification is none, a magnitude window
(ties, breadcrumbs(_ties): without ``rescale``) or DARE's random keep (with or without
it). DELLA (per-row ranks), linear, slerp and model_stock stay eager.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from evomerge.merge import rng
from evomerge.merge.family import FAMILY, MAGNITUDE, NONE, OUTLIERS, RANDOM
from evomerge.merge.gta import weight_sum_divisor
from evomerge.merge.ranking import magnitude_window, outlier_window, window_edges
from evomerge.merge.scratch import Workspace
from evomerge.merge.sparsify import l1_rescale_factor

Tensor = torch.Tensor
log = logging.getLogger(__name__)

#: Sparsifications the kernel computes: a rank window (none: the whole tensor) or DARE's hash.
_COVERED = (NONE, MAGNITUDE, OUTLIERS, RANDOM)
#: Methods the kernel covers (see :func:`plan_call` for the cases it leaves to eager ops).
FUSED_METHODS = frozenset(name for name, row in FAMILY.items() if row.sparsification in _COVERED)
_COMPUTE_DTYPES = (torch.float32, torch.float64)
_GRAPH_LIMIT = 64
_DRAW_SHIFT = 32 - rng.UNIFORM_BITS


def _random_keep(numel: int, device: torch.device, key1: Tensor, key2: Tensor, keep_below: Tensor) -> Tensor:
    """DARE's Bernoulli mask, element by element: the draw ``rng.bernoulli_mask`` makes."""
    bits = rng.hash_index_(torch.arange(numel, device=device, dtype=torch.int64), key1, key2)
    return (bits >> _DRAW_SHIFT) < keep_below


def gta_merge(
    target: Tensor,
    base: Tensor,
    deltas: Tensor,
    weight: Tensor,
    scale: Tensor,
    lo_value: Tensor,
    lo_index: Tensor,
    hi_value: Tensor,
    hi_index: Tensor,
    key1: Tensor,
    key2: Tensor,
    keep_below: Tensor,
    dropped: Tensor,
    divisor: Tensor,
    lambda_: Tensor,
    zero: Tensor,
    *,
    consensus: bool,
    keep: str,
    round_to: torch.dtype | None,
) -> None:
    """Writes ``base + lambda * mix(keep_i * delta_i * scale_i * w_i) / divisor`` into ``target``.

    All tensors flat: ``base`` (S), ``deltas`` (N, S), ``target`` (S, any float dtype). Per
    source (N): ``weight``; ``scale`` (DARE's L1 rescale factor, else 1); the rank-window
    edges ``lo_value``/``lo_index`` and ``hi_value``/``hi_index`` (see
    :class:`ranking.WindowEdges`; a missing lower edge is value -1, a missing upper one +inf
    with index S); DARE's hash keys ``key1``/``key2`` and ``keep_below`` (2**24 keeps all).
    ``keep`` says which test applies: "all", "lower" (TIES' top-k), "band" (breadcrumbs'
    two edges), "random" (DARE: the hash) or "measured" (DARE with rescale: ``dropped``
    (N, S) already holds each |delta_i * mask_i| from :func:`dropped_abs`, and an element
    is kept where that equals |delta_i| - exactly ``delta_i * mask_i`` again, zeros, inf
    and NaN included, without hashing twice). The kernel computes no test that keeps
    everything; ``dropped`` is read only in "measured" mode.
    ``divisor``: the weight sum without sign election, 0 to divide by the agreeing weights
    (``consensus``), or 1 for no normalisation; ``zero``: a +0.0 the sums start from, as
    the eager buffers do (a runtime value, so no compiler folds it away). ``round_to``: the
    output dtype to round through before widening into ``target``, as an exported file
    would. Window indices are int32 below 2**31 elements (twice int64's SIMD width).
    """
    numel = base.shape[0]
    j = torch.arange(numel, device=base.device, dtype=lo_index.dtype)
    weighted = []
    for i in range(deltas.shape[0]):
        d = deltas[i]
        if keep in ("lower", "band"):
            a = d.abs()
            kept = (a > lo_value[i]) | ((a == lo_value[i]) & (j >= lo_index[i]))
            if keep == "band":
                kept = kept & ((a < hi_value[i]) | ((a == hi_value[i]) & (j <= hi_index[i])))
            d = d * kept.to(d.dtype)
        elif keep == "random":
            d = (d * _random_keep(numel, base.device, key1[i], key2[i], keep_below[i]).to(d.dtype)) * scale[i]
        elif keep == "measured":
            d = (d * (dropped[i] == d.abs()).to(d.dtype)) * scale[i]
        weighted.append(d * weight[i])
    mixed = zero
    if consensus:
        total = zero
        for w in weighted:
            total = total + w
        plus = total >= 0  # the elected sign (a zero sum elects +)
        agreeing_weight = zero
        for i, w in enumerate(weighted):
            agree = torch.where(plus, w > 0, w < 0).to(base.dtype)  # eager: w * sign > 0, the same test
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


def dropped_abs(out: Tensor, delta: Tensor, key1: Tensor, key2: Tensor, keep_below: Tensor) -> None:
    """``out = |delta * mask|`` for one source's DARE mask: what eager rescaling sums."""
    kept = _random_keep(delta.shape[0], delta.device, key1, key2, keep_below)
    out.copy_((delta * kept.to(delta.dtype)).abs())


@dataclass(frozen=True)
class FusedCall:
    """One tensor's merge, ready for the kernel (see :func:`plan_call`): :func:`gta_merge`'s
    inputs by name (after ``target``), then its static options.

    ``rescale``: sources whose DARE L1 factor is still to be measured into ``scale``
    (:meth:`FusedMerger.merge_into` does it: it needs a kernel and the eager sum, and with
    ``keep == "measured"`` it also fills ``dropped``, which starts as a placeholder).
    """

    base: Tensor
    deltas: Tensor
    weight: Tensor
    scale: Tensor
    lo_value: Tensor
    lo_index: Tensor
    hi_value: Tensor
    hi_index: Tensor
    key1: Tensor
    key2: Tensor
    keep_below: Tensor
    dropped: Tensor
    divisor: Tensor
    lambda_: Tensor
    zero: Tensor
    consensus: bool
    keep: str
    rescale: tuple[int, ...] = ()

    @property
    def args(self) -> tuple[Tensor, ...]:
        """The tensors in :func:`gta_merge`'s positional order."""
        return (self.base, self.deltas, self.weight, self.scale, self.lo_value, self.lo_index, self.hi_value,
                self.hi_index, self.key1, self.key2, self.keep_below, self.dropped, self.divisor, self.lambda_,
                self.zero)


def plan_call(method: str, base: Tensor, deltas: Tensor, kwargs: Mapping[str, Any],
              orders: Sequence[Tensor] | None) -> FusedCall | None:
    """The kernel's inputs for ``method`` with ``kwargs`` (from
    :func:`methods.method_arguments`), or None when the kernel does not cover the case:
    another method, a 16-bit compute dtype (eager rounds every step there), ``rescale``
    on a rank window that drops entries, no presorted ``orders`` for a window that needs
    them, or a NaN at a window edge."""
    if method not in FUSED_METHODS or base.dtype not in _COMPUTE_DTYPES or base.numel() == 0:
        return None
    row = FAMILY[method]
    numel, n = base.numel(), deltas.shape[0]
    flat = deltas.reshape(n, numel)
    dev, dt = base.device, base.dtype
    lo_v, lo_i, hi_v, hi_i = [-1.0] * n, [0] * n, [float("inf")] * n, [numel] * n
    keys1, keys2, keep_below, rescale = [0] * n, [0] * n, [1 << rng.UNIFORM_BITS] * n, []
    if row.sparsification is RANDOM:
        keep = "random"
        for i, (density, seed) in enumerate(zip(kwargs["density"], kwargs["seeds"])):
            if density < 1:  # eager leaves a full-density delta alone: no draw, no rescale
                keys1[i], keys2[i] = rng.seed_keys(seed)
                keep_below[i] = rng.keep_threshold(density)
                if kwargs["rescale"]:
                    rescale.append(i)
        if rescale:
            keep = "measured"
    else:
        windows = [(0, numel)] * n
        if row.sparsification is MAGNITUDE:
            windows = [magnitude_window(numel, d) for d in kwargs["density"]]
        elif row.sparsification is OUTLIERS:
            windows = [outlier_window(numel, d, g) for d, g in zip(kwargs["density"], kwargs["gamma"])]
        keep = "band" if any(hi < numel for _, hi in windows) else "lower" if any(lo > 0 for lo, _ in windows) \
            else "all"
        if keep != "all" and (kwargs.get("rescale") or orders is None):
            return None
        for i, (lo, hi) in enumerate(windows):
            if (lo, hi) == (0, numel):
                continue
            if lo >= hi:  # an empty window keeps nothing: a lower edge above every magnitude
                lo_v[i], lo_i[i] = float("inf"), numel
                continue
            e = window_edges(flat[i], orders[i], lo, hi)
            if e is None:
                return None
            if e.lo_value is not None:
                lo_v[i], lo_i[i] = e.lo_value, e.lo_index
            if e.hi_value is not None:
                hi_v[i], hi_i[i] = e.hi_value, e.hi_index
    consensus = row.consensus
    if not kwargs["normalize"]:
        divisor = 1.0
    elif consensus:
        divisor = 0.0
    else:
        divisor = weight_sum_divisor(kwargs["weight"])
    values = lambda xs: torch.tensor(xs, dtype=dt, device=dev)  # noqa: E731 - rounded as eager rounds scalars
    index_dtype = torch.int32 if numel < 2**31 else torch.int64
    indices = lambda xs, t=index_dtype: torch.tensor(xs, dtype=t, device=dev)  # noqa: E731
    return FusedCall(
        base=base.reshape(numel), deltas=flat, weight=values(kwargs["weight"]), scale=values([1.0] * n),
        lo_value=values(lo_v), lo_index=indices(lo_i), hi_value=values(hi_v), hi_index=indices(hi_i),
        key1=indices(keys1, torch.int64), key2=indices(keys2, torch.int64),
        keep_below=indices(keep_below, torch.int64), dropped=flat, divisor=values(divisor),
        lambda_=values(kwargs["lambda_"]),
        zero=torch.zeros((), dtype=dt, device=dev), consensus=consensus, keep=keep, rescale=tuple(rescale))


class FusedMerger:
    """Runs :func:`gta_merge` (and :func:`dropped_abs`) compiled; eagerly with
    ``compile=False``, for tests.

    The first call per (source count, consensus, keep test, dtypes) compiles: 6-25 s on
    2 cores with an empty cache, 3-5 s from Inductor's on-disk cache. If compiling fails (no
    C++ compiler, say), it logs once and reports ``available = False``; callers then
    merge eagerly, which gives the same bits.
    """

    def __init__(self, compile: bool = True) -> None:
        self.available = True
        self.compiled = compile
        self._merge: Callable[..., None] = gta_merge
        self._dropped_abs: Callable[..., None] = dropped_abs
        self._scratch = Workspace()
        if compile:
            import torch._dynamo.config as dynamo_config

            # One graph per (source count, consensus, keep test, rounding, dtypes): a
            # search uses a handful, tests a few more; dynamo's default cap is 8.
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, _GRAPH_LIMIT)
            # emulate_precision_casts: keep the rounding to a 16-bit output dtype that
            # Inductor would otherwise skip inside a fused float32 computation.
            options = {"emulate_precision_casts": True}
            self._merge = torch.compile(gta_merge, dynamic=True, fullgraph=True, options=options)
            self._dropped_abs = torch.compile(dropped_abs, dynamic=True, fullgraph=True, options=options)

    def merge_into(self, target: Tensor, call: FusedCall, round_to: torch.dtype | None,
                   l1_norm: Callable[[int], Tensor] | None = None) -> bool:
        """Writes the merge into ``target`` (contiguous); False when the kernel is unavailable.

        ``l1_norm(i)``: source i's ``|delta_i|.sum()`` as eager rescaling takes it (the
        in-place merger caches it: it never changes); computed here when not given.
        """
        if not self.available or not target.is_contiguous():
            return False
        try:
            if call.keep == "measured":
                call = self._measure_rescale(call, l1_norm)
            self._merge(target.view(-1), *call.args, consensus=call.consensus, keep=call.keep, round_to=round_to)
        except Exception as err:  # noqa: BLE001 - any compiler failure means: merge eagerly
            if not self.compiled:
                raise
            log.warning("fused merge kernel unavailable (%s: %s); merging eagerly (same results, slower)",
                        type(err).__name__, str(err).splitlines()[0] if str(err) else "")
            self.available = False
            return False
        return True

    def _measure_rescale(self, call: FusedCall, l1_norm: Callable[[int], Tensor] | None) -> FusedCall:
        """Every source's |delta_i * mask_i| into one scratch buffer (an unmasked source's
        mask keeps all), and each rescaled source's L1 factor from it: summed by the same
        eager ``sum`` over a buffer shaped like the delta as eager rescaling takes, so the
        factor has the same bits. Returns the call reading that buffer."""
        n, numel = call.deltas.shape
        dropped = self._scratch.take("dropped_abs", (n, numel), call.deltas.dtype, call.deltas.device)
        for i in range(n):
            self._dropped_abs(dropped[i], call.deltas[i], call.key1[i], call.key2[i], call.keep_below[i])
        for i in call.rescale:
            before = l1_norm(i) if l1_norm is not None else call.deltas[i].abs().sum()
            call.scale[i] = l1_rescale_factor(before, dropped[i].sum())
        return dataclasses.replace(call, dropped=dropped)


@functools.lru_cache(maxsize=1)
def shared_merger() -> FusedMerger:
    """One compiled kernel per process (compilation is per process; its cache is on disk)."""
    return FusedMerger()
