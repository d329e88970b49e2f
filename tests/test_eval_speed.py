"""The lm-eval evaluator's request cache: same results as lm-eval's own ``evaluate``, keyed safely.

Per actor, the requests, tokenised/padded batches and doc lists of each run are built once
(``LmEvalEvaluator._prepare``) instead of on every candidate. These tests pin that the cached
path is lm-eval's path with that work hoisted: every score and every logged per-item record is
equal to what ``lm_eval.evaluator.evaluate`` gives (``use_request_cache = False``), on the first
call and later ones, for the same model object with new weights and for other model objects;
and that the cache key changes with the tokenizer, the task and the limit (never the model).
(Speed itself is measured by ``scripts/bench_eval.py``, not asserted: timings on a shared box are noise.)
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import evaluator_fixtures as F  # noqa: E402

from evomerge.config import parse_config  # noqa: E402

pytestmark = pytest.mark.slow  # runs lm-eval


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    tok = F.char_tokenizer()
    model = F.tiny_llama(0)
    folder = tmp_path_factory.mktemp("tasks")
    F.write_gen_task(folder, "speed_gen", model, tok, n_docs=24, seed=0)
    F.write_gen_task(folder, "speed_gen_heldout", model, tok, n_docs=12, seed=7)
    F.write_mc_task(folder, "speed_mc", n_docs=16)
    return dict(tok=tok, model=model, folder=folder)


def make_cfg(world, objectives):
    return parse_config({
        "models": {"sources": ["unused"]},
        "budget": {"evaluations": 1},
        "evaluation": {"include_paths": [str(world["folder"])]},
        "objectives": objectives,
    })


OBJECTIVES = [
    {"name": "gen", "task": "speed_gen", "metric": "exact_match", "limit": 10, "seed": 3, "batch_size": 4},
    {"name": "gen6", "task": "speed_gen", "metric": "exact_match", "limit": 6, "seed": 3, "batch_size": 4},
    {"name": "fewshot", "task": "speed_gen", "metric": "exact_match", "limit": 7, "seed": 1, "batch_size": 3,
     "num_fewshot": 2},
    {"name": "mc", "task": "speed_mc", "metric": "acc", "limit": 8, "seed": 0, "batch_size": 4},
]


def perturbed(model, seed: int, scale: float = 0.05):
    """Another model object: the same architecture, weights moved (what a new candidate is)."""
    import torch

    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std())
    return other


def run_all(objs, model, cached: bool):
    """Scores, heldout scores and per-item values, and lm-eval's logged per-item records of every run."""
    import torch

    ev = objs.evaluators["lm_eval"]
    ev.use_request_cache = cached
    try:
        with torch.inference_mode():
            sel = objs.evaluate(model)
            held = objs.evaluate(model, split="heldout")
            items = dict(objs.last_items)
            records = {}
            for logical in ev._logical.values():
                for spec in (logical.selection, logical.heldout):
                    out = ev.run_spec(model, spec, samples=True)
                    records[spec] = (
                        {k: v for k, v in out.items() if k != "__samples__"},
                        {t: [_plain(r) for r in rows] for t, rows in out["__samples__"].items()},
                    )
    finally:
        ev.use_request_cache = True
    return sel, held, items, records


def _plain(record):
    """A logged record with the doc as a plain dict (datasets rows compare by value anyway)."""
    return {k: (dict(v) if k == "doc" else v) for k, v in record.items()}


