"""Greedy exact-match scoring and a plain-torch task-arithmetic merge, for build-time checks.

Why here and not through lm-eval: the builder checks, in seconds, that each specialist
masters its skill and that simple merges keep a good part of each skill (the property the
evolutionary demo relies on). lm-eval's generate_until with ``until: ["\\n"]`` and greedy
decoding computes the same metric; the README's lm_eval command cross-checks it.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from evaluators.demo_skills import SKILLS, eval_items


@torch.no_grad()
def greedy_answers(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, prompts: list[str], max_new: int = 10) -> list[str]:
    """Greedy continuation up to the first newline/eos. Prompts of equal length share a batch, so no padding."""
    by_len: dict[int, list[int]] = defaultdict(list)
    encoded = [tok.encode(p, add_special_tokens=False) for p in prompts]
    for i, e in enumerate(encoded):
        by_len[len(e)].append(i)
    out = [""] * len(prompts)
    for idx in by_len.values():
        ids = torch.tensor([encoded[i] for i in idx])
        gen = ids
        past = None
        step_in = ids
        for _ in range(max_new):
            res = model(input_ids=step_in, past_key_values=past, use_cache=True)
            past = res.past_key_values
            nxt = res.logits[:, -1].argmax(-1, keepdim=True)
            gen = torch.cat([gen, nxt], 1)
            step_in = nxt
        for row, i in zip(gen[:, ids.shape[1]:].tolist(), idx):
            text = tok.decode(row, skip_special_tokens=False)
            out[i] = text.split("\n")[0].split(tok.eos_token)[0]
    return out


def exact_match(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, skill: str, split: str = "heldout", n: int | None = None) -> float:
    items = eval_items(skill, split)[:n]
    answers = greedy_answers(model, tok, [it["input"] for it in items])
    return sum(a.strip() == it["target"] for a, it in zip(answers, items)) / len(items)


def score_all(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, split: str = "heldout", n: int | None = None) -> dict[str, float]:
    scores = {s: exact_match(model, tok, s, split, n) for s in SKILLS}
    scores["mean"] = sum(scores.values()) / len(SKILLS)
    return scores


def task_arithmetic(base: dict[str, torch.Tensor], specialists: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """``base + sum_i w_i (specialist_i - base)`` tensor by tensor (weights summing to 1 = linear average)."""
    return {k: base[k] + sum(w * (sp[k] - base[k]) for w, sp in zip(weights, specialists)) for k in base}
