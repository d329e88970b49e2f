"""Builders for evaluator tests: a character tokenizer, tiny random Llamas, and lm-eval tasks
whose correct scores the test can work out on its own.

The generation task is built *from a model*: for each random prompt we decode the model's
greedy continuation with our own argmax loop (no lm-eval, no ``generate``) and make it the
target of half the items; the other half get a different target. So on that model the
exact-match score of any subsample is known in advance (the share of "true" items), and on
any other model it is the share of items whose own greedy continuation equals the target,
again computed by the test's own loop.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

LETTERS = "abcdefghijklmnopqrstuvwxyz"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
GEN_TOKS = 5
PROMPT_LEN = 8


def char_tokenizer():
    """A fast tokenizer with one token per lowercase letter (ids 4..29) and 4 special tokens."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(SPECIALS + list(LETTERS))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_llama(seed: int, vocab_size: int = len(SPECIALS) + len(LETTERS), context: int = 32):
    """A 2-layer random Llama (~20k parameters) with a small context, in eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger weights: sharper logits, so argmax is never a near-tie
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    return model.eval()


def greedy_ids(model, tokenizer, prompt: str, n: int = GEN_TOKS) -> list[int]:
    """Our own greedy decoding: n argmax steps, full forward each step (independent of generate)."""
    import torch

    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1]
            out.append(int(logits.argmax()))
    return out


def _write_json_task(folder: Path, name: str, rows: list[dict], body: str, relative_data: bool = False) -> Path:
    """``name``.jsonl (the rows) and an lm-eval task ``name``.yaml reading it, in ``folder``;
    ``body``: the YAML after the dataset keys. Returns the data file."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data_ref = data.name if relative_data else str(data)
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data_ref}\n"
        f"test_split: test\n{body}metadata:\n  version: 1.0\n"
    )
    return data


@dataclass
class GenTask:
    name: str
    folder: Path
    docs: list[dict]  # {"prompt", "target", "true"}


def write_gen_task(folder: Path, name: str, model, tokenizer, n_docs: int = 24, seed: int = 0,
                   relative_data: bool = False) -> GenTask:
    """A generate_until task whose targets are ``model``'s greedy outputs on even items."""
    rng = random.Random(seed)
    docs: list[dict] = []
    while len(docs) < n_docs:
        prompt = "".join(rng.choice(LETTERS) for _ in range(PROMPT_LEN))
        ids = greedy_ids(model, tokenizer, prompt)
        if any(i < len(SPECIALS) for i in ids):
            continue  # keep items whose continuation is plain letters (no eos/special handling)
        text = tokenizer.decode(ids)
        true = len(docs) % 2 == 0
        wrong = text[::-1] if text[::-1] != text else text + "q"
        target = text if true else wrong
        docs.append({"prompt": prompt, "target": target, "true": true})
    _write_json_task(folder, name, [{"prompt": d["prompt"], "target": d["target"]} for d in docs], f"""output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: target
generation_kwargs:
  until: ["#"]
  max_gen_toks: {GEN_TOKS}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""", relative_data)
    return GenTask(name, folder, docs)


def write_mc_task(folder: Path, name: str, n_docs: int = 16, seed: int = 1) -> Path:
    """A multiple-choice task with random letter strings (scores of a random model are arbitrary)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n_docs):
        q = "".join(rng.choice(LETTERS) for _ in range(6))
        choices = ["".join(rng.choice(LETTERS) for _ in range(3)) for _ in range(3)]
        rows.append({"q": q, "choices": choices, "label": rng.randrange(3)})
    return _write_json_task(folder, name, rows, """output_type: multiple_choice
doc_to_text: "{{q}}"
doc_to_target: label
doc_to_choice: choices
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")


def expected_exact_match(model, tokenizer, task: GenTask, ids: list[int]) -> float:
    """Share of items (by doc id) whose greedy continuation under ``model`` equals the target."""
    hits = [tokenizer.decode(greedy_ids(model, tokenizer, task.docs[i]["prompt"])) == task.docs[i]["target"]
            for i in ids]
    return sum(hits) / len(hits)
