"""Evaluators: scores against independent computations, subsampling, reuse, errors, cache keys.

The lm-eval tasks here are built from a tiny random Llama (see ``evaluator_fixtures``):
targets are the model's own greedy continuations on even items, so the expected
exact-match on any subsample is computed by the test with its own argmax loop.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import evaluator_fixtures as F  # noqa: E402

from evomerge.config import parse_config  # noqa: E402
from evomerge.errors import ConfigError, EvaluatorError  # noqa: E402



# -- fixtures -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tokenizer, model A, and a task folder: tiny_gen (+ its heldout twin), tiny_mc."""
    import torch

    torch.set_num_threads(1)  # tiny matmuls: threads only add contention on a shared CI box
    tok = F.char_tokenizer()
    model = F.tiny_llama(0)
    folder = tmp_path_factory.mktemp("tasks")
    gen = F.write_gen_task(folder, "tiny_gen", model, tok, n_docs=24, seed=0, relative_data=True)
    held = F.write_gen_task(folder, "tiny_gen_heldout", model, tok, n_docs=12, seed=7)
    F.write_mc_task(folder, "tiny_mc", n_docs=16)
    text = folder / "text.txt"
    text.write_text("".join(F.LETTERS[(i * 7) % 26] for i in range(150)))
    return dict(tok=tok, model=model, folder=folder, gen=gen, held=held, text=text)


def make_cfg(world, objectives, **extra):
    data = {
        "models": {"sources": ["unused"]},
        "budget": {"evaluations": 1},
        "evaluation": {"include_paths": [str(world["folder"])]},
        "objectives": objectives,
    }
    data.update(extra)
    return parse_config(data)


GEN = {"name": "gen", "task": "tiny_gen", "metric": "exact_match", "limit": 10, "seed": 3, "batch_size": 4}
MC = {"name": "mc", "task": "tiny_mc", "metric": "acc", "limit": 8, "seed": 0, "batch_size": 4}


@pytest.fixture(scope="module")
def objset(world):
    from evaluators import build_objectives

    cfg = make_cfg(world, [GEN, MC, {"name": "sum", "components": [
        {"task": "tiny_gen", "metric": "exact_match", "weight": 2.0},
        {"task": "tiny_mc", "metric": "acc", "weight": -0.5}], "limit": 10, "seed": 3, "batch_size": 4}])
    return cfg, build_objectives(cfg, world["tok"], "cpu")


# -- lm_eval evaluator ----------------------------------------------------------------
@pytest.mark.slow  # runs lm-eval
def test_score_equals_independent_greedy_exact_match(world, objset):
    from evaluators.lm_eval_evaluator import sample_ids

    cfg, objs = objset
    ev = objs.evaluators["lm_eval"]
    ids = ev.doc_ids(cfg.objectives[0])["tiny_gen"]
    assert ids == sample_ids(24, 10, 3, "tiny_gen") and len(ids) == 10 and ids != list(range(10))
    # pinned: the choice depends only on (n, limit, seed, task name), never on the process (hash seed)
    assert ids == [0, 1, 6, 7, 8, 13, 14, 17, 20, 23]
    expected = F.expected_exact_match(world["model"], world["tok"], world["gen"], ids)
    assert expected == pytest.approx(sum(world["gen"].docs[i]["true"] for i in ids) / 10)  # by construction
    scores = objs.evaluate(world["model"])
    assert scores["gen"] == pytest.approx(expected)
    assert objs.directions == {"gen": "maximize", "mc": "maximize", "sum": "maximize"}


@pytest.mark.slow  # runs lm-eval
def test_a_model_in_train_mode_is_scored_in_eval_mode_every_call(world, objset, monkeypatch):
    """The lm-eval wrapper is built once; every later call must still score without dropout
    and hand the model back in the mode it came in."""
    _, objs = objset
    live = copy.deepcopy(world["model"])
    modes: list[bool] = []
    # every forward pass the evaluator makes (either path: lm-eval's evaluate or the request cache)
    live.register_forward_pre_hook(lambda module, args: modes.append(any(m.training for m in live.modules())))
    ev = objs.evaluators["lm_eval"]
    for cached in (True, False):
        monkeypatch.setattr(ev, "use_request_cache", cached)
        for _ in range(2):
            live.train()
            objs.evaluate(live)
            assert live.training
    assert modes and not any(modes)


