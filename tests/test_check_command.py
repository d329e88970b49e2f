"""``evomerge check``: the ready configs check offline against a stand-in hub cache, bad ones fail in one line.

The hub cache (``tests/hub_fixture.py``) holds every model the configs in ``configs/`` name,
with their real config.json values and safetensors headers over sparse files, so these
tests also show what ``check`` promises: no weight is read (``safe_open`` and
``ModelSource.get_tensor`` raise here) and Ray is never started (``ray.init`` raises).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from evomerge.cli import main
from evomerge.merge.sources import ModelSource
from hub_fixture import (ALL_MODELS, LLAMA3_8B, MISTRAL_7B, QWEN25_05B, allocated_bytes, build_hub_cache,
                         parameter_count, use_hub_cache)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
READY = ["evollm_jp_7b.yaml", "code_math_llama3_8b.yaml", "small_qwen_0p5b.yaml"]


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every model of the ready configs, headers only (built once for the module)."""
    return build_hub_cache(tmp_path_factory.mktemp("hf_home"), ALL_MODELS)


@pytest.fixture
def offline(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The stand-in cache, offline; code execution allowed (mbpp asks for it); no weights, no Ray."""
    import ray
    import safetensors

    use_hub_cache(monkeypatch, hub_cache)
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def no_ray(*args: object, **kwargs: object) -> None:
        raise AssertionError("evomerge check started Ray")

    def no_weights(*args: object, **kwargs: object) -> None:
        raise AssertionError("evomerge check read a weight")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(safetensors, "safe_open", no_weights)
    monkeypatch.setattr(ModelSource, "get_tensor", no_weights)
    return hub_cache


def _check(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(["check", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    rc, _, err = _check(argv, capsys)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evomerge check: error: "), err
    return lines[0]


def test_fixture_models_have_their_real_sizes_and_use_no_disk(hub_cache: Path) -> None:
    """The stand-ins declare the published parameter counts, in sparse files that hold no data blocks."""
    assert parameter_count(MISTRAL_7B) == 7_241_732_096
    assert parameter_count(LLAMA3_8B) == 8_030_261_248
    assert parameter_count(QWEN25_05B) == 494_032_768
    apparent = sum(p.stat().st_size for p in hub_cache.rglob("*.safetensors"))
    assert apparent > 100 * 10**9  # 4 x 14.5 GB + 3 x 16 GB + 3 x 1 GB
    assert allocated_bytes(hub_cache) < 64 * 2**20


@pytest.mark.parametrize("name", READY)
def test_ready_config_checks(name: str, offline: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import ray

    rc, out, err = _check([str(CONFIGS / name), "--device", "cuda", "--memory-gb", "80"], capsys)
    assert rc == 0, err
    assert "OK (no weights read, Ray not started)" in out
    assert "genes: layerwise:" in out and "weight[" in out and "density[" in out
    assert "objectives:" in out and "maximize" in out
    assert "memory plan per actor (cuda; 80 GiB of GPU memory per actor" in out
    assert "chosen: " in out
    assert not ray.is_initialized()


def test_evollm_jp_plan_matches_a_hand_computation(offline: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """3 sources x 7,241,732,096 parameters x 4 B (float32) of task vectors; a bfloat16 live model."""
    rc, out, err = _check([str(CONFIGS / "evollm_jp_7b.yaml"), "--device", "cuda", "--memory-gb", "80"], capsys)
    assert rc == 0, err
    tv = 3 * 7_241_732_096 * 4
    assert tv == 86_900_785_152
    assert f"task vectors: 3 x 7,241,732,096 parameters x 4 B (float32) = {tv:,} B (80.9 GiB)" in out
    assert f"live model: 7,241,732,096 parameters x 2 B (bfloat16) = {7_241_732_096 * 2:,} B" in out
    for ref in ("mistralai/Mistral-7B-v0.1", "augmxnt/shisa-gamma-7b-v1", "WizardLMTeam/WizardMath-7B-V1.1",
                "GAIR/Abel-7B-002"):
        assert ref in out
    assert out.count("7,241,732,096 parameters  bfloat16") == 4
    assert "35 units" in out and "weight[35x3]" in out and "density[35x3]" in out  # 32 layers + embed, norm, head
    assert "mgsm_ja (maximize, lm_eval), 100 items per candidate" in out
    assert "mgsm_native_cot_ja exact_match,flexible-extract" in out
    assert "held-out: every item of mgsm_native_cot_ja outside the selection sample" in out
    assert "optimizer: CMA (seed 0" in out and "budget 1000 evaluations" in out
    assert "actors: 1 on cuda" in out
    # a plan that keeps the three float32 task vectors on an 80 GB GPU next to the model cannot fit
    chosen = next(line for line in out.splitlines() if line.startswith("  chosen: "))
    assert not chosen.startswith("  chosen: resident"), out


def test_memory_plan_options_carry_the_task_vector_bytes(offline: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The engine's options for the 7B case: the fastest keeps all 86.9 GB of task vectors on the device."""
    rc, out, err = _check([str(CONFIGS / "evollm_jp_7b.yaml"), "--device", "cuda", "--memory-gb", "200"], capsys)
    assert rc == 0, err
    options = [line for line in out.splitlines() if line.startswith(("  * ", "    ")) and " GPU " in line]
    assert options, out
    fastest = options[0]
    assert " resident " in fastest
    device_bytes = int(fastest.split(" GPU ")[1].split(" B ")[0].replace(",", ""))
    assert device_bytes >= 86_900_785_152 + 7_241_732_096 * 2
    parts = out.splitlines()[out.splitlines().index(fastest) + 1]
    assert "live model 14,483,464,192" in parts and "task vectors 86,900,785,152" in parts


def test_cpu_actors_follow_ray_actors(offline: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _check([str(CONFIGS / "small_qwen_0p5b.yaml"), "--device", "cpu", "--memory-gb", "16",
                           "--set", "ray.actors=2"], capsys)
    assert rc == 0, err
    assert "actors: 2 on cpu: ray.actors: 2" in out
    assert "memory plan per actor (cpu; 16 GiB per actor" in out
    assert "task vectors: 2 x 494,032,768 parameters x 4 B (float32)" in out


def test_missing_hub_model_is_one_line(offline: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _one_line_error([str(CONFIGS / "evollm_jp_7b.yaml"), "--set", "models.sources.1=nobody/Missing-7B"],
                           capsys)
    assert "'nobody/Missing-7B'" in line and "HF_HUB_OFFLINE" in line


def test_unknown_task_is_one_line(offline: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _one_line_error([str(CONFIGS / "evollm_jp_7b.yaml"), "--set", "objectives.0.task=mgsm_native_cot_xx"],
                           capsys)
    assert "unknown lm-eval task 'mgsm_native_cot_xx'" in line


def test_layer_group_that_does_not_divide_32_is_one_line(offline: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _one_line_error([str(CONFIGS / "evollm_jp_7b.yaml"), "--set", "space.layer_group_size=5"], capsys)
    assert "5 does not divide the model's 32 layers" in line


def test_code_task_needs_consent(offline: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    """mbpp runs the model's code: lm-eval would refuse it inside every actor, so the check refuses it first."""
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL")
    line = _one_line_error([str(CONFIGS / "code_math_llama3_8b.yaml"), "--memory-gb", "80"], capsys)
    assert "task 'mbpp' runs the code the model writes" in line and "HF_ALLOW_CODE_EVAL=1" in line


def test_bad_memory_gb_is_one_line(offline: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _one_line_error([str(CONFIGS / "small_qwen_0p5b.yaml"), "--memory-gb", "0"], capsys)
    assert "--memory-gb 0" in line


def test_too_little_memory_is_one_line(offline: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A 7B search on a 4 GB GPU has no residency that fits: the memory plan's own one-line error."""
    _one_line_error([str(CONFIGS / "evollm_jp_7b.yaml"), "--device", "cuda", "--memory-gb", "4"], capsys)


def test_cuda_without_a_gpu_or_a_size_is_one_line(offline: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from evomerge.search.ray_cluster import local_gpus

    if local_gpus():
        pytest.skip("this machine has a GPU to measure")
    line = _one_line_error([str(CONFIGS / "small_qwen_0p5b.yaml"), "--device", "cuda"], capsys)
    assert "--memory-gb" in line


def test_function_metric_of_a_code_task_is_checked_by_its_name(offline: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """mbpp's metric is ``!function utils.pass_at_1``: the check knows it as pass_at_1, as lm-eval reports it."""
    line = _one_line_error([str(CONFIGS / "code_math_llama3_8b.yaml"), "--memory-gb", "80",
                            "--set", "objectives.0.metric=pass_at_2"], capsys)
    assert "task 'mbpp' has no metric 'pass_at_2'; use one of pass_at_1" in line


def test_check_writes_nothing(offline: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    rc, _, err = _check([str(CONFIGS / "small_qwen_0p5b.yaml"), "--device", "cpu", "--memory-gb", "64"], capsys)
    assert rc == 0, err
    assert list(tmp_path.iterdir()) == []  # no runs/<name>, no lock, no log


def test_truncated_download_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A shard cut short (an interrupted download) is refused from its header, before anything is loaded."""
    from hub_fixture import SMALL_QWEN_MODELS

    cache = build_hub_cache(tmp_path, SMALL_QWEN_MODELS)
    use_hub_cache(monkeypatch, cache)
    shard = next((cache / "models--Qwen--Qwen2.5-0.5B-Instruct").rglob("model.safetensors"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    line = _one_line_error([str(CONFIGS / "small_qwen_0p5b.yaml"), "--memory-gb", "64"], capsys)
    assert "truncated safetensors file" in line and "re-download" in line


def test_demo_config_counts_local_items(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Local JSON-lines tasks are counted: the demo's 128 of 256 selection items, 512 held out per skill."""
    import ray

    monkeypatch.chdir(CONFIGS.parent)
    monkeypatch.setattr(ray, "init", lambda *a, **k: (_ for _ in ()).throw(AssertionError("Ray started")))
    rc, out, err = _check(["configs/demo.yaml", "--device", "cpu", "--memory-gb", "4"], capsys)
    assert rc == 0, err
    assert "sort (maximize, lm_eval), 128 items of 256 per candidate" in out
    assert "demo_sort exact_match; held-out: task demo_sort_heldout, every item (512)" in out
    assert "actors: 2 on cpu: ray.actors: 2" in out
    assert "task vectors: 3 x 874,368 parameters x 4 B (float32) = 10,492,416 B" in out
    assert "  * resident_sorted  memory " in out


def test_gpu_machine_one_actor_per_gpu_and_its_free_memory(offline: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """On a machine with GPUs (faked here: two of 140 GiB free) the default is one actor per GPU, planned
    for each GPU's measured free memory: the 7B plan then keeps everything resident (130.8 GiB)."""
    import evomerge.cli.check_command as cc
    import evomerge.merge.memory_plan as mp

    gib = 1024**3
    monkeypatch.setattr(cc, "_local_gpus", lambda: 2)
    monkeypatch.setattr(mp, "available_memory", lambda device: (140 * gib, 100 * gib) if str(device) == "cuda"
                        else (100 * gib, 100 * gib))
    rc, out, err = _check([str(CONFIGS / "evollm_jp_7b.yaml")], capsys)
    assert rc == 0, err
    assert "actors: 2 on cuda: one per GPU: 2 GPUs here (ray.use_gpu unset and this machine has 2 GPUs" in out
    assert "memory free on this machine: GPU 140.0 GiB, host 100.0 GiB" in out
    assert "  chosen: resident (memory mode auto: the fastest that fits)" in out


def test_sources_with_another_tokenizer_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Same shapes, other token ids: the check compares the tokenizers and names both models."""
    from dataclasses import replace

    from hub_fixture import SMALL_QWEN_MODELS

    models = [SMALL_QWEN_MODELS[0], replace(SMALL_QWEN_MODELS[1], tokenizer="another"), SMALL_QWEN_MODELS[2]]
    use_hub_cache(monkeypatch, build_hub_cache(tmp_path, models))
    line = _one_line_error([str(CONFIGS / "small_qwen_0p5b.yaml"), "--memory-gb", "64"], capsys)
    assert "Qwen/Qwen2.5-0.5B and Qwen/Qwen2.5-0.5B-Instruct have different vocabularies" in line


def test_forced_memory_mode_is_shown_and_checked(offline: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """ray.task_vectors_on: host still means memory mode host on a GPU; a forced mode that does not fit is one line."""
    import evomerge.merge.memory_plan as mp

    monkeypatch.setattr(mp, "available_memory", lambda device: (200 * 1024**3, 200 * 1024**3))  # host RAM, fixed
    rc, out, err = _check([str(CONFIGS / "evollm_jp_7b.yaml"), "--device", "cuda", "--memory-gb", "80",
                           "--set", "ray.task_vectors_on=host"], capsys)
    assert rc == 0, err
    assert "  chosen: host (memory mode host: forced by the config)" in out
    line = _one_line_error([str(CONFIGS / "evollm_jp_7b.yaml"), "--device", "cuda", "--memory-gb", "80",
                            "--set", "ray.memory_mode=resident"], capsys)
    assert "memory mode (resident) needs" in line


def test_the_dataflow_demo_config_checks(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The data-flow space's plan: its genes, and one memory option (every source once)."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    assert main(["check", "configs/demo_dataflow.yaml"]) == 0
    out = capsys.readouterr().out
    assert "genes: dataflow: 3 models, 12 layers x 2 repeats = 24 slots, genes on[24] scale[12x12]" in out
    assert "(dimension 168)" in out  # 24 slot genes + 12 x 12 transition scales
    assert "* paths" in out and "each loaded once" in out and "task vectors" not in out


def test_a_dataflow_config_with_a_base_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert main(["check", "configs/demo_dataflow.yaml", "--set", "models.base=models/demo/base"]) == 2
    err = capsys.readouterr().err.strip()
    assert "models.base: the dataflow space stacks the layers of models.sources and uses no base" in err
    assert len(err.splitlines()) == 1
