"""The fused hot-path kernel gives ``methods.merge_tensor``'s bits: over random cases with
forced magnitude ties, exact zeros, -0.0, empty and full windows, negative weights, DARE
masks with and without rescaling -
first the kernel's formula run eagerly (many cases, cheap), then compiled by Inductor
(fewer cases: each new source count / variant compiles once per process)."""

from __future__ import annotations

import random
import zlib

import pytest
import torch

from evomerge.merge import fused, methods

INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16}


def _case(trial: int, rnd: random.Random, n: int, method: str, dtype: torch.dtype = torch.float32):
    shape = rnd.choice([(7,), (64,), (33, 17), (128, 40), (5, 3, 4), (1000,)])
    gen = torch.Generator().manual_seed(trial)
    base = torch.randn(shape, generator=gen) * 0.5
    deltas = torch.randn((n, *shape), generator=gen) * 0.01
    if rnd.random() < 0.5:
        deltas = (deltas * 300).round() / 300  # many equal magnitudes: the index part of the window test matters
    if rnd.random() < 0.3:
        deltas[deltas.abs() < 0.002] = 0.0
    if rnd.random() < 0.3:
        deltas[deltas.abs() < 0.003] = -0.0
    if rnd.random() < 0.2:
        base[base.abs() < 0.3] = -0.0
    sp: dict[str, list[float]] = {"weight": [rnd.choice([rnd.uniform(-1, 1.5), 1.0, 0.0]) for _ in range(n)]}
    if method != "task_arithmetic":
        sp["density"] = [rnd.choice([1.0, rnd.uniform(0.0005, 0.95)]) for _ in range(n)]
    if method.startswith("breadcrumbs"):
        sp["gamma"] = [rnd.choice([0.0, rnd.uniform(0, 0.3)]) for _ in range(n)]
    params = {"normalize": rnd.random() < 0.5, "lambda": rnd.choice([1.0, 0.7])}
    if method.startswith("dare"):
        params["rescale"] = rnd.random() < 0.7
        if rnd.random() < 0.1:
            deltas[0] *= 1e-9  # L1 norms below mergekit's tolerance: no rescaling
    return base.to(dtype), deltas.to(dtype), sp, params


def _check(merger: fused.FusedMerger, method: str, base, deltas, sp, params, trial: int,
           out_dtype: torch.dtype | None = None) -> bool:
    plain = methods.merge_tensor(method, base, deltas, sp, params, seed=trial, tensor_name="t")
    if out_dtype is not None:  # rounded as the exported file is, widened into the float32 live model
        plain = plain.to(out_dtype).to(base.dtype)
    kwargs = methods.method_arguments(method, deltas.shape[0], sp, params, seed=trial, tensor_name="t")
    prepared = methods.PreparedDeltas.build(deltas)
    call = fused.plan_call(method, base, deltas, kwargs, prepared.orders)
    assert call is not None, (trial, method)
    target = torch.full(base.shape, float("nan"), dtype=plain.dtype)
    assert merger.merge_into(target, call, round_to=out_dtype)
    iv = INT_VIEW[plain.dtype]
    return torch.equal(plain.view(iv), target.view(iv))


@pytest.mark.parametrize("method", sorted(fused.FUSED_METHODS))
def test_kernel_formula_equals_eager_methods(method):
    torch.set_num_threads(1)
    eager = fused.FusedMerger(compile=False)
    rnd = random.Random(zlib.crc32(method.encode()))  # stable across runs (str hash is salted)
    for trial in range(120):
        n = rnd.randint(1, 5)
        dtype = torch.float64 if trial % 7 == 0 else torch.float32
        base, deltas, sp, params = _case(trial, rnd, n, method, dtype)
        assert _check(eager, method, base, deltas, sp, params, trial), (trial, method, n, dtype)


