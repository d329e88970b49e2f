"""Our merge methods against the installed mergekit's own implementations.

Deterministic methods must agree to 1e-5 relative (float32); random ones (DARE, DELLA)
use a different, device-independent generator, so only their keep rates, rank profile
and rescaling are compared.
"""

from __future__ import annotations

import zlib

import pytest
import torch

pytest.importorskip("mergekit")
from mergekit import sparsify as mk_sparsify  # noqa: E402
from mergekit.merge_methods import registry  # noqa: E402
from mergekit.merge_methods.base import TensorGroup  # noqa: E402

from evomerge.merge import methods  # noqa: E402
from evomerge.merge.methods import merge_tensor  # noqa: E402

SHAPES = [(48, 40), (37,), (6, 5, 7)]


def _models(shape, n, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    sources = [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n)]
    return base, sources


def _mergekit(name, base, sources, params, with_base=True):
    tensors = [base, *sources] if with_base else list(sources)
    group = TensorGroup.from_tensors(tensors, base_index=0 if with_base else None)
    return registry.get(name)([group], parameters=params)[0]


def _ours(name, base, sources, source_params, params):
    deltas = torch.stack([s - base for s in sources])
    return merge_tensor(name, base, deltas, source_params, params, seed=0, tensor_name="t")


def _assert_rel_close(ours, theirs, rel=1e-5):
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    scale = theirs.abs().max().item()
    err = (ours - theirs).abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel} x {scale:.3g}"


@pytest.mark.parametrize("name", sorted(methods.METHODS))
def test_parameter_names_and_defaults_match_mergekit(name):
    """Every parameter we expose (or accept and ignore) is mergekit's, with mergekit's default."""
    ours = methods.METHODS[name]
    spec = registry.get(name).spec
    theirs = {p.name: p for p in spec.parameters}
    exposed = {**ours.source_params, **ours.params}
    assert set(exposed) | ours.ignored_source_params | ours.ignored_params == set(theirs)
    for key, default in exposed.items():
        scope = theirs[key].scope.value
        assert (scope != "shared") == (key in ours.source_params), key
        if not theirs[key].required and theirs[key].default is not None:  # passthrough's scale: None = 1 here
            assert theirs[key].default == default, key
    assert ours.paper == spec.reference_url


GTA_CASES = [
    ("task_arithmetic", {"weight": [0.7, 1.2, -0.3]}, {}),
    ("task_arithmetic", {"weight": [0.7, 1.2, 0.4]}, {"normalize": True, "lambda": 0.8}),
    ("ties", {"weight": [0.7, 1.2, -0.3], "density": [0.3, 0.55, 0.9]}, {}),
    ("ties", {"weight": [0.5, 1.0, 0.8], "density": [0.2, 0.7, 1.0]}, {"normalize": False, "lambda": 1.3}),
    ("ties", {"weight": [0.5, 1.0, 0.8], "density": [0.2, 0.7, 0.5]}, {"rescale": True}),
    ("breadcrumbs", {"weight": [0.7, 1.2, 0.3], "density": [0.6, 0.8, 0.5], "gamma": [0.05, 0.1, 0.01]}, {}),
    ("breadcrumbs", {"weight": [0.7, 1.2, 0.3], "density": [0.9, 0.8, 0.5], "gamma": [0.2, 0.3, 0.6]},
     {"normalize": True, "rescale": True}),
    ("breadcrumbs_ties", {"weight": [0.7, 1.2, -0.3], "density": [0.6, 0.8, 0.5], "gamma": [0.05, 0.1, 0.02]}, {}),
    ("breadcrumbs_ties", {"weight": [0.7, 1.2, 0.3], "density": [0.6, 0.8, 0.5]}, {"normalize": True}),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name,source_params,params", GTA_CASES)
def test_task_arithmetic_family_matches_mergekit(name, source_params, params, shape):
    base, sources = _models(shape, 3, seed=zlib.crc32(f"{name}{shape}".encode()))
    theirs = _mergekit(name, base, sources, {**source_params, **params})
    ours = _ours(name, base, sources, source_params, params)
    _assert_rel_close(ours, theirs)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_mergekit(shape, normalize):
    base, sources = _models(shape, 3, seed=1)
    weight = [0.2, 0.5, 0.9]
    theirs = _mergekit("linear", base, sources, {"weight": weight, "normalize": normalize}, with_base=False)
    ours = _ours("linear", base, sources, {"weight": weight}, {"normalize": normalize})
    _assert_rel_close(ours, theirs)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.3, 0.75, 1.0])
