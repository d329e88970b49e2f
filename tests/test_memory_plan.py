"""The memory plan (bytes per residency mode, from headers only), its choice under caps, and
the in-place merger's modes: every mode gives the bits of the folder merge, and a mode that
does not fit is refused before a single tensor is read."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge.errors import ConfigError, MemoryPlanError
from evomerge.merge.memory_plan import (GB, ModelSizes, choose_residency, input_bytes, plan_mode, residency_options,
                                        workspace_bytes)
from evomerge.merge.recipe import MergeRecipe
from evomerge.merge.sources import ModelSource, load_model_set

# -- the plan on a hand-computed case ------------------------------------------------------------
#: 1000 elements, largest tensor 100, 3 sources, a base; live bfloat16 (2), compute float32 (4),
#: files bfloat16 (2), distinct shapes 300 elements.
TINY = ModelSizes(elements=1000, largest=100, sources=3, has_base=True, live_itemsize=2, compute_itemsize=4,
                  source_itemsize=2, zero_elements=300)
# live 2000, base 4000, task vectors 12000, orders 12000, workspace (8+3)*100*4 + 100 = 4500,
# inputs (3+1)*100*4 = 1600, temporaries 100 * max(24, 3*4) = 2400, reads 2*100*2 = 400, headroom 1000


def test_plan_bytes_hand_computed():
    cpu = residency_options(TINY, device_type="cpu", headroom_bytes=1000)
    assert [r.mode for r in cpu] == ["resident_sorted", "resident", "streaming"]
    assert [(r.device_bytes, r.host_bytes) for r in cpu] == [
        (2000 + 4000 + 12000 + 12000 + 4500 + 2400 + 1000, 0),
        (2000 + 4000 + 12000 + 4500 + 2400 + 1000, 0),
        (2000 + (4500 + 1600) + 400 + 2400 + 1000, 0)]
    assert dict(cpu[0].parts) == {"live model": 2000, "base copy": 4000, "task vectors": 12000,
                                  "magnitude orders": 12000, "workspace": 4500, "temporaries": 2400,
                                  "headroom": 1000}
    gpu = residency_options(TINY, device_type="cuda", headroom_bytes=1000)
    assert [r.mode for r in gpu] == ["resident", "host", "streaming"]  # presort stays off on GPUs
    assert [(r.device_bytes, r.host_bytes) for r in gpu] == [
        (2000 + 4000 + 12000 + 4500 + 2400 + 1000, 0),
        (2000 + 4500 + 1600 + 2400 + 1000, 4000 + 12000),
        (2000 + (4500 + 1600) + 2400 + 1000, 400)]
    no_base = ModelSizes(**{**TINY.__dict__, "has_base": False})
    assert plan_mode(no_base, "resident", device_type="cpu").part("base copy") == 300 * 4  # one zero per shape
    assert workspace_bytes(TINY) == 4500 and input_bytes(TINY) == 1600
    line = cpu[2].describe()
    assert line.startswith("streaming: 0.00 GB on cpu (live model 0.00 + workspace 0.00") and "\n" not in line
    with pytest.raises(MemoryPlanError, match="on a CPU use resident or streaming"):
        plan_mode(TINY, "host", device_type="cpu")


def test_model_sizes_from_headers(tiny_models):
    ms = load_model_set(tiny_models.base_ref, tiny_models.source_refs)
    sizes = ModelSizes.from_model_set(ms, live_dtype="float32", compute_dtype=torch.bfloat16)
    files = load_file(Path(tiny_models.base) / "model.safetensors")
    floats = [t for t in files.values() if t.is_floating_point()]
    assert sizes == ModelSizes(elements=sum(t.numel() for t in floats), largest=max(t.numel() for t in floats),
                               sources=3, has_base=True, live_itemsize=4, compute_itemsize=2, source_itemsize=4,
                               zero_elements=sum(math.prod(s) for s in {tuple(t.shape) for t in floats}))


# -- the choice ----------------------------------------------------------------------------------
def test_choose_each_mode_under_a_cap():
    cpu = residency_options(TINY, device_type="cpu", headroom_bytes=1000)
    big = 10**12
    pick = lambda cap: choose_residency(cpu, device_free=big, host_free=big, cap_bytes=cap).mode  # noqa: E731
    assert pick(None) == "resident_sorted"
    assert pick(cpu[0].device_bytes) == "resident_sorted"
    assert pick(cpu[0].device_bytes - 1) == "resident"
    assert pick(cpu[1].device_bytes - 1) == "streaming"
    assert choose_residency(cpu, device_free=cpu[1].device_bytes, host_free=0).mode == "resident"  # measured
    assert choose_residency(cpu, device_free=big, host_free=big, mode="streaming").mode == "streaming"  # forced

    gpu = residency_options(TINY, device_type="cuda", headroom_bytes=1000)
    g = lambda dev, host: choose_residency(gpu, device_free=dev, host_free=host).mode  # noqa: E731
    assert g(big, big) == "resident"
    assert g(gpu[0].device_bytes - 1, big) == "host"
    assert g(gpu[0].device_bytes - 1, gpu[1].host_bytes - 1) == "streaming"  # host memory too small for host
    assert choose_residency(gpu, device_free=0, host_free=big, cap_bytes=gpu[0].device_bytes).mode == "resident"


def test_nothing_fits_is_one_line():
    sizes = ModelSizes(elements=10**9, largest=5 * 10**7, sources=3, has_base=True, live_itemsize=2,
                       compute_itemsize=2, source_itemsize=2)
    options = residency_options(sizes, device_type="cpu", headroom_bytes=GB)
    # streaming: live 2e9 + workspace 1.15e9 + inputs 0.4e9 + reads 0.2e9 + temporaries 1.2e9 + 1 GB headroom
    assert options[-1].device_bytes == 4.95e9 + GB
    with pytest.raises(MemoryPlanError) as err:
        choose_residency(options, device_free=10**12, host_free=10**12, cap_bytes=4 * GB)
    assert str(err.value) == (
        "the smallest memory plan (streaming) needs 5.61 GB on cpu but the ray.actor_memory_gb cap allows 4.00 GB; "
        "use a bigger machine or GPU, raise ray.actor_memory_gb, merge fewer sources, or set merge.compute_dtype "
        "to bfloat16 or float16")
    with pytest.raises(MemoryPlanError) as err:
        choose_residency(options, device_free=3 * GB, host_free=3 * GB, mode="resident")
    assert str(err.value).startswith("memory mode (resident) needs ") and "but 3.00 GB is free;" in str(err.value)
    with pytest.raises(MemoryPlanError, match="memory mode 'host' is not one of this cpu actor's"):
        choose_residency(options, device_free=10**12, host_free=10**12, mode="host")


# -- the merger's modes --------------------------------------------------------------------------
MODES = ("resident_sorted", "resident", "streaming")


def _live_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _files(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def model_set(tiny_models):
    return load_model_set(tiny_models.base_ref, tiny_models.source_refs)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic", "della", "slerp"])
def test_every_mode_gives_the_folder_bits(tiny_models, model_set, tmp_path, method):
    from mergekit_compare import per_layer_recipe

    from evomerge.merge.materialise import InPlaceMerger, merge_to_folder

    recipe = per_layer_recipe(method, tiny_models.base_ref, tiny_models.source_refs, 4)
    states = {}
    for mode in MODES:
        model = _live_model(tiny_models.base)
        merger = InPlaceMerger(model, model_set, device="cpu", residency=mode)
        assert merger.residency == mode and merger.plan.mode == mode
        merger.apply(recipe)
        if mode == "streaming":
            assert merger.task_vector_bytes() == 0
            merger.apply(recipe)  # a second merge reads the files again: no drift
        assert merger.resident_bytes() <= merger.planned_resident_bytes()
        states[mode] = _state(model)
    folder = _files(merge_to_folder(recipe, tmp_path / method))
    for name, t in folder.items():
        for mode in MODES:
            assert torch.equal(states[mode][name], t), (mode, name)


def test_workspace_reaches_the_planned_size(tiny_models, model_set):
    """A TIES merge of every tensor grows the workspace to exactly the plan's figure."""
    from evomerge.merge.materialise import InPlaceMerger

    srcs = tiny_models.source_refs
    recipe = MergeRecipe.from_dict({"base": tiny_models.base_ref, "sources": srcs, "groups": {"default": {
        "method": "ties", "source_params": {s: {"weight": 0.5, "density": 0.5} for s in srcs}}}})
    for mode in MODES:
        merger = InPlaceMerger(_live_model(tiny_models.base), model_set, device="cpu", residency=mode)
        merger.apply(recipe)
        assert merger._workspace.nbytes() == merger.plan.part("workspace"), mode  # noqa: SLF001
        if mode == "resident_sorted":  # orders built on the first TIES merge: now all of the plan is held
            assert merger.resident_bytes() == merger.planned_resident_bytes()


