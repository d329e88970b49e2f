"""Sparsifiers: mergekit 0.1.5's ``sparsify.py`` semantics on one task vector.

Why a module of its own: every task-arithmetic-family method is "sparsify each task vector,
then mix" (see :mod:`evomerge.merge.family`); the sparsifiers are that first half, shared
by all rows. Each writes ``x * keep`` (a signed zero where dropped) into ``out`` when given
and returns ``x`` itself when nothing is dropped. ``rescale`` restores the L1 norm (mergekit
0.1.5 rescales by the norm ratio, not by 1/density), skipped when either norm is below
1e-7. Random masks come from :mod:`evomerge.merge.rng` (the same bits on CPU and GPU).
"""

from __future__ import annotations

import torch

from evomerge.merge import rng
from evomerge.merge.ranking import magnitude_window, outlier_window, rank_window, ranking_view
from evomerge.merge.scratch import Workspace

Tensor = torch.Tensor

#: mergekit's rescale tolerance (sparsify.rescaled_masked_tensor).
_RESCALE_EPS = 1e-7


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
    keep = rank_window(mag.reshape(-1), *window, order=order,
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
    order = ranking_view(rows).argsort(dim=1, stable=True)
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

