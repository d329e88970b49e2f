"""mergekit YAML -> MergeRecipe: mergekit's own parameter resolution, replayed per evomerge group.

Import simulates mergekit 0.1.5's resolution of every parameter (scopes: the model's entry
in the slice, the slice's ``parameters``, the top-level ``parameters``; settings: scalars,
gradients interpolated over a slice's layers, ``{filter, value}`` lists where the first
matching filter wins) on representative tensor names of every evomerge group
(:mod:`evomerge.merge.mergekit_spec`), then writes the fewest recipe groups that give each
group its settings. A construct that splits one evomerge group (say ``filter: q_proj``),
reorders layers (slices that are not the identity), or is otherwise not a per-group merge
raises a one-line RecipeError. The mergekit-multi set :mod:`evomerge.merge.mergekit_yaml`
writes for multi-method recipes reads back too.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping

import yaml

from evomerge.errors import RecipeError
from evomerge.merge.groups import (
    DEFAULT_GROUP,
    LAYOUTS_BY_MODEL_TYPE,
    OTHER_KINDS,
    PARTS,
    layer_key,
    leaf_keys,
    parse_key,
)
from evomerge.merge.mergekit_spec import (
    IGNORED_SHARED,
    REQUIRED,
    _LayoutNames,
    layout_names,
    norm_value,
    resolved_group,
    spec_of,
)
from evomerge.merge.recipe import MergeRecipe

__all__ = ["eval_setting", "from_mergekit_yaml", "source_ref"]


_TOP_KEYS = {
    "merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
    "tokenizer_source", "chat_template", "name",
}


def source_ref(value: Any, where: str, base_dir: Path | None) -> str:
    """A mergekit YAML's model reference (a string, or mergekit's ``{model: {path: ...}}`` forms) as the
    reference evomerge loads: a relative local folder is resolved against the YAML's folder."""
    if isinstance(value, dict) and set(value) <= {"model", "path"}:  # {model: {path: ...}} forms
        value = value.get("model", value.get("path"))
        if isinstance(value, dict):
            value = value.get("path")
    if not isinstance(value, str) or not value:
        raise RecipeError(f"mergekit YAML {where}: expected a model path or hub id, got {value!r}")
    if "+" in value:
        raise RecipeError(f"mergekit YAML {where}: LoRA references ({value!r}) are not supported; merge the LoRA first")
    if base_dir is not None and not Path(value).is_absolute() and (Path(base_dir) / value).exists():
        return str(Path(base_dir) / value)
    return value


def _model_config(ref: str) -> dict[str, Any] | None:
    p = Path(ref) / "config.json"
    if p.is_file():
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None
    return None


