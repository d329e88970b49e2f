"""Spherical methods: multislerp, nuslerp and karcher average directions on a hypersphere.

Why they exist: a plain weighted average of tensors that point in different directions is
shorter than any of them (the chord is shorter than the arc), which shrinks the merged
weights and the activations they produce. These methods average *directions* on the unit
sphere and then restore a norm taken from the inputs:

* ``multislerp``: the weighted mean direction of many inputs, times their weighted mean norm;
* ``nuslerp``: textbook slerp between two inputs, over the whole tensor or per row/column;
* ``karcher``: the Riemannian (Karcher) mean of the directions, times the mean norm.

What they average, as mergekit 0.1.5 does: ``multislerp`` and ``nuslerp`` take task vectors
(``source - base``) and add the base back when the recipe has a base, and the models themselves
when it has none. The caller's ``deltas`` are exactly that in both cases (without a base the
base is zeros and the deltas are the sources), so these two need no ``has_base``. ``karcher``
ignores the base's role in mergekit: a configured base is just one more model in the average,
so it must know whether ``base`` is a real model or the zeros of a base-less recipe.

dtype: as in :mod:`evomerge.merge.whole_model`, the math runs in at least float32 and the
result comes back in the compute dtype. mergekit does most of it in the input dtype (karcher
takes norms in float32), so with a float16/bfloat16 compute dtype the two differ by that
rounding; in float32 and float64 they agree to rounding. Each function's signature is its
parameter table (:func:`evomerge.merge.methods.method_from_signature`); the module constants
are what the method registry names.
"""

from __future__ import annotations

import torch

from evomerge.merge.methods import PerSource, method_from_signature
from evomerge.merge.whole_model import work_dtype

Tensor = torch.Tensor

#: nuslerp: |weight sum| below this counts as zero and gives t = 0.5 (mergekit's constant).
NUSLERP_ZERO_TOTAL = 1e-6
#: nuslerp: inputs count as colinear when 1 - cos^2 <= this (mergekit's eps = 1e-8, squared).
NUSLERP_COLINEAR = 1e-16
#: nuslerp: norms are clamped to at least this before normalising (mergekit's constant).
NUSLERP_MIN_NORM = 1e-7
#: multislerp: with normalize_weights, a |weight sum| below this is left undivided (see multislerp).
MULTISLERP_ZERO_TOTAL = 1e-8


