"""Merge methods: the registry, each method's parameter table, its checks, and the entry point.

Every method merges ONE tensor. Inputs are the base tensor and the task vectors
``deltas = source_i - base`` stacked as ``(N, *shape)`` (the actors precompute task
vectors once and reuse them for every candidate, so methods never modify their inputs).
Without a base model the caller passes zeros and the sources as deltas.

A method is a :class:`MergeMethod`: a function plus its parameter table - per-source
parameters (mergekit's per-model ``parameters:``: weight, density, gamma, epsilon) and
method-level ones (mergekit's top-level ``parameters:``: normalize, rescale, lambda, t,
filter_wise) with mergekit 0.1.5's defaults; the two parameters mergekit requires
(``weight``, slerp's ``t``) default to 1.0 and 0.5 here. Where they live:

* the task-arithmetic family (task_arithmetic, ties, dare_*, breadcrumbs*, della*): one
  data row each in :mod:`evomerge.merge.family`, merged by :mod:`evomerge.merge.gta`;
* linear, slerp, model_stock, passthrough: :mod:`evomerge.merge.whole_model`, where each
  function's signature is its table (:func:`method_from_signature`);
* sce, arcee_fusion, nearswap (per-position selection): :mod:`evomerge.merge.selection`.

The registry maps names to ``"module:attribute"`` strings (:class:`evomerge.registry.Registry`),
so listing or checking names imports no method module; ``merge_tensor`` fills in defaults,
validates, seeds random masks (:mod:`evomerge.merge.rng`: the same bits on every device)
and calls the method. dtype: math runs in the dtype of ``base``/``deltas`` (the recipe's
compute dtype) and the result is returned in it; callers cast to the output dtype.
"""

from __future__ import annotations

import difflib
import inspect
import keyword
import math
import typing
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Annotated, Any, Callable, Iterator, Mapping, Sequence

import torch

from evomerge.errors import MethodError
from evomerge.merge import rng
from evomerge.merge.family import FAMILY, USES_SORTED_MAGNITUDES
from evomerge.merge.scratch import PreparedDeltas, Scratch, Workspace
from evomerge.merge.sparsify import sparsify_magnitude, sparsify_outliers
from evomerge.registry import Registry

# Re-exported for callers that reach them through this module (the hot path's tests and
# benchmarks); they live in scratch / family / sparsify.
__all__ = [
    "METHODS", "MergeMethod", "MethodError", "PerSource", "PreparedDeltas", "USES_SORTED_MAGNITUDES", "Workspace",
    "check_methods_usable", "check_params", "check_source_count", "get_method", "merge_tensor", "method_arguments",
    "method_from_signature", "sparsify_magnitude", "sparsify_outliers",
]

Tensor = torch.Tensor

#: Marker for per-source parameters in a method's signature.
PER_SOURCE = "per_source"
PerSource = Annotated[Sequence[float], PER_SOURCE]

#: Keyword a random method receives: one 63-bit stream seed per source.
_SEEDS_ARG = "seeds"
#: Keyword a method that reuses scratch memory receives (a :class:`Scratch`).
_SCRATCH_ARG = "scratch"
#: Keyword a method that means something else with and without a base receives (karcher: a real
#: base is one more model in the mean, the zeros of a base-less recipe must not be): without a
#: base the caller passes zeros as ``base``, which a method cannot tell from a real base of zeros.
#: (multislerp and nuslerp need no flag: slerping the deltas and adding ``base`` back is right both ways.)
_HAS_BASE_ARG = "has_base"