def test_cached_path_equals_lm_eval_path_first_and_later_calls_and_across_models(world):
    from evaluators import build_objectives

    cfg = make_cfg(world, OBJECTIVES)
    objs = build_objectives(cfg, world["tok"], "cpu")
    ev = objs.evaluators["lm_eval"]
    a = world["model"]
    b = perturbed(a, 1)
    c = copy.deepcopy(a)  # a third object with a's weights

    ref_a = run_all(objs, a, cached=False)
    ref_b = run_all(objs, b, cached=False)
    assert ref_a[0] != ref_b[0] or ref_a[2] != ref_b[2], "the perturbation must change some result"
    assert ev.prepared_builds == 0  # the reference path builds no cache

    first_a = run_all(objs, a, cached=True)  # builds the cache
    builds = ev.prepared_builds
    assert builds == len({s for lg in ev._logical.values() for s in (lg.selection, lg.heldout)})
    assert first_a == ref_a
    assert run_all(objs, a, cached=True) == ref_a  # later call, same object
    assert run_all(objs, b, cached=True) == ref_b  # another model object: same cache, its own results
    assert run_all(objs, c, cached=True) == ref_a
    # the live object's weights changed in place (the actor's case), then restored
    original = {k: v.clone() for k, v in a.state_dict().items()}
    import torch

    with torch.no_grad():
        for k, v in a.state_dict().items():
            v.copy_(b.state_dict()[k])
    assert run_all(objs, a, cached=True) == ref_b
    with torch.no_grad():
        for k, v in a.state_dict().items():
            v.copy_(original[k])
    assert run_all(objs, a, cached=True) == ref_a
    assert ev.prepared_builds == builds  # nothing rebuilt per candidate or per model object
    # the two paths interleave freely (the reference path leaves the cached Instances alone)
    assert run_all(objs, b, cached=False) == ref_b
    assert run_all(objs, a, cached=True) == ref_a


def _reordered_tokenizer():
    """A tokenizer of the same size whose letters have other ids (so it encodes differently)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    letters = F.LETTERS[::-1]
    vocab = {s: i for i, s in enumerate(F.SPECIALS + list(letters))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_cache_key_is_tokenizer_task_and_limit_never_the_model(world):
    import torch

    from evaluators import build_objectives
    from evaluators.lm_eval_evaluator import _prepared_key, tokenizer_fingerprint

    cfg = make_cfg(world, OBJECTIVES)
    objs = build_objectives(cfg, world["tok"], "cpu")
    ev = objs.evaluators["lm_eval"]
    specs = {lg.selection for lg in ev._logical.values()}
    assert len(specs) == 4  # limit 10 / limit 6 / fewshot on one task, and another task
    lm_a = ev._lm(world["model"], 4)
    lm_b = ev._lm(perturbed(world["model"], 2), 4)
    assert lm_a is not lm_b
    keys = {s: _prepared_key(s, lm_a) for s in specs}
    assert len(set(keys.values())) == len(specs)  # task, limit, seed, fewshot: each its own entry
    for s in specs:
        assert _prepared_key(s, lm_b) == keys[s]  # another model object, same tokenizer: same entry
    # same tokenizer content in another object: same fingerprint; other ids: another
    assert tokenizer_fingerprint(F.char_tokenizer()) == tokenizer_fingerprint(world["tok"])
    other_tok = _reordered_tokenizer()
    assert tokenizer_fingerprint(other_tok) != tokenizer_fingerprint(world["tok"])
    other_side = F.char_tokenizer()
    other_side.padding_side = "left" if world["tok"].padding_side == "right" else "right"
    assert tokenizer_fingerprint(other_side) != tokenizer_fingerprint(world["tok"])

    # functionally: a second evaluator with the other tokenizer builds its own entries and its
    # cached results equal lm-eval's with that tokenizer (not the first tokenizer's)
    with torch.inference_mode():
        first = objs.evaluate(world["model"])
        builds = ev.prepared_builds
        ev.tokenizer = other_tok
        ev._lms = {}
        lm_c = ev._lm(world["model"], 4)
        assert all(_prepared_key(s, lm_c) != keys[s] for s in specs)
        cached = objs.evaluate(world["model"])
        assert ev.prepared_builds == builds + len(specs)  # a miss for every run, never a hit
        ev.use_request_cache = False
        reference = objs.evaluate(world["model"])
        ev.use_request_cache = True
    assert cached == reference
    assert first != cached  # the other tokenizer scores differently: a hit would have been wrong