def test_compiled_kernel_is_bit_identical_to_eager_methods():
    merger = fused.FusedMerger()
    rnd = random.Random(7)
    checked = 0
    for trial in range(60):
        method = ["ties", "task_arithmetic", "breadcrumbs_ties", "breadcrumbs", "dare_ties", "dare_linear"][trial % 6]
        base, deltas, sp, params = _case(trial, rnd, 3, method)
        out_dtype = torch.bfloat16 if trial % 10 == 1 else None
        assert _check(merger, method, base, deltas, sp, params, trial, out_dtype), (trial, method, out_dtype)
        checked += 1
    assert merger.available and checked == 60


def test_cases_the_kernel_leaves_to_eager():
    base, deltas = torch.zeros(10), torch.randn(2, 10)
    orders = methods.PreparedDeltas.build(deltas).orders
    args = lambda m, sp, p: methods.method_arguments(m, 2, sp, p, seed=0, tensor_name="t")  # noqa: E731
    sparse = {"weight": [1.0, 1.0], "density": [0.5, 0.5]}
    assert fused.plan_call("della", base, deltas, args("della", {**sparse, "epsilon": [0.1, 0.1]}, {}),
                           orders) is None
    assert fused.plan_call("ties", base, deltas, args("ties", sparse, {"rescale": True}), orders) is None
    assert fused.plan_call("ties", base, deltas, args("ties", sparse, {}), None) is None  # no presort
    assert fused.plan_call("ties", base.bfloat16(), deltas.bfloat16(), args("ties", sparse, {}),
                              orders) is None
    # a full window needs no order, and rescale has nothing to restore there
    full = {"weight": [1.0, 1.0], "density": [1.0, 1.0]}
    assert fused.plan_call("ties", base, deltas, args("ties", full, {"rescale": True}), None) is not None
    nan = deltas.clone()
    nan[0, :6] = float("nan")
    nan_orders = methods.PreparedDeltas.build(nan).orders
    assert fused.plan_call("ties", base, nan, args("ties", sparse, {}), nan_orders) is None


def test_sign_election_sums_sources_in_order():
    """Weighted deltas that cancel to within one rounding: the elected sign is that of the
    source-by-source sum (here -4.7e-10, so '-'), in both paths and at every width - torch's
    sum over dim 0 associates differently at some widths and would elect '+' there."""
    column = torch.tensor([-1 / 300, -0.01, 0.0, 0.01, 1 / 300])
    total = torch.zeros(())
    for v in column:
        total = total + v
    assert -1e-9 < float(total) < 0
    for width in (1, 8, 16, 561):
        deltas = column[:, None].repeat(1, width).contiguous()
        base = torch.zeros(width)
        sp = {"weight": [1.0] * 5}
        plain = methods.merge_tensor("ties", base, deltas, sp, {}, seed=0, tensor_name="t")
        want = (column[0] + column[1]) / 2  # the two negative sources agree with '-'; normalised
        assert torch.equal(plain, torch.full((width,), float(want))), width
        assert _check(fused.FusedMerger(compile=False), "ties", base, deltas, sp, {}, 0), width


def test_a_failed_compile_falls_back_to_eager_once(caplog):
    """No C++ compiler (say): the first call logs one warning, reports False (the caller
    merges eagerly), and later calls do not retry."""
    merger = fused.FusedMerger(compile=False)
    merger.compiled = True  # behave as a compiled merger whose kernel cannot be built

    def broken(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found\nmore detail")

    merger._merge = broken
    base, deltas = torch.zeros(10), torch.randn(2, 10)
    kwargs = methods.method_arguments("task_arithmetic", 2, {"weight": [1.0, 1.0]}, {}, seed=0, tensor_name="t")
    call = fused.plan_call("task_arithmetic", base, deltas, kwargs, None)
    target = torch.zeros(10)
    with caplog.at_level("WARNING", logger="evomerge.merge.fused"):
        assert not merger.merge_into(target, call, None)
        assert not merger.merge_into(target, call, None)
    assert not merger.available and torch.equal(target, torch.zeros(10))
    warnings = [r for r in caplog.records if "merging eagerly" in r.getMessage()]
    assert len(warnings) == 1 and "InvalidCxxCompiler" in warnings[0].getMessage()
    assert "more detail" not in warnings[0].getMessage()  # one line
