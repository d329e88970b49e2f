"""PathModel: the live model of a data-flow merge, rebuilt from a ``PathRecipe`` without copying weights.

In the data-flow space of evolutionary model merging (Sakana AI, arXiv 2403.13187) a
candidate is a *path*: an ordered list of decoder layers taken from several models of one
architecture, each entered with a positive scale on the hidden state. Evaluating a
candidate must therefore be cheap: an actor loads every model once, for its whole life,
and ``PathModel.apply`` only rewires which layer objects the embedding model's decoder
runs, in which order. No parameter is copied or written; a recipe change costs a few
hundred small Python objects.

Two details make the rewiring correct rather than merely plausible:

- transformers' KV cache is indexed by each attention module's ``layer_idx``. A layer that
  appears twice on a path would write both of its positions into one cache slot and
  corrupt generation with ``use_cache=True`` (without the cache the output is right, which
  hides the bug). Each position therefore gets its own *view* of the layer: a new module
  object of the same class sharing every parameter, buffer and submodule by reference,
  except the attention module, which is itself a view whose ``layer_idx`` is the position.
- the cache is built from the config (``DynamicCache(config=...)`` reads
  ``num_hidden_layers`` and ``layer_types``), and the decoder runs
  ``layers[:config.num_hidden_layers]``; both are set to the path, per position.

A scale of exactly 1.0 installs no hook at all, so a model's own path reproduces that
model bit for bit.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from evomerge.errors import RecipeError, SourceError
from evomerge.merge.path_recipe import PathRecipe

if TYPE_CHECKING:
    from evomerge.merge.sources import ModelSet

__all__ = ["PathModel", "build_path_layers", "decoder_layers", "decoder_of", "layer_view"]


# -- per-position views of a layer -----------------------------------------------------------
def _shallow_view(module: nn.Module) -> nn.Module:
    """A new module object of the same class that shares parameters, buffers and children.

    ``copy.copy`` copies ``__dict__`` one level deep only, so the copy and the original
    would share the very dict objects ``_modules``, ``_parameters``, ``_buffers`` and the
    hook registries: replacing a child or registering a hook on the copy would silently
    change the original. Every dict/set held in ``__dict__`` is therefore copied too (same
    values, new container); tensors and submodules stay shared by reference.
    """
    view = copy.copy(module)
    for key, value in list(view.__dict__.items()):
        if type(value) in (dict, OrderedDict, set):
            view.__dict__[key] = value.copy()
    return view


def _scale_pre_hook(scale: float):
    """A forward pre-hook (``with_kwargs=True``) multiplying ``hidden_states`` by ``scale``.

    The scale is first rounded to the hidden state's dtype, so the product is exactly
    ``h * torch.tensor(scale, dtype=h.dtype)`` (a bf16 stream stays bf16 and matches a
    hand-written reference), yet it is passed as a Python number: no tensor is created on
    the accelerator per call, so the hook adds no host-device transfer to a forward.
    """
    rounded: dict[torch.dtype, float] = {}

    def mul(h: torch.Tensor) -> torch.Tensor:
        s = rounded.get(h.dtype)
        if s is None:
            s = rounded[h.dtype] = float(torch.tensor(scale, dtype=h.dtype)) if h.is_floating_point() else scale
        return h * s

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]):
        if args:
            return (mul(args[0]), *args[1:]), kwargs
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": mul(kwargs["hidden_states"])}
        raise RuntimeError(f"{type(module).__name__} was called without hidden_states; cannot apply the path scale")

    return hook


def layer_view(layer: nn.Module, position: int, scale: float = 1.0) -> nn.Module:
    """The view of decoder ``layer`` that runs at ``position`` of a path, entered with ``scale``.

    Shares all weights with ``layer``. Every direct child carrying an int ``layer_idx``
    (``self_attn`` in Llama/Qwen/Mistral, linear-attention blocks in hybrids) is replaced by
    its own view with ``layer_idx = position``, so each position owns its KV-cache slot;
    the layer's own ``layer_idx`` (some architectures keep one) is set too. The original
    layer and its children are never modified.
    """
    view = _shallow_view(layer)
    if isinstance(getattr(view, "layer_idx", None), int):
        view.layer_idx = position
    for name, child in list(view._modules.items()):
        if child is not None and isinstance(getattr(child, "layer_idx", None), int):
            child_view = _shallow_view(child)
            child_view.layer_idx = position
            view._modules[name] = child_view
    if scale != 1.0:
        view.register_forward_pre_hook(_scale_pre_hook(float(scale)), with_kwargs=True)
    return view


def build_path_layers(layers_of: Mapping[str, Sequence[nn.Module]], recipe: PathRecipe) -> list[nn.Module]:
    """One view per step of ``recipe.path``: ``layers_of[step.model][step.layer]`` at that position.

    ``layers_of`` maps a model name as the recipe writes it to that model's decoder layers
    (the original, unmodified ones). A missing model or an out-of-range layer is a
    ``RecipeError`` naming the step, since it means the recipe was made for other models.
    """
    out: list[nn.Module] = []
    for p, step in enumerate(recipe.path):
        layers = layers_of.get(step.model)
        if layers is None:
            raise RecipeError(f"path[{p}] names model {step.model!r}, which is not loaded "
                              f"({', '.join(layers_of) or 'none'})")
        if step.layer >= len(layers):
            raise RecipeError(f"path[{p}] asks for layer {step.layer} of {step.model!r}, which has "
                              f"{len(layers)} layers (0..{len(layers) - 1})")
        out.append(layer_view(layers[step.layer], p, step.scale))
    return out


# -- the live model -------------------------------------------------------------------------------
def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack of a causal LM: the module that owns ``layers``."""
    get = getattr(model, "get_decoder", None)
    if callable(get):
        try:
            dec = get()
        except Exception:  # noqa: BLE001 - some remote-code models raise here; fall back below
            dec = None
        if dec is not None and isinstance(getattr(dec, "layers", None), nn.ModuleList):
            return dec
    inner = getattr(model, "model", None)
    if inner is not None and isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return inner
    raise SourceError(f"{type(model).__name__}: cannot find its decoder layers (no get_decoder().layers or "
                      f"model.layers); data-flow merging needs a decoder-only model with a layer list")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's own decoder layers, in order (a plain list, detached from the ModuleList)."""
    return list(decoder_of(model).layers)


