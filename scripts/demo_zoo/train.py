"""Tiny Llama models and the CPU training loop of the demo zoo.

Why so small and so deterministic: the zoo is built on a fresh laptop in minutes, and the
same seed must give the same bits (the test builds twice and compares hashes). So: one
seeded ``torch.Generator`` for init and one ``random.Random`` for data, deterministic
algorithms, a fixed thread count, and no attention mask (right padding only, ignored by the
causal mask and the loss) so no data-dependent kernels are chosen.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Iterator

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from evaluators.demo_skills import LETTERS, PRETRAIN_SKILLS, SKILLS, train_words


@dataclass(frozen=True)
class ModelSize:
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 384


def make_model(tok: PreTrainedTokenizerFast, size: ModelSize, seed: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.heads,
        max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model


def _words_text(rng: random.Random) -> str:
    """Filler 'prose' of random lowercase words: teaches letters, spaces and line ends."""
    n = rng.randint(2, 4)
    return " ".join("".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 6))) for _ in range(n)) + "\n"


def example_stream(skill: str | None, rng: random.Random, replay: float = 0.0,
                   demo_share: float = 0.0) -> Iterator[tuple[str, str]]:
    """``(prompt, answer+newline)`` pairs. ``skill=None``: the base's mixed corpus (words + copy/lower/back/rsort).

    ``replay``: share of base-corpus items mixed into a skill's stream. Without it a specialist
    learns "after '=' do X" whatever the keyword, and specialists' task vectors then fight in
    a merge; with it each learns "do X only after *its* keyword", which sums far better.

    ``demo_share``: share of demo-skill items in the base corpus, and so in a specialist's replay (training words only, never an
    evaluation item). A base that is already *partly* competent at every demo skill makes each
    specialist a small nudge away from it, so task vectors stay in the linear regime where merges
    add up -- like instruction-tuning a pre-trained model rather than teaching it from scratch.
    """
    if skill is not None:
        words = train_words(skill, rng)
        base = example_stream(None, rng, demo_share=demo_share)  # replay = the base's own last corpus
        sk = SKILLS[skill]
        while True:
            if replay and rng.random() < replay:
                yield next(base)
                continue
            w = next(words)
            yield sk.prompt(w), sk.answer(w) + "\n"
    streams = {name: train_words(name, rng) for name in PRETRAIN_SKILLS}
    names = list(PRETRAIN_SKILLS)
    demo_streams = {name: train_words(name, rng) for name in SKILLS} if demo_share else {}
    demo_names = list(SKILLS)
    while True:
        if demo_share and rng.random() < demo_share:
            name = demo_names[rng.randrange(len(demo_names))]
            w = next(demo_streams[name])
            yield SKILLS[name].prompt(w), SKILLS[name].answer(w) + "\n"
            continue
        r = rng.random()
        if r < 0.2:
            yield "", _words_text(rng)
            continue
        name = names[min(int((r - 0.2) / 0.8 * len(names)), len(names) - 1)]
        w = next(streams[name])
        sk = PRETRAIN_SKILLS[name]
        prompt = sk.prompt(w.upper() if name == "lower" else w)
        yield prompt, sk.answer(w) + "\n"


def make_batch(tok: PreTrainedTokenizerFast, pairs: list[tuple[str, str]], answer_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and labels (-100 on padding, and on prompts when ``answer_only``)."""
    seqs, labs = [], []
    for prompt, answer in pairs:
        p = tok.encode(prompt, add_special_tokens=False) if prompt else []
        a = tok.encode(answer, add_special_tokens=False) + [tok.eos_token_id]
        seqs.append(p + a)
        labs.append(([-100] * len(p) if answer_only else p) + a)
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labs)):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(l)] = torch.tensor(l)
    return ids, labels


@dataclass(frozen=True)
class TrainPlan:
    steps: int
    lr: float
    batch: int = 64
    warmup: int = 20
    weight_decay: float = 0.0
    replay: float = 0.0
    freeze_embeddings: bool = False  # keep embed/lm_head/norms at the base: their deltas merge worst
    demo_share: float = 0.0  # share of demo-skill training items in the base corpus (specialists: in their replay)
    prompt_loss: bool | None = None  # train on prompt tokens too; None = only for the base
    stage: str = ""  # names a later base stage, so its data stream differs from the first stage's
    schedule_steps: int | None = None  # cosine schedule length; > steps stops early, while the lr is high


def train(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, skill: str | None, plan: TrainPlan,
          seed: int, log_every: int = 50, log=print, on_step=None) -> dict[str, float]:
    """Train in place; returns ``{"seconds", "final_loss"}``. Warm-up then cosine decay."""
    rng = random.Random(f"{seed}:train:{skill or 'base'}" + (f":{plan.stage}" if plan.stage else ""))
    stream = example_stream(skill, rng, plan.replay, plan.demo_share)
    for n, p in model.named_parameters():
        p.requires_grad_(not (plan.freeze_embeddings and ("embed" in n or "lm_head" in n or "norm" in n)))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=plan.lr, betas=(0.9, 0.98), weight_decay=plan.weight_decay)

    def lr_at(step: int) -> float:
        if step < plan.warmup:
            return plan.lr * (step + 1) / plan.warmup
        frac = (step - plan.warmup) / max(1, (plan.schedule_steps or plan.steps) - plan.warmup)
        return plan.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    prompt_loss = skill is None if plan.prompt_loss is None else plan.prompt_loss
    model.train()
    t0, loss_ema = time.perf_counter(), float("nan")
    for step in range(plan.steps):
        ids, labels = make_batch(tok, [next(stream) for _ in range(plan.batch)], answer_only=not prompt_loss)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        loss_ema = loss.item() if math.isnan(loss_ema) else 0.9 * loss_ema + 0.1 * loss.item()
        if log_every and (step + 1) % log_every == 0:
            log(f"  [{skill or 'base'}] step {step + 1}/{plan.steps} loss {loss_ema:.3f} ({time.perf_counter() - t0:.0f}s)")
        if on_step is not None:  # experiments: checkpoint/score mid-run (not used by the build)
            on_step(step + 1, model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return {"seconds": time.perf_counter() - t0, "final_loss": loss_ema}
