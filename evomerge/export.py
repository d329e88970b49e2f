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

from evomerge import __version__, pareto
from evomerge.errors import EvomergeError
from evomerge.fileio import atomic_write, fsync_dir
from evomerge.merge.recipe import MergeRecipe
from evomerge.model_card import (PLOT_NAME, hub_base_models, method_rows, render_model_card, render_path_card,
                                 search_settings, short_names)
from evomerge.records import EvaluationRecord
from evomerge.runview import Objective, RunView, load_run

log = logging.getLogger(__name__)

#: re-exported: the card helpers lived here before ``evomerge.model_card``
__all__ = ["ExportError", "PLOT_NAME", "best_member", "check_repo_id", "choose_member", "export_member",
           "hub_base_models", "knee_member", "method_rows", "push_folder", "render_model_card", "search_settings",
           "short_names"]


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
        if not ev.measured:
            n = (ev.screen or {}).get("n_items")
            screen = f"a {n}-item screen" if n else "a screen"
            raise ExportError(f"--id {eval_id}: its scores are estimates from {screen}, never measured on "
                              f"every item; export a front member (`evomerge status {view.path}`) or one scored in "
                              f"full")
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
    from evomerge.merge.recipes import is_path_recipe
    from evomerge.merge.sources import load_model_set

    view = load_run(run_dir)
    member = choose_member(view, eval_id=eval_id, best=best, knee=knee)
    out = Path(out)
    _check_out(out)
    if is_path_recipe(member.recipe):
        return _export_path_member(view, member, out, dtype=dtype, max_shard_size=max_shard_size, title=title), member
    recipe = MergeRecipe.from_dict(member.recipe or {})
    if dtype:
        recipe = recipe.model_copy(update={"dtype": dtype})
    models_cfg = view.config.get("models") or {}
    allow_pickle = bool(models_cfg.get("allow_pickle", False))
    revision = models_cfg.get("revision")  # the hub revision the search merged and scored

    def write(tmp: Path) -> None:
        model_set = load_model_set(recipe.base, recipe.sources, tokenizer_source=recipe.tokenizer_source,
                                   allow_pickle=allow_pickle, revision=revision)  # once: merge and card share it
        merge_to_folder(recipe, tmp, max_shard_size=max_shard_size, dtype=dtype, device=device,
                        allow_pickle=allow_pickle, revision=revision, model_set=model_set)
        atomic_write(tmp / "recipe.json", recipe.to_json() + "\n")
        atomic_write(tmp / "mergekit.yaml", to_mergekit_yaml(recipe, model_set.num_layers, model_set.layout))
        plot = _draw_plot(view, tmp, member.id)
        card = render_model_card(title=title or out.name, recipe=recipe, num_layers=model_set.num_layers, member=member,
                                 heldout=view.heldout.get(member.id), objectives=view.objectives,
                                 references=view.references, settings=search_settings(view), plot=plot)
        atomic_write(tmp / "README.md", card)

    _write_folder(out, write)
    return out, member


def _export_path_member(view: RunView, member: EvaluationRecord, out: Path, *, dtype: str | None,
                        max_shard_size: str | int, title: str | None) -> Path:
    """A data-flow member as a plain model: the path's layers stacked, scales folded into o_proj/down_proj."""
    from evomerge.merge.layer_stack import stack_from_path, write_stack
    from evomerge.merge.layer_stack_yaml import stack_to_mergekit_yaml
    from evomerge.merge.path_recipe import PathRecipe
    from evomerge.merge.run_member import member_provenance
    from evomerge.merge.sources import resolve_source

    recipe = PathRecipe.from_dict(member.recipe or {})
    if dtype:
        recipe = recipe.model_copy(update={"dtype": dtype})
    models_cfg = view.config.get("models") or {}
    allow_pickle = bool(models_cfg.get("allow_pickle", False))
    revision = models_cfg.get("revision")
    upstream: dict[str, Any] = {}
    for ref in recipe.models_used():  # a member of an earlier run carries its own recipe: the card records both
        prov = member_provenance(resolve_source(ref, allow_pickle=allow_pickle, revision=revision).path)
        if prov is not None:
            upstream[ref] = prov
    stack = stack_from_path(recipe)

    def write(tmp: Path) -> None:
        write_stack(stack, tmp, max_shard_size=max_shard_size, dtype=dtype, allow_pickle=allow_pickle,
                    revision=revision)
        atomic_write(tmp / "recipe.json", recipe.to_json() + "\n")
        atomic_write(tmp / "mergekit.yaml", stack_to_mergekit_yaml(stack))
        plot = _draw_plot(view, tmp, member.id)
        card = render_path_card(title=title or out.name, recipe=recipe, member=member,
                                heldout=view.heldout.get(member.id), objectives=view.objectives,
                                references=view.references, settings=search_settings(view), upstream=upstream,
                                plot=plot)
        atomic_write(tmp / "README.md", card)

    _write_folder(out, write)
    return out


def _draw_plot(view: RunView, folder: Path, highlight: str) -> str | None:
    """The front plot for the card, or None: a plot must never cost the user the export."""
    try:
        from evomerge.report import draw_report

        draw_report(view, folder / PLOT_NAME, highlight=highlight)
        return PLOT_NAME
    except Exception as err:  # noqa: BLE001
        log.warning("could not draw the front plot for the model card: %s", err)
        return None


def _write_folder(out: Path, write: Any) -> None:
    """Run ``write(tmp)`` in a hidden sibling folder, then rename it to ``out``: never a half folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
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
