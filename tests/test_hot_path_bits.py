"""The search's hot path (presorted magnitude orders + reused workspace) gives the very bits of
the plain path that exports use — over random cases with forced magnitude ties, exact
zeros, -0.0, negative weights, every dtype and 1-5 sources."""

from __future__ import annotations

import random

import torch

from evomerge.merge import methods

METHOD_NAMES = ["ties", "breadcrumbs", "breadcrumbs_ties", "task_arithmetic", "dare_ties", "dare_linear",
                "della", "della_linear", "linear"]
INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
            torch.float16: torch.int16}


def _case(trial: int, rnd: random.Random):
    dtype = rnd.choice([torch.float32, torch.float32, torch.bfloat16, torch.float16, torch.float64])
    shape = rnd.choice([(7,), (64,), (33, 17), (128, 40), (5, 3, 4)])
    n = rnd.randint(1, 5)
    gen = torch.Generator().manual_seed(trial)
    base = torch.randn(shape, generator=gen) * 0.5
    deltas = torch.randn((n, *shape), generator=gen) * 0.01
    if rnd.random() < 0.5:
        deltas = (deltas * 300).round() / 300  # many equal magnitudes: tie handling matters
    if rnd.random() < 0.3:
        deltas[deltas.abs() < 0.002] = 0.0
    if rnd.random() < 0.2:
        base[base.abs() < 0.3] = -0.0
    method = rnd.choice(METHOD_NAMES)
    sp: dict[str, list[float]] = {"weight": [rnd.choice([rnd.uniform(-1, 1.5), 1.0, 0.0]) for _ in range(n)]}
    if method not in ("task_arithmetic", "linear"):
        sp["density"] = [rnd.choice([1.0, rnd.uniform(0.05, 0.95)]) for _ in range(n)]
    if method.startswith("breadcrumbs"):
        sp["gamma"] = [rnd.uniform(0, 0.3) for _ in range(n)]
    if method.startswith("della"):
        sp["density"] = [rnd.uniform(0.2, 0.8) for _ in range(n)]
        sp["epsilon"] = [0.1] * n
    params: dict[str, object] = {"normalize": rnd.random() < 0.5}
    if method != "linear":
        params["lambda"] = rnd.choice([1.0, 0.7])
    if method.startswith(("dare", "della", "ties", "breadcrumbs")):
        params["rescale"] = rnd.random() < 0.5
    if method in ("ties", "breadcrumbs", "breadcrumbs_ties"):
        params.pop("rescale", None)
    return method, base.to(dtype), deltas.to(dtype), sp, params


def test_hot_path_is_bit_identical_to_plain_path():
    torch.set_num_threads(1)
    rnd = random.Random(0)
    workspace = methods.Workspace()
    checked = 0
    for trial in range(300):
        method, base, deltas, sp, params = _case(trial, rnd)
        try:
            plain = methods.merge_tensor(method, base, deltas, sp, params, seed=trial, tensor_name="t")
        except methods.MethodError:
            continue  # a combination the method refuses (e.g. rescale where it has no meaning)
        prepared = methods.PreparedDeltas.build(deltas) if method in methods.USES_SORTED_MAGNITUDES else None
        hot = methods.merge_tensor(method, base, deltas, sp, params, seed=trial, tensor_name="t",
                                   prepared=prepared, workspace=workspace).clone()
        iv = INT_VIEW[plain.dtype]
        assert hot.dtype == plain.dtype and hot.shape == plain.shape
        assert torch.equal(plain.view(iv), hot.view(iv)), (trial, method, base.dtype)
        checked += 1
    assert checked >= 200
