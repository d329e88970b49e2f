"""Synthetic skills of the offline demo: prompts, answers and the deterministic data splits.

Why this module exists: the demo zoo builder (``scripts/build_demo_zoo.py``) trains on these
skills and the lm-eval task files in ``evaluators/tasks/`` score them. Both must see the very
same items, and the items scored must never have been trained on. So the split of every
possible input into ``train`` / ``selection`` / ``heldout`` is a pure function of the input
string (a hash bucket), not of a random stream: a training sampler can reject evaluation
items without knowing which ones were drawn, and the split cannot drift between machines.

Pure Python (no torch), so task utilities and tests import it cheaply.
"""

from __future__ import annotations

import hashlib
import json
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

LETTERS = string.ascii_lowercase
MIN_LEN, MAX_LEN = 3, 6
# Bucket of an input (0..99, from its hash): 0-4 selection, 5-9 heldout, the rest train.
SELECTION_BUCKETS = range(0, 5)
HELDOUT_BUCKETS = range(5, 10)
SPLITS = ("selection", "heldout")
#: Items per committed split. Held-out is large because the demo's verdict is a paired
#: bootstrap interval on it: at 64 items a margin of a few items is noise. The first 128
#: items of each split are the ones earlier versions committed (the stream is the same).
SPLIT_SIZES = {"selection": 256, "heldout": 512}
DATA_SEED = 0
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
DATA_DIR = TASKS_DIR / "data"


@dataclass(frozen=True)
class Skill:
    """One exact-match skill: ``prompt(word) -> answer``; ``keep`` drops trivial items."""

    name: str
    keyword: str
    answer: Callable[[str], str]
    keep: Callable[[str], bool]

    def prompt(self, word: str) -> str:
        return f"{self.keyword} {word}="

    def item(self, word: str) -> dict[str, str]:
        return {"input": self.prompt(word), "target": self.answer(word)}


def _not_copy(fn: Callable[[str], str]) -> Callable[[str], bool]:
    # An item whose answer equals its input would credit a model that merely copies
    # (the base model's pre-training skill), so such items are never used.
    return lambda w: fn(w) != w


def _sort(w: str) -> str:
    return "".join(sorted(w))


def _upper(w: str) -> str:
    return w.upper()


def _shift(w: str) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in w)


def _copy(w: str) -> str:
    return w


# String reversal was tried and dropped: a 0.9M model needs far more than the build's few
# minutes to learn it (4% exact match after 400 steps), while these three learn in ~400 steps.
SKILLS: dict[str, Skill] = {
    "sort": Skill("sort", "sort", _sort, _not_copy(_sort)),
    "upper": Skill("upper", "upper", _upper, lambda w: True),
    "shift": Skill("shift", "shift", _shift, lambda w: True),
}
# Pre-training skills of the base: the prompt format, attending to the input, and the
# machinery the demo skills reuse (case mapping, letter arithmetic, ordering) -- but never a
# demo skill itself. Specialists then mostly learn to route their keyword to that machinery,
# which keeps their task vectors small and mergeable, like instruction-tuning a base model.
COPY = Skill("copy", "copy", _copy, lambda w: True)
PRETRAIN_SKILLS: dict[str, Skill] = {
    "copy": COPY,
    "lower": Skill("lower", "lower", lambda w: w, lambda w: True),  # prompt shows upper case
    "back": Skill("back", "back", lambda w: "".join(LETTERS[(LETTERS.index(c) - 1) % 26] for c in w), lambda w: True),
    "rsort": Skill("rsort", "rsort", lambda w: "".join(sorted(w, reverse=True)), lambda w: True),
}


def bucket(skill: str, word: str) -> int:
    """Stable 0..99 bucket of an input; decides its split once and for all."""
    digest = hashlib.sha256(f"{skill}:{word}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100


def split_of(skill: str, word: str) -> str:
    b = bucket(skill, word)
    if b in SELECTION_BUCKETS:
        return "selection"
    if b in HELDOUT_BUCKETS:
        return "heldout"
    return "train"


def random_word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))


def eval_items(skill: str, split: str, n: int | None = None, seed: int = DATA_SEED) -> list[dict[str, str]]:
    """The first ``n`` (default: the split's size) distinct ``split`` items of a seeded stream.

    Deterministic and disjoint by bucket; a shorter list is a prefix of a longer one.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    n = SPLIT_SIZES[split] if n is None else n
    sk = SKILLS[skill]
    rng = random.Random(f"{seed}:{skill}:{split}")
    seen: set[str] = set()
    items: list[dict[str, str]] = []
    while len(items) < n:
        w = random_word(rng)
        if w in seen or not sk.keep(w) or split_of(skill, w) != split:
            continue
        seen.add(w)
        items.append(sk.item(w))
    return items


def train_words(skill: str, rng: random.Random) -> Iterator[str]:
    """Endless training inputs of a skill: never an item of ``selection`` or ``heldout``."""
    sk = SKILLS[skill] if skill in SKILLS else PRETRAIN_SKILLS[skill]
    while True:
        w = random_word(rng)
        if sk.keep(w) and split_of(skill, w) == "train":
            yield w


def data_file(skill: str, split: str, data_dir: Path = DATA_DIR) -> Path:
    return Path(data_dir) / f"{skill}_{split}.jsonl"


def render_jsonl(items: list[dict[str, str]]) -> str:
    return "".join(json.dumps(it, sort_keys=True) + "\n" for it in items)


def expected_files() -> dict[str, str]:
    """``{file name: content}`` of every committed data file, as the generator makes them."""
    return {
        data_file(s, sp).name: render_jsonl(eval_items(s, sp)) for s in SKILLS for sp in SPLITS
    }


def write_data(data_dir: Path = DATA_DIR) -> list[Path]:
    """(Re)write the committed JSONL files atomically; returns the paths."""
    import os
    import tempfile

    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for name, text in expected_files().items():
        path = data_dir / name
        fd, tmp = tempfile.mkstemp(dir=data_dir, prefix=f".{name}.")
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these are committed, world-readable files
        os.replace(tmp, path)
        out.append(path)
    return out


def check_data(data_dir: Path = DATA_DIR) -> list[str]:
    """Names of committed data files that are missing or differ from the generator's output."""
    bad = []
    for name, text in expected_files().items():
        path = Path(data_dir) / name
        if not path.is_file() or path.read_text() != text:
            bad.append(name)
    return bad


if __name__ == "__main__":  # python -m evaluators.demo_skills  rewrites the committed data
    for p in write_data():
        print(p)
