"""Tiny random Llama models for tests and scripts: a base and fine-tune-like sources.

The sources are the base plus small, different random perturbations, which is what
fine-tunes of one base look like to a merge method (task vectors small relative to the
weights, different per source). Each model is an ordinary Hugging Face folder saved with
``save_pretrained`` (safetensors) and a tiny word-level tokenizer, so every code path
that reads real checkpoints (sources, AutoModel, AutoTokenizer) runs on them in well
under a second.

Usable from scripts too: ``from tests.tiny_models import build_tiny_llama_set``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

#: Small enough to build in ~1 s on one CPU core, big enough to have every tensor kind.
TINY_LLAMA = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


@dataclass
class TinyModels:
    """Paths of a built set; ``refs`` are the strings a config or recipe would use."""

    root: Path
    base: Path
    sources: list[Path] = field(default_factory=list)

    @property
    def base_ref(self) -> str:
        return str(self.base)

    @property
    def source_refs(self) -> list[str]:
        return [str(p) for p in self.sources]


def tiny_tokenizer(vocab_size: int = TINY_LLAMA["vocab_size"]):
    """A word-level fast tokenizer with ``vocab_size`` tokens: <pad> <s> </s> <unk> w4 w5 ..."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def build_tiny_llama(out: Path, *, seed: int = 0, tie_word_embeddings: bool = False, max_shard_size: str | None = None,
                     perturb_from: Path | None = None, scale: float = 0.02, with_tokenizer: bool = True,
                     **config_overrides) -> Path:
    """Save one tiny random Llama to ``out``; with ``perturb_from``, that model + noise."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if perturb_from is not None:
        model = LlamaForCausalLM.from_pretrained(perturb_from, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * scale)
    else:
        cfg = LlamaConfig(**{**TINY_LLAMA, "tie_word_embeddings": tie_word_embeddings, **config_overrides})
        model = LlamaForCausalLM(cfg)
        with torch.no_grad():  # norms at 1 would give zero task vectors' noise floor; make them distinct
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(torch.randn_like(p) * 0.1)
    model.generation_config.max_new_tokens = 8
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    if with_tokenizer:
        tiny_tokenizer(model.config.vocab_size).save_pretrained(out)
    return out


def build_tiny_llama_set(root: Path, *, n_sources: int = 3, seed: int = 0, tie_word_embeddings: bool = False,
                         scale: float = 0.02) -> TinyModels:
    """``root/base`` and ``root/src{i}`` (fine-tune-like perturbations of the base)."""
    root = Path(root)
    base = build_tiny_llama(root / "base", seed=seed, tie_word_embeddings=tie_word_embeddings)
    sources = [build_tiny_llama(root / f"src{i}", seed=seed + 1 + i, perturb_from=base, scale=scale)
               for i in range(n_sources)]
    return TinyModels(root=root, base=base, sources=sources)
