"""The model card (README.md) of an exported merge: Hub front matter, what was merged, how, how good.

Pure functions of a recipe and a run's view, so the card can be tested without writing
weights. A parameter-space merge lists its method and parameters per group of layers; a
data-flow merge lists its path (which layer of which model, at which scale) and, for a
model of the path that is itself a member of an earlier run, that member's recipe, so the
card of a chained result records both searches.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from evomerge import __version__
from evomerge.merge.groups import PARTS, parse_key
from evomerge.merge.path_recipe import PathRecipe
from evomerge.merge.recipe import MergeRecipe
from evomerge.records import EvaluationRecord, ReferenceRecord, display_label
from evomerge.runview import Objective, RunView

PLOT_NAME = "report.png"
CARD_TAGS = ["merge", "evomerge", "mergekit"]


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _units(recipe: MergeRecipe, num_layers: int) -> list[tuple[str, int | None, str | None]]:
    """Tensor groups of the model in reading order; split layers are listed part by part."""
    keyed = [parse_key(k) for k in recipe.groups]
    split = sorted({g.part for g in keyed if g is not None and g.part is not None}, key=PARTS.index)
    units: list[tuple[str, int | None, str | None]] = [("embed", None, None)]
    if split:
        parts = list(split) + [p for p in PARTS if p not in split]
        units += [("layer", i, p) for p in parts for i in range(num_layers)]
    else:
        units += [("layer", i, None) for i in range(num_layers)]
    return units + [("final_norm", None, None), ("lm_head", None, None)]


def _unit_label(units: list[tuple[str, int | None, str | None]]) -> str:
    """``embed, layers 0–5 (attn)``: runs of consecutive layers of one part compressed."""
    pieces: list[str] = []
    k = 0
    while k < len(units):
        kind, layer, part = units[k]
        if kind != "layer":
            pieces.append(kind)
            k += 1
            continue
        j = k
        while j + 1 < len(units) and units[j + 1][0] == "layer" and units[j + 1][2] == part \
                and units[j + 1][1] == units[j][1] + 1:  # type: ignore[operator]
            j += 1
        span = f"layer {layer}" if j == k else f"layers {layer}–{units[j][1]}"
        pieces.append(f"{span} ({part})" if part else span)
        k = j + 1
    return ", ".join(pieces)


def method_rows(recipe: MergeRecipe, num_layers: int) -> list[list[str]]:
    """One row per run of consecutive tensor groups with identical settings.

    Rows: [groups, method, method params, one cell per source]. Settings are compared
    exactly (not as displayed) so two rows that print alike but differ stay apart.
    """
    from evomerge.merge.groups import TensorGroup

    rows: list[tuple[Any, list, list[str]]] = []
    for unit in _units(recipe, num_layers):
        kind, layer, part = unit
        _, g = recipe.group_for(TensorGroup(kind, layer, part))  # type: ignore[arg-type]
        sig = (g.method, sorted(g.params.items()),
               tuple(tuple(sorted(g.source_params.get(s, {}).items())) for s in recipe.sources))
        if rows and rows[-1][0] == sig:
            rows[-1][1].append(unit)
            continue
        cells = [g.method, ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(g.params.items())) or "–"]
        cells += [", ".join(f"{k}={_fmt(v)}" for k, v in sorted(g.source_params.get(s, {}).items())) or "–"
                  for s in recipe.sources]
        rows.append((sig, [unit], cells))
    return [[_unit_label(units)] + cells for _, units, cells in rows]


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_base_models(refs: Sequence[str]) -> list[str]:
    """The refs usable as Hub ``base_model`` metadata: hub ids, not local folders.

    A local path is meaningless on the Hub, so it is left out when at least one ref is a
    hub id; if all are local (offline demo), they are listed as given so the key is
    still present and says what was merged.
    """
    hub = [r for r in refs if _HUB_ID.match(r) and not Path(r).exists()]
    return hub or list(refs)


def _score(scores: Mapping[str, float] | None, name: str) -> str:
    if not scores or not isinstance(scores.get(name), (int, float)):
        return "–"
    return f"{scores[name]:.4g}"


def render_model_card(*, title: str, recipe: MergeRecipe, num_layers: int, member: EvaluationRecord,
                      heldout: Mapping[str, float] | None, objectives: Sequence[Objective],
                      references: Sequence[ReferenceRecord], settings: Mapping[str, Any],
                      plot: str | None = PLOT_NAME, version: str = __version__) -> str:
    """The README.md of an exported model: Hub front matter, then what, how and how good."""
    refs = ([recipe.base] if recipe.base else []) + list(recipe.sources)
    meta: dict[str, Any] = {"base_model": hub_base_models(refs), "library_name": "transformers", "tags": CARD_TAGS}
    if len(refs) > 1:
        meta["base_model_relation"] = "merge"
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip()

    methods = sorted(recipe.methods_used())
    out = [f"---\n{front}\n---", "", f"# {title}", "",
           f"A merge of {len(recipe.sources)} fine-tuned model(s) found by evomerge's evolutionary, "
           f"multi-objective search (evaluation `{member.id}`; method(s): {', '.join(methods)}).", "",
           "## Models merged", ""]
    if recipe.base:
        out.append(f"- base: `{recipe.base}`")
    out += [f"- source {k + 1}: `{s}`" for k, s in enumerate(recipe.sources)]
    if recipe.tokenizer_source:
        out.append(f"- tokenizer from: `{recipe.tokenizer_source}`")

    out += ["", "## Merge recipe", "",
            f"Method and parameters per group of layers (rows with identical settings collapsed); "
            f"dtype `{recipe.dtype}`, random masks seeded with `{recipe.seed}`.", ""]
    out.append(_md_table(["Tensors", "Method", "Parameters"] + [f"`{s}`" for s in short_names(recipe.sources)],
                         method_rows(recipe, num_layers)))

    out += _scores_and_settings(member=member, heldout=heldout, objectives=objectives, references=references,
                                settings=settings, plot=plot, version=version)
    out += ["", "## Reproduce", "", "```bash",
            "evomerge merge recipe.json --out merged   # bit for bit this folder's weights"]
    if len(methods) > 1:
        out.append("mergekit-multi mergekit.yaml --intermediate-dir mk-tmp --out-path merged-mk   # with mergekit")
    else:
        out.append("mergekit-yaml mergekit.yaml merged-mk   # with mergekit")
    out.append("```")
    if any(m.startswith(("dare", "della")) for m in methods):
        out += ["", "mergekit draws the DARE/DELLA random masks from its own generator, so its merge matches this "
                "one in distribution, not bit for bit; `evomerge merge` reproduces it exactly."]
    return "\n".join(out) + "\n"


def _scores_and_settings(*, member: EvaluationRecord, heldout: Mapping[str, float] | None,
                         objectives: Sequence[Objective], references: Sequence[ReferenceRecord],
                         settings: Mapping[str, Any], plot: str | None, version: str) -> list[str]:
    """The card's "Scores" table (selection and held-out, this merge and the references) and settings."""
    out = ["", "## Scores", "",
           "*selection*: the items the search optimised on; *heldout*: items it never saw "
           "(the honest estimate).", ""]
    header = ["Model"] + [f"{o.name} ({'↑' if o.maximized else '↓'}) {split}"
                          for o in objectives for split in ("selection", "heldout")]
    rows = [[f"**this merge** (`{member.id}`)"] + [c for o in objectives
                                                  for c in (_score(member.scores, o.name), _score(heldout, o.name))]]
    for ref in references:
        rows.append([display_label(ref.label)]
                    + [c for o in objectives for c in (_score(ref.scores, o.name), _score(ref.heldout, o.name))])
    out.append(_md_table(header, rows))
    if plot:
        out += ["", f"![Pareto front of the search; this merge is circled]({plot})"]
    out += ["", "## Search settings", ""]
    out += [f"- {k}: {_fmt(v)}" for k, v in settings.items() if v is not None]
    out.append(f"- evomerge version: {version}")
    return out


