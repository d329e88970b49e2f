"""The lm-eval evaluator's request cache: what does not depend on the candidate, built once per actor.

Why: ``lm_eval.evaluator.evaluate`` rebuilds, on every call, the Instances of every task (Jinja
templates compiled per doc, fewshot contexts), re-tokenises every prompt to sort and batch it,
pads each batch, and renders each doc's target again to score it. None of that depends on the
weights, and on a small model it was most of the cost of one candidate. A ``_Prepared`` holds it
for one (RunSpec, tokenizer content, wrapper settings) -- the key is ``_prepared_key``, never the
model object -- and ``_evaluate_prepared`` is ``evaluate`` (world size 1) with those parts read
from it, and HFLM's own ``generate_until`` with the sorted, tokenised, padded batches
precomputed. The model calls themselves (``HFLM._model_generate``, ``HFLM._loglikelihood_tokens``),
the filters, ``process_results`` and the aggregation are lm-eval's own, run on every call.
:class:`evaluators.lm_eval_evaluator.LmEvalEvaluator` keeps the cache (``_prepare``) and runs
``evaluate`` as-is when ``_build_prepared`` returns None or ``use_request_cache`` is off.

This mirrors lm-eval 0.4.13 internals, not its public API: the steps and arguments of
``evaluate`` and ``Task.build_all_requests``, ``evaluator_utils._process_results``, HFLM's
``generate_until`` (``Collator``, ``normalize_gen_kwargs``, ``handle_stop_sequences``,
``postprocess_generated_text``) and ``TemplateLM.loglikelihood``'s tokenisation. A wrapper
method that is not HFLM's own (``_stock``) takes lm-eval's path. An lm-eval upgrade that
changes any of these is caught by tests/test_eval_speed.py, which checks that every score and
every logged per-item record equals ``evaluate``'s (``use_request_cache = False``) on the first
and later calls and across model objects, and that the cache key follows the tokenizer, the
task and the limit, never the model; tests/test_lm_eval_cli.py checks the scores against the
``lm_eval`` command line.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any, Hashable

from evomerge.errors import EvaluatorError


#: wrapper attributes that shape requests, batches or decoding (part of every cache key)
_LM_KEY_ATTRS = ("rank", "world_size", "backend", "max_length", "max_gen_toks", "batch_size", "add_bos_token",
                 "truncation", "device", "think_end_token", "prefix_token_id", "eot_token_id", "enable_thinking",
                 "chat_template_args", "mixed_precision_dtype", "tokenizer_name")
_FINGERPRINTS: dict[int, tuple[Any, str]] = {}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A digest of a tokenizer's content (vocabulary, normaliser, special tokens, padding, chat template).

    Two tokenizer objects loaded from the same files share it; any tokenizer that could encode or
    decode differently does not. Memoised per object (the object is held, so its id is not reused).
    """
    import hashlib

    hit = _FINGERPRINTS.get(id(tokenizer))
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    elif hasattr(tokenizer, "get_vocab"):
        h.update(json.dumps(sorted(tokenizer.get_vocab().items()), default=str).encode())
    else:
        h.update(repr(tokenizer).encode())
    extra = [type(tokenizer).__qualname__, getattr(tokenizer, "padding_side", None),
             getattr(tokenizer, "truncation_side", None), getattr(tokenizer, "model_max_length", None),
             getattr(tokenizer, "chat_template", None), getattr(tokenizer, "clean_up_tokenization_spaces", None)]
    for attr in ("pad_token", "bos_token", "eos_token", "unk_token"):
        extra.append(str(getattr(tokenizer, attr, None)))
    if hasattr(tokenizer, "__len__"):
        extra.append(len(tokenizer))
    h.update(json.dumps(extra, default=str).encode())
    digest = h.hexdigest()
    if len(_FINGERPRINTS) > 64:
        _FINGERPRINTS.clear()
    _FINGERPRINTS[id(tokenizer)] = (tokenizer, digest)
    return digest


def _prepared_key(spec: Hashable, lm: Any) -> tuple[Any, ...] | None:
    """Cache key of a run's requests for a wrapper: spec (the RunSpec) x tokenizer content x wrapper settings."""
    tok = getattr(lm, "tokenizer", None)
    if tok is None:
        return None
    settings = tuple((a, str(getattr(lm, a, None))) for a in _LM_KEY_ATTRS)
    return (spec, tokenizer_fingerprint(tok), type(lm).__module__, type(lm).__qualname__, settings)


