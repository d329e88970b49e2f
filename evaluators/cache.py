"""Evaluation cache key: the driver skips a recipe it has already scored with the same settings.

The key hashes (1) the recipe's content and (2) everything about the evaluation that
can change a score: each objective's full settings (task, metric, components, limit,
seed, fewshot, gen_kwargs, batch size, chat template, files, ...), the content of the
task YAMLs and local data files of tasks found in the include paths (editing a demo
task must invalidate old scores), the content of perplexity files, and the lm-eval
version for built-in tasks. Settings that cannot change a score (budget, optimizer,
Ray, output paths) are left out, so changing them keeps the cache.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from evomerge.config import SearchConfig
from evomerge.fileio import sha256_file
from evomerge.merge.path_recipe import PathRecipe
from evomerge.merge.recipe import MergeRecipe

#: Bump when the meaning of a score changes (e.g. a different subsampling rule).
KEY_VERSION = 1


def _file_digest(path: Path) -> str:
    st = path.stat()
    return _digest_of(str(path.resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=256)
def _digest_of(path: str, mtime_ns: int, size: int) -> str:
    """Content hash, memoised on (path, mtime, size): the driver asks once per candidate."""
    return sha256_file(path)


def _task_fingerprint(task: str, paths: tuple[str, ...]) -> dict[str, Any]:
    """Content hashes of a task's YAML (+ includes' resolved config) and local data files."""
    from evaluators import task_index as ti

    manager = ti.manager_for([task], paths)
    e = ti.entry(manager, task)
    if e is None or e.yaml_path is None or not ti.is_local(e, paths):
        import lm_eval

        return {"task": task, "lm_eval": getattr(lm_eval, "__version__", "?")}
    out: dict[str, Any] = {
        "task": task,
        "yaml": _file_digest(Path(e.yaml_path)),
        "config": hashlib.sha256(json.dumps(e.cfg, sort_keys=True, default=str).encode()).hexdigest(),
    }
    yaml_dir = Path(e.yaml_path).parent
    data = {}
    for value in ti.data_files_of(e.cfg or {}):
        resolved = ti.resolve_data_path(value, yaml_dir)
        if resolved and "://" not in resolved and Path(resolved).is_file():
            data[value] = _file_digest(Path(resolved))
    out["data"] = data
    return out


def _settings_digest(settings_json: str) -> str:
    """Hash of the evaluation settings plus the content of the files they read."""
    from evaluators import task_index as ti

    settings = json.loads(settings_json)
    paths = ti.include_paths(settings["include_paths"])
    files: dict[str, Any] = {}
    for obj in settings["objectives"]:
        tasks = [obj.get("task"), obj.get("heldout_task")] + [c["task"] for c in obj.get("components") or []]
        if obj.get("evaluator") == "lm_eval":
            for t in tasks:
                if t and t not in files:
                    files[t] = _task_fingerprint(t, paths)
                    held = f"{t}_heldout"
                    if ti.entry(ti.manager_for([t], paths), held) is not None:
                        files[held] = _task_fingerprint(held, paths)
        for f in obj.get("files") or []:
            p = Path(f).expanduser()
            files[f"file:{f}"] = _file_digest(p) if p.is_file() else None
    blob = json.dumps({"settings": settings, "files": files}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def evaluation_settings(cfg: SearchConfig) -> dict[str, Any]:
    """The part of a config that determines scores (besides the recipe)."""
    return {
        "version": KEY_VERSION,
        # heldout_limit decides held-out scores only; selection keys stay as they were without it
        "objectives": [o.model_dump(mode="json", exclude={"heldout_limit"}) for o in cfg.objectives],
        "include_paths": [str(Path(p).expanduser().resolve()) for p in cfg.evaluation.include_paths],
        # the tokenizer the merge uses decides how text is scored
        "tokenizer_source": cfg.models.tokenizer_source,
    }


def evaluation_key(recipe: "MergeRecipe | PathRecipe", cfg: SearchConfig) -> str:
    """Stable hash of recipe content + evaluator settings; equal keys mean equal scores."""
    settings = _settings_digest(json.dumps(evaluation_settings(cfg), sort_keys=True))
    return hashlib.sha256(f"{recipe.canonical_json()}\n{settings}".encode()).hexdigest()[:32]
