"""Finding lm-eval tasks by name, cheaply, and checking them before a search starts.

lm-eval's ``TaskManager`` indexes every YAML under its built-in task folder (~15k
entries, several seconds) plus the include paths. Most evomerge configs only name
tasks from ``evaluators/tasks`` or the user's include paths, so we first index
*only* those folders (milliseconds) and fall back to the full index when a name is
not found there. Managers are memoised per process: a config check and the actor's
build in the same process pay indexing once.

Relative ``data_files`` in a task YAML are resolved by ``datasets`` against the
current directory. So that the demo tasks work from any directory (and inside Ray
workers), a relative data file that does not exist from the current directory but
does exist next to the YAML is rewritten to that absolute path when the task is
built (``resolved_task_config``); the same rule is used by the config check.
"""

from __future__ import annotations

import functools
import glob
import logging
from pathlib import Path
from typing import Any, Iterable

from evomerge.errors import EvaluatorError

log = logging.getLogger(__name__)

#: The task folder shipped with evomerge (demo task YAMLs + data).
BUILTIN_TASK_DIR = Path(__file__).resolve().parent / "tasks"

#: Dataset builders whose data are local files named by ``dataset_kwargs.data_files``.
LOCAL_BUILDERS = {"json", "csv", "text", "parquet", "arrow", "pandas"}


def include_paths(extra: Iterable[str] = ()) -> tuple[str, ...]:
    """evomerge's task folder plus the user's ``evaluation.include_paths`` (absolute, in order)."""
    paths = [BUILTIN_TASK_DIR]
    for p in extra:
        path = Path(p).expanduser().resolve()
        if not path.is_dir():
            raise EvaluatorError(
                f"evaluation.include_paths: {p} is not a folder; give folders that hold lm-eval task YAMLs"
            )
        paths.append(path)
    return tuple(str(p) for p in paths if Path(p).is_dir())


@functools.lru_cache(maxsize=8)
def task_manager(paths: tuple[str, ...], include_defaults: bool) -> Any:
    """A memoised ``lm_eval.tasks.TaskManager`` over ``paths`` (+ lm-eval's own tasks)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths) or None, include_defaults=include_defaults)


def manager_for(names: Iterable[str], paths: tuple[str, ...]) -> Any:
    """The cheapest TaskManager that knows every name: local folders only, else with built-ins."""
    names = [n for n in names if n]
    local = task_manager(paths, False)
    if all(n in local.task_index for n in names):
        return local
    return task_manager(paths, True)


def entry(manager: Any, name: str) -> Any | None:
    return manager.task_index.get(name)


def is_local(entry_: Any, paths: tuple[str, ...]) -> bool:
    """True when a task YAML lives in one of our include paths (not lm-eval's built-ins)."""
    yp = getattr(entry_, "yaml_path", None)
    if yp is None:
        return False
    yp = Path(yp).resolve()
    return any(Path(p) in yp.parents for p in paths)


# -- data files -----------------------------------------------------------------
def _data_file_values(data_files: Any) -> list[str]:
    if data_files is None:
        return []
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, dict):
        return [v for x in data_files.values() for v in _data_file_values(x)]
    if isinstance(data_files, (list, tuple)):
        return [v for x in data_files for v in _data_file_values(x)]
    return []


def _exists(pattern: str) -> bool:
    if any(c in pattern for c in "*?["):
        return bool(glob.glob(pattern))
    return Path(pattern).exists()


def resolve_data_path(value: str, yaml_dir: Path) -> str | None:
    """Where a YAML's data file really is: as given (cwd-relative), else next to the YAML; None if nowhere."""
    if "://" in value:
        return value
    if _exists(value):
        return value
    if not Path(value).is_absolute():
        beside = str(yaml_dir / value)
        if _exists(beside):
            return beside
    return None


def _rewrite(data_files: Any, yaml_dir: Path) -> Any:
    if isinstance(data_files, str):
        return resolve_data_path(data_files, yaml_dir) or data_files
    if isinstance(data_files, dict):
        return {k: _rewrite(v, yaml_dir) for k, v in data_files.items()}
    if isinstance(data_files, (list, tuple)):
        return [_rewrite(v, yaml_dir) for v in data_files]
    return data_files


def data_files_of(cfg: dict[str, Any]) -> list[str]:
    """The local data files a task config reads (empty for hub datasets)."""
    kwargs = cfg.get("dataset_kwargs") or {}
    files = _data_file_values(kwargs.get("data_files"))
    if "data_dir" in kwargs and isinstance(kwargs["data_dir"], str):
        files.append(kwargs["data_dir"])
    return files