def eval_setting(setting: Any, tensor: str, t: float, where: str) -> Any:
    """mergekit's ``evaluate_setting``: filters (first match wins) and interpolated gradients."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            vals = [_num_or_str(e) for e in setting]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
                return vals[int(t * (len(vals) - 1))]
            scaled = t * (len(vals) - 1)
            i0 = int(scaled)
            i1 = min(len(vals) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * float(vals[i0]) + frac * float(vals[i1])
        for cond in setting:
            if not isinstance(cond, dict) or "value" not in cond or set(cond) - {"value", "filter"}:
                raise RecipeError(
                    f"mergekit YAML {where}: a list entry must be a number or a {{filter, value}} mapping, got {cond!r}"
                )
            flt = cond.get("filter")
            if flt is None or flt == "*" or (tensor and str(flt) in tensor):
                return eval_setting(cond["value"], tensor, t, where)
        return None
    raise RecipeError(f"mergekit YAML {where}: unexpected parameter value {setting!r}")


def _num_or_str(v: Any) -> Any:
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def _resolve(name: str, scopes: list[Mapping[str, Any] | None], tensor: str, t: float, where: str) -> Any:
    for scope in scopes:
        if scope and name in scope:
            v = eval_setting(scope[name], tensor, t, f"{where}.{name}")
            if v is not None:
                return v
    return REQUIRED


@dataclass
class _Slice:
    start: int
    end: int
    models: list[str]
    model_params: dict[str, Mapping[str, Any] | None]
    params: Mapping[str, Any] | None


def _mapping(value: Any, where: str) -> Mapping[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise RecipeError(f"mergekit YAML {where}: expected a mapping of parameters, got {type(value).__name__}")
    return value


def _read_slices(doc: dict[str, Any], base_dir: Path | None, num_layers: int | None) -> tuple[list[_Slice], int | None]:
    if "slices" in doc:
        raw = doc["slices"]
        if not isinstance(raw, list) or not raw:
            raise RecipeError("mergekit YAML slices: expected a non-empty list of slices")
        slices: list[_Slice] = []
        pos = 0
        for si, s in enumerate(raw):
            where = f"slices[{si}]"
            if not isinstance(s, dict) or "sources" not in s:
                raise RecipeError(f"mergekit YAML {where}: a slice needs 'sources'")
            extra = set(s) - {"sources", "parameters", "base_model"}
            if extra:
                raise RecipeError(f"mergekit YAML {where}: {sorted(extra)[0]!r} is not supported; remove it")
            models, mparams, ranges = [], {}, set()
            for j, src in enumerate(s["sources"]):
                w = f"{where}.sources[{j}]"
                if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
                    raise RecipeError(f"mergekit YAML {w}: needs 'model' and 'layer_range'")
                ref = source_ref(src["model"], w, base_dir)
                lr = src["layer_range"]
                if not (isinstance(lr, list) and len(lr) == 2 and all(isinstance(x, int) for x in lr)):
                    raise RecipeError(f"mergekit YAML {w}.layer_range: expected [start, end], got {lr!r}")
                ranges.add(tuple(lr))
                models.append(ref)
                mparams[ref] = _mapping(src.get("parameters"), f"{w}.parameters")
            if len(ranges) != 1 or next(iter(ranges))[0] != pos:
                raise RecipeError(
                    f"mergekit YAML {where}: layer ranges {sorted(ranges)} move or repeat layers (output layer "
                    f"{pos} onward); evomerge merges layer i of every model into layer i only"
                )
            start, end = next(iter(ranges))
            if end <= start:
                raise RecipeError(f"mergekit YAML {where}: empty layer_range [{start}, {end}]")
            if slices and models != slices[0].models:
                raise RecipeError(f"mergekit YAML {where}: every slice must list the same models in the same order")
            slices.append(_Slice(start, end, models, mparams, _mapping(s.get("parameters"), f"{where}.parameters")))
            pos = end
        if num_layers is not None and pos != num_layers:
            raise RecipeError(f"mergekit YAML slices cover {pos} layers but the models have {num_layers}; cover all layers")
        return slices, pos
    raw = doc.get("models")
    if not isinstance(raw, list) or not raw:
        raise RecipeError("mergekit YAML: give 'models' (a list) or 'slices'")
    models, mparams = [], {}
    for j, m in enumerate(raw):
        w = f"models[{j}]"
        if isinstance(m, str):
            m = {"model": m}
        if not isinstance(m, dict) or "model" not in m or set(m) - {"model", "parameters"}:
            raise RecipeError(f"mergekit YAML {w}: expected {{model, parameters}}")
        ref = source_ref(m["model"], w, base_dir)
        models.append(ref)
        mparams[ref] = _mapping(m.get("parameters"), f"{w}.parameters")
    return [_Slice(0, num_layers or 0, models, mparams, None)], num_layers


def _needs_layers(doc: dict[str, Any]) -> bool:
    """True when some setting is not one plain scalar (so per-layer evaluation is needed)."""
    scopes = [doc.get("parameters") or {}]
    for m in doc.get("models") or []:
        if isinstance(m, dict):
            scopes.append(m.get("parameters") or {})
    return any(not isinstance(v, (bool, int, float, str)) for s in scopes if isinstance(s, dict) for v in s.values())


def _parse_seed(text: str) -> int:
    m = re.search(r"recipe seed=(\d+)", text)
    return int(m.group(1)) if m else 0


def from_mergekit_yaml(text: str, base_dir: str | Path | None = None) -> MergeRecipe:
    """A MergeRecipe equivalent to a mergekit config (single document, or evomerge's multi set).

    ``base_dir``: relative model paths that exist under it are made absolute there; model
    folders with a ``config.json`` tell the layer count and the naming layout when the YAML
    uses per-layer settings without slices.
    """
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:
        raise RecipeError(f"mergekit YAML does not parse: {' '.join(str(err).split())}") from None
    if not docs:
        raise RecipeError("mergekit YAML is empty")
    bd = Path(base_dir) if base_dir is not None else None
    seed = _parse_seed(text)
    if len(docs) == 1:
        doc = docs[0]
        if not isinstance(doc, dict):
            raise RecipeError("mergekit YAML: the document must be a mapping")
        if "name" in doc:
            doc = {k: v for k, v in doc.items() if k != "name"}
        recipe, _ = _import_doc(doc, bd, seed)
        return recipe
    return _import_multi(docs, bd, seed)


def _import_doc(doc: dict[str, Any], base_dir: Path | None, seed: int,
                num_layers: int | None = None) -> tuple[MergeRecipe, int]:
    if "modules" in doc:
        raise RecipeError("mergekit YAML 'modules' (multi-module models) is not supported; use 'models' or 'slices'")
    if "tokenizer" in doc:
        raise RecipeError("mergekit YAML 'tokenizer' (vocabulary surgery) is not supported; use tokenizer_source")
    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        raise RecipeError(f"mergekit YAML: unknown key {unknown[0]!r}; see mergekit's configuration docs")
    if "merge_method" not in doc:
        raise RecipeError("mergekit YAML: 'merge_method' is missing; add e.g. merge_method: ties")
    method = str(doc["merge_method"])
    spec = spec_of(method, "mergekit YAML merge_method")
    base = source_ref(doc["base_model"], "base_model", base_dir) if doc.get("base_model") is not None else None
    if spec.uses_base and base is None:
        raise RecipeError(f"mergekit YAML: {method} needs 'base_model'; add it")

    # layer count and layout: slices tell the count; otherwise the models' config.json
    cfg = None
    listed = list(doc.get("models") or []) + [
        src for s in (doc.get("slices") or []) if isinstance(s, dict) for src in (s.get("sources") or [])
    ]
    for ref in ([base] if base else []) + [(m.get("model") if isinstance(m, dict) else m) for m in listed]:
        if isinstance(ref, str):
            cfg = _model_config(source_ref(ref, "models", base_dir))
            if cfg:
                break
    layout = LAYOUTS_BY_MODEL_TYPE.get((cfg or {}).get("model_type", "llama"), LAYOUTS_BY_MODEL_TYPE["llama"])
    names = layout_names(layout)
    if num_layers is None and cfg:
        num_layers = cfg.get("num_hidden_layers", cfg.get("n_layer", cfg.get("num_layers")))
    slices, n = _read_slices(doc, base_dir, num_layers)
    if n is None:
        if "slices" not in doc and _needs_layers(doc):
            raise RecipeError(
                "mergekit YAML uses per-layer settings (filters or gradients) but the layer count is unknown; "
                "give slices with layer_range, or pass base_dir where the models' config.json can be read"
            )
        n = 1  # scalar settings only: one representative layer
        slices[0].end = 1
    all_models = slices[0].models
    if spec.uses_base or spec.base_optional:  # the base is the base, never a weighted source
        sources = [m for m in all_models if m != base]
    else:
        sources = list(all_models)
    if not sources:
        raise RecipeError(f"mergekit YAML: {method} needs at least one model besides the base")
    top = _mapping(doc.get("parameters"), "parameters")
    if not spec.uses_base and base is not None and base in sources and _zero_weight_everywhere(
        base, slices, top, names, n
    ):
        sources.remove(base)  # evomerge's export form: the base named, with weight 0

    # evaluate every leaf group on its representative tensor names
    leaf_settings: dict[str, tuple] = {}

    def evaluate(leaf: str, sl: _Slice, t: float) -> tuple:
        reps = names.representatives(leaf)
        params: dict[str, Any] = {}
        for p, default in spec.shared.items():
            params[p] = _agree(leaf, p, [_resolve(p, [sl.params, top], r, t, "parameters") for r in reps], default)
        for p in IGNORED_SHARED:
            params.pop(p, None)
        sp: dict[str, dict[str, Any]] = {}
        for s in sources:
            sp[s] = {
                p: _agree(
                    leaf, p,
                    [_resolve(p, [sl.model_params.get(s), sl.params, top], r, t, f"models[{s}]") for r in reps],
                    default, s,
                )
                for p, default in spec.per_input.items()
            }
        return _freeze(params, sp)

    leaf_settings["embed"] = evaluate("embed", slices[0], 0.0)
    for sl in slices:
        length = sl.end - sl.start
        for idx in range(length):
            t = idx / (length - 1) if length > 1 else 1.0
            for part in PARTS:
                leaf = layer_key(sl.start + idx, part)
                leaf_settings[leaf] = evaluate(leaf, sl, t)
    for leaf in ("final_norm", "lm_head"):
        leaf_settings[leaf] = evaluate(leaf, slices[-1], 0.0)

    groups = _compress(leaf_settings, n, method, scalar_only=(n == 1 and "slices" not in doc))
    dtype = doc.get("dtype")
    out_dtype = doc.get("out_dtype") or dtype
    recipe = MergeRecipe.from_dict(
        {
            "base": base,
            "sources": sources,
            "groups": groups,
            "seed": seed,
            **({"compute_dtype": str(dtype)} if dtype else {}),
            **({"dtype": str(out_dtype)} if out_dtype else {}),
            **({"tokenizer_source": _tok(doc["tokenizer_source"], base, base_dir)} if doc.get("tokenizer_source") else {}),
        }
    )
    return recipe, n


def _zero_weight_everywhere(model: str, slices: list["_Slice"], top: Mapping[str, Any] | None,
                            names: _LayoutNames, n: int) -> bool:
    for leaf in leaf_keys(n):
        g = parse_key(leaf)
        sl = slices[0] if leaf == "embed" else slices[-1]
        t = 0.0
        if g is not None and g.kind == "layer":
            sl = next(x for x in slices if x.start <= g.layer < x.end)
            length = sl.end - sl.start
            t = (g.layer - sl.start) / (length - 1) if length > 1 else 1.0
        for rep in names.representatives(leaf):
            v = _resolve("weight", [sl.model_params.get(model), sl.params, top], rep, t, f"models[{model}]")
            if v is REQUIRED or float(_num_or_str(v)) != 0.0:
                return False
    return True


def _tok(value: Any, base: str | None, base_dir: Path | None) -> str:
    if value == "base" and base:
        return base
    if value == "union":
        raise RecipeError("mergekit YAML tokenizer_source: 'union' is not supported; name one model's tokenizer")
    return source_ref(value, "tokenizer_source", base_dir)


def _agree(leaf: str, p: str, values: list[Any], default: Any, src: str | None = None) -> Any:
    vals = [default if v is REQUIRED else v for v in values]
    if any(v is REQUIRED for v in vals):
        raise RecipeError(
            f"mergekit YAML: parameter {p!r} is missing"
            + (f" for model {src!r}" if src else "")
            + f" (group {leaf}); add it to the model's parameters or the top-level parameters"
        )
    vals = [norm_value(p, _num_or_str(v)) for v in vals]
    if any(v != vals[0] for v in vals):
        raise RecipeError(
            f"mergekit YAML: parameter {p!r} takes different values inside evomerge group {leaf} "
            f"(a filter finer than attn/mlp/norm); use filters on self_attn / mlp / layernorm names"
        )
    return vals[0]


def _freeze(params: dict[str, Any], sp: dict[str, dict[str, Any]]) -> tuple:
    return (tuple(sorted(params.items())), tuple((s, tuple(sorted(v.items()))) for s, v in sp.items()))


def _thaw(method: str, frozen: tuple) -> dict[str, Any]:
    params, sp = frozen
    return {"method": method, "params": dict(params), "source_params": {s: dict(v) for s, v in sp}}


def _compress(leaf_settings: dict[str, tuple], n: int, method: str, scalar_only: bool) -> dict[str, dict[str, Any]]:
    """Fewest recipe keys that give every leaf its settings: a default, then layers, then parts."""
    if scalar_only:  # no per-layer information: one layer stood for all
        units = {"embed": leaf_settings["embed"], "final_norm": leaf_settings["final_norm"],
                 "lm_head": leaf_settings["lm_head"]}
        parts = {p: leaf_settings[layer_key(0, p)] for p in PARTS}
        if len(set(parts.values())) != 1:
            raise RecipeError("internal: scalar-only mergekit settings differ between layer parts")
        units["layers"] = parts["attn"]
        default = Counter(units.values()).most_common(1)[0][0]
        groups = {DEFAULT_GROUP: _thaw(method, default)}
        for k in ("embed", "final_norm", "lm_head"):
            if units[k] != default:
                groups[k] = _thaw(method, units[k])
        if units["layers"] != default:
            raise RecipeError("mergekit YAML sets layers apart from embeddings but the layer count is unknown; pass base_dir")
        return groups
    return _fewest_groups(leaf_settings, n, lambda v: _thaw(method, v))


def _fewest_groups(leaves: Mapping[str, Hashable], n: int,
                   thaw: Callable[[Any], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Recipe groups for per-leaf settings: the most common as default, then the kinds,
    layers and parts that differ from what they would otherwise fall back to."""
    default = Counter(leaves.values()).most_common(1)[0][0]
    groups: dict[str, dict[str, Any]] = {DEFAULT_GROUP: thaw(default)}
    for k in OTHER_KINDS:
        if leaves[k] != default:
            groups[k] = thaw(leaves[k])
    for i in range(n):
        parts = {p: leaves[layer_key(i, p)] for p in PARTS}
        layer_val = Counter(parts.values()).most_common(1)[0][0]
        if layer_val != default:
            groups[layer_key(i)] = thaw(layer_val)
        for p, v in parts.items():
            if v != layer_val:
                groups[layer_key(i, p)] = thaw(v)
    return groups


def _import_multi(docs: list[Any], base_dir: Path | None, seed: int) -> MergeRecipe:
    """Read back the mergekit-multi set ``to_mergekit_yaml`` writes for multi-method recipes."""
    named: dict[str, dict[str, Any]] = {}
    final = None
    for d in docs:
        if not isinstance(d, dict):
            raise RecipeError("mergekit YAML: every document must be a mapping")
        if "name" in d:
            named[str(d["name"])] = {k: v for k, v in d.items() if k != "name"}
        elif final is None:
            final = d
        else:
            raise RecipeError("mergekit-multi YAML has two unnamed (final) documents; name all but one")
    sel_models = [src for s in final.get("slices") or [] for src in s.get("sources", [])] if final else []
    if final is None or final.get("merge_method") != "linear" or not sel_models or not all(
        isinstance(m, dict) and m.get("model") in named for m in sel_models
    ):
        raise RecipeError(
            "mergekit-multi YAML: only the shape evomerge writes is supported (named per-method merges and a final "
            "linear 0/1 selector over them); run mergekit-multi and merge its output instead"
        )
    parts = {}
    n = None
    for name, d in named.items():
        recipe, n_doc = _import_doc(d, base_dir, seed, None if n is None else n)
        parts[name] = recipe
        n = n_doc if n is None else n
    assert n is not None
    # read the selector's weights per leaf as a plain linear doc over the intermediates' names
    sel, _ = _import_doc(final, None, seed, n)
    first = next(iter(parts.values()))
    # passthrough's document has no base_model (mergekit's passthrough takes one input): the
    # others name the recipe's base, and they must agree on it
    bases = {r.base for r in parts.values() if r.base is not None}
    if len(bases) > 1:
        raise RecipeError("mergekit-multi YAML: the per-method merges must use the same base and models")
    base = next(iter(bases), None)
    leaf_groups: dict[str, tuple] = {}
    for leaf in leaf_keys(n):
        _, _, sp = resolved_group(sel, leaf)
        chosen = [name for name, p in sp.items() if p["weight"] == 1.0]
        if len(chosen) != 1 or any(p["weight"] not in (0.0, 1.0) for p in sp.values()):
            raise RecipeError(f"mergekit-multi YAML: group {leaf} is not selected from exactly one merge (weights 0/1)")
        r = parts[chosen[0]]
        if r.sources != first.sources or r.base not in (None, base):
            raise RecipeError("mergekit-multi YAML: the per-method merges must use the same base and models")
        method, params, srcp = resolved_group(r, leaf)
        leaf_groups[leaf] = (method, _freeze(params, srcp))
    groups = _fewest_groups(leaf_groups, n, lambda v: _thaw(*v))  # settings with their method
    dtype = final.get("out_dtype") or final.get("dtype") or first.dtype
    return MergeRecipe.from_dict(
        {"base": base, "sources": first.sources, "groups": groups, "seed": seed,
         "dtype": str(dtype), "compute_dtype": first.compute_dtype,
         **({"tokenizer_source": _tok(final["tokenizer_source"], base, base_dir)}
            if final.get("tokenizer_source") else {})}
    )