def test_a_mode_that_does_not_fit_fails_before_reading(tiny_models, model_set, monkeypatch):
    from evomerge.merge.materialise import InPlaceMerger

    def no_reads(self, name, device="cpu"):
        raise AssertionError(f"{name} was read")

    model = _live_model(tiny_models.base)
    monkeypatch.setattr(ModelSource, "get_tensor", no_reads)
    with pytest.raises(MemoryPlanError, match=r"^memory mode \(resident\) needs .* but the ray.actor_memory_gb cap"):
        InPlaceMerger(model, model_set, device="cpu", residency="resident", memory_cap_bytes=10_000)
    with pytest.raises(MemoryPlanError, match=r"^the smallest memory plan \(streaming\) needs"):
        InPlaceMerger(model, model_set, device="cpu", residency="auto", memory_cap_bytes=10_000)
    sizes = ModelSizes.from_model_set(model_set, live_dtype="float32", compute_dtype="float32")
    streaming = plan_mode(sizes, "streaming", device_type="cpu").device_bytes
    merger = InPlaceMerger(model, model_set, device="cpu", residency="auto", memory_cap_bytes=streaming)
    assert merger.residency == "streaming" and merger.resident_bytes() == 0  # built without one read


def test_modes_and_the_older_arguments(tiny_models, model_set):
    from evomerge.merge.materialise import InPlaceMerger

    model = _live_model(tiny_models.base)
    assert InPlaceMerger(model, model_set, device="cpu").residency == "resident_sorted"  # presort: on on CPU
    assert InPlaceMerger(model, model_set, device="cpu", presort=False).residency == "resident"
    assert InPlaceMerger(model, model_set, device="cpu", task_vectors_on="host").residency == "resident_sorted"
    assert InPlaceMerger(model, model_set, device="cpu", residency="auto").residency == "resident_sorted"
    bad = [({"residency": "streaming", "presort": True}, "contradicts presort=True"),
           ({"residency": "resident_sorted", "presort": False}, "contradicts presort=False"),
           ({"residency": "resident", "task_vectors_on": "host"}, "contradicts task_vectors_on='host'"),
           ({"residency": "host"}, "on a CPU use resident or streaming"),
           ({"residency": "everywhere"}, "use one of auto, resident_sorted, resident, streaming, host")]
    for kwargs, text in bad:
        with pytest.raises(ConfigError, match=text):
            InPlaceMerger(model, model_set, device="cpu", **kwargs)
