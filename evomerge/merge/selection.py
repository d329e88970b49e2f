"""Selective methods: SCE, Arcee Fusion and NearSwap keep a change only where a test passes.

Why a module of their own: the task-arithmetic family (:mod:`evomerge.merge.gta`) thins each
task vector *on its own* and then mixes; these three decide per position by comparing the
models with each other, so none fits a :mod:`evomerge.merge.family` row:

* ``sce`` (FuseChat, arXiv 2408.07990): keep the ``select_topk`` share of positions where
  the sources disagree most (variance across sources), weight each source by its mean
  squared task vector, and mix only the entries that agree with the elected sign (TIES);
* ``arcee_fusion``: take the one source's change only where its importance (|delta| times
  the row's KL divergence between the two models' softmaxes) is an outlier, at least
  median + 1.5 IQR of all importances;
* ``nearswap``: move toward the one source only where the two models are already close,
  by ``w = clamp(t / |delta|, 0, 1)``, so large (task-specific) changes are left out.

Numerics follow mergekit 0.1.5 (``merge_methods/{sce,arcee_fusion,nearswap}.py``): the
same operations in the compute dtype of ``base``/``deltas``; each source is rebuilt as
``base + delta_i`` where mergekit reads it. Deliberate differences, all at ties or in
the scale of what is computed (see each function): SCE's top-k keeps equal variances by
element index (the same on every device) where torch.topk's choice is unspecified, and
its sign election sums the sources in a fixed order (as :mod:`evomerge.merge.gta`); Arcee
Fusion's quartiles are exact order statistics of the whole tensor, where mergekit
estimates them from a random sample of 1e6 entries once a tensor is larger than that.
All three need a base model; Arcee Fusion and NearSwap merge it with exactly one source.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

import torch
import torch.nn.functional as F

from evomerge.merge.methods import method_from_signature
from evomerge.merge.ranking import rank_window

Tensor = torch.Tensor

_SIXTEEN_BIT = (torch.float16, torch.bfloat16)

#: mergekit's floor of SCE's sum of weights (``clamp(min=1e-6)``): positions where only
#: near-zero-weight sources agree are divided by at most 1e6.
SCE_MIN_DIVISOR = 1e-6
#: Below this total of mean squared task vectors SCE weights every source equally (mergekit's).
SCE_UNIFORM_BELOW = 1e-6
#: Added to both softmaxes before Arcee Fusion's KL divergence, so log(0) never occurs (mergekit's).
FUSION_SOFTMAX_EPS = 1e-8
#: Arcee Fusion's outlier rule: importance >= median + FUSION_IQR_FACTOR * (q3 - q1).
FUSION_IQR_FACTOR = 1.5
#: NearSwap's floor of |base - other| (mergekit's): equal entries get weight clamp(t / 1e-6).
NEARSWAP_MIN_DISTANCE = 1e-6


# --------------------------------------------------------------------------------------
# SCE
# --------------------------------------------------------------------------------------


def sce(base: Tensor, deltas: Tensor, *, select_topk: float = 1.0) -> Tensor:
    """SCE: top-variance positions, weights from mean squared task vectors, TIES sign consensus.

    Select: with ``select_topk`` < 1 only the ``int(nonzero * select_topk)`` positions of
    highest variance across the sources (``nonzero``: positions where the sources differ
    at all) keep their task vectors; a single source has no variance, so it is reset to
    the base. Calculate: source i's weight is its mean squared (selected) task vector over
    the sum of them (equal weights when that sum is below 1e-6). Erase: per position the
    sign of the *unweighted* sum of task vectors is elected (0 elects +) and only entries
    of that sign count; the merged task vector is their weighted mean, divided by the sum
    of the agreeing weights floored at 1e-6.

    Why not :func:`evomerge.merge.gta.combine`: it elects the sign of the *weighted* sum
    and divides by 1 where no weight agrees, while SCE elects on the plain sum and floors
    the divisor at 1e-6; mergekit's results would differ wherever the weights decide a sign
    or a weight is tiny. mergekit 0.1.5 default: select_topk 1.0; ``int8_mask`` (its mask
    dtype) is accepted and ignored: 0/1 masks multiply exactly in any dtype.
    """
    tv = deltas
    if select_topk < 1:
        tv = deltas * _high_variance_positions(deltas, select_topk)
    n = tv.shape[0]
    weights = _sce_weights(tv)
    # Sums over sources are added source by source - a fixed association, so the elected
    # sign is the same on every device (torch.sum's order varies with the SIMD path) - in
    # float32 for 16-bit inputs, then rounded once, as torch.sum accumulates them.
    acc = torch.float32 if tv.dtype in _SIXTEEN_BIT else tv.dtype
    total = torch.zeros(base.shape, dtype=acc, device=base.device)
    for i in range(n):
        total.add_(tv[i])
    elected = torch.where(total.to(tv.dtype) >= 0, 1.0, -1.0).to(tv.dtype)
    mixed, divisor = total.zero_(), torch.zeros_like(total)
    for i in range(n):
        weight_here = (tv[i] * elected > 0) * weights[i]  # w_i where source i agrees, else 0
        mixed.add_(tv[i] * weight_here)
        divisor.add_(weight_here)
    return base + mixed.to(tv.dtype) / divisor.to(tv.dtype).clamp(min=SCE_MIN_DIVISOR)


def _high_variance_positions(deltas: Tensor, select_topk: float) -> Tensor:
    """1/0 mask (compute dtype, shape of one task vector) of the positions SCE keeps:
    the ``int(nonzero * select_topk)`` largest population variances across sources,
    equal variances at the cut kept by element index (highest first)."""
    var = torch.var(deltas, dim=0, unbiased=False)
    # The count is taken as mergekit takes it: an int64 tensor times a Python float is a
    # float32 product, whose rounding decides k at exact multiples (e.g. 10 * 0.3).
    k = int(torch.count_nonzero(var) * select_topk)
    flat = var.reshape(-1)
    keep = torch.empty_like(flat)
    rank_window(flat, flat.numel() - k, flat.numel(), out=keep)  # k == 0: keeps nothing
    return keep.view(var.shape)


def _sce_weights(tv: Tensor) -> Tensor:
    """Per source, mean(tv_i ** 2) over the sum of them, or 1/N each when that sum is below 1e-6."""
    energy = tv.square().reshape(tv.shape[0], -1).mean(dim=1)
    total = float(energy.sum())
    if abs(total) < SCE_UNIFORM_BELOW:
        return torch.ones_like(energy) / energy.shape[0]
    return energy / total


# --------------------------------------------------------------------------------------
# Arcee Fusion
# --------------------------------------------------------------------------------------


def arcee_fusion(base: Tensor, deltas: Tensor) -> Tensor:
    """Arcee Fusion: the source's change where its importance is an outlier, the base elsewhere.

    importance = |delta| * KL(softmax(other) || softmax(base)) of the entry's row (last
    dim; the whole vector for 1-D tensors); kept where importance >= median + 1.5 * (q3 -
    q1), quartiles taken as the sorted importances at ``floor(q * (numel - 1))``. With an
    all-zero task vector every importance is 0, so is the threshold, and the base comes
    back. mergekit 0.1.5 has no parameters for it and merges the base with exactly one
    source. Differences from mergekit: quartiles are exact where mergekit samples 1e6
    entries at random for larger tensors (so its threshold is an estimate that changes
    from run to run there); the importance is computed in the compute dtype as there, and
    the final ``base + delta * keep`` in float32 (float64 inputs: float64) as mergekit's
    float32 mask promotes it, rounded once to the compute dtype.
    """
    delta = deltas[0]
    importance = delta.abs() * _row_kl(base + delta, base)
    keep = importance >= _outlier_threshold(importance)
    work = torch.float64 if base.dtype == torch.float64 else torch.float32
    return (base.to(work) + delta.to(work) * keep).to(base.dtype)


def _row_kl(other: Tensor, base: Tensor) -> Tensor:
    """KL(p || q) per row (last dim, kept as size 1), p and q the softmaxes of ``other`` and
    ``base`` each plus 1e-8."""
    p = F.softmax(other, dim=-1) + FUSION_SOFTMAX_EPS
    q = F.softmax(base, dim=-1) + FUSION_SOFTMAX_EPS
    return torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def _outlier_threshold(importance: Tensor) -> Tensor:
    """median + 1.5 IQR of ``importance`` as a 0-d tensor of its dtype (the arithmetic in
    that dtype, as mergekit's); order statistics at ``floor(q * (numel - 1))``."""
    flat = importance.reshape(-1)
    last = flat.numel() - 1
    # kthvalue needs float32/64; widening 16-bit values is exact, and narrowing back too.
    ranked = flat.float() if flat.dtype in _SIXTEEN_BIT else flat
    q1, median, q3 = (ranked.kthvalue(k + 1).values.to(flat.dtype) for k in (last // 4, last // 2, 3 * last // 4))
    return median + FUSION_IQR_FACTOR * (q3 - q1)


# --------------------------------------------------------------------------------------
# NearSwap
# --------------------------------------------------------------------------------------


def nearswap(base: Tensor, deltas: Tensor, *, t: float = 0.0001) -> Tensor:
    """NearSwap: interpolate toward the source by w = clamp(t / |delta|, 0, 1) per entry.

    Entries closer than ``t`` are swapped for the source's; farther ones move by t/|delta|
    of the way, so the source's large (specialised) changes barely enter. t = 0 (or
    negative) returns the base, a t beyond every |delta| the source; |delta| is floored at
    1e-6. mergekit 0.1.5 requires t (default here 0.0001, the value of the method's
    reference model) and merges the base with exactly one source.
    """
    delta = deltas[0]
    w = (t / delta.abs().clamp(min=NEARSWAP_MIN_DISTANCE)).clamp(min=0, max=1)
    return w * (base + delta) + (1 - w) * base


SCE = dataclasses.replace(
    method_from_signature(sce, "sce", paper="https://arxiv.org/abs/2408.07990"),
    ignored_params=frozenset({"int8_mask"}),
    ignored_defaults=MappingProxyType({"int8_mask": False}),
)
ARCEE_FUSION = method_from_signature(arcee_fusion, "arcee_fusion", paper="https://arcee.ai", min_sources=1,
                                     max_sources=1)
NEARSWAP = method_from_signature(nearswap, "nearswap",
                                 paper="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
                                 min_sources=1, max_sources=1, required=("t",))
