"""evomerge vs mergekit 0.1.5 on tiny random Llama models, for every method.

The recipe varies every parameter per layer (and per attn/mlp in one layer); mergekit runs
in-process on ``to_mergekit_yaml``'s export of it, evomerge through ``merge_to_folder``.
Deterministic methods must agree to 1e-5 (relative to each tensor's scale); random ones
(DARE, DELLA: different RNGs by design) must keep the same fraction of elements and give
the same update norm within sampling noise.
"""

from __future__ import annotations

import pytest

pytest.importorskip("mergekit")

from mergekit_compare import (  # noqa: E402
    DETERMINISTIC_METHODS,
    RANDOM_METHODS,
    TOLERANCE,
    delta_stats,
    load_folder,
    max_rel_diff,
    mixed_recipe,
    per_layer_recipe,
    run_mergekit_inprocess,
)

from evomerge.merge.groups import LAYOUTS_BY_MODEL_TYPE  # noqa: E402
from evomerge.merge.materialise import merge_to_folder  # noqa: E402
from evomerge.merge.mergekit_yaml import to_mergekit_yaml  # noqa: E402

pytestmark = pytest.mark.slow
N_LAYERS = 4  # tiny_models.TINY_LLAMA


def _both(recipe, tmp_path):
    text = to_mergekit_yaml(recipe, N_LAYERS, LAYOUTS_BY_MODEL_TYPE["llama"])
    theirs = load_folder(run_mergekit_inprocess(text, tmp_path / "mergekit"))
    ours = load_folder(merge_to_folder(recipe, tmp_path / "evomerge"))
    return ours, theirs


@pytest.mark.parametrize("method", DETERMINISTIC_METHODS)
def test_deterministic_methods_match(method, tiny_models, tmp_path):
    recipe = per_layer_recipe(method, tiny_models.base_ref, tiny_models.source_refs, N_LAYERS)
    ours, theirs = _both(recipe, tmp_path)
    assert max_rel_diff(ours, theirs) <= TOLERANCE
    # the per-layer settings matter: a uniform recipe gives a clearly different model
    # (methods with nothing to vary per layer - arcee_fusion, ram - have one setting)
    if any(g != recipe.groups["default"] for g in recipe.groups.values()):
        uniform = recipe.model_copy(update={"groups": {"default": recipe.groups["default"]}})
        flat = load_folder(merge_to_folder(uniform, tmp_path / "uniform"))
        assert max_rel_diff(flat, theirs) > 1e-3


def test_mixed_methods_match_through_mergekit_multi(tiny_models, tmp_path):
    recipe = mixed_recipe(tiny_models.base_ref, tiny_models.source_refs, N_LAYERS)
    ours, theirs = _both(recipe, tmp_path)
    assert max_rel_diff(ours, theirs) <= TOLERANCE


@pytest.mark.parametrize("method", RANDOM_METHODS)
def test_random_methods_match_in_distribution(method, tiny_models, tmp_path):
    recipe = per_layer_recipe(method, tiny_models.base_ref, tiny_models.source_refs, N_LAYERS)
    ours, theirs = _both(recipe, tmp_path)
    base = load_folder(tiny_models.base)
    s_ours, s_theirs = delta_stats(ours, base), delta_stats(theirs, base)
    # densities are 0.3-0.8 per source: the kept fraction is far from 0 and 1, so a wrong
    # density or a missing rescale would move these by much more than sampling noise
    assert 0.2 < s_theirs["keep"] < 0.99
    assert abs(s_ours["keep"] - s_theirs["keep"]) < 0.02
    assert s_ours["norm"] / s_theirs["norm"] == pytest.approx(1.0, abs=0.05)
