"""The demo zoo builder and its data: determinism, loadability, disjoint splits, task files.

A reduced zoo (toy sizes, a few steps) is built twice with one seed into temp folders; the
files must be identical byte for byte, and loadable with the Auto classes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from evaluators import demo_skills as ds  # noqa: E402


def _build(out: Path, seed: int) -> dict:
    import build_demo_zoo

    return build_demo_zoo.build(out, seed=seed, reduced=True, log=lambda *_: None)


@pytest.fixture(scope="module")
def zoos(tmp_path_factory):
    a = tmp_path_factory.mktemp("zoo_a")
    b = tmp_path_factory.mktemp("zoo_b")
    return (a, _build(a, 0)), (b, _build(b, 0))


def _tree_hashes(root: Path) -> dict[str, str]:
    import build_demo_zoo

    return {
        str(p.relative_to(root)): build_demo_zoo.sha256_file(p)
        for p in sorted(root.rglob("*")) if p.is_file() and p.name != "zoo.json"
    }


def test_same_seed_same_bits(zoos):
    (a, ma), (b, mb) = zoos
    ha, hb = _tree_hashes(a), _tree_hashes(b)
    expected = {f"{m}/{f}" for m in ["base", *ds.SKILLS] for f in
                ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")}
    assert expected <= set(ha)
    assert ha == hb
    # The manifest records the same hashes as the files on disk.
    for name, entry in ma["models"].items():
        assert entry["hashes"]["model.safetensors"] == ha[f"{name}/model.safetensors"]
        assert mb["models"][name]["hashes"] == entry["hashes"]
    assert json.loads((a / "zoo.json").read_text())["skills"] == list(ds.SKILLS)


def test_specialists_differ_from_base_and_each_other(zoos):
    (a, ma), _ = zoos
    weights = {m: e["hashes"]["model.safetensors"] for m, e in ma["models"].items()}
    assert len(set(weights.values())) == len(weights)
    for skill in ds.SKILLS:
        assert ma["models"][skill]["parent_weights"] == weights["base"]


def test_other_seed_other_bits(zoos, tmp_path):
    (a, ma), _ = zoos
    import build_demo_zoo

    mc = build_demo_zoo.build(tmp_path, seed=1, reduced=True, check_merges=False, log=lambda *_: None)
    assert mc["models"]["base"]["hashes"]["model.safetensors"] != ma["models"]["base"]["hashes"]["model.safetensors"]


def test_skip_existing_reuses_matching_folders(zoos):
    (a, ma), _ = zoos
    import build_demo_zoo

    lines: list[str] = []
    mb = build_demo_zoo.build(a, seed=0, reduced=True, skip_existing=True, check_merges=False, log=lines.append)
    assert sum("reusing" in line for line in lines) == 1 + len(ds.SKILLS)
    assert {m: e["hashes"] for m, e in mb["models"].items()} == {m: e["hashes"] for m, e in ma["models"].items()}


def test_auto_classes_load_models_and_tokenizer(zoos):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    (a, _), _ = zoos
    tok = AutoTokenizer.from_pretrained(a / "sort")
    assert tok.eos_token == "</s>" and tok.pad_token == "<pad>"
    text = "sort dcba=abcd\n"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text)  # one token per character, no specials added
    assert tok.decode(ids) == text
    for name in ["base", *ds.SKILLS]:
        model = AutoModelForCausalLM.from_pretrained(a / name)
        assert type(model).__name__ == "LlamaForCausalLM"
        assert model.config.vocab_size == len(tok)
        logits = model(torch.tensor([ids])).logits
        assert logits.shape == (1, len(ids), len(tok)) and torch.isfinite(logits).all()


def test_splits_are_deterministic_and_disjoint():
    for skill in ds.SKILLS:
        sel, held = ds.eval_items(skill, "selection"), ds.eval_items(skill, "heldout")
        assert sel == ds.eval_items(skill, "selection")
        assert (len(sel), len(held)) == (ds.SPLIT_SIZES["selection"], ds.SPLIT_SIZES["heldout"]) == (256, 512)
        assert ds.eval_items(skill, "heldout", 128) == held[:128]
        sel_in, held_in = {it["input"] for it in sel}, {it["input"] for it in held}
        assert len(sel_in) == len(sel) and len(held_in) == len(held)
        assert not sel_in & held_in
        sk = ds.SKILLS[skill]
        train = {sk.prompt(w) for w, _ in zip(ds.train_words(skill, __import__("random").Random(0)), range(3000))}
        assert not train & (sel_in | held_in)
        for it in sel + held:
            word = it["input"][len(sk.keyword) + 1:-1]
            assert it["target"] == sk.answer(word) != word


def test_skill_answers_worked_by_hand():
    assert ds.SKILLS["sort"].item("dcab") == {"input": "sort dcab=", "target": "abcd"}
    assert ds.SKILLS["upper"].item("abz") == {"input": "upper abz=", "target": "ABZ"}
    assert ds.SKILLS["shift"].item("abz") == {"input": "shift abz=", "target": "bca"}


def test_committed_data_matches_generator():
    assert ds.check_data() == []


def test_task_loader_resolves_paths_from_any_directory(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "evaluators" / "tasks"))
    import utils as task_utils

    monkeypatch.chdir(tmp_path)
    d = task_utils.load_jsonl_splits(data_files={"selection": "data/sort_selection.jsonl"}, version=1.0)
    assert d["selection"][0] == ds.eval_items("sort", "selection")[0]
    assert len(d["selection"]) == ds.SPLIT_SIZES["selection"]


@pytest.mark.slow
def test_lm_eval_cli_scores_task_from_repo_root(zoos, tmp_path):
    """The lm_eval CLI, run from the repo root, loads the demo task and scores exact match."""
    (a, _), _ = zoos
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={a / 'sort'},dtype=float32",
           "--tasks", "demo_sort_heldout", "--include_path", "evaluators/tasks", "--limit", "4",
           "--batch_size", "4", "--device", "cpu", "--output_path", str(tmp_path / "res")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = list((tmp_path / "res").rglob("results*.json"))
    assert results
    res = json.loads(results[0].read_text())["results"]["demo_sort_heldout"]
    assert 0.0 <= res["exact_match,none"] <= 1.0


def test_base_corpus_demo_share_uses_training_words_only():
    """Mid-training mixes demo skills into the base corpus at about ``demo_share``, never an eval item;
    a specialist's replay is that same corpus: 30% replay at demo_share 0.6 gives ~18% demo items (any
    skill, training words only) and the rest is the specialist's own skill."""
    import random

    from demo_zoo.train import example_stream

    prefixes = tuple(f"{s} " for s in ds.SKILLS)
    stream = example_stream(None, random.Random(0), demo_share=0.6)
    pairs = [next(stream) for _ in range(3000)]
    demo = [(p, a) for p, a in pairs if p.startswith(prefixes)]
    assert 0.55 < len(demo) / len(pairs) < 0.65
    for p, a in demo:
        name, word = p[:-1].split(" ")
        assert ds.split_of(name, word) == "train"
        assert a == ds.SKILLS[name].answer(word) + "\n"
    replay = example_stream("sort", random.Random(0), replay=0.3, demo_share=0.6)
    items = [next(replay) for _ in range(4000)]
    own = [p for p, _ in items if p.startswith("sort ")]
    others = [(p, a) for p, a in items if p.startswith(("upper ", "shift "))]
    assert 0.12 * 2 / 3 < len(others) / len(items) < 0.24 * 2 / 3  # ~18% demo replay, 2/3 of it other skills
    assert 0.70 < len(own) / len(items) < 0.82
    for p, a in others:
        name, word = p[:-1].split(" ")
        assert ds.split_of(name, word) == "train" and a == ds.SKILLS[name].answer(word) + "\n"


