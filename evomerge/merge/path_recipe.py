"""PathRecipe: a data-flow merge, the ordered list of layers a token passes through.

The second space of evolutionary model merging (Sakana AI, arXiv 2403.13187) does not mix
weights: it chooses which decoder layer of which model comes next, and by how much the
hidden state is scaled before it enters that layer. A ``PathRecipe`` is the result of one
such choice, small and JSON-serialisable like a ``MergeRecipe``, and is what crosses the
network to the actors, is logged in ``evaluations.jsonl`` and is exported.

- ``models``: the models of the space (refs as the user wrote them, model A first);
- ``embed_from``: the model whose embeddings, final norm and head the path uses;
- ``path``: the steps, each ``{model, layer, scale}``; ``scale`` multiplies the residual
  stream entering that layer (1.0: unchanged).

For pre-norm decoders whose norms are scale-invariant, a scale on the residual stream
is the same as dividing the outputs of that layer and of every later layer by the
running product of scales (``fold_factors``), which is how export writes a plain model.
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from evomerge.merge.recipe import RecipeModel

__all__ = ["PathRecipe", "PathStep", "DATAFLOW_KIND"]

#: the ``kind`` field that tells a data-flow recipe from a parameter-space one
DATAFLOW_KIND = "dataflow"


def _positive_scale(value: float) -> float:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"must be a finite number > 0 (got {value}); a path only rescales the hidden state, "
                         f"it never flips or zeroes it")
    return value


#: a scale on the residual stream (a path step's) or on a layer's outputs (a stack layer's, folded)
PositiveScale = Annotated[float, AfterValidator(_positive_scale)]


class PathStep(BaseModel):
    """One position of the path: decoder layer ``layer`` of ``model``, entered with ``scale``."""

    model_config = ConfigDict(extra="forbid")

    model: str
    layer: int = Field(..., ge=0)
    scale: PositiveScale = 1.0


class PathRecipe(RecipeModel):
    """A complete data-flow merge: the models, where embeddings come from, the path, the dtype."""

    _what: ClassVar[str] = "path recipe"

    kind: Literal["dataflow"] = DATAFLOW_KIND
    models: list[str] = Field(..., min_length=1)
    embed_from: str
    path: list[PathStep] = Field(..., min_length=1)
    dtype: str = "float32"
    tokenizer_source: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "PathRecipe":
        known = set(self.models)
        if len(known) != len(self.models):
            raise ValueError("models lists a model twice; list each model once")
        if self.embed_from not in known:
            raise ValueError(f"embed_from {self.embed_from!r} is not one of the recipe's models "
                             f"({', '.join(self.models)})")
        for i, step in enumerate(self.path):
            if step.model not in known:
                raise ValueError(f"path[{i}] names model {step.model!r}, which is not one of the recipe's models "
                                 f"({', '.join(self.models)})")
        return self

    # -- folding ------------------------------------------------------------------
    def running_scales(self) -> list[float]:
        """``s_p``: the product of the scales of steps 0..p (float64, as Python floats)."""
        out: list[float] = []
        s = 1.0
        for step in self.path:
            s *= float(step.scale)
            out.append(s)
        return out

    def fold_factors(self) -> list[float]:
        """Per step, the factor on its ``o_proj`` and ``down_proj`` that makes the unscaled model equal.

        ``1 / s_p``: a scale c_p on the residual entering step p, with scale-invariant
        pre-norms, equals an unscaled stream whose sublayer outputs from step p on are
        divided by the running product s_p (the embedding scale c_0 cancels in every norm).
        """
        return [1.0 / s for s in self.running_scales()]

    def models_used(self) -> list[str]:
        """The models that contribute a layer or the embeddings, in ``models`` order."""
        used = {s.model for s in self.path} | {self.embed_from}
        return [m for m in self.models if m in used]

    def describe(self) -> str:
        """A short human line: ``A0 A1 B2x1.20 ...`` (model index + layer, scale when not 1)."""
        index = {m: chr(ord("A") + i) if i < 26 else f"M{i}" for i, m in enumerate(self.models)}
        parts = [f"{index[s.model]}{s.layer}" + ("" if s.scale == 1.0 else f"x{s.scale:.2f}") for s in self.path]
        return f"{len(self.path)} layers: " + " ".join(parts)