def test_slerp_matches_mergekit(shape, t):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(shape, generator=g)
    other = torch.randn(shape, generator=g)  # far from parallel: true slerp branch
    theirs = _mergekit("slerp", base, [other], {"t": t})
    _assert_rel_close(_ours("slerp", base, [other], {}, {"t": t}), theirs)
    near = base * 1.5 + 1e-4 * other  # nearly parallel: lerp fallback in both
    _assert_rel_close(_ours("slerp", base, [near], {}, {"t": t}), _mergekit("slerp", base, [near], {"t": t}))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_mergekit(shape, n, filter_wise):
    base, sources = _models(shape, n, seed=3)
    sources[1] = sources[1] + 0.5 * (sources[0] - base)  # correlated deltas: t well inside (0, 1)
    theirs = _mergekit("model_stock", base, sources, {"filter_wise": filter_wise})
    ours = _ours("model_stock", base, sources, {}, {"filter_wise": filter_wise})
    _assert_rel_close(ours, theirs)


@pytest.mark.parametrize("density", [0.1, 0.37, 0.5, 0.99])
def test_sparsifiers_match_mergekit(density):
    x = torch.randn(33, 29, generator=torch.Generator().manual_seed(4))
    for rescale in (False, True):
        norm = mk_sparsify.RescaleNorm.l1 if rescale else None
        _assert_rel_close(methods.sparsify_magnitude(x, density, rescale),
                          mk_sparsify.magnitude(x, density, rescale_norm=norm))
        for gamma in (0.0, 0.05, 0.5):
            _assert_rel_close(methods.sparsify_outliers(x, density, gamma, rescale),
                              mk_sparsify.magnitude_outliers(x, density, rescale_norm=norm, gamma=gamma))


# -- random methods: keep rates and profiles -------------------------------------------

BIG = (300, 400)


def _kept(merged, base):
    return (merged - base) != 0


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_keep_rate_and_rescale_match_mergekit(name):
    torch.manual_seed(0)
    base, sources = _models(BIG, 1, seed=5)
    delta = sources[0] - base
    for density in (0.2, 0.6):
        sp = {"weight": [1.0], "density": [density]}
        theirs = _mergekit(name, base, sources, sp)
        ours = _ours(name, base, sources, sp, {})
        rate_ours = _kept(ours, base).float().mean().item()
        rate_theirs = _kept(theirs, base).float().mean().item()
        assert abs(rate_ours - density) < 0.005 and abs(rate_theirs - density) < 0.005
        # rescale (default on) restores the L1 norm of the delta in both
        l1 = delta.abs().sum().item()
        assert (ours - base).abs().sum().item() == pytest.approx(l1, rel=1e-4)
        assert (theirs - base).abs().sum().item() == pytest.approx(l1, rel=1e-4)


@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_della_keep_profile_matches_mergekit(name):
    torch.manual_seed(0)
    base, sources = _models(BIG, 1, seed=6)
    delta = sources[0] - base
    sp = {"weight": [1.0], "density": [0.5], "epsilon": [0.3]}
    theirs = _mergekit(name, base, sources, {**sp, "rescale": False})
    ours = _ours(name, base, sources, sp, {"rescale": False})
    # keep probability runs linearly from 0.2 (smallest in a row) to 0.8 (largest):
    # the lowest and highest quarters of each row keep ~0.275 and ~0.725 of their entries.
    ranks = delta.abs().argsort(dim=1).argsort(dim=1)
    low, high = ranks < BIG[1] // 4, ranks >= 3 * BIG[1] // 4
    for merged in (ours, theirs):
        kept = _kept(merged, base)
        assert kept.float().mean().item() == pytest.approx(0.5, abs=0.01)
        assert kept[low].float().mean().item() == pytest.approx(0.275, abs=0.01)
        assert kept[high].float().mean().item() == pytest.approx(0.725, abs=0.01)