# -- the shipped zoo and the builder's property check ----------------------------------------------
SHIPPED = REPO / "models" / "demo"


def test_shipped_zoo_matches_its_manifest_and_holds_its_properties():
    import build_demo_zoo

    assert build_demo_zoo.verify_zoo(SHIPPED) == []
    manifest = json.loads((SHIPPED / "zoo.json").read_text())
    assert manifest["version"] == build_demo_zoo.ZOO_VERSION and not manifest["reduced"]
    assert manifest["heldout_items"] == ds.SPLIT_SIZES["heldout"] == 512
    props = build_demo_zoo.ZooProperties(**{k: v for k, v in manifest["properties"]["required"].items()})
    assert props == build_demo_zoo.ZooProperties()
    assert build_demo_zoo.check_properties(manifest["heldout_exact_match"], list(ds.SKILLS), props) == []
    for skill in ds.SKILLS:
        assert manifest["models"][skill]["parent_weights"] == manifest["models"]["base"]["hashes"]["model.safetensors"]


def test_verify_zoo_names_a_changed_or_missing_file(zoos, tmp_path):
    import shutil

    import build_demo_zoo

    (a, _), _ = zoos
    copy = tmp_path / "zoo"
    shutil.copytree(a, copy)
    assert build_demo_zoo.verify_zoo(copy) == []
    weights = copy / "upper" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    (copy / "shift" / "tokenizer.json").unlink()
    assert build_demo_zoo.verify_zoo(copy) == [f"{copy / 'shift' / 'tokenizer.json'} (missing)",
                                               f"{weights} (sha256 differs from zoo.json)"]