def _stock(lm: Any, method: str) -> bool:
    """True when ``lm.<method>`` is HFLM's own (not a subclass override or a test's patch)."""
    fn = getattr(type(lm), method, None)
    return getattr(fn, "__module__", None) == "lm_eval.models.huggingface" and \
        getattr(fn, "__qualname__", None) == f"HFLM.{method}"


@dataclass
class _TaskPrep:
    """One leaf task of a prepared run: its Instances, its docs, and the Instances of each doc."""

    task: Any
    instances: list[Any]
    docs: list[tuple[int, Any]]
    by_doc: dict[int, list[Any]]
    hashes: dict[int, tuple[str, str]] = field(default_factory=dict)  # doc id -> (doc hash, prompt hash)


@dataclass
class _GenBatch:
    """One batch of HFLM.generate_until, as HFLM builds it: request positions, padded inputs, settings."""

    positions: list[int]
    contexts: tuple[str, ...]
    gen_kwargs: dict[str, Any]
    kwargs: dict[str, Any]
    until: list[str]
    context_enc: Any
    attn_masks: Any
    max_length: int


@dataclass
class _Prepared:
    key: tuple[Any, ...]
    tasks: dict[str, _TaskPrep]
    groups: dict[str, Any]
    requests: dict[str, list[Any]]  # request type -> the Instances, repeats expanded (evaluate's cloned_reqs)
    runners: dict[str, Any]  # request type -> fast runner(lm) -> responses; absent: lm.<type>(requests)


def _build_prepared(loaded: dict[str, Any], apply_chat_template: bool, lm: Any, key: tuple[Any, ...],
                    allow_unsafe_code: bool) -> _Prepared | None:
    """Build requests exactly as ``evaluate`` does (same arguments), then what HFLM derives from them.

    ``loaded``: a run's lm-eval task dict (docs installed); ``apply_chat_template``: the RunSpec's;
    ``allow_unsafe_code``: the consent ``evaluate`` gets as ``confirm_run_unsafe_code``.
    """
    from lm_eval.evaluator_utils import get_sample_size

    if "tasks" not in loaded or getattr(lm, "world_size", 1) != 1 or getattr(lm, "rank", 0) != 0:
        return None
    tasks = loaded["tasks"]
    for task in tasks.values():
        if getattr(task, "UNSAFE_CODE", False) and not allow_unsafe_code:
            return None  # evaluate raises its own error
        if getattr(task, "MULTIMODAL", False) or "bypass" in getattr(task, "_metric_fn_list", {}):
            return None
    requests: dict[str, list[Any]] = {}
    preps: dict[str, _TaskPrep] = {}
    for name, task in tasks.items():
        limit = get_sample_size(task, None)
        task.build_all_requests(
            limit=limit, samples=None, rank=lm.rank, world_size=lm.world_size, cache_requests=False,
            rewrite_requests_cache=False, system_instruction=None, apply_chat_template=bool(apply_chat_template),
            fewshot_as_multiturn=apply_chat_template,
            chat_template=getattr(lm, "apply_chat_template", None) if apply_chat_template else None,
            tokenizer_name=getattr(lm, "tokenizer_name", "") if apply_chat_template else "",
        )
        instances = list(task.instances)
        for inst in instances:
            requests.setdefault(inst.request_type, []).extend([inst] * inst.repeats)
        by_doc: dict[int, list[Any]] = {}
        for inst in instances:
            by_doc.setdefault(inst.doc_id, []).append(inst)
        for insts in by_doc.values():
            insts.sort(key=lambda x: x.idx)
        docs = list(task.doc_iterator(rank=0, limit=limit, world_size=1, samples=None))
        _memoise_doc_functions(task, docs)
        preps[name] = _TaskPrep(task, instances, docs, by_doc)
    runners: dict[str, Any] = {}
    for reqtype, reqs in requests.items():
        if reqtype == "generate_until" and _stock(lm, "generate_until") and isinstance(lm.batch_size, int):
            plan = _generate_plan(lm, reqs)
            runners[reqtype] = lambda lm, plan=plan, n=len(reqs): _run_generate_plan(lm, plan, n)
        elif (reqtype == "loglikelihood" and _stock(lm, "loglikelihood") and _stock(lm, "_loglikelihood_tokens")
              and not getattr(lm, "enable_thinking", False)):
            encoded = _encode_loglikelihood(lm, reqs)
            runners[reqtype] = lambda lm, encoded=encoded: lm._loglikelihood_tokens(encoded, disable_tqdm=True)
    return _Prepared(key, preps, loaded.get("groups") or {}, requests, runners)