@dataclass(frozen=True)
class MergeMethod:
    """One method and its parameter table (see the module docstring)."""

    name: str
    fn: Callable[..., Tensor]
    paper: str | None
    source_params: Mapping[str, float]  # per-source params and defaults
    params: Mapping[str, float | bool]  # method-level params and defaults
    uses_base: bool
    min_sources: int
    max_sources: int | None
    random: bool
    #: Names mergekit accepts for this method but that change nothing (e.g. density on
    #: task_arithmetic, int8_mask): accepted and dropped, so mergekit YAML imports.
    ignored_source_params: frozenset[str] = frozenset()
    ignored_params: frozenset[str] = frozenset()
    summary: str = ""
    #: Parameters mergekit requires (it has no default for them; evomerge's is in the table).
    required: frozenset[str] = frozenset()
    #: mergekit's default of each ignored parameter.
    ignored_defaults: Mapping[str, float | bool] = field(default_factory=dict)
    #: ``fn`` takes ``scratch=`` (a :class:`Scratch`: reusable buffers, presorted orders).
    takes_scratch: bool = False
    #: ``fn`` takes ``has_base=`` (whether ``base`` is a real base model or the zeros of a base-less recipe).
    takes_has_base: bool = False

    def is_bool(self, param: str) -> bool:
        return isinstance(self.params.get(param), bool)

    @staticmethod
    def arg_name(param: str) -> str:
        """``fn``'s keyword for a public parameter name ("lambda" -> "lambda_")."""
        return param + "_" if keyword.iskeyword(param) else param


def method_from_signature(
    fn: Callable[..., Tensor],
    name: str,
    *,
    paper: str | None,
    uses_base: bool = True,
    min_sources: int = 1,
    max_sources: int | None = None,
    random: bool = False,
    required: Sequence[str] = (),
) -> MergeMethod:
    """The :class:`MergeMethod` of ``fn(base, deltas, *, <params>)``: its keyword-only
    parameters are the table, those annotated :data:`PerSource` per source."""
    hints = typing.get_type_hints(fn, include_extras=True)
    source_params: dict[str, float] = {}
    params: dict[str, float | bool] = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.name in (_SEEDS_ARG, _SCRATCH_ARG, _HAS_BASE_ARG):
            continue
        public = p.name.rstrip("_")  # lambda_ -> lambda
        if p.default is inspect.Parameter.empty:
            raise TypeError(f"{fn.__name__}: parameter {p.name} needs a default")
        if PER_SOURCE in getattr(hints.get(p.name), "__metadata__", ()):
            source_params[public] = float(p.default)
        else:
            params[public] = p.default
    return MergeMethod(
        name=name,
        fn=fn,
        paper=paper,
        source_params=MappingProxyType(source_params),
        params=MappingProxyType(params),
        uses_base=uses_base,
        min_sources=min_sources,
        max_sources=max_sources,
        random=random,
        summary=(inspect.getdoc(fn) or "").split("\n")[0],
        required=frozenset(required),
        takes_scratch=_SCRATCH_ARG in inspect.signature(fn).parameters,
        takes_has_base=_HAS_BASE_ARG in inspect.signature(fn).parameters,
    )


# --------------------------------------------------------------------------------------
# Registry and lookup
# --------------------------------------------------------------------------------------

#: name -> where its MergeMethod lives (imported on first use).
REGISTRY: Registry[MergeMethod] = Registry(
    "merge method",
    {
        **{name: f"evomerge.merge.gta:METHODS.{name}" for name in FAMILY},
        "linear": "evomerge.merge.whole_model:LINEAR",
        "slerp": "evomerge.merge.whole_model:SLERP",
        "model_stock": "evomerge.merge.whole_model:MODEL_STOCK",
        "passthrough": "evomerge.merge.whole_model:PASSTHROUGH",
        "sce": "evomerge.merge.selection:SCE",
        "arcee_fusion": "evomerge.merge.selection:ARCEE_FUSION",
        "nearswap": "evomerge.merge.selection:NEARSWAP",
        "multislerp": "evomerge.merge.spherical:MULTISLERP",
        "nuslerp": "evomerge.merge.spherical:NUSLERP",
        "karcher": "evomerge.merge.spherical:KARCHER",
        "ram": "evomerge.merge.ram:RAM",
        "ramplus_tl": "evomerge.merge.ram:RAMPLUS_TL",
    },
    error=MethodError,
)


