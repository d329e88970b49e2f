"""The ``lm_eval`` evaluator: any lm-eval task, scored on the live in-memory model.

Why not ``lm_eval.simple_evaluate``: it rebuilds the task objects (YAML parsing,
dataset loading, ``process_docs``, fewshot samplers) on every call, which dominated
the cost of one candidate on a small model. Here task objects are built once per
evaluator and reused; each call runs ``lm_eval.evaluator.evaluate`` -- the same
function ``simple_evaluate`` ends with -- on that task dict, after resetting what
``simple_evaluate`` would have set fresh: the python/numpy/torch seeds and each task's
fewshot sampler seed (the sampler's RNG advances while building contexts, so without a
reset the second candidate would see other fewshot examples than the first).

Request cache (``use_request_cache``, on by default): what ``evaluate`` redoes on every call
without depending on the weights -- building the Instances (prompt templates, fewshot
contexts), tokenising, sorting and padding the prompts into batches, rendering each doc's
target -- is done once per (RunSpec, tokenizer content, wrapper settings) and reused for every
candidate and every model object (:mod:`evaluators.request_cache`). The model calls, the
filters, ``process_results`` and lm-eval's aggregation run on every call, so scores and per-item
records equal ``evaluate``'s (tests/test_eval_speed.py; ``use_request_cache = False`` runs
``evaluate`` as-is). ``scripts/bench_eval.py`` measures both against the model's own ``generate``.

The model is wrapped by ``HFLM(pretrained=<live model>)``, which keeps a reference to
the same ``nn.Module``: weights merged in place are what the next call scores. No
weights are written anywhere.

Subsampling: ``limit`` items are a seeded choice of doc ids (not the first ``limit``),
fixed once at build time, so every candidate sees the same items. The chosen docs
replace the task's evaluation split on the task object, so ``process_docs`` runs once.
Heldout: ``heldout_task`` (default ``<task>_heldout`` when that task exists), else a
seeded sample of the same task's items *outside* the selection subsample.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from evomerge.config import ObjectiveConfig, SearchConfig
from evomerge.errors import EvaluatorError
from evaluators import task_index as ti
from evaluators.base import Direction, Split, Term, shared_direction
from evaluators.request_cache import (
    _build_prepared,
    _evaluate_prepared,
    _Prepared,
    _prepared_key,
    tokenizer_fingerprint,
)

# tokenizer_fingerprint (request_cache.py) is also reached through here.
__all__ = ["FEWSHOT_SEED", "OTHER_SEED", "RANDOM_SEED", "LmEvalEvaluator", "RunSpec", "code_execution_allowed",
           "complement_ids", "heldout_limit", "load_tokenizer", "sample_ids", "tokenizer_fingerprint"]

log = logging.getLogger(__name__)

#: Seeds ``lm_eval.simple_evaluate`` (and the ``lm_eval`` command line) use by default.
RANDOM_SEED = 0
OTHER_SEED = 1234
FEWSHOT_SEED = 1234


@dataclass(frozen=True)
class RunSpec:
    """One lm-eval task run with fixed settings; objectives sharing a spec share the run."""

    task: str
    items: str  # "sample": seeded subsample; "complement": heldout items outside the sample
    limit: int | None
    seed: int
    num_fewshot: int | None
    batch_size: int | str
    apply_chat_template: bool
    gen_kwargs: str | None  # canonical JSON, hashable
    #: "complement" only: how many of the items outside the ``limit`` sample (None: all of them)
    count: int | None = None
    #: a screen (``evaluation.fidelity``): only these positions of the sample (sorted), else every item
    positions: tuple[int, ...] | None = None

    @classmethod
    def of(cls, obj: ObjectiveConfig, task: str, items: str = "sample", heldout: bool = False) -> "RunSpec":
        """``heldout``: a held-out twin task takes ``heldout_limit`` items; a complement excludes the
        selection sample (``limit``) and takes ``heldout_limit`` of the rest."""
        gk = json.dumps(obj.gen_kwargs, sort_keys=True) if obj.gen_kwargs else None
        limit = heldout_limit(obj) if heldout and items == "sample" else obj.limit
        count = heldout_limit(obj) if heldout and items == "complement" else None
        return cls(task, items, limit, obj.seed, obj.num_fewshot, obj.batch_size, obj.apply_chat_template, gk, count)


def code_execution_allowed() -> bool:
    """Whether tasks that execute model-written code (mbpp, humaneval) may run.

    The consent is ``HF_ALLOW_CODE_EVAL=1``, the variable their ``code_eval`` metric already
    demands: one switch, read by the config check and passed to lm-eval as
    ``confirm_run_unsafe_code`` (without it lm-eval refuses such a task inside the actor).
    """
    return os.environ.get("HF_ALLOW_CODE_EVAL", "").strip() == "1"


def heldout_limit(obj: ObjectiveConfig) -> int | None:
    """Items of the held-out run: ``heldout_limit`` ("all" = every item), else the selection ``limit``."""
    if obj.heldout_limit == "all":
        return None
    return obj.limit if obj.heldout_limit is None else obj.heldout_limit


@dataclass
class _Run:
    """A built RunSpec: lm-eval task dict with the chosen docs installed, and its doc ids."""

    spec: RunSpec
    loaded: dict[str, Any]
    doc_ids: dict[str, list[int]] = field(default_factory=dict)  # leaf task -> chosen ids (into eval docs)


@dataclass(frozen=True)
class _Logical:
    """A measurement: a metric of a task, scored on the selection or the heldout run."""

    metric: str
    selection: RunSpec
    heldout: RunSpec


def sample_ids(n: int, limit: int | None, seed: int, task: str) -> list[int]:
    """The seeded subsample of ``limit`` doc ids out of ``n`` (all when limit is None or >= n)."""
    if limit is None or limit >= n:
        return list(range(n))
    return sorted(random.Random(f"{seed}|{task}").sample(range(n), limit))


def complement_ids(n: int, limit: int | None, seed: int, task: str, count: int | None | str = "limit") -> list[int]:
    """Heldout ids of a task without a heldout twin: a seeded sample outside the selection sample.

    ``count`` items of the rest (None: all of them; the default: as many as the selection's ``limit``).
    """
    chosen = set(sample_ids(n, limit, seed, task))
    rest = [i for i in range(n) if i not in chosen]
    if not rest:
        log.warning("task %s: no items outside the selection sample; heldout scores reuse them", task)
        return sorted(chosen)
    count = limit if count == "limit" else count
    k = len(rest) if count is None else min(int(count), len(rest))
    return sorted(random.Random(f"{seed}|{task}|heldout").sample(rest, k))


def _objective_tasks(obj: ObjectiveConfig) -> list[tuple[str, str, float]]:
    """(task, metric, weight) of each term of an objective."""
    if obj.components:
        return [(c.task, c.metric, c.weight) for c in obj.components]
    return [(obj.task, obj.metric or "", 1.0)]  # type: ignore[list-item]


def _metric_from_result(task: str, metric: str, results: dict[str, Any]) -> float:
    row = results.get(task)
    if row is None:
        raise EvaluatorError(f"lm-eval returned no results for task {task!r}")
    name, filt = ti.split_metric(metric)
    if filt is not None:
        key = f"{name},{filt}"
    elif f"{name},none" in row:
        key = f"{name},none"
    else:
        keys = [k for k in row if k.startswith(f"{name},")]
        if len(keys) != 1:
            raise EvaluatorError(
                f"task {task!r}: metric {metric!r} is ambiguous or missing in results "
                f"({', '.join(k for k in row if ',' in k and '_stderr' not in k)}); name it as metric,filter"
            )
        key = keys[0]
    if key not in row:
        raise EvaluatorError(f"task {task!r}: no result {key!r}; available: {', '.join(k for k in row if ',' in k)}")
    return float(row[key])


class LmEvalEvaluator:
    """Scores lm-eval tasks on a live model; task objects built once, reused for every call."""

    # -- config check (fast) ----------------------------------------------------------
    @staticmethod
    def check(objectives: Sequence[ObjectiveConfig], cfg: SearchConfig) -> None:
        paths = ti.include_paths(cfg.evaluation.include_paths)
        names: list[str] = []
        for obj in objectives:
            for task, _, _ in _objective_tasks(obj):
                names.append(task)
            if obj.heldout_task:
                names.append(obj.heldout_task)
        manager = ti.manager_for(names, paths)
        for i, obj in enumerate(objectives):
            where = f"objective {obj.name!r}"
            if obj.components and obj.task:
                raise EvaluatorError(f"{where}: give either task+metric or components, not both")
            if not obj.components and not obj.metric:
                raise EvaluatorError(f"{where}: metric is missing; add metric: (e.g. exact_match or acc)")
            task_names = [t for t, _, _ in _objective_tasks(obj)]
            if obj.heldout_task:
                if obj.components:
                    raise EvaluatorError(
                        f"{where}: heldout_task applies to single-task objectives; components use <task>_heldout"
                    )
                task_names.append(obj.heldout_task)
            for task in task_names:
                e = ti.entry(manager, task)
                if e is None:
                    raise EvaluatorError(
                        f"{where}: unknown lm-eval task {task!r}; check the name (`lm-eval ls tasks`) "
                        f"or add its folder to evaluation.include_paths"
                    )
                if e.yaml_path is not None and ti.is_local(e, paths):
                    ti.check_data_files(task, e)
                if ti.unsafe_code(e) and not code_execution_allowed():
                    raise EvaluatorError(
                        f"{where}: task {task!r} runs the code the model writes (unsafe_code); set "
                        f"HF_ALLOW_CODE_EVAL=1 where the search runs to allow it (preferably in a sandbox)"
                    )
            for task, metric, _ in _objective_tasks(obj):
                LmEvalEvaluator._check_metric(where, task, metric, ti.entry(manager, task))

    @staticmethod
    def directions(objectives: Sequence[ObjectiveConfig], cfg: SearchConfig) -> dict[str, Direction]:
        """Each objective's direction from the task configs, without building a task (``objective_directions``).

        A metric's ``higher_is_better`` comes from the task YAML's ``metric_list`` (or a
        group's ``aggregate_metric_list``), else from lm-eval's metric registry; a metric
        neither names is a one-line error asking for ``direction`` on the objective.
        """
        paths = ti.include_paths(cfg.evaluation.include_paths)
        manager = ti.manager_for([t for o in objectives for t, _, _ in _objective_tasks(o)], paths)
        out: dict[str, Direction] = {}
        for obj in objectives:
            if obj.direction is not None:
                out[obj.name] = obj.direction
                continue
            dirs: list[Direction] = []
            for task, metric, _ in _objective_tasks(obj):
                name, _ = ti.split_metric(metric)
                e = ti.entry(manager, task)
                known = ti.known_metrics(e) if e is not None else None
                hib = known[0].get(name) if known else None
                if hib is None:
                    from lm_eval.api.registry import is_higher_better

                    try:
                        hib = is_higher_better(name)
                    except Exception:  # noqa: BLE001 - lm-eval warns/raises for metrics it does not know
                        hib = None
                if hib is None:
                    raise EvaluatorError(f"objective {obj.name!r}: cannot tell whether metric {name!r} of task "
                                         f"{task!r} is better high or low; set direction: maximize|minimize on it")
                dirs.append("maximize" if hib else "minimize")
            out[obj.name] = shared_direction(obj, dirs)
        return out

    @staticmethod
    def _check_metric(where: str, task: str, metric: str, e: Any) -> None:
        from lm_eval.tasks._index import Kind

        if e.kind == Kind.TAG:
            raise EvaluatorError(f"{where}: {task!r} is a tag of several tasks; name one task or a group")
        known = ti.known_metrics(e)
        if known is None:
            return  # Python-defined task or group without aggregates: checked when built
        metrics, filters = known
        name, filt = ti.split_metric(metric)
        if name not in metrics:
            raise EvaluatorError(
                f"{where}: task {task!r} has no metric {name!r}; use one of {', '.join(sorted(metrics))}"
            )
        if filt is not None and filt not in filters:
            raise EvaluatorError(
                f"{where}: task {task!r} has no filter {filt!r} (metric {metric!r}); use one of {', '.join(filters)}"
            )

    # -- build (once per actor) -------------------------------------------------------
    def __init__(self, objectives: Sequence[ObjectiveConfig], cfg: SearchConfig, tokenizer: Any, device: Any) -> None:
        self.check(objectives, cfg)
        self._paths = ti.include_paths(cfg.evaluation.include_paths)
        names = [t for o in objectives for t, _, _ in _objective_tasks(o)]
        names += [o.heldout_task for o in objectives if o.heldout_task]
        self._manager = ti.manager_for(names, self._paths)
        self.tokenizer = load_tokenizer(tokenizer)
        self.device = device
        self._terms: dict[str, list[Term]] = {}
        self._logical: dict[str, _Logical] = {}
        for obj in objectives:
            terms = []
            for task, metric, weight in _objective_tasks(obj):
                sel = RunSpec.of(obj, task)
                held_name = obj.heldout_task if (obj.heldout_task and not obj.components) else f"{task}_heldout"
                if ti.entry(self._manager, held_name) is not None:
                    held = RunSpec.of(obj, held_name, heldout=True)
                else:
                    held = RunSpec.of(obj, task, items="complement", heldout=True)
                key = f"{task}|{metric}|{json.dumps(sel.__dict__, sort_keys=True)}"
                self._logical[key] = _Logical(metric, sel, held)
                terms.append(Term(key, weight))
            self._terms[obj.name] = terms
        self._runs: dict[RunSpec, _Run] = {}
        self._lms: dict[tuple[int, str], Any] = {}
        #: per-candidate-invariant work (requests, tokenised batches, doc lists), keyed by
        #: ``_prepared_key``: RunSpec x tokenizer content x wrapper settings, never the model object
        self._prepared: dict[tuple[Any, ...], _Prepared] = {}
        #: how many ``_Prepared`` were built (tests assert it stays flat across candidates)
        self.prepared_builds = 0
        #: False: every call runs ``lm_eval.evaluator.evaluate`` as-is (the reference path)
        self.use_request_cache = True
        #: per-item values of each measurement from the last heldout call, in doc-id order
        #: (what a paired bootstrap of two models needs); selection calls fill it only when the run
        #: logs items (``evaluation.record_items``, or screening) and for a screen
        self.last_items: dict[str, list[float]] = {}
        self.selection_items = bool(cfg.evaluation.wants_items)
        #: a screen's doc ids (into the task's eval split) per measurement, from the last call
        self.last_doc_ids: dict[str, list[int]] = {}
        #: how many lm-eval task dicts were built (tests assert it stays flat across calls)
        self.task_builds = 0
        # Selection runs are built now; heldout runs on the first heldout call.
        for logical in self._logical.values():
            self._run(logical.selection)
        self.directions: dict[str, Direction] = {
            key: self._direction(logical) for key, logical in self._logical.items()
        }

    def terms(self, objective: ObjectiveConfig) -> list[Term]:
        return self._terms[objective.name]

    def _run(self, spec: RunSpec) -> _Run:
        """Build (once) the lm-eval task dict of a spec, with its chosen docs installed."""
        if spec in self._runs:
            return self._runs[spec]
        e = ti.entry(self._manager, spec.task)
        if e is None:
            raise EvaluatorError(f"unknown lm-eval task {spec.task!r}")
        resolved = ti.resolved_task_config(e) if (e.yaml_path is not None and ti.is_local(e, self._paths)) else None
        try:
            loaded = self._manager.load([resolved if resolved is not None else spec.task])
        except EvaluatorError:
            raise
        except Exception as err:  # noqa: BLE001 - lm-eval/datasets errors become one line
            msg = " ".join(str(err).split())[:300]
            raise EvaluatorError(f"lm-eval task {spec.task!r} could not be built: {type(err).__name__}: {msg}") from err
        self.task_builds += 1
        run = _Run(spec, loaded)
        gen_kwargs = json.loads(spec.gen_kwargs) if spec.gen_kwargs else None
        for name, task in loaded["tasks"].items():
            # The per-task settings simple_evaluate applies before evaluating.
            if gen_kwargs is not None and task.get_config("output_type") == "generate_until":
                task.set_config(key="generation_kwargs", value=gen_kwargs, update=True)
            if spec.num_fewshot is not None:
                if task.get_config("num_fewshot") != 0:
                    task.set_config(key="num_fewshot", value=spec.num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            run.doc_ids[name] = _install_docs(task, spec, name)
        self._runs[spec] = run
        return run

    def _direction(self, logical: _Logical) -> Direction:
        run = self._runs[logical.selection]
        name, _ = ti.split_metric(logical.metric)
        hib = None
        for task in run.loaded["tasks"].values():
            hib = task.higher_is_better().get(name, hib)
            if hib is not None:
                break
        for group in (run.loaded.get("groups") or {}).values():
            for agg in getattr(group.config, "aggregate_metric_list", None) or []:
                if getattr(agg, "metric", None) == name and getattr(agg, "higher_is_better", None) is not None:
                    hib = agg.higher_is_better
        if hib is None:
            from lm_eval.api.registry import is_higher_better

            hib = is_higher_better(name)
        if hib is None:
            raise EvaluatorError(
                f"task {logical.selection.task!r}: cannot tell whether metric {name!r} is better high or low; "
                f"set direction on the objective"
            )
        return "maximize" if hib else "minimize"

    def _lm(self, model: Any, batch_size: int | str) -> Any:
        """One HFLM wrapper per (model object, batch size); it scores whatever weights the module holds now."""
        key = (id(model), str(batch_size))
        cached = self._lms.get(key)
        if cached is not None and cached.model is model:
            return cached
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, tokenizer=self.tokenizer, batch_size=batch_size)
        self._lms = {k: v for k, v in self._lms.items() if v.model is model}
        self._lms[key] = lm
        return lm

    def _prepare(self, run: _Run, lm: Any) -> "_Prepared | None":
        """The per-call-invariant work of a run for this wrapper, built once (None: use lm-eval as-is).

        Keyed by ``_prepared_key``: the RunSpec, the wrapper's tokenizer (by content) and the
        wrapper settings that shape requests and batches (max length, batch size, device, ...),
        never the model object -- another model with the same tokenizer and settings reuses it.
        """
        key = _prepared_key(run.spec, lm)
        if key is None:
            return None
        prepared = self._prepared.pop(key, None)  # re-inserted below: the oldest entry is the least recently used
        if prepared is None:
            prepared = _build_prepared(run.loaded, run.spec.apply_chat_template, lm, key, code_execution_allowed())
            if prepared is None:
                return None
            self.prepared_builds += 1
            if len(self._prepared) >= 32:  # many wrapper settings (e.g. model configs): drop the least recently used
                self._prepared.pop(next(iter(self._prepared)))
        self._prepared[key] = prepared
        return prepared

    # -- scoring (every candidate) ---------------------------------------------------
    def __call__(self, model: Any, split: Split = "selection",
                 items: Mapping[str, Sequence[int]] | None = None) -> dict[str, float]:
        """Score ``model``: {measurement key: value}. ``items``: a screen, {measurement key: positions of
        its selection items} (those measurements only, on those items only, per-item values kept)."""
        specs: dict[RunSpec, list[str]] = {}
        for key, logical in self._logical.items():
            spec = logical.selection if split == "selection" else logical.heldout
            if items is not None:
                if key not in items:
                    continue
                spec = dataclasses.replace(spec, positions=tuple(sorted(int(p) for p in items[key])))
            specs.setdefault(spec, []).append(key)
        out: dict[str, float] = {}
        want_items = split == "heldout" or self.selection_items or items is not None
        self.last_items = {}
        self.last_doc_ids = {}
        for spec, keys in specs.items():
            results = self.run_spec(model, spec, samples=want_items)
            for key in keys:
                if spec.positions is not None:  # lm-eval's own doc ids of a screen: `lm_eval --samples` reproduces it
                    self.last_doc_ids[key] = list(self._runs[spec].doc_ids.get(spec.task, []))
                metric = self._logical[key].metric
                out[key] = _metric_from_result(spec.task, metric, results)
                if want_items:
                    per_item = _items_from_samples(spec.task, metric, results.get("__samples__") or {})
                    if per_item is not None:
                        self.last_items[key] = per_item
        return out

    def run_spec(self, model: Any, spec: RunSpec, samples: bool = False) -> dict[str, Any]:
        """Run one built task dict on the live model; returns lm-eval's ``results`` mapping.

        ``samples``: also log lm-eval's per-item records, returned under ``"__samples__"``.
        """
        import numpy as np
        import torch
        from lm_eval.evaluator import evaluate

        run = self._run(spec)
        random.seed(RANDOM_SEED)
        np.random.seed(OTHER_SEED)
        torch.manual_seed(OTHER_SEED)
        for task in run.loaded["tasks"].values():
            task.set_fewshot_seed(seed=FEWSHOT_SEED)
        was_training = getattr(model, "training", False)
        lm = self._lm(model, spec.batch_size)
        try:
            model.eval()  # HFLM sets eval mode only when it is built; the cached wrapper must not score with dropout
            prepared = self._prepare(run, lm) if self.use_request_cache else None
            if prepared is not None:
                res = _evaluate_prepared(lm, prepared, samples)
            else:
                res = evaluate(
                    lm=lm,
                    task_dict=run.loaded,
                    limit=None,
                    bootstrap_iters=0,
                    log_samples=samples,
                    confirm_run_unsafe_code=code_execution_allowed(),
                    apply_chat_template=spec.apply_chat_template,
                    fewshot_as_multiturn=spec.apply_chat_template,
                )
        finally:
            if was_training:
                model.train()
        if res is None:
            raise EvaluatorError("lm-eval returned no results (non-zero rank?)")
        if samples:
            return {**res["results"], "__samples__": res.get("samples") or {}}
        return res["results"]

    def doc_ids(self, objective: ObjectiveConfig, split: Split = "selection") -> dict[str, list[int]]:
        """The doc ids (into each task's eval split) an objective is scored on; same for every call."""
        ids: dict[str, list[int]] = {}
        for term in self._terms[objective.name]:
            logical = self._logical[term.key]
            run = self._run(logical.selection if split == "selection" else logical.heldout)
            ids.update(run.doc_ids)
        return ids


def _items_from_samples(task: str, metric: str, samples: dict[str, list[dict[str, Any]]]) -> list[float] | None:
    """Per-item values of ``metric`` for ``task``, ordered by doc id; None when lm-eval logged none.

    Only a leaf task logs samples, and only a metric computed per item (not a corpus-level
    one such as BLEU) has a number per item; anything else yields None.
    """
    rows = samples.get(task)
    if not rows:
        return None
    name, filt = ti.split_metric(metric)
    filters = {r.get("filter") for r in rows}
    filt = filt or ("none" if "none" in filters else (filters.pop() if len(filters) == 1 else None))
    picked = sorted((r for r in rows if r.get("filter") == filt), key=lambda r: r["doc_id"])
    if not picked or any(not isinstance(r.get(name), (int, float)) for r in picked):
        return None
    return [float(r[name]) for r in picked]


def _install_docs(task: Any, spec: RunSpec, name: str) -> list[int]:
    """Choose the doc ids once and make them the task's evaluation split (see module docstring)."""
    docs = task.eval_docs
    n = len(docs)
    if spec.items == "complement":
        ids = complement_ids(n, spec.limit, spec.seed, name, spec.count)
    else:
        ids = sample_ids(n, spec.limit, spec.seed, name)
    if spec.positions is not None:  # a screen: a fixed sub-selection of the sample, the same for every candidate
        bad = [p for p in spec.positions if not 0 <= p < len(ids)]
        if bad:
            raise EvaluatorError(f"task {name}: screen positions {bad[:3]} are outside its {len(ids)} selection "
                                 f"items; lower evaluation.fidelity.screen_items")
        ids = [ids[p] for p in spec.positions]
    chosen = docs.select(ids) if hasattr(docs, "select") else [docs[i] for i in ids]
    attr = "test_docs" if task.has_test_docs() else "validation_docs"
    setattr(task, attr, lambda chosen=chosen: chosen)
    return ids


def load_tokenizer(tokenizer: Any) -> Any:
    """A tokenizer object as given, or one loaded from a local folder path (the evaluators accept both)."""
    if tokenizer is None or not isinstance(tokenizer, (str, bytes)) and not hasattr(tokenizer, "__fspath__"):
        return tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer))