def _memoise_doc_functions(task: Any, docs: list[tuple[int, Any]]) -> None:
    """Render each prepared doc's target/choices/text once: ``process_results`` asks on every call.

    Pure functions of the doc (Jinja templates or the task's own functions), so a memo of their
    value per doc object is the same value; docs other than the prepared ones pass through.
    """
    memo_docs: dict[int, Any] | None = getattr(task, "_evomerge_memo_docs", None)
    if memo_docs is None:
        memo_docs = {}
        task._evomerge_memo_docs = memo_docs
        for name in ("doc_to_target", "doc_to_choice", "doc_to_text"):
            original = getattr(task, name, None)
            if original is None:
                continue
            values: dict[int, Any] = {}

            def memoised(doc: Any, *args: Any, _orig: Any = original, _values: dict[int, Any] = values,
                         **kwargs: Any) -> Any:
                if args or kwargs or memo_docs.get(id(doc)) is not doc:
                    return _orig(doc, *args, **kwargs)
                hit = _values.get(id(doc), _MISSING)
                if hit is _MISSING:
                    hit = _values[id(doc)] = _orig(doc)
                return hit if isinstance(hit, (str, int, float, bool, type(None))) else copy.deepcopy(hit)

            setattr(task, name, memoised)
    for _, doc in docs:
        memo_docs[id(doc)] = doc


_MISSING = object()