def check_data_files(name: str, entry_: Any) -> None:
    """One-line error when a task YAML names a local data file that exists nowhere."""
    cfg = entry_.cfg or {}
    yaml_dir = Path(entry_.yaml_path).parent
    for value in data_files_of(cfg):
        if resolve_data_path(value, yaml_dir) is None:
            raise EvaluatorError(
                f"task {name!r} ({entry_.yaml_path}) reads data file {value!r}, which does not exist "
                f"(looked in the current directory and in {yaml_dir}); create it or fix dataset_kwargs.data_files"
            )
    ds_path = cfg.get("dataset_path")
    if isinstance(ds_path, str) and ds_path.startswith((".", "/", "~")) and resolve_data_path(ds_path, yaml_dir) is None:
        raise EvaluatorError(
            f"task {name!r} ({entry_.yaml_path}) reads dataset_path {ds_path!r}, which does not exist; fix dataset_path"
        )


def resolved_task_config(entry_: Any) -> dict[str, Any] | None:
    """The task's full config with relative data files made absolute, or None if nothing to rewrite."""
    cfg = entry_.cfg or {}
    files = data_files_of(cfg)
    if not files or entry_.yaml_path is None:
        return None
    yaml_dir = Path(entry_.yaml_path).parent
    if all(_exists(f) for f in files if "://" not in f):
        return None
    from lm_eval.tasks._yaml_loader import load_yaml

    full = dict(load_yaml(entry_.yaml_path, resolve_func=True))
    kwargs = dict(full.get("dataset_kwargs") or {})
    if "data_files" in kwargs:
        kwargs["data_files"] = _rewrite(kwargs["data_files"], yaml_dir)
    if isinstance(kwargs.get("data_dir"), str):
        kwargs["data_dir"] = _rewrite(kwargs["data_dir"], yaml_dir)
    full["dataset_kwargs"] = kwargs
    for key in ("tag", "group", "task_list"):
        full.pop(key, None)
    return full


# -- metrics --------------------------------------------------------------------
def known_metrics(entry_: Any) -> tuple[dict[str, bool | None], list[str]] | None:
    """({metric: higher_is_better}, [filter names]) from a YAML task, or None when unknowable cheaply."""
    from lm_eval.api.registry import DEFAULT_METRIC_REGISTRY, is_higher_better
    from lm_eval.tasks._index import Kind

    cfg = entry_.cfg or {}
    if entry_.kind == Kind.GROUP:
        aggs = cfg.get("aggregate_metric_list") or []
        if isinstance(aggs, dict):
            aggs = [aggs]
        metrics = {a["metric"]: a.get("higher_is_better") for a in aggs if isinstance(a, dict) and "metric" in a}
        filters = sorted({str(f) for a in aggs if isinstance(a, dict) for f in (a.get("filter_list") or ["none"])})
        return (metrics, filters or ["none"]) if metrics else None
    if entry_.kind != Kind.TASK:
        return None
    metric_list = cfg.get("metric_list")
    if metric_list:
        metrics = {}
        for m in metric_list:
            if isinstance(m, dict) and isinstance(m.get("metric"), str):
                name = function_metric_name(m["metric"])
                hib = m.get("higher_is_better")
                metrics[name] = hib if hib is not None else _quiet(is_higher_better, name)
    else:
        out = cfg.get("output_type", "generate_until")
        metrics = {m: _quiet(is_higher_better, m) for m in DEFAULT_METRIC_REGISTRY.get(out, [])}
    filters = [f.get("name", "none") for f in cfg.get("filter_list") or [] if isinstance(f, dict)] or ["none"]
    return metrics, filters


def function_metric_name(metric: str) -> str:
    """The name lm-eval reports for a metric, also for a ``!function utils.pass_at_1`` metric.

    The index reads YAMLs without importing their functions, so such a metric arrives as
    the path ``<task folder>/utils.pass_at_1``; lm-eval names the result after the
    function (``pass_at_1``), and so must the config check (mbpp, humaneval).
    """
    if "/" in metric or "\\" in metric:
        return metric.rsplit(".", 1)[-1]
    return metric


def unsafe_code(entry_: Any) -> bool:
    """True for a task that runs the model's code (``unsafe_code: true``: mbpp, humaneval)."""
    return bool((entry_.cfg or {}).get("unsafe_code")) if entry_ is not None else False


def _quiet(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 - unknown metric: direction unknown
        return None


def split_metric(metric: str) -> tuple[str, str | None]:
    """``"exact_match,strict-match"`` -> ("exact_match", "strict-match"); no comma -> (metric, None)."""
    name, _, filt = metric.partition(",")
    return name.strip(), (filt.strip() or None)