class _MethodTable(Mapping[str, MergeMethod]):
    """The registered methods as a read-only mapping (names without imports; values on use)."""

    def __getitem__(self, name: str) -> MergeMethod:
        if name not in REGISTRY.names():
            raise KeyError(name)
        return REGISTRY.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(REGISTRY.names())

    def __len__(self) -> int:
        return len(REGISTRY.names())


#: name -> MergeMethod for every registered method.
METHODS: Mapping[str, MergeMethod] = _MethodTable()


def get_method(name: str | MergeMethod) -> MergeMethod:
    """The registered method called ``name``; MethodError listing the known ones otherwise.

    ``name`` may also be a ``"module:attribute"`` path to a MergeMethod of your own."""
    if isinstance(name, MergeMethod):
        return name
    if name not in REGISTRY:
        known = REGISTRY.names()
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise MethodError(f"unknown merge method {name!r}; {hint}known methods: {', '.join(known)}")
    return REGISTRY.get(name)


# --------------------------------------------------------------------------------------
# Parameter checks
# --------------------------------------------------------------------------------------


def check_methods_usable(names: Sequence[str], n_sources: int, has_base: bool, where: str) -> None:
    """Every method in ``names`` exists and can merge ``n_sources`` sources (with/without a base)."""
    for name in names:
        try:
            method = get_method(name)
        except MethodError as err:
            raise MethodError(f"{where}: {err}") from None
        if method.uses_base and not has_base:
            raise MethodError(
                f"{where}: method {name!r} needs a base model (the model the sources were fine-tuned "
                f"from); set models.base, or use 'linear'"
            )
        if n_sources < method.min_sources or (method.max_sources is not None and n_sources > method.max_sources):
            raise MethodError(f"{where}: method {name!r} {_source_count_rule(method)}, got {n_sources}; "
                              f"change models.sources or drop {name!r}")


def _source_count_rule(method: MergeMethod) -> str:
    lo, hi = method.min_sources, method.max_sources
    if hi == lo:
        with_base = "the base with " if method.uses_base else ""
        return f"merges {with_base}exactly {lo} source{'s' if lo != 1 else ''}"
    if hi is None:
        return f"needs at least {lo} source{'s' if lo != 1 else ''}"
    return f"needs {lo} to {hi} sources"


#: Method-level parameters that mean nothing below 0, and why (RAM's ``epsilon`` threshold is
#: method-level; DELLA's per-source ``epsilon`` is checked with the per-source values below).
NON_NEGATIVE_PARAMS = {
    "epsilon": "the magnitude a change must exceed to count as one",
    "r": "how strongly RAM+ amplifies unique changes",
    "alpha": "the cap on the shared/unique ratio RAM+ amplifies by",
    "eps": "multislerp's guard against dividing by a zero norm",
    "tol": "karcher's threshold below which norms, angles and steps count as zero",
}