@pytest.mark.slow  # runs lm-eval
def test_in_place_weight_changes_are_scored(world, objset):
    import torch

    cfg, objs = objset
    ids = objs.evaluators["lm_eval"].doc_ids(cfg.objectives[0])["tiny_gen"]
    live = copy.deepcopy(world["model"])
    original = {k: v.clone() for k, v in live.state_dict().items()}
    assert objs.evaluate(live)["gen"] == pytest.approx(F.expected_exact_match(live, world["tok"], world["gen"], ids))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # what the in-place merger does: same module object, new weights
        for p in live.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05 * p.std())
    changed = F.expected_exact_match(live, world["tok"], world["gen"], ids)
    assert changed != F.expected_exact_match(world["model"], world["tok"], world["gen"], ids)
    assert objs.evaluate(live)["gen"] == pytest.approx(changed)
    with torch.no_grad():
        for k, v in live.state_dict().items():
            v.copy_(original[k])
    assert objs.evaluate(live)["gen"] == pytest.approx(F.expected_exact_match(live, world["tok"], world["gen"], ids))


@pytest.mark.slow  # runs lm-eval
def test_weighted_sum_is_the_weighted_sum(world, objset):
    _, objs = objset
    s = objs.evaluate(world["model"])
    # 'sum' uses limit 10 for both components; 'mc' uses limit 8 -> score tiny_mc separately
    from evaluators.base import combine

    ev = objs.evaluators["lm_eval"]
    raw = ev(world["model"])
    terms = ev.terms(next(o for o in objs.objectives if o.name == "sum"))
    assert [t.weight for t in terms] == [2.0, -0.5]
    assert s["sum"] == pytest.approx(2.0 * raw[terms[0].key] - 0.5 * raw[terms[1].key])
    assert raw[terms[0].key] == pytest.approx(s["gen"])  # same task, limit, seed: same items, same run
    assert combine(terms, {terms[0].key: 0.25, terms[1].key: 0.5}) == pytest.approx(0.25)


@pytest.mark.slow  # runs lm-eval
def test_second_call_reuses_tasks_and_items(world, monkeypatch):
    """Task objects are built once; each call sees the same docs and the same fewshot contexts."""
    import lm_eval.api.task as task_mod
    from lm_eval.models.huggingface import HFLM

    from evaluators import build_objectives

    built = {"n": 0}
    real_init = task_mod.ConfigurableTask.__init__

    def counting_init(self, *a, **k):
        built["n"] += 1
        real_init(self, *a, **k)

    monkeypatch.setattr(task_mod.ConfigurableTask, "__init__", counting_init)
    contexts: list[list[str]] = []
    real_gen = HFLM.generate_until

    def recording_gen(self, requests, *a, **k):
        contexts.append([r.args[0] for r in requests])
        return real_gen(self, requests, *a, **k)

    monkeypatch.setattr(HFLM, "generate_until", recording_gen)
    cfg = make_cfg(world, [dict(GEN, num_fewshot=2)])
    objs = build_objectives(cfg, world["tok"], "cpu")
    after_build = built["n"]
    assert after_build == 1
    first = objs.evaluate(world["model"])
    second = objs.evaluate(world["model"])
    assert built["n"] == after_build  # no task rebuilt per candidate
    assert first == second
    assert len(contexts) == 2 and len(contexts[0]) == 10 and contexts[0] == contexts[1]
    # 2-shot contexts: two solved examples then the prompt
    assert all(c.count("\n\n") == 2 for c in contexts[0])


@pytest.mark.slow  # runs lm-eval
def test_heldout_uses_twin_task_or_complement(world, objset):
    from evaluators.lm_eval_evaluator import sample_ids

    cfg, objs = objset
    ev = objs.evaluators["lm_eval"]
    held_ids = ev.doc_ids(cfg.objectives[0], "heldout")["tiny_gen_heldout"]
    assert held_ids == sample_ids(12, 10, 3, "tiny_gen_heldout")
    held = objs.evaluate(world["model"], split="heldout")
    assert held["gen"] == pytest.approx(F.expected_exact_match(world["model"], world["tok"], world["held"], held_ids))
    # tiny_mc has no twin: heldout items are a seeded sample outside the selection items
    sel = set(ev.doc_ids(cfg.objectives[1])["tiny_mc"])
    comp = set(ev.doc_ids(cfg.objectives[1], "heldout")["tiny_mc"])
    assert len(sel) == 8 and len(comp) == 8 and not sel & comp


