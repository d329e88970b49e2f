"""References: the baselines every run is judged against, scored once per run on both splits.

A merge is only worth having if it beats what a user gets without a search: the uniform
average of the sources, each source alone, and the base. They are scored with the same
objectives, items and actors as the candidates, logged as ``ReferenceRecord``s, and shown
by ``status``, the plot and the verdict.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from evomerge.records import BASE, UNIFORM, Kind, ReferenceRecord, Status, source_label
from evomerge.rundir import RunDir
from evomerge.search.plan import SearchPlan
from evomerge.search.pool import EvaluatorPool, Job

log = logging.getLogger("evomerge.search")

#: evaluate each source alone as a reference when there are at most this many
MAX_SOURCE_REFERENCES = 8


def reference_recipes(plan: SearchPlan) -> list[tuple[str, dict[str, Any]]]:
    """Baselines scored once: the uniform average, each source alone (if few), the base."""
    from evomerge.merge.recipe import GroupRecipe, MergeRecipe

    cfg = plan.cfg
    if not plan.space.parameter_space:  # a data-flow search: each model's own path is its baseline
        return path_references(plan)
    sources = [s.ref for s in plan.model_set.sources]
    base = plan.model_set.base.ref if plan.model_set.base is not None else None

    def recipe(method: str, params: dict[str, Any], weights: dict[str, float]) -> dict[str, Any]:
        group = GroupRecipe(method=method, params=params, source_params={s: {"weight": w} for s, w in weights.items()})
        return MergeRecipe(base=base, sources=list(sources), groups={"default": group}, seed=cfg.merge.seed,
                           dtype=cfg.merge.dtype, compute_dtype=cfg.merge.compute_dtype,
                           tokenizer_source=cfg.models.tokenizer_source).to_dict()

    out = [(UNIFORM, recipe("linear", {"normalize": True}, {s: 1.0 for s in sources}))]
    if 1 < len(sources) <= MAX_SOURCE_REFERENCES:
        out += [(source_label(s), recipe("linear", {"normalize": True}, {t: float(t == s) for t in sources}))
                for s in sources]
    if base is not None:
        out.append((BASE, recipe("task_arithmetic", {}, {s: 0.0 for s in sources})))
    return out


def path_references(plan: SearchPlan) -> list[tuple[str, dict[str, Any]]]:
    """Each source alone, as the path of its own layers at scale 1 with its own embeddings.

    No uniform average: averaging weights is the other space's baseline; a data-flow
    search is judged against the models it stacks (a parameter-space winner among them,
    when chained)."""
    from evomerge.merge.path_recipe import PathRecipe, PathStep
    from search_spaces.dataflow import model_layers

    models = [s.ref for s in plan.model_set.sources]
    layers = model_layers(plan.model_set)
    out = []
    for ref in models:
        recipe = PathRecipe(models=list(models), embed_from=ref, dtype=plan.cfg.merge.dtype,
                            tokenizer_source=plan.cfg.models.tokenizer_source,
                            path=[PathStep(model=ref, layer=i) for i in range(layers[ref])])
        out.append((source_label(ref), recipe.to_dict()))
    return out


def score_references(run: RunDir, pool: EvaluatorPool, plan: SearchPlan, done: set[str], *,
                     should_stop: Callable[[], bool] = lambda: False,
                     on_tick: Callable[[], None] = lambda: None) -> None:
    """Score the references not in ``done`` (labels already logged) and append their records."""
    todo = [(label, recipe) for label, recipe in reference_recipes(plan) if label not in done]
    if not todo:
        return
    splits = ["selection"] + (["heldout"] if plan.cfg.evaluation.rescore_heldout else [])
    jobs = [Job(Kind.REFERENCE, f"ref:{label}", recipe, split=s, label=label) for label, recipe in todo for s in splits]
    results = pool.run_batch(jobs, should_stop=should_stop, on_tick=on_tick)
    for label, recipe in todo:
        sel = results.get((Kind.REFERENCE.value, f"ref:{label}", "selection"))
        if sel is None:  # interrupted
            continue
        held = results.get((Kind.REFERENCE.value, f"ref:{label}", "heldout"))
        held_ok = held is not None and held["status"] == Status.OK.value
        sel_ok = sel["status"] == Status.OK.value
        rec = ReferenceRecord(label=label, recipe=recipe, status=Status(sel["status"]),
                              scores=sel["scores"] if sel_ok else {},
                              heldout=held["scores"] if held_ok else None,
                              heldout_items=held.get("items") if held_ok else None,
                              error=sel.get("error") or (held or {}).get("error"), timings=sel.get("timings"),
                              finished_at=time.time(),
                              items=sel.get("items") if sel_ok and plan.cfg.evaluation.wants_items else None)
        run.append(rec)
        log.info("reference %s: %s%s", label, rec.scores or rec.error, f" (heldout {rec.heldout})" if rec.heldout else "")