def check_params(
    method: str | MergeMethod,
    source_params: Mapping[str, Sequence[float]],
    params: Mapping[str, Any],
    where: str,
) -> None:
    """Names and values of a method's parameters: one-line MethodError at the first problem.

    ``source_params`` maps a per-source parameter to its values (one per source, any
    order); ``params`` holds method-level values. Missing names take their defaults.
    """
    m = get_method(method)
    for key in source_params:
        if key not in m.source_params and key not in m.ignored_source_params:
            raise MethodError(f"{where}: {_unknown_param(m, key, per_source=True)}")
    for key in params:
        if key not in m.params and key not in m.ignored_params:
            raise MethodError(f"{where}: {_unknown_param(m, key, per_source=False)}")

    for key, value in params.items():
        if key not in m.params:
            continue
        if m.is_bool(key):
            if not (isinstance(value, bool) or value in (0, 1)):
                raise MethodError(f"{where}: {m.name} parameter {key!r} must be true or false, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise MethodError(f"{where}: {m.name} parameter {key!r} must be a finite number, got {value!r}")
        elif key in NON_NEGATIVE_PARAMS and value < 0:
            raise MethodError(f"{where}: {m.name} parameter {key!r} is {value:g}; it must be >= 0 "
                              f"({NON_NEGATIVE_PARAMS[key]})")
        elif key == "max_iter" and (value < 0 or value != int(value)):
            raise MethodError(f"{where}: {m.name} parameter 'max_iter' is {value:g}; it must be a whole number >= 0 "
                              f"(the most Karcher-mean steps)")
        elif key == "select_topk" and not 0.0 < value <= 1.0:
            raise MethodError(f"{where}: {m.name} select_topk is {value:g}; it must lie in (0, 1] "
                              f"(the fraction of highest-variance positions kept)")

    values = {k: [float(x) for x in v] for k, v in source_params.items() if k in m.source_params}
    for key, vals in values.items():
        for i, v in enumerate(vals):
            if not math.isfinite(v):
                raise MethodError(f"{where}: {m.name} {key} of source {i} must be a finite number, got {v}")
            if key == "density" and not 0.0 < v <= 1.0:
                raise MethodError(f"{where}: {m.name} density of source {i} is {v}; it must lie in (0, 1] "
                                  f"(the fraction of delta entries kept)")
            if key == "gamma" and not 0.0 <= v <= 1.0:
                raise MethodError(f"{where}: {m.name} gamma of source {i} is {v}; it must lie in [0, 1] "
                                  f"(the fraction of largest entries dropped)")
            if key == "epsilon" and v < 0.0:
                raise MethodError(f"{where}: {m.name} epsilon of source {i} is {v}; it must be >= 0")
    lengths = {len(v) for v in values.values()}
    if len(lengths) > 1:
        raise MethodError(f"{where}: per-source parameters of {m.name} have different lengths "
                          f"({', '.join(f'{k}: {len(v)}' for k, v in values.items())}); give one value per source")

    if "epsilon" in m.source_params:
        n = max(lengths, default=1)
        dens = values.get("density", [m.source_params["density"]] * n)
        eps = values.get("epsilon", [m.source_params["epsilon"]] * n)
        for i, (d, e) in enumerate(zip(dens, eps)):
            # mergekit's della_magprune: keep probabilities density +/- epsilon must lie
            # strictly inside (0, 1) unless density >= 1 (then nothing is pruned).
            if d < 1.0 and (d - e <= 0.0 or d + e >= 1.0):
                raise MethodError(
                    f"{where}: {m.name} source {i}: density {d:g} +/- epsilon {e:g} leaves (0, 1); "
                    f"use epsilon < {min(d, 1.0 - d):g} or move density away from 0 and 1"
                )


def _unknown_param(m: MergeMethod, key: str, per_source: bool) -> str:
    own = m.source_params if per_source else m.params
    other = m.params if per_source else m.source_params
    kind = "per-source" if per_source else "method-level"
    if key in other:
        where_else = "method-level (group params)" if per_source else "per-source (source_params)"
        return f"{m.name} parameter {key!r} is {where_else}, not {kind}; move it there"
    known = ", ".join(sorted(own)) or "none"
    return f"{m.name} has no {kind} parameter {key!r}; its {kind} parameters: {known}"

# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def merge_tensor(
    method: str | MergeMethod,
    base: Tensor,
    deltas: Tensor,
    source_params: Mapping[str, Tensor | Sequence[float] | float],
    params: Mapping[str, Any],
    *,
    seed: int,
    tensor_name: str,
    prepared: PreparedDeltas | None = None,
    workspace: Workspace | None = None,
    has_base: bool = True,
) -> Tensor:
    """Merge one tensor: ``base`` (shape S), ``deltas`` (N, *S) -> merged tensor (S).

    ``has_base``: False for a recipe without a base model (``base`` is then zeros and the
    deltas are the sources themselves).

    ``source_params[p]`` is one value per source (a 1-D tensor, a sequence, or a scalar
    for all); pass Python floats or float64 tensors, since density counts are
    ``int(density * numel)`` and float32 rounding of e.g. 0.7 changes them. Missing
    parameters take the method's defaults. Random masks are seeded by
    ``rng.tensor_seed(seed, tensor_name, i)`` for source ``i``. Inputs are not modified.

    Speed-ups that never change a bit of the result (the search passes them, a one-off
    export need not): ``prepared``, this tensor's :class:`PreparedDeltas` for the same
    deltas (rank thresholds become lookups), and ``workspace``, a :class:`Workspace`
    reused across calls (no fresh allocations). With a workspace the returned tensor
    may be one of its buffers: use or copy it before the next call.
    """
    m = get_method(method)
    if deltas.dim() != base.dim() + 1 or deltas.shape[1:] != base.shape:
        raise ValueError(f"{tensor_name}: deltas {tuple(deltas.shape)} must be (N, *{tuple(base.shape)})")
    if deltas.dtype != base.dtype or deltas.device != base.device:
        raise ValueError(f"{tensor_name}: base and deltas must share dtype and device")
    n = deltas.shape[0]
    check_source_count(m, n, tensor_name)

    kwargs = method_arguments(m, n, source_params, params, seed=seed, tensor_name=tensor_name)
    if base.numel() == 0:
        return base.clone()
    if m.takes_scratch:
        if prepared is not None and (len(prepared.orders) != n or any(
                o.numel() != base.numel() for o in prepared.orders)):
            raise ValueError(f"{tensor_name}: prepared deltas do not match the deltas' sources or size")
        kwargs[_SCRATCH_ARG] = Scratch(workspace or Workspace(), prepared.orders if prepared is not None else None)
    if m.takes_has_base:
        kwargs[_HAS_BASE_ARG] = has_base
    return m.fn(base, deltas, **kwargs)


