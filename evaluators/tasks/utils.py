"""lm-eval helpers of the demo tasks: load the committed JSONL relative to THIS folder.

Why a loader instead of ``dataset_path: json``: lm-eval hands ``data_files`` to
``datasets.load_dataset`` unchanged, so relative paths resolve against the current directory
and the tasks would work only when lm_eval is started from the repository root. The YAMLs
therefore name their files relative to this folder in ``dataset_kwargs.data_files`` and use
``custom_dataset: !function utils.load_jsonl_splits``, which resolves them here. They work from
any directory, through ``lm_eval --include_path evaluators/tasks`` or
``TaskManager(include_path=...)``. Plain json files keep the data readable and diffable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

HERE = Path(__file__).resolve().parent


def resolve_data_files(data_files: dict[str, str]) -> dict[str, Path]:
    """``{split: path}`` with relative paths taken against the tasks folder."""
    return {split: (HERE / p if not Path(p).is_absolute() else Path(p)) for split, p in data_files.items()}


def load_jsonl_splits(data_files: dict[str, str] | None = None, **_metadata: Any) -> datasets.DatasetDict:
    """lm-eval ``custom_dataset``: called with task metadata + dataset_kwargs; metadata is ignored."""
    if not data_files:
        raise ValueError("demo task: dataset_kwargs.data_files is missing")
    out = {}
    for split, path in resolve_data_files(data_files).items():
        if not path.is_file():
            raise FileNotFoundError(f"demo task data file {path} is missing; regenerate it with `python -m evaluators.demo_skills`")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        out[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(out)
