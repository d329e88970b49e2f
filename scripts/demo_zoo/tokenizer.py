"""A character-level tokenizer saved as an ordinary ``PreTrainedTokenizerFast``.

Why characters: the demo skills (reverse, sort, upper-case) act on single letters, and a
one-token-per-letter vocabulary lets a tiny model learn them in minutes. The tokenizer adds
no special tokens when encoding, so lm-eval's HFLM sees exactly the token ids used in training.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOS, BOS, UNK = "<pad>", "</s>", "<s>", "<unk>"
SPECIALS = [PAD, EOS, BOS, UNK]
CHARS = list(string.ascii_lowercase + string.ascii_uppercase + string.digits + " =\n.,:;!?+-*/()'\"")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Specials first (pad=0, eos=1, bos=2, unk=3), then one id per character."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, eos_token=EOS, bos_token=BOS, unk_token=UNK,
        model_max_length=64, clean_up_tokenization_spaces=False,
    )
    return tok
