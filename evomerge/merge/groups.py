"""Tensor groups: which part of the network a tensor name belongs to.

A recipe sets a method and parameters per *group*, not per tensor. Groups are the
embeddings, each decoder layer (optionally split into attention / mlp / norm), the
final norm and the lm_head. The layout of names differs between architectures, so a
small table of regular expressions per naming family recognises them; an unknown layout
is a clear error rather than a silent "everything is one group".

Group keys are strings, used as-is in recipe JSON:
``embed``, ``layers.<i>``, ``layers.<i>.attn``, ``layers.<i>.mlp``, ``layers.<i>.norm``,
``final_norm``, ``lm_head``, and ``default`` for every tensor no other key covers. This
module is the one home of those keys: :data:`PARTS`, :func:`layer_key`, :func:`parse_key`,
:func:`leaf_keys` and :meth:`TensorGroup.lookup_keys` (most specific first).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Literal

from evomerge.errors import RecipeError

Part = Literal["attn", "mlp", "norm"]
Kind = Literal["embed", "layer", "final_norm", "lm_head"]

#: The parts a decoder layer may be split into, in reading order.
PARTS: tuple[Part, ...] = ("attn", "mlp", "norm")
#: Groups outside the decoder layers; each kind is its own recipe key.
OTHER_KINDS: tuple[Kind, ...] = ("embed", "final_norm", "lm_head")
#: The recipe key every tensor falls back to.
DEFAULT_GROUP = "default"
_LAYER_KEY = re.compile(r"^layers\.(\d+)(?:\.(attn|mlp|norm))?$")


def layer_key(layer: int, part: str | None = None) -> str:
    """``layers.<i>`` or ``layers.<i>.<part>``."""
    return f"layers.{layer}" if part is None else f"layers.{layer}.{part}"


@dataclass(frozen=True)
class TensorGroup:
    """Where one tensor sits: its kind, layer index and part within the layer."""

    kind: Kind
    layer: int | None = None
    part: Part | None = None

    def key(self, split: Iterable[str] = ()) -> str:
        """The recipe key of this tensor when layers are split by the parts in ``split``."""
        if self.kind != "layer":
            return self.kind
        split = set(split)
        return layer_key(self.layer, self.part if self.part in split else None)

    def lookup_keys(self) -> list[str]:
        """The recipe keys that may set this group, most specific first, ending with ``default``."""
        if self.kind != "layer":
            return [self.kind, DEFAULT_GROUP]
        own = [layer_key(self.layer, self.part)] if self.part is not None else []
        return own + [layer_key(self.layer), DEFAULT_GROUP]


def parse_key(key: str) -> TensorGroup | None:
    """The group a recipe key names (``layers.<i>`` is a layer with no part); None for
    ``default``; a one-line RecipeError for anything else."""
    if key == DEFAULT_GROUP:
        return None
    if key in OTHER_KINDS:
        return TensorGroup(key)  # type: ignore[arg-type]
    m = _LAYER_KEY.match(key)
    if not m:
        raise RecipeError(
            f"recipe group {key!r} is not a group key; use default, embed, final_norm, lm_head, "
            f"layers.<i> or layers.<i>.attn|mlp|norm"
        )
    return TensorGroup("layer", int(m.group(1)), m.group(2))  # type: ignore[arg-type]


def leaf_keys(num_layers: int) -> list[str]:
    """Every leaf group of a model: embed, layers.<i>.attn|mlp|norm, final_norm, lm_head."""
    keys = ["embed"] + [layer_key(i, p) for i in range(num_layers) for p in PARTS]
    return keys + ["final_norm", "lm_head"]


@dataclass(frozen=True)
class Layout:
    """Naming family of an architecture: regexes for each kind of tensor."""

    name: str
    layer: re.Pattern[str]  # group 1: layer index, group 2: rest of the name
    embed: re.Pattern[str]
    final_norm: re.Pattern[str]
    lm_head: re.Pattern[str]
    attn: re.Pattern[str]  # applied to the rest of a layer tensor's name
    mlp: re.Pattern[str]
    norm: re.Pattern[str]


_LLAMA_LIKE = Layout(
    name="llama",  # Llama, Mistral, Qwen2, Gemma (1-3), Phi-3 and most decoder-only models
    layer=re.compile(r"^(?:model\.)?(?:language_model\.)?layers\.(\d+)\.(.+)$"),
    embed=re.compile(r"^(?:model\.)?(?:language_model\.)?embed_tokens\."),
    final_norm=re.compile(r"^(?:model\.)?(?:language_model\.)?norm\."),
    lm_head=re.compile(r"^lm_head\."),
    attn=re.compile(r"^self_attn\."),
    mlp=re.compile(r"^(?:mlp|block_sparse_moe)\."),
    norm=re.compile(r"^(?:input_layernorm|post_attention_layernorm|pre_feedforward_layernorm|post_feedforward_layernorm)\."),
)

_GPT2 = Layout(
    name="gpt2",
    layer=re.compile(r"^(?:transformer\.)?h\.(\d+)\.(.+)$"),
    embed=re.compile(r"^(?:transformer\.)?(?:wte|wpe)\."),
    final_norm=re.compile(r"^(?:transformer\.)?ln_f\."),
    lm_head=re.compile(r"^lm_head\."),
    attn=re.compile(r"^attn\."),
    mlp=re.compile(r"^mlp\."),
    norm=re.compile(r"^ln_[12]\."),
)

_GPT_NEOX = Layout(
    name="gpt_neox",
    layer=re.compile(r"^(?:gpt_neox\.)?layers\.(\d+)\.(.+)$"),
    embed=re.compile(r"^(?:gpt_neox\.)?embed_in\."),
    final_norm=re.compile(r"^(?:gpt_neox\.)?final_layer_norm\."),
    lm_head=re.compile(r"^embed_out\."),
    attn=re.compile(r"^attention\."),
    mlp=re.compile(r"^mlp\."),
    norm=re.compile(r"^(?:input_layernorm|post_attention_layernorm)\."),
)

#: model_type (config.json) -> layout. Unknown types are tried against every layout.
LAYOUTS_BY_MODEL_TYPE: dict[str, Layout] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "gpt2": _GPT2,
    "gpt_neox": _GPT_NEOX,
}
ALL_LAYOUTS = (_LLAMA_LIKE, _GPT2, _GPT_NEOX)


def classify(name: str, layout: Layout) -> TensorGroup | None:
    """The group of ``name`` under ``layout``, or None if the layout does not know it."""
    m = layout.layer.match(name)
    if m:
        rest = m.group(2)
        part = next((p for p in PARTS if getattr(layout, p).match(rest)), None)
        return TensorGroup("layer", int(m.group(1)), part)
    if layout.embed.match(name):
        return TensorGroup("embed")
    if layout.final_norm.match(name):
        return TensorGroup("final_norm")
    if layout.lm_head.match(name):
        return TensorGroup("lm_head")
    return None


def detect_layout(names: Iterable[str], model_type: str | None = None) -> Layout:
    """Pick the layout that classifies every tensor name; error naming the first stranger."""
    names = list(names)
    candidates = [LAYOUTS_BY_MODEL_TYPE[model_type]] if model_type in LAYOUTS_BY_MODEL_TYPE else list(ALL_LAYOUTS)
    best: tuple[int, Layout, str | None] | None = None
    for layout in candidates:
        unknown = [n for n in names if classify(n, layout) is None]
        if not unknown:
            return layout
        if best is None or len(unknown) < best[0]:
            best = (len(unknown), layout, unknown[0])
    stranger = best[2] if best else "<no tensors>"
    raise RecipeError(
        f"unknown tensor layout (model_type={model_type!r}): tensor {stranger!r} is not an embedding, "
        f"decoder layer, final norm or lm_head of a Llama/Mistral/Qwen2/Gemma/GPT-2/GPT-NeoX model; "
        f"add a Layout for it in evomerge/merge/groups.py"
    )


def group_tensors(names: Iterable[str], layout: Layout) -> dict[str, TensorGroup]:
    """Map every tensor name to its TensorGroup (names the layout does not know raise)."""
    out: dict[str, TensorGroup] = {}
    for n in names:
        g = classify(n, layout)
        if g is None:
            raise RecipeError(f"tensor {n!r} does not fit the {layout.name} layout; check the model's tensor names")
        out[n] = g
    return out


def num_layers(groups: Iterable[TensorGroup]) -> int:
    layers = [g.layer for g in groups if g.kind == "layer" and g.layer is not None]
    return max(layers) + 1 if layers else 0