@pytest.mark.slow  # runs lm-eval
def test_heldout_reports_per_item_values_and_heldout_limit(world, objset):
    """Held-out calls give each single-metric objective's value per item, in doc-id order (what a paired
    bootstrap needs); weighted sums give none; selection calls give none; heldout_limit sets the count."""
    cfg, objs = objset
    held = objs.evaluate(world["model"], split="heldout")
    assert set(objs.last_items) == {"gen", "mc"}  # "sum" has two terms: no per-item value
    ev = objs.evaluators["lm_eval"]
    held_ids = ev.doc_ids(cfg.objectives[0], "heldout")["tiny_gen_heldout"]
    gen_items = objs.last_items["gen"]
    assert gen_items == [float(F.expected_exact_match(world["model"], world["tok"], world["held"], [i])) for i in held_ids]
    assert sum(gen_items) / len(gen_items) == pytest.approx(held["gen"])
    assert sum(objs.last_items["mc"]) / 8 == pytest.approx(held["mc"])
    objs.evaluate(world["model"])
    assert objs.last_items == {}

    from evaluators import build_objectives

    every = make_cfg(world, [{**GEN, "heldout_limit": "all"}])
    some = make_cfg(world, [{**GEN, "heldout_limit": 5}])
    for c, n in ((every, 12), (some, 5)):
        o = build_objectives(c, world["tok"], "cpu")
        o.evaluate(world["model"], split="heldout")
        assert len(o.last_items["gen"]) == n
        assert len(o.evaluators["lm_eval"].doc_ids(c.objectives[0], "heldout")["tiny_gen_heldout"]) == n
        assert len(o.evaluators["lm_eval"].doc_ids(c.objectives[0])["tiny_gen"]) == 10  # selection unchanged
    # a task without a held-out twin: the items outside the selection sample (16 - 8), or heldout_limit of them
    for hl, n in (("all", 8), (3, 3), (None, 8)):
        c = make_cfg(world, [{**MC, "heldout_limit": hl}])
        o = build_objectives(c, world["tok"], "cpu")
        held_ids = set(o.evaluators["lm_eval"].doc_ids(c.objectives[0], "heldout")["tiny_mc"])
        assert len(held_ids) == n and not held_ids & set(o.evaluators["lm_eval"].doc_ids(c.objectives[0])["tiny_mc"])
    with pytest.raises(ConfigError, match="heldout_limit must be > 0"):
        make_cfg(world, [{**GEN, "heldout_limit": 0}])


def test_heldout_limit_does_not_change_selection_cache_keys(world):
    from evaluators.cache import evaluation_settings

    a = make_cfg(world, [GEN])
    b = make_cfg(world, [{**GEN, "heldout_limit": "all"}])
    assert evaluation_settings(a) == evaluation_settings(b)


# -- perplexity ---------------------------------------------------------------------------
def _hand_ppl(model, ids, length):
    import torch

    total, count = 0.0, 0
    for start in range(0, len(ids), length):
        w = ids[start : start + length]
        if len(w) < 2:
            continue
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([w]), labels=torch.tensor([w])).loss  # mean over len(w)-1
        total += float(loss) * (len(w) - 1)
        count += len(w) - 1
    return math.exp(total / count)


@pytest.mark.parametrize("max_tokens", [None, 40])
def test_perplexity_matches_hand_computation(world, max_tokens):
    from evaluators import build_objectives

    cfg = make_cfg(world, [{"name": "ppl", "evaluator": "perplexity", "files": [str(world["text"])],
                            "max_tokens": max_tokens, "batch_size": 2}])
    objs = build_objectives(cfg, world["tok"], "cpu")
    assert objs.directions == {"ppl": "minimize"}
    ids = world["tok"](world["text"].read_text(), add_special_tokens=False)["input_ids"]
    ids = ids[:max_tokens] if max_tokens else ids
    assert len(ids) == (40 if max_tokens else 150)
    expected = _hand_ppl(world["model"], ids, world["model"].config.max_position_embeddings)
    got = objs.evaluate(world["model"])["ppl"]
    assert got == pytest.approx(expected, rel=1e-5)
    assert 1.0 < got < 1e6


def test_objective_direction_rules():
    from evaluators.base import Term, objective_direction

    obj = parse_config({"models": {"sources": ["x"]}, "budget": {"evaluations": 1}, "objectives": [
        {"name": "m", "components": [{"task": "a", "metric": "x"}, {"task": "b", "metric": "y"}]}]}).objectives[0]
    terms = [Term("a"), Term("b")]
    assert objective_direction(obj, terms, {"a": "minimize", "b": "minimize"}) == "minimize"
    with pytest.raises(EvaluatorError, match="set direction"):
        objective_direction(obj, terms, {"a": "maximize", "b": "minimize"})
    assert objective_direction(obj.model_copy(update={"direction": "maximize"}), terms,
                               {"a": "maximize", "b": "minimize"}) == "maximize"


# -- config-load errors: one line each ----------------------------------------------------
def _one_line_error(exc_type, fn, *match):
    with pytest.raises(exc_type) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    for m in match:
        assert m in msg, msg
    return msg


