"""The task-arithmetic family, eagerly: one formula, parametrised by a :mod:`family` row.

Numerics follow mergekit 0.1.5 (``generalized_task_arithmetic.py``): each task vector is
sparsified on its own (see :mod:`evomerge.merge.sparsify`) and multiplied by its
``weight``; with sign election ("consensus") a sign is elected per element from the sign
of the weighted sum (a zero sum elects +), only agreeing entries are kept (the disjoint
merge) and ``normalize`` divides by the sum of the agreeing weights (a zero sum divides
by 1); without it the sparsified deltas are summed and ``normalize`` divides by the plain
weight sum (|sum| < 1e-8 divides by 1). The mix is scaled by ``lambda`` and added to the
base. Math runs in the compute dtype of ``base``/``deltas``.

Each row becomes one :class:`~evomerge.merge.methods.MergeMethod` (``METHODS.<name>``,
the targets of the method registry), whose parameter table the row states.
"""

from __future__ import annotations

import functools
from types import MappingProxyType, SimpleNamespace
from typing import Any, Callable, Sequence

import torch

from evomerge.merge.family import DELLA, FAMILY, MAGNITUDE, NONE, OUTLIERS, RANDOM, FamilyRow
from evomerge.merge.methods import MergeMethod
from evomerge.merge.scratch import Scratch, Workspace
from evomerge.merge.sparsify import sparsify_bernoulli, sparsify_della, sparsify_magnitude, sparsify_outliers

Tensor = torch.Tensor

#: sparsify(i, delta_i, out, scratch) -> sparsified delta_i: ``out`` (written) or delta_i itself.
Sparsify = Callable[[int, Tensor, Tensor, Scratch], Tensor]


def merge_family(
    row: FamilyRow,
    base: Tensor,
    deltas: Tensor,
    *,
    weight: Sequence[float],
    normalize: bool,
    lambda_: float,
    rescale: bool = False,
    density: Sequence[float] = (),
    gamma: Sequence[float] = (),
    epsilon: Sequence[float] = (),
    seeds: Sequence[int] = (),
    scratch: Scratch | None = None,
) -> Tensor:
    """``row``'s merge of one tensor, with the arguments ``methods.method_arguments`` builds."""
    s = row.sparsification
    thin: Sparsify | None
    if s is NONE:
        thin = None
    elif s is MAGNITUDE:
        thin = lambda i, d, out, sc: sparsify_magnitude(  # noqa: E731
            d, density[i], rescale, ws=sc.ws, out=out, order=sc.order(i))
    elif s is OUTLIERS:
        thin = lambda i, d, out, sc: sparsify_outliers(  # noqa: E731
            d, density[i], gamma[i], rescale, ws=sc.ws, out=out, order=sc.order(i))
    elif s is RANDOM:
        thin = lambda i, d, out, sc: sparsify_bernoulli(  # noqa: E731
            d, density[i], seeds[i], rescale, ws=sc.ws, out=out)
    elif s is DELLA:
        thin = lambda i, d, out, sc: sparsify_della(  # noqa: E731
            d, density[i], epsilon[i], seeds[i], rescale, ws=sc.ws, out=out)
    else:
        raise ValueError(f"{row.name}: no eager sparsifier for {s.name!r}")
    return combine(base, deltas, weight, thin, row.consensus, normalize, lambda_, scratch)


def combine(
    base: Tensor,
    deltas: Tensor,
    weight: Sequence[float],
    sparsify: Sparsify | None,
    consensus: bool,
    normalize: bool,
    lambda_: float,
    scratch: Scratch | None,
) -> Tensor:
    """base + lambda * (sum_i w_i * sparsify(delta_i)) [/ divisor], optional TIES sign election.

    Every intermediate lives in the workspace and is updated in place, with exactly the
    operations (and so the roundings) of the plain formulas: x * keep, * scale, * w_i,
    sum over sources, agreement masks, disjoint sum, / divisor, * lambda, + base.
    """
    sc = scratch or Scratch(Workspace())
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


def _method(row: FamilyRow) -> MergeMethod:
    source_params, params = row.source_params(), row.params()
    consensus = "sign election, disjoint merge" if row.consensus else "weighted sum"
    return MergeMethod(
        name=row.name,
        fn=functools.partial(merge_family, row),
        paper=row.paper,
        source_params=MappingProxyType(source_params),
        params=MappingProxyType(params),
        uses_base=True,
        min_sources=1,
        max_sources=None,
        random=row.sparsification.random,
        ignored_source_params=frozenset(row.ignored_source_params()),
        ignored_params=frozenset(row.ignored_params()),
        summary=f"{row.sparsification.name} sparsification, {consensus}",
        required=frozenset({"weight"}),
        ignored_defaults=MappingProxyType({**row.ignored_source_params(), **row.ignored_params()}),
        takes_scratch=True,
    )


#: ``METHODS.<name>``: each row's MergeMethod (what the method registry's entries name).
METHODS: Any = SimpleNamespace(**{name: _method(row) for name, row in FAMILY.items()})
