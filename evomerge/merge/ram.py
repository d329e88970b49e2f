"""Reinforced Agent Merging (RAM) and RAM+ with a tensor-local ratio (``ramplus_tl``).

Why these exist: averaging task vectors (task arithmetic with normalize) halves a change
that only one source made, because the other sources' zeros enter the mean. RAM
(arXiv 2601.13572) counts, per position, how many sources really changed it (``|delta| >
epsilon``): a position changed by one source keeps that source's full change (*unique*),
a position changed by several gets the mean over those sources only (*shared*), and a
position changed by none keeps the base. ``ramplus_tl`` additionally amplifies each
source's unique changes by ``1 + r * min(rho_i, alpha)``, where ``rho_i`` is, in this
tensor, the number of source i's shared positions over its unique ones: a source whose
changes mostly overlap with the others' has its few unique changes drowned out less.

Numerics follow mergekit 0.1.5 (``merge_methods/ram.py``) bit for bit (float32, bfloat16
and float16; ``tests/test_methods_ram.py`` checks against mergekit's kernels): the same
per-element operations on the tensor flattened to ``(N, numel)`` and the same reduction
over sources (``sum(dim=0)`` of a differently shaped tensor may associate differently). Both need a base model. Changes of at most ``epsilon`` are dropped, so with
one source ``ram`` is that source with its tiny changes reset to the base (not the source
itself). dtype: ``ram`` runs in the compute dtype throughout; ``ramplus_tl`` computes the
amplification in float32 (float64 inputs stay float64), adds it to the base in that
precision and rounds once to the compute dtype, as mergekit does before its output cast.

One deliberate difference: with ``epsilon = 0`` a source that changed nothing at all
gives mergekit's ratio 0/0 = NaN, which then turns the whole merged tensor into NaN
(NaN * 0 is NaN); here that source's ratio counts as 0. It has no unique positions, so
its factor multiplies nothing and every other result is unchanged.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from evomerge.merge.methods import method_from_signature

Tensor = torch.Tensor

#: mergekit's reference for both methods (its ``reference_url``).
RAM_PAPER = "https://arxiv.org/abs/2601.13572"


class Changes(NamedTuple):
    """Which sources changed which positions, for one tensor flattened to ``(N, numel)``."""

    kept: Tensor  # (N, numel) compute dtype: the deltas with changes <= epsilon zeroed
    changed: Tensor  # (N, numel) bool: |delta| > epsilon
    count: Tensor  # (1, numel) int64: how many sources changed each position


def changes(deltas: Tensor, epsilon: float) -> Changes:
    """The above-threshold changes of ``deltas`` (N, *S) and how many sources made each."""
    flat = deltas.reshape(deltas.shape[0], -1)
    changed = flat.abs() > epsilon
    return Changes(flat * changed, changed, changed.sum(dim=0, keepdim=True))


def shared_mean(c: Changes) -> Tensor:
    """Per source, its change divided by the number of sources that changed that position
    (a unique change divided by 1 stays exact; unchanged positions are 0 / 1)."""
    return c.kept / c.count.clamp(min=1)


def ram(base: Tensor, deltas: Tensor, *, epsilon: float = 1e-5) -> Tensor:
    """RAM: unique changes summed, shared changes averaged over the sources that made them.

    merged = base + sum_i kept_i / max(count, 1), with kept_i = delta_i where
    |delta_i| > epsilon (else 0) and count the number of such sources per position.
    mergekit default: epsilon=1e-5. Needs a base model.
    """
    merged = shared_mean(changes(deltas, epsilon)).sum(dim=0)
    return base + merged.reshape(base.shape)


def amplification(c: Changes, r: float, alpha: float, epsilon: float) -> Tensor:
    """(N,) float32: ``1 + r * clamp(shared_i / unique_i, 0, alpha)`` per source.

    shared_i / unique_i count source i's changed positions that others changed too / that
    only it changed, in this tensor. As mergekit, the divisor is ``max(unique_i, epsilon)``
    (so a source without unique positions gets the capped ratio; its factor then
    multiplies nothing), except that 0 / 0 (epsilon 0, nothing changed) counts as 0.
    """
    shared = (c.changed & (c.count > 1)).sum(dim=1).to(torch.float32)
    unique = (c.changed & (c.count == 1)).sum(dim=1).to(torch.float32)
    ratio = shared / unique.clamp(min=epsilon)
    ratio = torch.where(torch.isnan(ratio), torch.zeros_like(ratio), ratio)
    return 1 + r * ratio.clamp(min=0, max=alpha)


def ramplus_tl(base: Tensor, deltas: Tensor, *, r: float = 0.1, alpha: float = 0.2,
               epsilon: float = 1e-5) -> Tensor:
    """RAM+ (tensor-local): RAM with each source's unique changes scaled by 1 + r * min(rho_i, alpha).

    rho_i = (source i's shared positions) / (its unique positions) in this tensor; shared
    changes are averaged as in RAM. mergekit defaults: r=0.1, alpha=0.2, epsilon=1e-5.
    With r = 0 or alpha = 0 it is RAM. Needs a base model.
    """
    c = changes(deltas, epsilon)
    factor = amplification(c, r, alpha, epsilon).unsqueeze(-1)
    unique = c.count == 1
    shared = c.count > 1
    # the unique term is float32 (the factor's dtype), the shared one the compute dtype;
    # their sum, the reduction over sources and the base's addition run in float32 too
    per_source = c.kept * unique * factor + c.kept * shared / c.count.clamp(min=1)
    merged = per_source.sum(dim=0).reshape(base.shape)
    return (base + merged).to(base.dtype)


RAM = method_from_signature(ram, "ram", paper=RAM_PAPER)
RAMPLUS_TL = method_from_signature(ramplus_tl, "ramplus_tl", paper=RAM_PAPER)
