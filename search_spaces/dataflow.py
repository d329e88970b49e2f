"""The ``dataflow`` genome: which layers of which model a token passes through, and how scaled.

Sakana AI's evolutionary model merging (arXiv 2403.13187) searches, besides the weights,
the *data-flow space*: the path of a token through the layers of several models. This
space follows the paper's parameterisation, so that the space stays 2^T, not (M+1)^T:

- The M decoder layers of the models (``models.sources`` in order: model A's layers,
  then model B's, ...) are laid out in order and repeated ``space.repeats`` times,
  giving T = M x repeats *slots*. The order of slots is fixed.
- Gene ``on`` (T reals in [-1, 1]): a slot's layer is on the path when its gene is > 0.
- Gene ``scale``: the factor on the hidden state entering a layer. ``transition`` (the
  paper's M x M matrix): one factor per pair (previous layer, this layer), so a scale
  belongs to a connection and is shared wherever the path repeats it. ``slot``: one per
  slot (T genes rather than M^2, so it is the default once M > ``AUTO_TRANSITION_MAX``).
- Embeddings, final norm and head come from ``space.embed_from`` (default: model A).
  ``space.fixed_ends: k`` pins the first and the last k layers of the path to that
  model's own first and last k layers (scale 1 on entry); the genes choose the middle.
- ``space.max_path_length``: when more slots are on than fit, the middle keeps the ones
  with the largest genes (ties by slot order), in slot order. A path is never empty: with
  no gene on and no fixed ends, the slot with the largest gene is used.
- The initial point is model A's own path (its layers once, every scale 1), so the
  first candidate told to the optimizer is model A itself.

``to_recipe`` is a pure function of the genome, as the resume replay needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import nevergrad as ng
import numpy as np

from evomerge.errors import ConfigError, RecipeError
from evomerge.merge.path_recipe import PathRecipe, PathStep
from search_spaces.base import SearchSpace

#: ``scaling: auto`` uses the paper's M x M transition matrix up to this many layers, per-slot beyond
AUTO_TRANSITION_MAX = 32
#: gene value of a slot that is on / off in the initial point (symmetric around the threshold 0)
_ON, _OFF = 0.5, -0.5


@dataclass(frozen=True)
class Slot:
    """One gene position: layer ``layer`` of model ``model`` (index ``flat`` among the M layers)."""

    model: str
    layer: int
    flat: int  # index among the M layers of all models, for the transition matrix


def model_layers(model_set: Any) -> dict[str, int]:
    """Each source's number of decoder layers (``num_hidden_layers`` of its config)."""
    out: dict[str, int] = {}
    for src in model_set.sources:
        n = src.config.get("num_hidden_layers")
        if n is None and isinstance(src.config.get("text_config"), dict):
            n = src.config["text_config"].get("num_hidden_layers")
        out[src.ref] = int(n if n is not None else model_set.num_layers)
    return out