class PathModel:
    """Every model of a set, loaded once, and the one live model a ``PathRecipe`` rewires.

    An actor holds one for its whole life. ``apply(recipe)`` returns the ``embed_from``
    model's object with its decoder running the recipe's path; the next ``apply`` first
    puts back that model's own layers and config, so nothing of one recipe survives into
    the next (applying a model's own path gives exactly that model). Models are addressed
    by ``ModelSource.ref``, the strings recipes use.

    The weights of all models stay resident (``model_bytes()``): that is the price of a
    recipe change that copies nothing.
    """

    def __init__(self, model_set: "ModelSet", *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                 allow_pickle: bool = False) -> None:
        from transformers import AutoModelForCausalLM

        self.model_set = model_set
        self.device = torch.device(device)
        self.dtype = dtype
        self._models: dict[str, nn.Module] = {}
        self._layers: dict[str, list[nn.Module]] = {}
        self._own: dict[str, tuple[nn.ModuleList, int, list[str] | None, bool | None]] = {}
        for src in model_set.sources:
            model = AutoModelForCausalLM.from_pretrained(
                str(src.path), dtype=dtype, trust_remote_code=trust_remote_code,
                use_safetensors=None if allow_pickle else True,
            ).to(self.device).eval()
            cfg = model.config
            if getattr(cfg, "is_heterogeneous", False):
                raise SourceError(f"model {src.ref}: its config has per-layer overrides (per_layer_config); "
                                  f"data-flow merging supports only models whose layers share one config")
            dec = decoder_of(model)
            self._install_capture_hooks(dec)
            self._models[src.ref] = model
            self._layers[src.ref] = list(dec.layers)
            layer_types = getattr(cfg, "layer_types", None)
            self._own[src.ref] = (dec.layers, cfg.num_hidden_layers,
                                  list(layer_types) if layer_types is not None else None,
                                  getattr(dec, "has_sliding_layers", None))
        self._live: str | None = None
        self._recipe: PathRecipe | None = None

    @staticmethod
    def _install_capture_hooks(decoder: nn.Module) -> None:
        """Install transformers' output-capturing hooks now, before any view is made.

        They are installed lazily, once per decoder, on the first ``output_hidden_states``
        call; views made earlier copy the hooks their layer has, views made later would
        otherwise miss them. The hooks do nothing unless outputs are requested.
        """
        try:
            from transformers.utils.output_capturing import maybe_install_capturing_hooks
        except ImportError:  # older/newer transformers: hooks are not the mechanism there
            return
        try:
            maybe_install_capturing_hooks(decoder)
        except Exception:  # noqa: BLE001 - a model without _can_record_outputs; nothing to capture
            pass

    # -- looking things up ------------------------------------------------------------------
    @property
    def models(self) -> Mapping[str, nn.Module]:
        """The loaded models by ref (read-only mapping; the live one is rewired by ``apply``)."""
        return MappingProxyType(self._models)

    @property
    def live(self) -> nn.Module | None:
        """The model last returned by ``apply`` (None before the first)."""
        return self._models[self._live] if self._live is not None else None

    @property
    def recipe(self) -> PathRecipe | None:
        """The recipe now applied (None before the first ``apply``)."""
        return self._recipe

    def num_layers(self, ref: str) -> int:
        """How many decoder layers model ``ref`` has."""
        return len(self._layers[self._resolve(ref)])

    def _resolve(self, name: str) -> str:
        """The loaded ref a recipe's model name means (exact ref, or the same folder)."""
        if name in self._models:
            return name
        try:
            ref = self.model_set.by_ref(name).ref
        except SourceError:
            ref = None
        if ref is None or ref not in self._models:
            raise RecipeError(f"path recipe names model {name!r}, which is not one of the loaded models "
                              f"({', '.join(self._models)})")
        return ref

    def model_bytes(self) -> int:
        """Bytes of parameters of all loaded models (each tensor counted once), for a memory line.

        Walks each model *and* its own layer list: while a path is live, the live model
        reaches other models' layers through views and no longer reaches its own unused
        layers, so ``model.parameters()`` alone would miss some and double-count others.
        """
        seen: set[int] = set()
        total = 0
        for ref, model in self._models.items():
            for module in (model, *self._layers[ref]):
                for p in module.parameters():
                    if id(p) not in seen:
                        seen.add(id(p))
                        total += p.numel() * p.element_size()
        return total

    def describe(self) -> str:
        """One line: the models, their layer counts, the resident size, and the live path."""
        models = ", ".join(f"{chr(ord('A') + i) if i < 26 else f'M{i}'}={ref} ({len(self._layers[ref])} layers)"
                           for i, ref in enumerate(self._models))
        live = self._recipe.describe() if self._recipe is not None else "no path applied"
        return (f"PathModel: {len(self._models)} models [{models}], {self.model_bytes() / 2**20:.1f} MiB "
                f"{str(self.dtype).removeprefix('torch.')} on {self.device}; live: {live}")

    # -- rewiring ------------------------------------------------------------------------------
    def _restore(self) -> None:
        """Give the live model back its own layers, layer count, layer types and mask flags."""
        if self._live is None:
            return
        model = self._models[self._live]
        dec = decoder_of(model)
        layers, n, layer_types, has_sliding = self._own[self._live]
        dec.layers = layers
        model.config.num_hidden_layers = n
        if layer_types is not None:
            model.config.layer_types = list(layer_types)
        if has_sliding is not None:
            dec.has_sliding_layers = has_sliding
        self._live = None
        self._recipe = None

    def apply(self, recipe: PathRecipe) -> nn.Module:
        """Rewire the ``embed_from`` model to run ``recipe.path`` and return it (in eval mode).

        The previous recipe is undone first. ``config.num_hidden_layers`` becomes the path
        length and ``config.layer_types`` (where the architecture has it) the source layer's
        type at each position, so the KV cache and attention masks match the path.
        """
        refs = {name: self._resolve(name) for name in recipe.models}
        layers_of = {name: self._layers[ref] for name, ref in refs.items()}
        views = build_path_layers(layers_of, recipe)  # validates before anything is touched
        self._restore()
        embed_ref = refs[recipe.embed_from]
        model = self._models[embed_ref]
        dec = decoder_of(model)
        dec.layers = nn.ModuleList(views)
        model.config.num_hidden_layers = len(views)
        if self._own[embed_ref][2] is not None:
            types = [self._own[refs[s.model]][2] for s in recipe.path]
            model.config.layer_types = [t[s.layer] if t is not None else "full_attention"
                                        for t, s in zip(types, recipe.path)]
            if self._own[embed_ref][3] is not None:
                dec.has_sliding_layers = "sliding_attention" in model.config.layer_types
        self._live = embed_ref
        self._recipe = recipe
        return model.eval()
