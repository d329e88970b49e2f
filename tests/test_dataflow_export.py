"""A data-flow candidate, live in memory on an actor, equals its folded export.

The search scores a path as a ``PathModel`` (layers shared by reference, the hidden state
scaled by pre-hooks); export writes an ordinary Llama folder with the scales folded into
``o_proj``/``down_proj``. The two must be the same model: same logits to float tolerance
(RMSNorm's eps makes the fold exact only in the limit), the same scores from lm-eval's
own command line on the exported folder as from the in-memory evaluator, and the same
weights through the mergekit passthrough YAML that export writes next to them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evomerge.config import parse_config
from evomerge.merge.path_recipe import PathRecipe, PathStep

ROOT = Path(__file__).resolve().parents[1]
SORT, UPPER, SHIFT = (str(ROOT / "models" / "demo" / s) for s in ("sort", "upper", "shift"))


def _path() -> PathRecipe:
    """A path through two demo specialists that repeats a layer and scales four transitions."""
    steps = [(SORT, 0, 1.0), (SORT, 1, 1.3), (UPPER, 1, 0.8), (SORT, 2, 1.0), (UPPER, 2, 1.6), (UPPER, 2, 0.7),
             (SORT, 3, 1.0)]
    return PathRecipe(models=[SORT, UPPER, SHIFT], embed_from=SORT,
                      path=[PathStep(model=m, layer=i, scale=c) for m, i, c in steps])


@pytest.fixture(scope="module")
def live_and_folder(tmp_path_factory):
    import torch

    from evomerge.merge.layer_stack import stack_from_path, write_stack
    from evomerge.merge.path_model import PathModel
    from evomerge.merge.sources import load_model_set

    torch.set_num_threads(1)
    recipe = _path()
    paths = PathModel(load_model_set(None, [SORT, UPPER, SHIFT]))
    live = paths.apply(recipe)
    folder = tmp_path_factory.mktemp("dataflow") / "export"
    write_stack(stack_from_path(recipe), folder)
    return recipe, live, folder


def test_folded_export_gives_the_logits_of_the_live_path(live_and_folder):
    import torch
    from transformers import AutoModelForCausalLM

    recipe, live, folder = live_and_folder
    exported = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    config = json.loads((folder / "config.json").read_text())
    assert config["num_hidden_layers"] == len(recipe.path) == 7 and config["architectures"] == ["LlamaForCausalLM"]
    assert not list(folder.glob("*.py"))  # no custom code
    ids = torch.randint(3, 80, (4, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = live(ids).logits, exported(ids).logits
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), float((a - b).abs().max())
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    # and the scales matter: the same path at scale 1 is another model, far from these logits
    from evomerge.merge.layer_stack import stack_from_path, write_stack

    flat = recipe.model_copy(update={"path": [s.model_copy(update={"scale": 1.0}) for s in recipe.path]})
    write_stack(stack_from_path(flat), folder.parent / "flat")
    unscaled = AutoModelForCausalLM.from_pretrained(str(folder.parent / "flat"), dtype=torch.float32).eval()
    with torch.no_grad():
        c = unscaled(ids).logits
    assert float((a - c).abs().max()) > 100 * float((a - b).abs().max())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_lm_eval_cli_on_the_export_scores_what_the_search_scored(live_and_folder, tmp_path):
    import torch

    from evaluators import build_objectives

    recipe, live, folder = live_and_folder
    cfg = parse_config({
        "models": {"sources": [SORT, UPPER]}, "budget": {"evaluations": 1},
        "objectives": [{"name": "sort", "task": "demo_sort", "metric": "exact_match", "limit": 48, "seed": 0,
                        "batch_size": 16},
                       {"name": "upper", "task": "demo_upper", "metric": "exact_match", "limit": 48, "seed": 0,
                        "batch_size": 16}],
    })
    objs = build_objectives(cfg, SORT, "cpu")
    with torch.inference_mode():
        in_memory = objs.evaluate(live)
    assert 0 < in_memory["sort"] < 1  # items both right and wrong: the comparison below can fail
    ev = objs.evaluators["lm_eval"]
    samples = {**ev.doc_ids(cfg.objectives[0]), **ev.doc_ids(cfg.objectives[1])}
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={folder},dtype=float32",
           "--tasks", "demo_sort,demo_upper", "--include_path", str(ROOT / "evaluators" / "tasks"),
           "--device", "cpu", "--batch_size", "16", "--samples", json.dumps(samples), "--output_path", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli = json.loads(sorted(out.rglob("results_*.json"))[-1].read_text())["results"]
    assert cli["demo_sort"]["exact_match,none"] == pytest.approx(in_memory["sort"], abs=1e-12)
    assert cli["demo_upper"]["exact_match,none"] == pytest.approx(in_memory["upper"], abs=1e-12)


def test_the_mergekit_yaml_and_the_recipe_json_rebuild_the_export_bit_for_bit(live_and_folder, tmp_path):
    from safetensors.torch import load_file

    from evomerge.merge.layer_stack import stack_from_path
    from evomerge.merge.layer_stack_yaml import stack_to_mergekit_yaml

    recipe, _, folder = live_and_folder
    yml = tmp_path / "mergekit.yaml"
    yml.write_text(stack_to_mergekit_yaml(stack_from_path(recipe)))
    js = tmp_path / "recipe.json"
    js.write_text(recipe.to_json())
    want = load_file(str(folder / "model.safetensors"))
    for src, name in ((yml, "from_yaml"), (js, "from_json")):
        out = tmp_path / name
        proc = subprocess.run([sys.executable, "-m", "evomerge.cli", "merge", str(src), "--out", str(out)],
                              capture_output=True, text=True, timeout=120, cwd=ROOT,
                              env=dict(os.environ, HF_HUB_OFFLINE="1"))
        assert proc.returncode == 0, proc.stderr[-2000:]
        got = load_file(str(out / "model.safetensors"))
        assert set(got) == set(want)
        assert all(got[k].dtype == want[k].dtype and got[k].equal(want[k]) for k in want), name