def multislerp(
    base: Tensor,
    deltas: Tensor,
    *,
    weight: PerSource = 1.0,
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> Tensor:
    """Weighted spherical mean of the inputs: the mean direction times the weighted mean norm.

    The inputs are the task vectors with a base (the base is added back) and the models
    without one. Each input ``p_i`` becomes the direction ``u_i = p_i / (|p_i| + eps)``; the
    weighted mean ``M = sum w_i u_i`` gives the direction ``m = M / |M|``. mergekit then maps
    the weighted tangent vectors at ``m`` back onto the sphere; they sum to ``M - |M| m = 0``,
    so that step only multiplies ``m`` by ``cos(eps)`` (kept, so a large ``eps`` agrees too).
    The result is scaled by ``sum w_i |p_i|``. Whole tensor, flattened.

    Cases: one input is returned unchanged (mergekit too). When ``|M| < eps`` (antipodal
    inputs whose weights cancel, or all inputs zero) the result is the linear ``sum w_i p_i``:
    mergekit does that for two inputs and raises for more; here it holds for any count, so
    a layer the fine-tunes left untouched (all task vectors zero) merges to the base instead
    of stopping the merge. With ``normalize_weights`` (divide by the weight sum) a sum below
    ``MULTISLERP_ZERO_TOTAL`` in magnitude is left undivided, as ``linear`` does here;
    mergekit divides by it (inf/NaN). mergekit requires ``weight``; the default here is 1.0.
    """
    n = deltas.shape[0]
    work = work_dtype(base)
    b = base.to(work)
    if n == 1:
        return (b + deltas[0].to(work)).to(base.dtype)
    points = deltas.to(work).reshape(n, -1)  # a view for a float32 compute dtype
    w = torch.tensor(list(weight), dtype=work, device=base.device)
    total = float(w.sum())
    if normalize_weights and abs(total) >= MULTISLERP_ZERO_TOTAL:
        w = w / total
    norms = torch.linalg.vector_norm(points, dim=1)
    inv = 1.0 / (norms + eps)  # u_i = inv_i * p_i, never materialised: (N, numel) temporaries are avoided
    mean = points.T @ (w * inv)
    mean_norm = torch.linalg.vector_norm(mean)
    if float(mean_norm) < eps:
        merged = points.T @ w
    else:
        direction = mean / mean_norm
        # sum_i w_i (u_i - (u_i . m) m): zero but for rounding, as the docstring says
        tangent = mean - (w * inv * (points @ direction)).sum() * direction
        step = torch.linalg.vector_norm(tangent) + eps
        on_sphere = direction * torch.cos(step) + tangent * (torch.sin(step) / step)
        merged = on_sphere * (norms * w).sum()
    return (b + merged.reshape(base.shape)).to(base.dtype)


def nuslerp(
    base: Tensor,
    deltas: Tensor,
    *,
    weight: PerSource = 1.0,
    nuslerp_flatten: bool = True,
    nuslerp_row_wise: bool = False,
) -> Tensor:
    """Slerp between exactly two inputs at ``t = weight_2 / (weight_1 + weight_2)``.

    The inputs are the task vectors with a base (the base is added back) and the models
    without one. Unlike ``slerp`` the inputs are not rescaled: the result is
    ``(sin((1-t) theta) v0 + sin(t theta) v1) / sin(theta)``, theta the angle between them,
    and ``(1-t) v0 + t v1`` where they are colinear (``1 - cos^2 <= 1e-16``, parallel or
    antiparallel). ``t = 0.5`` when the weights sum to ~0 (|sum| < 1e-6).

    Vectors: the whole tensor with ``nuslerp_flatten`` (mergekit's default); otherwise each
    slice along the last dimension (a matrix's rows), or along the first dimension (its
    columns) with ``nuslerp_row_wise`` - mergekit's naming, kept. A zero input has no
    direction: its normalised form is zero, theta is 90 degrees, and the other input is
    scaled by ``sin`` of its share of the angle (mergekit's arithmetic, kept).
    mergekit requires ``weight``; the default here is 1.0.
    """
    work = work_dtype(base)
    w0, w1 = float(weight[0]), float(weight[1])
    total = w0 + w1
    t = 0.5 if abs(total) < NUSLERP_ZERO_TOTAL else w1 / total
    v0, v1 = deltas[0].to(work), deltas[1].to(work)
    if nuslerp_flatten or v0.dim() == 0:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif nuslerp_row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    merged = _slerp_last_dim(v0, v1, t)
    if not nuslerp_flatten and nuslerp_row_wise:
        merged = merged.transpose(0, -1)
    return (base.to(work) + merged.reshape(base.shape)).to(base.dtype)


def _slerp_last_dim(v0: Tensor, v1: Tensor, t: float) -> Tensor:
    """Slerp of every pair of vectors along the last dimension (norms kept, see nuslerp)."""
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=NUSLERP_MIN_NORM)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=NUSLERP_MIN_NORM)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0)
    colinear = (1 - cos * cos) <= NUSLERP_COLINEAR
    # colinear pairs take the lerp below; acos(0) keeps their (unused) spherical branch finite
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    return torch.where(colinear, (1 - t) * v0 + t * v1, spherical)


