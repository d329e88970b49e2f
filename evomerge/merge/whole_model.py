"""Whole-model methods: linear, slerp and model_stock mix the sources themselves, not thinned
deltas; passthrough copies its one source (optionally scaled).

Each rebuilds ``source_i = base + delta_i`` (so the base's own values count as mergekit's
do) and, as mergekit does, accumulates in at least float32, returning the compute dtype.
Each function's signature is its parameter table (see
:func:`evomerge.merge.methods.method_from_signature`); the module constants are what the
method registry's entries name.
"""

from __future__ import annotations

import torch

from evomerge.merge.methods import PerSource, method_from_signature

Tensor = torch.Tensor

#: mergekit's slerp: |cos| above this interpolates linearly (a fixed constant there too).
SLERP_DOT_THRESHOLD = 0.9995


def work_dtype(x: Tensor) -> torch.dtype:
    """mergekit's linear/slerp accumulate in float32 unless the inputs are float64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def linear(base: Tensor, deltas: Tensor, *, weight: PerSource = 1.0, normalize: bool = True) -> Tensor:
    """Weighted average of the sources (``base + delta_i``); the base itself gets no weight.

    mergekit defaults: normalize=true (weight required there). Differs from mergekit
    only when the weights sum to ~0 with normalize on: mergekit divides (inf/NaN), here
    the sum is left undivided as task arithmetic does.
    """
    work = work_dtype(base)
    b = base.to(work)
    out = torch.zeros_like(b)
    for i in range(deltas.shape[0]):
        out.add_((b + deltas[i].to(work)) * weight[i])
    total = sum(weight)
    if normalize and abs(total) >= 1e-8:
        out.div_(total)
    return out.to(base.dtype)


def slerp(base: Tensor, deltas: Tensor, *, t: float = 0.5) -> Tensor:
    """Spherical interpolation from the base (t=0) to the one source (t=1), whole tensor.

    As mergekit: norms below 1e-8 count as 1; when |cos| of the angle exceeds
    ``SLERP_DOT_THRESHOLD`` (0.9995: nearly parallel or antiparallel) it falls back to lerp.
    mergekit requires t; the default here is 0.5.
    """
    work = work_dtype(base)
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


def model_stock(base: Tensor, deltas: Tensor, *, filter_wise: bool = False) -> Tensor:
    """Model Stock: pull the sources' average towards the base by the mean pairwise cosine.

    t = N cos / (1 + (N - 1) cos) with cos the mean pairwise cosine of the deltas (over
    the whole tensor, or per row - last dim - when ``filter_wise``); merged =
    t * mean(sources) + (1 - t) * base, and the base where 1 + (N-1) cos ~ 0.
    mergekit default: filter_wise=false.
    """
    work = work_dtype(base)
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


def passthrough(base: Tensor, deltas: Tensor, *, scale: PerSource = 1.0, has_base: bool = True) -> Tensor:
    """The one source, times its ``scale``; a base model takes no part.

    Why it exists: mergekit uses it to copy (and rescale) one model's tensors, e.g. to
    stitch layers of a model into another recipe. mergekit 0.1.5 takes at most one input
    and multiplies it by ``scale`` when given (default: none, i.e. 1 here, which returns
    the source unchanged). Unlike the other methods here it works in the compute dtype,
    as mergekit's single multiply does. With a base the source is rebuilt as
    ``base + delta``; without one it is the delta itself, bit for bit.
    """
    source = base + deltas[0] if has_base else deltas[0].clone()
    return source if scale[0] == 1.0 else source.mul_(scale[0])


LINEAR = method_from_signature(linear, "linear", paper="https://arxiv.org/abs/2203.05482", uses_base=False,
                               required=("weight",))
SLERP = method_from_signature(slerp, "slerp", paper="https://en.wikipedia.org/wiki/Slerp", min_sources=1,
                              max_sources=1, required=("t",))
MODEL_STOCK = method_from_signature(model_stock, "model_stock", paper="https://arxiv.org/abs/2403.19522",
                                    min_sources=2)
PASSTHROUGH = method_from_signature(passthrough, "passthrough", paper=None, uses_base=False, min_sources=1,
                                    max_sources=1)