def check_source_count(method: str | MergeMethod, n: int, tensor_name: str) -> None:
    """A :class:`MethodError` when ``method`` cannot merge ``n`` sources."""
    m = get_method(method)
    if n < m.min_sources or (m.max_sources is not None and n > m.max_sources):
        raise MethodError(f"tensor {tensor_name}: method {m.name!r} {_source_count_rule(m)}, got {n}")


def method_arguments(
    method: str | MergeMethod,
    n: int,
    source_params: Mapping[str, Tensor | Sequence[float] | float],
    params: Mapping[str, Any],
    *,
    seed: int,
    tensor_name: str,
) -> dict[str, Any]:
    """The keyword arguments ``method``'s function gets for one tensor with ``n`` sources:
    per-source lists, method-level values (defaults filled in), and random methods' seeds.

    Checked first (unknown or misplaced parameters, ranges): a :class:`MethodError`.
    Shared by :func:`merge_tensor` and the fused hot path, so both read a recipe alike.
    """
    m = get_method(method)
    per_source = {k: _per_source_values(v, n, k, tensor_name) for k, v in source_params.items()}
    check_params(m, per_source, params, where=f"tensor {tensor_name}")
    kwargs: dict[str, Any] = {}
    for key, default in m.source_params.items():
        kwargs[m.arg_name(key)] = per_source.get(key, [default] * n)
    for key, default in m.params.items():
        value = params.get(key, default)
        kwargs[m.arg_name(key)] = bool(value) if isinstance(default, bool) else float(value)
    if m.random:
        kwargs[_SEEDS_ARG] = [rng.tensor_seed(seed, tensor_name, i) for i in range(n)]
    return kwargs


def _per_source_values(value: Any, n: int, key: str, tensor_name: str) -> list[float]:
    if isinstance(value, Tensor):
        value = value.detach().double().cpu().reshape(-1).tolist()
        if len(value) == 1:
            value = value * n
    elif isinstance(value, (int, float)):
        value = [float(value)] * n
    vals = [float(v) for v in value]
    if len(vals) != n:
        raise MethodError(f"tensor {tensor_name}: {key} has {len(vals)} values for {n} sources; give one per source")
    return vals