def karcher(
    base: Tensor,
    deltas: Tensor,
    *,
    max_iter: int = 10,
    tol: float = 1e-5,
    has_base: bool = True,
) -> Tensor:
    """Karcher (Riemannian) mean of the inputs' directions, times their mean norm; equal weights.

    Inputs: the sources, plus the base when the recipe has one (mergekit averages every
    model it is given, base included, last unless listed). Directions whose input norm is
    at most ``tol`` are left out of the mean direction but their norms still count in the
    mean norm, so an all-zero input shrinks the result. Start: the normalised mean of the
    directions (the first direction if that mean is shorter than ``tol``); then up to
    ``max_iter`` steps along the mean of the log maps (directions within angle ``tol`` of
    the mean contribute nothing), stopping once that step is shorter than ``tol``. Why not
    the normalised linear mean (its starting point): that one minimises chord lengths, the
    Karcher mean minimises squared angles, the distance intrinsic to the sphere; they part
    as the directions spread (equal weights on 0, 0 and 90 degrees: 26.6 vs 30 degrees).

    Cases: one input is returned unchanged; all inputs at most ``tol`` in norm give zeros.
    ``max_iter`` arrives as a float (a whole number, checked with the recipe).
    """
    work = work_dtype(base)
    n = deltas.shape[0]
    if n == 1 and not has_base:
        return deltas[0].to(base.dtype)
    inputs = _Inputs(deltas.to(work).reshape(n, -1), base.to(work).reshape(-1) if has_base else None)
    norms = inputs.norms()
    scale = norms.mean()  # every input counts, even those too short to have a direction
    valid = norms > tol
    if not bool(valid.any()):
        return torch.zeros_like(base)
    # directions u_i = p_i / |p_i| of the valid inputs, as coefficients on the inputs
    inv = valid.to(work) / torch.where(valid, norms, torch.ones_like(norms))  # 0 for the left-out ones
    share = 1.0 / int(valid.sum())
    mean = inputs.combine(share * inv)
    mean_norm = float(torch.linalg.vector_norm(mean))
    if mean_norm < tol:
        pick = torch.zeros_like(inv)  # the first valid direction
        first = int(valid.nonzero()[0])
        pick[first] = inv[first]
        mean = inputs.combine(pick)
    else:
        mean = mean / mean_norm
    for _ in range(int(max_iter)):
        cos = (inputs.dots(mean) * inv).clamp(-1.0, 1.0)
        theta = torch.acos(cos)
        moves = valid & (theta >= tol)
        # log map of each direction at the mean, theta / sin(theta) * (u - cos * mean), averaged
        coef = torch.where(moves, share * theta / torch.sin(theta), torch.zeros_like(theta))
        tangent = inputs.combine(coef * inv) - (coef * cos).sum() * mean
        step = torch.linalg.vector_norm(tangent)
        if float(step) < tol:
            break
        mean = torch.cos(step) * mean + torch.sin(step) * (tangent / step)
        length = torch.linalg.vector_norm(mean)
        if float(length) > tol:
            mean = mean / length
    return (scale * mean).reshape(base.shape).to(base.dtype)


class _Inputs:
    """karcher's inputs ``p_i = rows_i + shift`` and, with a base, ``shift`` itself as the last one.

    Why not stack them: a stacked copy of every input (and of every direction) costs
    (N + 1) x numel floats per tensor - gigabytes for a large embedding - while the
    mean only needs dot products with, and weighted sums of, the inputs.
    """

    def __init__(self, rows: Tensor, shift: Tensor | None) -> None:
        self.rows, self.shift = rows, shift

    def norms(self) -> Tensor:
        if self.shift is None:
            return torch.linalg.vector_norm(self.rows, dim=1)
        shifted = [torch.linalg.vector_norm(r + self.shift) for r in self.rows]
        return torch.stack([*shifted, torch.linalg.vector_norm(self.shift)])

    def dots(self, x: Tensor) -> Tensor:
        """``p_i . x`` for every input."""
        d = self.rows @ x
        if self.shift is None:
            return d
        sx = self.shift @ x
        return torch.cat([d + sx, sx.unsqueeze(0)])

    def combine(self, coef: Tensor) -> Tensor:
        """``sum_i coef_i p_i``."""
        out = self.rows.T @ coef[: self.rows.shape[0]]
        if self.shift is not None:
            out = out + coef.sum() * self.shift
        return out


MULTISLERP = method_from_signature(multislerp, "multislerp",
                                   paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
                                   uses_base=False, required=("weight",))
NUSLERP = method_from_signature(nuslerp, "nuslerp", paper=None, uses_base=False,  # mergekit names no reference
                                min_sources=2, max_sources=2, required=("weight",))
KARCHER = method_from_signature(karcher, "karcher", paper="https://arxiv.org/abs/2603.04972",
                                uses_base=False)
