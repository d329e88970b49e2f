"""The ``perplexity`` evaluator: token-level perplexity of the live model on local text files.

Texts are tokenised once at build time (the tokenizer is fixed for a search); each call
only runs forward passes. Tokens of each file are cut into non-overlapping windows of
the model's context length (stride = window), and every window predicts its own
tokens 2..L from the ones before it, so the score is

    exp( sum of token NLLs / number of predicted tokens )

over all windows of all files, up to ``max_tokens`` tokens in total (files in order).
Direction: minimize. ``heldout`` scores the same text (there is no second text set).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from evomerge.config import ObjectiveConfig, SearchConfig
from evomerge.errors import EvaluatorError
from evaluators.base import Direction, Split, Term


def context_length(model_config: Any, default: int = 2048) -> int:
    """The model's context window, from the usual config fields."""
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model_config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def windows(ids: Sequence[int], length: int) -> list[list[int]]:
    """Non-overlapping windows of ``length`` tokens (the last may be shorter; 1-token tails dropped)."""
    out = [list(ids[i : i + length]) for i in range(0, len(ids), length)]
    return [w for w in out if len(w) >= 2]


def nll_sum(model: Any, batch: "Any") -> tuple[float, int]:
    """(sum of next-token NLLs, number of predicted tokens) for a (B, L) batch of equal-length windows."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        logits = model(input_ids=batch).logits.float()
    pred = logits[:, :-1, :]
    target = batch[:, 1:]
    loss = F.cross_entropy(pred.reshape(-1, pred.size(-1)), target.reshape(-1), reduction="sum")
    return float(loss), int(target.numel())


class PerplexityEvaluator:
    """Perplexity of each perplexity objective's files; tokenised once, scored per call."""

    @staticmethod
    def directions(objectives: Sequence[ObjectiveConfig], cfg: SearchConfig) -> dict[str, Direction]:
        """Perplexity is better low (an objective's own ``direction`` still wins)."""
        return {o.name: o.direction or "minimize" for o in objectives}

    @staticmethod
    def check(objectives: Sequence[ObjectiveConfig], cfg: SearchConfig) -> None:
        for obj in objectives:
            for f in obj.files or []:
                if not Path(f).expanduser().is_file():
                    raise EvaluatorError(
                        f"objective {obj.name!r}: perplexity file {f} does not exist; give paths of local text files"
                    )
            if obj.max_tokens is not None and obj.max_tokens < 2:
                raise EvaluatorError(f"objective {obj.name!r}: max_tokens must be >= 2 (got {obj.max_tokens})")
            if obj.direction == "maximize":
                raise EvaluatorError(f"objective {obj.name!r}: perplexity is minimized; remove direction: maximize")

    def __init__(self, objectives: Sequence[ObjectiveConfig], cfg: SearchConfig, tokenizer: Any, device: Any) -> None:
        from evaluators.lm_eval_evaluator import load_tokenizer

        self.check(objectives, cfg)
        self.tokenizer = load_tokenizer(tokenizer)
        if self.tokenizer is None:
            raise EvaluatorError("perplexity objectives need a tokenizer (models.tokenizer_source or the base model's)")
        self.device = device
        self._tokens: dict[str, list[list[int]]] = {}  # key -> token ids per file (budget applied)
        self._batch: dict[str, int] = {}
        self.directions: dict[str, Direction] = {}
        for obj in objectives:
            key = f"perplexity|{obj.name}"
            self._tokens[key] = self._tokenise(obj)
            self._batch[key] = obj.batch_size if isinstance(obj.batch_size, int) else 16
            self.directions[key] = "minimize"

    def _tokenise(self, obj: ObjectiveConfig) -> list[list[int]]:
        budget = obj.max_tokens
        per_file: list[list[int]] = []
        for f in obj.files or []:
            ids = list(self.tokenizer(Path(f).expanduser().read_text(), add_special_tokens=False)["input_ids"])
            if budget is not None:
                ids = ids[:budget]
                budget -= len(ids)
            if len(ids) >= 2:
                per_file.append(ids)
            if budget is not None and budget <= 0:
                break
        if not per_file:
            raise EvaluatorError(f"objective {obj.name!r}: its files hold fewer than 2 tokens; give longer texts")
        return per_file

    def terms(self, objective: ObjectiveConfig) -> list[Term]:
        return [Term(f"perplexity|{objective.name}", 1.0)]

    def __call__(self, model: Any, split: Split = "selection") -> dict[str, float]:
        return {key: self.perplexity(model, key) for key in self._tokens}

    def perplexity(self, model: Any, key: str) -> float:
        import torch

        length = context_length(model.config)
        device = next(model.parameters()).device
        by_len: dict[int, list[list[int]]] = {}
        for ids in self._tokens[key]:
            for w in windows(ids, length):
                by_len.setdefault(len(w), []).append(w)
        total, count = 0.0, 0
        was_training = model.training
        model.eval()
        try:
            for wins in by_len.values():
                bs = self._batch[key]
                for i in range(0, len(wins), bs):
                    batch = torch.tensor(wins[i : i + bs], dtype=torch.long, device=device)
                    s, n = nll_sum(model, batch)
                    total += s
                    count += n
        finally:
            if was_training:
                model.train()
        return math.exp(total / count)