def test_bad_inputs_fail_at_config_load_with_one_line(world, tmp_path):
    from evaluators import check_objectives

    check_objectives(make_cfg(world, [GEN, MC]))  # the good config passes
    bad_yaml = tmp_path / "tasks"
    bad_yaml.mkdir()
    (bad_yaml / "tiny_nodata.yaml").write_text(
        (world["folder"] / "tiny_mc.yaml").read_text().replace("task: tiny_mc", "task: tiny_nodata")
        .replace(str(world["folder"] / "tiny_mc.jsonl"), "missing/nowhere.jsonl"))
    _one_line_error(EvaluatorError, lambda: check_objectives(
        make_cfg(world, [dict(MC, task="tiny_nodata")], evaluation={"include_paths": [str(bad_yaml)]})),
        "tiny_nodata", "missing/nowhere.jsonl", "does not exist")
    _one_line_error(EvaluatorError, lambda: check_objectives(make_cfg(world, [dict(GEN, metric="bleu")])),
                    "tiny_gen", "'bleu'", "exact_match")
    _one_line_error(EvaluatorError, lambda: check_objectives(
        make_cfg(world, [dict(GEN, metric="exact_match,strict")])), "filter 'strict'")
    _one_line_error(ConfigError, lambda: make_cfg(world, [dict(GEN, limit=0)]), "limit")
    _one_line_error(EvaluatorError, lambda: check_objectives(make_cfg(world, [
        {"name": "p", "evaluator": "perplexity", "files": [str(tmp_path / "nope.txt")]}])), "nope.txt", "does not exist")
    _one_line_error(EvaluatorError, lambda: check_objectives(make_cfg(world, [dict(GEN, evaluator="bogus")])),
                    "unknown evaluator 'bogus'", "lm_eval", "perplexity")
    _one_line_error(EvaluatorError, lambda: check_objectives(make_cfg(world, [dict(GEN, heldout_task="nope_xyz")])),
                    "nope_xyz")
    _one_line_error(EvaluatorError, lambda: check_objectives(
        make_cfg(world, [dict(GEN, task="definitely_not_a_task_xyz")])),
        "unknown lm-eval task 'definitely_not_a_task_xyz'")


def test_unknown_include_path_is_one_line(world, tmp_path):
    from evaluators import check_objectives

    _one_line_error(EvaluatorError, lambda: check_objectives(
        make_cfg(world, [GEN], evaluation={"include_paths": [str(tmp_path / "no_dir")]})), "no_dir", "include_paths")


# -- cache key -------------------------------------------------------------------------------
def test_evaluation_key_changes_exactly_with_settings(world, tmp_path):
    import shutil

    from evaluators import evaluation_key
    from evomerge.merge.recipe import GroupRecipe, MergeRecipe

    folder = tmp_path / "tasks"
    shutil.copytree(world["folder"], folder)
    recipe = MergeRecipe(sources=["a", "b"], groups={"default": GroupRecipe(
        method="linear", source_params={"a": {"weight": 0.5}, "b": {"weight": 0.5}})})

    def cfg(**obj_changes):
        extra = obj_changes.pop("_extra", {})
        return make_cfg(world, [dict(GEN, **obj_changes)], evaluation={"include_paths": [str(folder)]}, **extra)

    base = evaluation_key(recipe, cfg())
    assert base == evaluation_key(MergeRecipe.from_json(recipe.to_json()), cfg())  # stable
    for same in [dict(_extra={"budget": {"evaluations": 50}}), dict(_extra={"optimizer": {"name": "DE", "seed": 9}}),
                 dict(_extra={"ray": {"actors": 3}})]:
        assert evaluation_key(recipe, cfg(**same)) == base, same
    for diff in [dict(limit=11), dict(seed=4), dict(num_fewshot=1), dict(gen_kwargs={"max_gen_toks": 3}),
                 dict(metric="exact_match,none"), dict(task="tiny_mc", metric="acc"), dict(apply_chat_template=True)]:
        assert evaluation_key(recipe, cfg(**diff)) != base, diff
    other = recipe.model_copy(deep=True)
    other.groups["default"].source_params["a"]["weight"] = 0.6
    assert evaluation_key(other, cfg()) != base
    yaml = folder / "tiny_gen.yaml"
    yaml.write_text(yaml.read_text() + "# edited\n")
    assert evaluation_key(recipe, cfg()) != base
    after_yaml = evaluation_key(recipe, cfg())
    data = folder / "tiny_gen.jsonl"
    data.write_text(data.read_text() + '{"prompt": "abcdefgh", "target": "x"}\n')
    assert evaluation_key(recipe, cfg()) != after_yaml