def _generate_plan(lm: Any, reqs: list[Any]) -> list[_GenBatch]:
    """``HFLM.generate_until`` up to the model call: same sort, grouping, batches, padding and settings."""
    from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs

    def _collate(req: tuple[str, dict]) -> tuple[int, str]:
        toks = lm.tok_encode(req[0])
        return -len(toks), req[0]

    collator = Collator([r.args for r in reqs], sort_fn=_collate, group_by="gen_kwargs", group_fn=lambda x: x[1])
    chunks = list(collator.get_batched(n=lm.batch_size, batch_fn=None))
    order = list(collator._reorder_indices)
    eos = lm.tok_decode(lm.eot_token_id, skip_special_tokens=False)
    plan: list[_GenBatch] = []
    pos = 0
    for chunk in chunks:
        positions = order[pos:pos + len(chunk)]
        pos += len(chunk)
        contexts, all_gen_kwargs = zip(*chunk, strict=True)
        gen_kwargs = all_gen_kwargs[0]
        kwargs = normalize_gen_kwargs(gen_kwargs, lm.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
        max_gen_toks = kwargs.pop("max_gen_toks")
        if lm.backend == "causal":
            max_ctx_len = lm.max_length - max_gen_toks
            if max_ctx_len <= 0:
                raise EvaluatorError(f"max_gen_toks {max_gen_toks} must be less than the model's max length "
                                     f"{lm.max_length}")
        else:
            max_ctx_len = lm.max_length
        context_enc, attn_masks = lm.tok_batch_encode(list(contexts), left_truncate_len=max_ctx_len,
                                                      truncation=lm.truncation)
        context_enc = context_enc.to(lm.device)
        attn_masks = attn_masks.to(lm.device)
        max_length = kwargs.pop("max_length", context_enc.shape[1] + max_gen_toks)
        plan.append(_GenBatch(positions, contexts, gen_kwargs, kwargs, until, context_enc, attn_masks, max_length))
    if sorted(order) != list(range(len(reqs))):
        raise EvaluatorError("internal: generate plan does not cover every request")
    return plan


def _run_generate_plan(lm: Any, plan: list[_GenBatch], n: int) -> list[str]:
    """The rest of ``HFLM.generate_until`` on a plan: generate, cut the context, decode, post-process."""
    from lm_eval.models.utils import postprocess_generated_text

    res: list[Any] = [None] * n
    think = getattr(lm, "think_end_token", None)
    for b in plan:
        cont = lm._model_generate(context=b.context_enc, attention_mask=b.attn_masks, stop=b.until,
                                  max_length=b.max_length, **b.kwargs)
        width = b.context_enc.shape[1]
        for i, cont_toks, context in zip(b.positions, cont.tolist(), b.contexts, strict=True):
            if lm.backend == "causal":
                cont_toks = cont_toks[width:]
            if isinstance(think, int):
                idx = [j for j, t in enumerate(cont_toks) if t == think]
                if idx:
                    cont_toks = cont_toks[idx[-1] + 1:]
            s = lm.tok_decode(cont_toks)
            if isinstance(think, int):
                s = s.lstrip()
            s = postprocess_generated_text(generation=s, stop=b.until,
                                           think_end_token=think if isinstance(think, str) else None)
            res[i] = s
            lm.cache_hook.add_partial("generate_until", (context, b.gen_kwargs), s)
    return res


def _encode_loglikelihood(lm: Any, reqs: list[Any]) -> list[tuple[tuple[str, str], list[int], list[int]]]:
    """``TemplateLM.loglikelihood``'s tokenisation of (context, continuation) pairs, once."""
    out = []
    for context, continuation in [r.args for r in reqs]:
        if context == "":
            continuation_enc = lm.tok_encode(continuation, add_special_tokens=False)
            context_enc, continuation_enc = (
                ([lm.prefix_token_id], continuation_enc)
                if lm.prefix_token_id != continuation_enc[0]
                else (continuation_enc[:1], continuation_enc[1:])
            )
        else:
            context_enc, continuation_enc = lm._encode_pair(context, continuation)
        out.append(((context, continuation), context_enc, continuation_enc))
    return out


def _evaluate_prepared(lm: Any, prep: _Prepared, log_samples: bool) -> dict[str, Any]:
    """``lm_eval.evaluator.evaluate`` for world size 1 on prepared requests (same steps, same order)."""
    from collections import defaultdict

    from lm_eval.evaluator_utils import _process_results
    from lm_eval.utils import handle_non_serializable, hash_string

    for tp in prep.tasks.values():
        tp.task._instances = tp.instances
        for inst in tp.instances:
            inst.resps = []
            inst.filtered_resps = {}
    for reqtype, reqs in prep.requests.items():
        runner = prep.runners.get(reqtype)
        resps = runner(lm) if runner is not None else getattr(lm, reqtype)(reqs)
        for x, req in zip(resps, reqs, strict=True):
            req.resps.append(x)
    acc_all: dict[str, Any] = {}
    for name, tp in prep.tasks.items():
        task = tp.task
        acc = {"task": task, "raw_metrics": defaultdict(list), "logged_samples": []}
        acc_all[name] = acc
        task.apply_filters()
        for filter_key in tp.instances[0].filtered_resps:
            for doc_id, doc in tp.docs:
                requests = tp.by_doc.get(doc_id, [])
                metrics = task.process_results(doc, [req.filtered_resps[filter_key] for req in requests])
                if log_samples:
                    target = task.doc_to_target(doc)
                    hashes = tp.hashes.get(doc_id)
                    if hashes is None:
                        hashes = tp.hashes[doc_id] = (
                            hash_string(json.dumps(requests[0].doc, indent=2, default=handle_non_serializable,
                                                   ensure_ascii=False)),
                            hash_string(requests[0].arguments[0]),
                        )
                    example = {
                        "doc_id": doc_id,
                        "doc": doc,
                        "target": target,
                        "arguments": [req.args for req in requests],
                        "resps": [req.resps for req in requests],
                        "filtered_resps": [req.filtered_resps[filter_key] for req in requests],
                        "filter": filter_key,
                        "metrics": list(metrics.keys()),
                        "doc_hash": hashes[0],
                        "prompt_hash": hashes[1],
                        "target_hash": hash_string(str(target)),
                    }
                    example.update(metrics)
                    acc["logged_samples"].append(example)
                for metric, value in metrics.items():
                    acc["raw_metrics"][(metric, filter_key)].append(value)
    res = _process_results(acc_all, prep.groups, 0)
    return res._to_eval_results(samples=res.samples if log_samples else None)
