"""Export a chosen merge as an ordinary Hugging Face model folder, and push it to the Hub.

The search only keeps *recipes*; export turns one into weights (streamed, shard by shard,
through ``merge_to_folder`` so memory stays at one tensor group), plus everything a
reader of the folder needs to trust and reproduce it: ``recipe.json`` (``evomerge merge``),
``mergekit.yaml`` (``mergekit-yaml``), and a model card with the scores and settings.

The folder is built in a hidden sibling directory and renamed into place at the end, so
an interrupted or failed export never leaves a half folder that looks like a model (each
file in it is written whole by ``fileio.atomic_write``).
Pushing happens only after the folder is complete; a push failure leaves it in place.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from evomerge import __version__, pareto
from evomerge.errors import EvomergeError
from evomerge.fileio import atomic_write, fsync_dir
from evomerge.merge.groups import PARTS, parse_key
from evomerge.merge.recipe import MergeRecipe
from evomerge.records import EvaluationRecord, ReferenceRecord, display_label
from evomerge.runview import Objective, RunView, load_run

log = logging.getLogger(__name__)

PLOT_NAME = "report.png"
CARD_TAGS = ["merge", "evomerge", "mergekit"]


class ExportError(EvomergeError):
    """The member cannot be chosen, written or pushed; the message says how to fix it."""


# -- choosing a member (pure) ---------------------------------------------------------
def knee_member(points: Mapping[str, Mapping[str, float]], objectives: Sequence[Objective]) -> str:
    """``pareto.knee`` of ``points`` (the front, in its order); an empty front is an ExportError."""
    if not points:
        raise ExportError("the run's Pareto front is empty; wait for evaluations to finish or pass --id")
    return pareto.knee(points, {o.name: o.direction for o in objectives})


def best_member(points: Mapping[str, Mapping[str, float]], objectives: Sequence[Objective], objective: str) -> str:
    """The best point on ``objective`` (its direction respected); ties broken by the knee."""
    obj = next((o for o in objectives if o.name == objective), None)
    if obj is None:
        names = ", ".join(o.name for o in objectives)
        raise ExportError(f"--best {objective}: the run has no objective of that name; use one of: {names}")
    if not points:
        raise ExportError("the run's Pareto front is empty; wait for evaluations to finish or pass --id")
    top = max(obj.sign * p[objective] for p in points.values())
    tied = {i: p for i, p in points.items() if obj.sign * p[objective] == top}
    return knee_member(tied, objectives) if len(tied) > 1 else next(iter(tied))


def choose_member(view: RunView, *, eval_id: str | None = None, best: str | None = None,
                  knee: bool = False) -> EvaluationRecord:
    """The evaluation to export: an explicit id (any successful one), or best/knee of the front."""
    if eval_id is not None:
        ev = view.get(eval_id)
        if ev is None:
            raise ExportError(f"--id {eval_id}: no evaluation with that id in {view.path / 'evaluations.jsonl'}; "
                              f"`evomerge status {view.path}` lists the front")
        if not ev.ok or ev.recipe is None:
            raise ExportError(f"--id {eval_id}: that evaluation failed ({ev.error or 'no recipe'}); pick another id")
        return ev
    front = {e.id: e.scores for e in view.front_evaluations() if e.recipe is not None
             and all(o.name in e.scores for o in view.objectives)}
    if best is not None:
        chosen = best_member(front, view.objectives, best)
    elif knee:
        chosen = knee_member(front, view.objectives)
    else:
        raise ExportError("choose a member with --id ID, --best OBJECTIVE or --knee")
    ev = view.get(chosen)
    assert ev is not None
    return ev


# -- model card (pure) -------------------------------------------------------------------
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

    out += ["", "## Scores", "",
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
    out += [f"- evomerge version: {version}", "", "## Reproduce", "", "```bash",
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
        "layer group size": space.get("layer_group_size"),
        "method choices": ", ".join((cfg.get("merge") or {}).get("methods") or []) or None,
        "front size": len(view.front),
    }


# -- writing the folder -------------------------------------------------------------------
def _check_out(out: Path) -> None:
    from evomerge.merge.materialise import file_in_the_way

    blocker = file_in_the_way(out.parent)  # --out itself may be an existing (non-empty) file: said below
    if blocker is not None:
        raise ExportError(f"--out {out}: {blocker} is a file, not a folder; pass a folder path")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} already exists and is not empty; remove it or choose another folder")


def export_member(run_dir: str | Path, out: str | Path, *, eval_id: str | None = None, best: str | None = None,
                  knee: bool = False, dtype: str | None = None, max_shard_size: str | int = "2GB",
                  device: str = "cpu", title: str | None = None) -> tuple[Path, EvaluationRecord]:
    """Write the chosen member as a complete HF folder at ``out``; returns (folder, member).

    ``title`` heads the model card (default: the folder's name; the repo name when pushing).
    """
    from evomerge.merge.materialise import merge_to_folder
    from evomerge.merge.mergekit_yaml import to_mergekit_yaml
    from evomerge.merge.sources import load_model_set

    view = load_run(run_dir)
    member = choose_member(view, eval_id=eval_id, best=best, knee=knee)
    out = Path(out)
    _check_out(out)
    recipe = MergeRecipe.from_dict(member.recipe or {})
    if dtype:
        recipe = recipe.model_copy(update={"dtype": dtype})
    models_cfg = view.config.get("models") or {}
    allow_pickle = bool(models_cfg.get("allow_pickle", False))
    revision = models_cfg.get("revision")  # the hub revision the search merged and scored

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model_set = load_model_set(recipe.base, recipe.sources, tokenizer_source=recipe.tokenizer_source,
                                   allow_pickle=allow_pickle, revision=revision)  # once: merge and card share it
        merge_to_folder(recipe, tmp, max_shard_size=max_shard_size, dtype=dtype, device=device,
                        allow_pickle=allow_pickle, revision=revision, model_set=model_set)
        atomic_write(tmp / "recipe.json", recipe.to_json() + "\n")
        atomic_write(tmp / "mergekit.yaml", to_mergekit_yaml(recipe, model_set.num_layers, model_set.layout))
        plot: str | None = PLOT_NAME
        try:
            from evomerge.report import draw_report

            draw_report(view, tmp / PLOT_NAME, highlight=member.id)
        except Exception as err:  # a plot must never cost the user the export
            log.warning("could not draw the front plot for the model card: %s", err)
            plot = None
        card = render_model_card(title=title or out.name, recipe=recipe, num_layers=model_set.num_layers, member=member,
                                 heldout=view.heldout.get(member.id), objectives=view.objectives,
                                 references=view.references, settings=search_settings(view), plot=plot)
        atomic_write(tmp / "README.md", card)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
        fsync_dir(out.parent)  # the rename itself survives a crash
    except OSError as err:  # disk full, permissions, ...: one line, nothing half-written left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"export to {out} failed ({type(err).__name__}: {' '.join(str(err).split())[:200]}); "
                          f"nothing was written; free space or fix permissions and run it again") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, member


# -- pushing --------------------------------------------------------------------------------
def _scrub(text: str, token: str | None) -> str:
    text = " ".join(str(text).split())
    if token:
        text = text.replace(token, "***")
    return re.sub(r"hf_[A-Za-z0-9]{8,}", "***", text)


def check_repo_id(repo_id: str) -> None:
    """A malformed ``--push-to-hub`` id fails in one line before any work is done."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ExportError(f"--push-to-hub {repo_id!r} is not a valid repo id ({' '.join(str(err).split())[:150]}); "
                          f"use OWNER/NAME") from None
    if repo_id.count("/") != 1:
        raise ExportError(f"--push-to-hub {repo_id!r}: use OWNER/NAME (your user or organisation, then the model name)")


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, token: str | None = None) -> str:
    """Upload ``folder`` to ``repo_id`` as one commit; returns the commit URL.

    The token comes from ``token``, else HF_TOKEN or the login cache (``get_token``). It is
    passed only to ``HfApi`` and scrubbed from every error text, which are turned into one
    line; the local folder is never touched.
    """
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    try:
        token = token or huggingface_hub.get_token()
    except Exception as err:  # e.g. a failed OIDC exchange: say so without leaking anything
        raise ExportError(f"--push-to-hub {repo_id}: could not read the Hugging Face token ({type(err).__name__}); "
                          f"set HF_TOKEN or run `hf auth login`; the model folder {folder} is kept") from None
    if not token:
        raise ExportError(f"--push-to-hub {repo_id}: no Hugging Face token; set HF_TOKEN or run `hf auth login` "
                          f"(the model folder {folder} is kept; push it again with the same command)")
    api = huggingface_hub.HfApi(token=token)
    step = "create the repository"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            step = f"create branch {revision}"
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        step = "upload the folder"
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
                                 commit_message=commit_message or f"Upload merge exported by evomerge {__version__}")
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            why = (f"the token has no write access to {repo_id} (HTTP {status}); use a token with write "
                   f"permission for that owner")
        else:
            why = f"the Hub refused to {step} (HTTP {status}: {_scrub(str(err), token)[:200]})"
        raise ExportError(f"--push-to-hub {repo_id}: {why}; the model folder {folder} is kept") from None
    except Exception as err:  # network failure, bad repo id, ... : one line, token scrubbed
        raise ExportError(f"--push-to-hub {repo_id}: could not {step} ({type(err).__name__}: "
                          f"{_scrub(str(err), token)[:200]}); check the network and the repo id; "
                          f"the model folder {folder} is kept") from None
    url = getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}"
    return str(url)


# -- command ----------------------------------------------------------------------------------