def _scores(base=0.1, own=0.8, other=0.3, uniform=0.5):
    s = {m: {k: other for k in ds.SKILLS} for m in ds.SKILLS}
    for k in ds.SKILLS:
        s[k][k] = own
    s["base"] = {k: base for k in ds.SKILLS}
    s["uniform_average"] = {k: uniform for k in ds.SKILLS}
    return s


def test_property_check_by_hand():
    import build_demo_zoo

    props, skills = build_demo_zoo.ZooProperties(), list(ds.SKILLS)
    assert build_demo_zoo.check_properties(_scores(), skills, props) == []
    weak_sort = _scores()
    weak_sort["sort"]["sort"] = 0.45  # only +0.15 over the others, and below the uniform average's 0.5
    failed = build_demo_zoo.check_properties(weak_sort, skills, props)
    assert [line.split(":")[0] for line in failed] == ["own_margin", "uniform_gap"]
    assert "specialist sort scores 0.450 on sort" in failed[0] and "sort" in failed[1]
    assert build_demo_zoo._failing_specialists(failed, skills) == ["sort"]
    strong_base = build_demo_zoo.check_properties(_scores(base=0.6), skills, props)
    assert len(strong_base) == 2 * len(skills) and all(line.startswith(("base_max", "own_margin")) for line in strong_base)
    assert "base scores 0.600 on sort; must be at most 0.40" in " ".join(strong_base)


def test_builder_trains_more_then_fails_naming_the_property(tmp_path):
    """A reduced zoo asked for a margin it cannot reach: bounded extra rounds, then one clear error, no manifest."""
    import build_demo_zoo

    lines: list[str] = []
    props = build_demo_zoo.ZooProperties(own_margin=0.99, uniform_gap=-1.0, base_max=1.0, extra_steps=2,
                                         max_extra_rounds=2)
    with pytest.raises(build_demo_zoo.ZooPropertyError, match=r"after 2 extra round\(s\): own_margin: specialist"):
        build_demo_zoo.build(tmp_path, seed=0, reduced=True, check_merges=False, log=lines.append, properties=props)
    assert sum("extra round 1" in line for line in lines) == len(ds.SKILLS)
    assert sum("extra round 2" in line for line in lines) == len(ds.SKILLS)
    assert not (tmp_path / "zoo.json").exists()

    with pytest.raises(build_demo_zoo.ZooPropertyError, match=r"after 0 extra round\(s\): base_max: base scores"):
        build_demo_zoo.build(tmp_path / "b", seed=0, reduced=True, check_merges=False, log=lines.append,
                             properties=build_demo_zoo.ZooProperties(own_margin=-1, uniform_gap=-1, base_max=-0.5))