def path_rows(recipe: PathRecipe, fold: Sequence[float]) -> list[list[str]]:
    """One row per run of consecutive layers of one model entered at scale 1 (and so one fold factor
    per row only when the scales are 1): [positions, model, layers, scale on entry, o_proj/down_proj factor]."""
    rows: list[list[str]] = []
    k = 0
    steps = recipe.path
    while k < len(steps):
        j = k
        while (j + 1 < len(steps) and steps[j + 1].model == steps[k].model and steps[j + 1].layer == steps[j].layer + 1
               and steps[j + 1].scale == 1.0 and fold[j + 1] == fold[k]):
            j += 1
        pos = f"{k}" if j == k else f"{k}–{j}"
        layers = f"{steps[k].layer}" if j == k else f"{steps[k].layer}–{steps[j].layer}"
        rows.append([pos, f"`{steps[k].model}`", layers, f"{steps[k].scale:.4g}", f"{fold[k]:.4g}"])
        k = j + 1
    return rows


def render_path_card(*, title: str, recipe: PathRecipe, member: EvaluationRecord,
                     heldout: Mapping[str, float] | None, objectives: Sequence[Objective],
                     references: Sequence[ReferenceRecord], settings: Mapping[str, Any],
                     upstream: Mapping[str, Mapping[str, Any]] | None = None,
                     plot: str | None = PLOT_NAME, version: str = __version__) -> str:
    """The README.md of an exported data-flow merge: its path, the scales folded, scores, upstream recipes.

    ``upstream``: for a model of the path that is a member of an earlier run (``runs/x#eID``),
    that member's provenance (run, id, recipe, scores), so a chained result records both recipes.
    """
    used = recipe.models_used()
    meta: dict[str, Any] = {"base_model": hub_base_models(used), "library_name": "transformers", "tags": CARD_TAGS}
    if len(used) > 1:
        meta["base_model_relation"] = "merge"
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip()
    fold = recipe.fold_factors()
    out = [f"---\n{front}\n---", "", f"# {title}", "",
           f"A data-flow merge found by evomerge's evolutionary search (evaluation `{member.id}`): a token "
           f"passes through {len(recipe.path)} decoder layers taken from {len(used)} model(s), in the order "
           f"below. It is an ordinary model: the hidden-state scales of the search are folded into each "
           f"layer's `o_proj` and `down_proj`, so it loads with no custom code.", "",
           "## Models", ""]
    layered = {s.model for s in recipe.path}
    for m in used:
        roles = (["embeddings, final norm and head"] if m == recipe.embed_from else []) + \
            ([f"{sum(s.model == m for s in recipe.path)} layer(s) of the path"] if m in layered else [])
        out.append(f"- `{m}`: {' and '.join(roles)}")
    if recipe.tokenizer_source:
        out.append(f"- tokenizer from: `{recipe.tokenizer_source}`")
    out += ["", "## Path", "",
            f"*scale on entry*: the factor on the hidden state entering the layer during the search; "
            f"*folded factor*: what the exported `o_proj`/`down_proj` were multiplied by (1 / running product "
            f"of scales); dtype `{recipe.dtype}`.", ""]
    out.append(_md_table(["Positions", "Model", "Layers", "Scale on entry", "Folded factor"], path_rows(recipe, fold)))
    for ref, prov in (upstream or {}).items():
        out += ["", f"## Upstream merge: `{ref}`", "",
                f"This model of the path is evaluation `{prov.get('id')}` of the run `{prov.get('run_dir')}` "
                f"(an earlier search); its recipe:", "", "```json",
                json.dumps(prov.get("recipe"), indent=2, sort_keys=True), "```"]
    out += _scores_and_settings(member=member, heldout=heldout, objectives=objectives, references=references,
                                settings=settings, plot=plot, version=version)
    out += ["", "## Reproduce", "", "```bash",
            "evomerge merge recipe.json --out merged   # bit for bit this folder's weights",
            "mergekit-yaml mergekit.yaml merged-mk     # with mergekit (passthrough slices, scales on o_proj/down_proj)",
            "```"]
    return "\n".join(out) + "\n"


def short_names(refs: Sequence[str]) -> list[str]:
    """Last path component of each ref when those are unique (table headers stay narrow)."""
    short = [r.rstrip("/").rsplit("/", 1)[-1] or r for r in refs]
    return short if len(set(short)) == len(short) else list(refs)


def search_settings(view: RunView) -> dict[str, Any]:
    cfg = view.config
    opt, budget, space = cfg.get("optimizer") or {}, cfg.get("budget") or {}, cfg.get("space") or {}
    done = len(view.evaluations)
    return {
        "run": cfg.get("name"),
        "optimizer": opt.get("name") or "default for the objective count",
        "seed": opt.get("seed", 0),
        "budget": ", ".join(f"{k}={v}" for k, v in budget.items() if v is not None) or None,
        "evaluations done": f"{done} ({view.failed} failed)",
        "search space": space.get("name"),
        "layer group size": space.get("layer_group_size") if space.get("name", "layerwise") == "layerwise" else None,
        "repeats": space.get("repeats") if space.get("name") == "dataflow" else None,
        "method choices": ", ".join((cfg.get("merge") or {}).get("methods") or []) or None,
        "front size": len(view.front),
    }


