"""The ``layerwise`` genome: merge coefficients per layer group, per tensor kind, per source.

Genes (an ``ng.p.Dict``; one row per *unit*, see below):

- ``method``: the merge method, an ``ng.p.Choice`` among ``merge.methods`` -- one for
  the whole model (``merge.method_gene: global``) or one per layer group, plus one each
  for embed / final_norm / lm_head (``per_group``). Omitted when only one method is
  allowed. Deterministic (argmax of the softmax weights), so a value is a pure function
  of the optimizer's standardized data and the log replays exactly on resume.
- one bounded ``ng.p.Array`` of shape ``(units, sources)`` per per-source parameter any
  allowed method uses (``weight``, ``density``, ``epsilon``, ``gamma``, ``scale``), and one
  of shape ``(units,)`` per method-level parameter (``t`` for slerp and nearswap,
  ``select_topk`` for SCE, ``r`` and ``alpha`` for RAM+; ``lambda`` only when
  ``space.bounds`` names it, since it merely rescales the weights). Only the genes of
  the chosen method enter the recipe; the others ride along unused. Dense arrays rather
  than one scalar per gene keep nevergrad fast for thousands of genes.

Units: ``embed``; per group of ``space.layer_group_size`` consecutive layers, one unit per
part in ``space.split`` (attn / mlp / norm) plus a "rest" unit for the layer's other
tensors (``layers.<i>`` in the recipe; absent when the split covers every tensor);
``final_norm``; ``lm_head`` (only the kinds the model has, e.g. no lm_head when tied).
Embeddings, final norm and lm_head get their own genes: they are few and sensitive
(vocabulary rows, output scale), so sharing them with a decoder layer would couple
unrelated effects.

Parameters fixed in ``merge.params`` (normalize, rescale, or even density) are not
searched; a bound with lower == upper fixes that parameter too.

Initial value ("uniform"): every source weight 1/N, every other parameter at the
method's default (density 1.0: nothing dropped; t 0.5), clipped into the bounds. 1/N
(rather than 1) makes the initial recipe the uniform average for *every* method: the
linear/ties families normalise by the weight sum anyway, while task_arithmetic and the
DARE/breadcrumbs families (normalize false in mergekit) give base + mean(task vectors).

Validity adjustments in ``to_recipe`` (so any in-bounds genome is a valid recipe):
density and SCE's select_topk are at least 1e-6; DELLA's epsilon is reduced to keep density +/- epsilon in
(0, 1), as mergekit requires (unless density is 1: nothing is pruned then).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import nevergrad as ng
import numpy as np

from evomerge.config import SEARCHABLE_PARAMS
from evomerge.errors import ConfigError, RecipeError
from evomerge.merge.groups import PARTS, TensorGroup
from evomerge.merge.recipe import GroupRecipe, MergeRecipe
from search_spaces.base import SearchSpace

#: bounds used for parameters that ``space.bounds`` does not name.
DEFAULT_BOUNDS: dict[str, tuple[float, float]] = {
    "weight": (0.0, 1.5),
    "density": (0.1, 1.0),
    "epsilon": (0.0, 0.2),
    "gamma": (0.0, 0.1),
    "scale": (0.0, 1.5),
    "t": (0.0, 1.0),
    "lambda": (0.5, 1.5),
    "select_topk": (0.1, 1.0),
    "r": (0.0, 0.5),
    "alpha": (0.0, 1.0),
}
#: method-level parameters a space may search; ``lambda`` only when bounds name it.
METHOD_LEVEL = ("t", "lambda", "select_topk", "r", "alpha")
_MIN_DENSITY = 1e-6
_EPS_MARGIN = 1e-6


@dataclass(frozen=True)
class Unit:
    """One row of the genome arrays: the recipe keys it writes and its method slot."""

    name: str
    keys: tuple[str, ...]
    probe: TensorGroup  # a tensor group of this unit, to look the unit up in a recipe
    slot: int  # index of its method gene


def build_units(model_set: Any, group_size: int, split: list[str], per_group: bool) -> tuple[list[Unit], int]:
    """The units of a model and the number of method slots (see module docstring)."""
    groups = getattr(model_set, "groups", None)
    if groups:
        kinds = {g.kind for g in groups.values()}
        layer_parts = {g.part for g in groups.values() if g.kind == "layer"}
    else:  # a model set that does not list its tensors: assume the usual decoder
        kinds = {"embed", "final_norm", "lm_head"}
        layer_parts = set(PARTS) if set(split) >= set(PARTS) else {*PARTS, None}
    parts = [p for p in PARTS if p in split and p in layer_parts]
    rest = any(p not in parts for p in layer_parts)
    units: list[Unit] = []
    slot = 0

    def special(kind: str) -> None:
        nonlocal slot
        if kind in kinds:
            units.append(Unit(kind, (kind,), TensorGroup(kind), slot))  # type: ignore[arg-type]
            slot += per_group

    special("embed")
    n_layers = int(model_set.num_layers)
    for start in range(0, n_layers, group_size):
        layers = range(start, start + group_size)
        label = f"layers.{start}" if group_size == 1 else f"layers.{start}-{start + group_size - 1}"
        for p in parts:
            units.append(Unit(f"{label}.{p}", tuple(f"layers.{i}.{p}" for i in layers),
                              TensorGroup("layer", start, p), slot))  # type: ignore[arg-type]
        if rest:  # probe with a real tensor's group: a recipe may set layers.<i>.norm without splitting
            probe = next((g for g in (groups or {}).values()
                          if g.kind == "layer" and g.layer == start and g.part not in parts),
                         TensorGroup("layer", start, None))
            units.append(Unit(label, tuple(f"layers.{i}" for i in layers), probe, slot))
        slot += per_group
    special("final_norm")
    special("lm_head")
    return units, (slot if per_group else 1)


class LayerwiseSpace(SearchSpace):
    """Per layer group x tensor kind x source coefficients, plus a method choice."""

    name = "layerwise"

    def __init__(self, cfg: Any, model_set: Any) -> None:
        from evomerge.merge.methods import get_method

        self.cfg = cfg
        self.model_set = model_set
        self.sources: list[str] = [s.ref for s in model_set.sources]
        self.base: str | None = model_set.base.ref if model_set.base is not None else None
        self.n = len(self.sources)
        self.methods: list[str] = list(dict.fromkeys(cfg.merge.methods))
        self.info = {m: get_method(m) for m in self.methods}
        self.per_group = cfg.merge.method_gene == "per_group"
        self.units, self.n_slots = build_units(model_set, cfg.space.layer_group_size, list(cfg.space.split),
                                               self.per_group)
        self.bounds = {p: tuple(map(float, cfg.space.bounds.get(p, DEFAULT_BOUNDS[p]))) for p in DEFAULT_BOUNDS}
        # fixed parameters: merge.params, plus any bound with lower == upper
        self.fixed: dict[str, float | bool] = {p: lo for p, (lo, hi) in self.bounds.items() if lo == hi}
        self.fixed.update(cfg.merge.params)
        used_src = {p for m in self.info.values() for p in m.source_params}
        used_lvl = {p for m in self.info.values() for p in m.params}
        self.source_genes = [p for p in SEARCHABLE_PARAMS if p in used_src and p not in self.fixed]
        self.method_genes = [
            p for p in METHOD_LEVEL
            if p in used_lvl and p not in self.source_genes and p not in self.fixed
            and (p != "lambda" or "lambda" in cfg.space.bounds)
        ]
        self._uniform = self._uniform_value()
        self._initial = self._load_initial()

    # -- genome ---------------------------------------------------------------------
    def parametrization(self) -> ng.p.Parameter:
        init = self._initial
        genes: dict[str, ng.p.Parameter] = {}
        if len(self.methods) > 1:
            choice = ng.p.Choice(self.methods, repetitions=self.n_slots if self.per_group else None, deterministic=True)
            choice.value = init["method"]
            genes["method"] = choice
        for p in self.source_genes + self.method_genes:
            lo, hi = self.bounds[p]
            genes[p] = ng.p.Array(init=np.array(init[p], dtype=float), lower=lo, upper=hi)
        return ng.p.Dict(**genes)

    def initial_value(self) -> dict[str, Any]:
        return _copy(self._initial)

    def value_from_json(self, data: Any) -> dict[str, Any]:
        out = dict(data)
        for p in self.source_genes + self.method_genes:
            out[p] = np.asarray(out[p], dtype=float)
        if "method" in out and self.per_group:
            out["method"] = tuple(out["method"])
        return out

    # -- recipe ---------------------------------------------------------------------
    def unit_methods(self, value: Mapping[str, Any]) -> list[str]:
        """The method each unit uses under ``value``."""
        if len(self.methods) == 1:
            return [self.methods[0]] * len(self.units)
        chosen = value["method"]
        if isinstance(chosen, str):
            chosen = [chosen] * self.n_slots
        chosen = list(chosen)
        if len(chosen) != self.n_slots:
            raise RecipeError(f"genome has {len(chosen)} method genes, the space expects {self.n_slots}")
        for m in chosen:
            if m not in self.info:
                raise RecipeError(f"genome chooses method {m!r}, not among merge.methods ({', '.join(self.methods)})")
        return [chosen[u.slot] for u in self.units]

    def to_recipe(self, value: Mapping[str, Any]) -> MergeRecipe:
        arrays = {p: self._clipped(p, value[p]) for p in self.source_genes + self.method_genes}
        groups: dict[str, GroupRecipe] = {}
        for u, (unit, method) in enumerate(zip(self.units, self.unit_methods(value))):
            info = self.info[method]
            # a bound fixes a gene: at method level only METHOD_LEVEL's (DELLA's per-source
            # epsilon bound must not become RAM's method-level epsilon threshold)
            params: dict[str, float | bool] = {k: v for k, v in self.fixed.items() if k in info.params
                                               and (k in METHOD_LEVEL or k in self.cfg.merge.params)}
            for p in self.method_genes:
                if p in info.params:
                    params[p] = float(arrays[p][u])
            if "select_topk" in self.method_genes and "select_topk" in params:  # bounds may start at 0
                params["select_topk"] = max(params["select_topk"], _MIN_DENSITY)
            source_params: dict[str, dict[str, float]] = {}
            for j, src in enumerate(self.sources):
                sp = {k: float(v) for k, v in self.fixed.items() if k in info.source_params}
                for p in self.source_genes:
                    if p in info.source_params:
                        sp[p] = float(arrays[p][u, j])
                _make_valid(sp)
                if sp:
                    source_params[src] = sp
            group = GroupRecipe(method=method, params=params, source_params=source_params)
            for key in unit.keys:
                groups[key] = group.model_copy(deep=True)
        return MergeRecipe(
            base=self.base,
            sources=list(self.sources),
            groups=groups,
            seed=self.cfg.merge.seed,
            dtype=self.cfg.merge.dtype,
            compute_dtype=self.cfg.merge.compute_dtype,
            tokenizer_source=self.cfg.models.tokenizer_source,
        )

    def from_recipe(self, recipe: MergeRecipe) -> dict[str, Any]:
        """Project ``recipe`` onto the genome.

        Each unit reads the settings of its first layer (``recipe.group_for``); values
        are clipped into the bounds and parameters the recipe leaves out keep their
        uniform defaults. Raises RecipeError when the recipe names other sources, uses
        a method outside ``merge.methods``, or uses several methods where the space has
        one method gene.
        """
        if not isinstance(recipe, MergeRecipe):
            raise RecipeError(f"the layerwise space starts from a parameter-space recipe; this is a "
                              f"{type(recipe).__name__} (a layer path): use it with space.name: dataflow")
        names = self._recipe_source_names(recipe)
        value = _copy(self._uniform)
        slot_method: dict[int, tuple[str, str]] = {}
        for u, unit in enumerate(self.units):
            key, group = recipe.group_for(unit.probe)
            if group.method not in self.info:
                raise RecipeError(
                    f"recipe group {key!r} uses method {group.method!r}, which merge.methods "
                    f"({', '.join(self.methods)}) does not allow; add it to merge.methods"
                )
            seen = slot_method.setdefault(unit.slot, (group.method, key))
            if seen[0] != group.method:
                raise RecipeError(
                    f"recipe uses {seen[0]!r} for {seen[1]!r} but {group.method!r} for {key!r}; the space has one "
                    f"method gene for both (set merge.method_gene: per_group, or use one method)"
                )
            for p in self.method_genes:
                if p in group.params:
                    value[p][u] = self._clip_one(p, group.params[p])
            for j, src in enumerate(names):
                sp = group.source_params.get(src, {})
                for p in self.source_genes:
                    if p in sp:
                        value[p][u, j] = self._clip_one(p, sp[p])
        if len(self.methods) > 1:
            chosen = [slot_method.get(s, (self.methods[0], ""))[0] for s in range(self.n_slots)]
            value["method"] = tuple(chosen) if self.per_group else chosen[0]
        return value

    # -- description ----------------------------------------------------------------
    def describe(self) -> str:
        """One line for the driver log: genes and dimension."""
        genes = [f"{p}[{len(self.units)}x{self.n}]" for p in self.source_genes]
        genes += [f"{p}[{len(self.units)}]" for p in self.method_genes]
        if len(self.methods) > 1:
            genes.append(f"method[{self.n_slots} of {'/'.join(self.methods)}]")
        return f"layerwise: {len(self.units)} units, genes {' '.join(genes)}"

    # -- internals ------------------------------------------------------------------
    def _recipe_source_names(self, recipe: MergeRecipe) -> list[str]:
        """For each source of the search, its name in ``recipe`` (same ref, or same folder)."""
        def canonical(ref: str) -> str:
            by_ref = getattr(self.model_set, "by_ref", None)
            if by_ref is None:
                return ref
            try:
                return by_ref(ref).ref
            except Exception:  # noqa: BLE001 - not one of our models
                return ref

        mapping = {canonical(r): r for r in recipe.sources}
        if sorted(mapping) != sorted(self.sources) or len(recipe.sources) != self.n:
            raise RecipeError(
                f"recipe merges {', '.join(recipe.sources)} but the search merges {', '.join(self.sources)}; "
                f"use a recipe over the configured models.sources"
            )
        return [mapping[s] for s in self.sources]

    def _uniform_value(self) -> dict[str, Any]:
        value: dict[str, Any] = {}
        if len(self.methods) > 1:
            value["method"] = (self.methods[0],) * self.n_slots if self.per_group else self.methods[0]
        for p in self.source_genes:
            default = 1.0 / self.n if p == "weight" else self._default(p, "source_params")
            value[p] = np.full((len(self.units), self.n), self._clip_one(p, default))
        for p in self.method_genes:
            value[p] = np.full((len(self.units),), self._clip_one(p, self._default(p, "params")))
        return value

    def _default(self, p: str, where: str) -> float:
        for m in self.info.values():
            table = getattr(m, where)
            if p in table and table[p] is not None and not isinstance(table[p], bool):
                return float(table[p])
        return {"density": 1.0, "t": 0.5, "lambda": 1.0, "epsilon": 0.15, "gamma": 0.01}.get(p, 1.0)

    def _load_initial(self) -> dict[str, Any]:
        init = self.cfg.space.init
        if init is None or init == "uniform":
            return _copy(self._uniform)
        from evomerge.merge.recipe_files import load_recipe_file

        try:
            return self.from_recipe(load_recipe_file(init))
        except RecipeError as err:
            raise ConfigError(f"config field space.init ({init}): {err}") from None

    def _clip_one(self, p: str, x: float) -> float:
        lo, hi = self.bounds[p]
        return float(min(max(float(x), lo), hi))

    def _clipped(self, p: str, x: Any) -> np.ndarray:
        lo, hi = self.bounds[p]
        arr = np.clip(np.asarray(x, dtype=float), lo, hi)
        want = (len(self.units), self.n) if p in self.source_genes else (len(self.units),)
        if arr.shape != want:
            raise RecipeError(f"genome gene {p!r} has shape {arr.shape}, the space expects {want}")
        return arr


def _make_valid(sp: dict[str, float]) -> None:
    """Adjust one source's parameters so that mergekit accepts them (see module docstring)."""
    if "density" in sp:
        sp["density"] = max(sp["density"], _MIN_DENSITY)
    if "epsilon" in sp:
        d = sp.get("density", 1.0)
        if d < 1.0:  # density 1 prunes nothing, so any epsilon is valid there
            sp["epsilon"] = min(sp["epsilon"], max(0.0, min(d, 1.0 - d) - _EPS_MARGIN))


def _copy(value: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in value.items()}