class DataflowSpace(SearchSpace):
    """Layer paths through the sources (see the module docstring)."""

    name = "dataflow"
    parameter_space = False

    def __init__(self, cfg: Any, model_set: Any) -> None:
        space = cfg.space
        self.cfg = cfg
        self.model_set = model_set
        self.models: list[str] = [s.ref for s in model_set.sources]
        self.layers_of = model_layers(model_set)
        self.embed_from = _embed_ref(cfg, model_set)
        flat: list[tuple[str, int]] = [(m, i) for m in self.models for i in range(self.layers_of[m])]
        self.m_layers = len(flat)
        self.slots = [Slot(m, i, f) for _ in range(space.repeats) for f, (m, i) in enumerate(flat)]
        self.flat_index = {(m, i): f for f, (m, i) in enumerate(flat)}
        mode = space.scaling
        if mode == "auto":
            mode = "transition" if self.m_layers <= AUTO_TRANSITION_MAX else "slot"
        self.scaling = mode
        self.scale_bounds = (float(space.scale_bounds[0]), float(space.scale_bounds[1]))
        n_embed = self.layers_of[self.embed_from]
        k = int(space.fixed_ends)
        self.prefix = [(self.embed_from, i) for i in range(k)]
        self.suffix = [(self.embed_from, i) for i in range(n_embed - k, n_embed)]
        self.max_length = int(space.max_path_length) if space.max_path_length is not None else None
        self.dtype = cfg.merge.dtype
        self._initial = self._load_initial()

    # -- checks (before any Ray work) -------------------------------------------------
    @classmethod
    def check(cls, cfg: Any, model_set: Any) -> None:
        """One-line ConfigError for a config this space cannot search."""
        from evomerge.merge.layer_stack import check_foldable

        space = cfg.space
        if model_set.base is not None:
            raise ConfigError("config field models.base: the dataflow space stacks the layers of models.sources "
                              "and uses no base; remove models.base")
        for key in ("layer_group_size", "split", "bounds"):  # compared with the defaults: a run dir's frozen
            default = type(space).model_fields[key].get_default(call_default_factory=True)  # config writes them all
            if getattr(space, key) != default:
                raise ConfigError(f"config field space.{key}: applies to the layerwise space only; remove it "
                                  f"(the dataflow space uses repeats, scaling, scale_bounds, max_path_length, "
                                  f"fixed_ends and embed_from)")
        embed = _embed_ref(cfg, model_set)
        for src in model_set.sources:
            try:
                check_foldable(str(src.model_type), src.ref)
            except Exception as err:  # noqa: BLE001 - a RecipeError here is a config error
                raise ConfigError(f"config field models.sources: {err}") from None
        layers = model_layers(model_set)
        n = layers[embed]
        k = int(space.fixed_ends)
        if 2 * k > n:
            raise ConfigError(f"config field space.fixed_ends: {k} first and {k} last layers of {embed} overlap "
                              f"(it has {n} layers); use at most {n // 2}")
        if space.max_path_length is not None and space.max_path_length < n:
            raise ConfigError(f"config field space.max_path_length: {space.max_path_length} is shorter than the "
                              f"{n} layers of {embed}, so the search could not start from that model's own path; "
                              f"raise it to at least {n}")
        total = sum(layers.values()) * space.repeats
        if space.max_path_length is not None and space.max_path_length > total + 2 * k:
            raise ConfigError(f"config field space.max_path_length: {space.max_path_length} is longer than any "
                              f"path can be ({total} slots + {2 * k} fixed layers); lower it or raise space.repeats")

    # -- genome ---------------------------------------------------------------------
    def parametrization(self) -> ng.p.Parameter:
        lo, hi = self.scale_bounds
        init = self._initial
        return ng.p.Dict(
            on=ng.p.Array(init=np.array(init["on"], dtype=float), lower=-1.0, upper=1.0),
            scale=ng.p.Array(init=np.array(init["scale"], dtype=float), lower=lo, upper=hi),
        )

    def initial_value(self) -> dict[str, Any]:
        return {k: np.array(v, dtype=float) for k, v in self._initial.items()}

    def value_from_json(self, data: Any) -> dict[str, Any]:
        return {"on": np.asarray(data["on"], dtype=float), "scale": np.asarray(data["scale"], dtype=float)}

    def _scale_shape(self) -> tuple[int, ...]:
        return (self.m_layers, self.m_layers) if self.scaling == "transition" else (len(self.slots),)

    # -- recipe ---------------------------------------------------------------------
    def to_recipe(self, value: Mapping[str, Any]) -> PathRecipe:
        on = np.asarray(value["on"], dtype=float)
        scale = np.clip(np.asarray(value["scale"], dtype=float), *self.scale_bounds)
        if on.shape != (len(self.slots),):
            raise RecipeError(f"genome gene 'on' has shape {on.shape}, the space expects ({len(self.slots)},)")
        if scale.shape != self._scale_shape():
            raise RecipeError(f"genome gene 'scale' has shape {scale.shape}, the space expects {self._scale_shape()}")
        chosen = [i for i in range(len(self.slots)) if on[i] > 0]
        room = None if self.max_length is None else self.max_length - len(self.prefix) - len(self.suffix)
        if room is not None and len(chosen) > room:
            keep = sorted(chosen, key=lambda i: (-on[i], i))[:room]
            chosen = sorted(keep)
        if not chosen and not self.prefix and not self.suffix:
            chosen = [int(np.argmax(on))]
        steps: list[tuple[str, int, int | None]] = [(m, i, None) for m, i in self.prefix]
        steps += [(self.slots[s].model, self.slots[s].layer, s) for s in chosen]
        steps += [(m, i, None) for m, i in self.suffix]
        path: list[PathStep] = []
        prev: tuple[str, int] | None = None
        for model, layer, slot in steps:
            if self.scaling == "transition":
                c = 1.0 if prev is None else float(scale[self.flat_index[prev], self.flat_index[(model, layer)]])
            else:
                c = 1.0 if slot is None else float(scale[slot])
            path.append(PathStep(model=model, layer=layer, scale=c))
            prev = (model, layer)
        return PathRecipe(models=list(self.models), embed_from=self.embed_from, path=path, dtype=self.dtype,
                          tokenizer_source=self.cfg.models.tokenizer_source)

    def from_recipe(self, recipe: Any) -> dict[str, Any]:
        """The genome of ``recipe``'s path: its middle matched to slots in order, scales written back.

        Raises RecipeError when the recipe is not a path over these models, or its
        middle cannot be read in slot order (a layer earlier than the previous one in
        the last repeat), or its scales disagree where the space shares one gene.
        """
        if not isinstance(recipe, PathRecipe):
            raise RecipeError("the dataflow space starts from a data-flow recipe (kind: dataflow); "
                              "this is a parameter-space recipe")
        if sorted(recipe.models) != sorted(self.models) or recipe.embed_from != self.embed_from:
            raise RecipeError(f"recipe paths through {', '.join(recipe.models)} with embeddings of "
                              f"{recipe.embed_from}; the search uses {', '.join(self.models)} with embeddings of "
                              f"{self.embed_from}")
        steps = [(s.model, s.layer, s.scale) for s in recipe.path]
        k = len(self.prefix)
        if ([(m, i) for m, i, _ in steps[:k]] != self.prefix
                or [(m, i) for m, i, _ in steps[len(steps) - len(self.suffix):]] != self.suffix
                or len(steps) < k + len(self.suffix)):
            raise RecipeError(f"recipe path does not begin and end with the {k} fixed layers of {self.embed_from} "
                              f"(space.fixed_ends)")
        middle = steps[k:len(steps) - len(self.suffix)]
        on = np.full(len(self.slots), _OFF)
        scale = np.ones(self._scale_shape())
        s = 0
        slot_of: list[int] = []
        for model, layer, _ in middle:
            while s < len(self.slots) and (self.slots[s].model, self.slots[s].layer) != (model, layer):
                s += 1
            if s == len(self.slots):
                raise RecipeError(f"recipe path cannot be laid on the space's slots in order (layer {layer} of "
                                  f"{model}); raise space.repeats")
            on[s] = _ON
            slot_of.append(s)
            s += 1
        lo, hi = self.scale_bounds
        prev: tuple[str, int] | None = None
        written: dict[Any, float] = {}
        for j, (model, layer, c) in enumerate(steps):
            c = float(min(max(c, lo), hi))
            if self.scaling == "transition":
                if prev is not None:
                    idx = (self.flat_index[prev], self.flat_index[(model, layer)])
                    if written.setdefault(idx, c) != c:
                        raise RecipeError("recipe uses two scales for one transition; use space.scaling: slot")
                    scale[idx] = c
            elif k <= j < k + len(middle):
                scale[slot_of[j - k]] = c
            prev = (model, layer)
        return {"on": on, "scale": scale}

    def describe(self) -> str:
        shape = "x".join(map(str, self._scale_shape()))
        limit = f", max path {self.max_length}" if self.max_length else ""
        ends = f", fixed ends {len(self.prefix)}" if self.prefix else ""
        return (f"dataflow: {len(self.models)} models, {self.m_layers} layers x {self.cfg.space.repeats} repeats "
                f"= {len(self.slots)} slots, genes on[{len(self.slots)}] scale[{shape}] ({self.scaling}), "
                f"embeddings of {self.embed_from}{limit}{ends}")

    # -- internals ------------------------------------------------------------------
    def _own_path(self) -> dict[str, Any]:
        """The genome of ``embed_from``'s own path: its middle layers on in the first repeat, every scale 1."""
        on = np.full(len(self.slots), _OFF)
        n = self.layers_of[self.embed_from]
        middle = range(len(self.prefix), n - len(self.suffix))
        for s, slot in enumerate(self.slots[:self.m_layers]):
            if slot.model == self.embed_from and slot.layer in middle:
                on[s] = _ON
        lo, hi = self.scale_bounds
        return {"on": on, "scale": np.full(self._scale_shape(), float(min(max(1.0, lo), hi)))}

    def _load_initial(self) -> dict[str, Any]:
        init = self.cfg.space.init
        if init is None or init in ("uniform", "own_path"):
            return self._own_path()
        from evomerge.merge.recipe_files import load_recipe_file

        try:
            return self.from_recipe(load_recipe_file(init))
        except RecipeError as err:
            raise ConfigError(f"config field space.init ({init}): {err}") from None


def _embed_ref(cfg: Any, model_set: Any) -> str:
    """The source whose embeddings/head the path uses: ``space.embed_from`` (a ref or index) or model A."""
    want = cfg.space.embed_from
    refs = [s.ref for s in model_set.sources]
    if want is None:
        return refs[0]
    if want in refs:
        return want
    try:
        return model_set.by_ref(want).ref
    except Exception:  # noqa: BLE001 - a one-line config error below
        raise ConfigError(f"config field space.embed_from: {want!r} is not one of models.sources "
                          f"({', '.join(refs)}); name one of them") from None
