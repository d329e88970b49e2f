"""A run's frozen identity: digests of everything that defines its scores (``identity.json``).

A run's log is only meaningful against the models, tasks and settings that produced it:
resuming after a model folder, a task YAML or a task's data file changed would mix two
searches in one log without a word. So the run dir records, at creation, a digest per
*field* of what defines the scores, and ``resume`` (or ``search`` continuing the run)
recomputes them and refuses a change with one line naming the field.

Fields (each ``{"summary": short text, "parts": {name: digest}}``):

- ``models.base``, ``models.sources[i]``, ``models.tokenizer_source``: the ref and revision;
  for a local folder also, per weight file, its size and the sha256 of its safetensors
  *header* plus ``SAMPLES`` evenly spaced 64 KiB pieces of its data (constant I/O per file,
  so a 70B model costs what a tiny one does; the header alone would miss a fine-tune of
  the same shapes), and the sha256 of config.json and the tokenizer files. A hub id is
  its ref and revision only.
- ``models``: allow_pickle, trust_remote_code, revision.
- ``objectives[i]``: the objective's settings, and for each of its lm-eval tasks found in
  the include paths (with its ``<task>_heldout`` twin) the sha256 of the task YAML, the
  YAMLs it includes, the Python files of its ``!function`` hooks and its local data files;
  a built-in lm-eval task is its name and lm-eval's version; perplexity files by content.
- ``merge`` (methods, dtypes, params, seed; not ``fused``), ``space``, ``optimizer``,
  ``evaluation``.

Not part of it, so free to change between sessions: ``budget`` (see ``evomerge resume
--budget``), ``ray.*``, ``output.*`` and ``merge.fused`` (same bits either way), and the name.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import time
from pathlib import Path
from typing import Any

from evomerge.errors import RunDirError
from evomerge.fileio import atomic_write, sha256_file
from evomerge.rundir import IDENTITY

VERSION = 1
#: pieces of a weight file's data hashed besides its header and size
SAMPLES = 16
PIECE = 64 * 1024
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "vocab.json", "merges.txt")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _json_sha(obj: Any) -> str:
    return _sha(json.dumps(obj, sort_keys=True, default=str).encode())


def weight_file_digest(path: Path) -> str:
    """Size + safetensors header + ``SAMPLES`` evenly spaced pieces of the data, hashed together."""
    size = path.stat().st_size
    h = hashlib.sha256(f"size={size}\n".encode())
    with open(path, "rb") as fh:
        start = 0
        if path.suffix == ".safetensors" and size >= 8:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n <= size - 8:
                h.update(fh.read(n))
                start = 8 + n
        span = size - start
        for k in range(SAMPLES):
            fh.seek(start + (span - PIECE) * k // max(1, SAMPLES - 1) if span > PIECE else start)
            h.update(fh.read(PIECE))
            if span <= PIECE:
                break
    return h.hexdigest()


def _model_field(ref: str, revision: str | None) -> dict[str, Any]:
    parts: dict[str, str] = {"ref": ref, "revision": str(revision)}
    folder = Path(ref).expanduser()
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            if p.is_file() and p.suffix in WEIGHT_SUFFIXES:
                parts[f"{ref.rstrip('/')}/{p.name}"] = weight_file_digest(p)
            elif p.is_file() and (p.name in TOKENIZER_FILES or p.name.endswith(".safetensors.index.json")):
                parts[f"{ref.rstrip('/')}/{p.name}"] = sha256_file(p)
    return {"summary": ref, "parts": parts}


_INCLUDE = re.compile(r"^\s*include:\s*['\"]?([^'\"\s#]+)", re.M)
_FUNCTION = re.compile(r"!function\s+([A-Za-z0-9_.]+)")


def _task_parts(task: str, paths: tuple[str, ...]) -> dict[str, str]:
    """Digests of a task's files: YAML (+ includes), ``!function`` modules, local data files."""
    from evaluators import task_index as ti

    e = ti.entry(ti.manager_for([task], paths), task)
    if e is None:
        return {f"{task}": "unknown task"}
    if getattr(e, "yaml_path", None) is None or not ti.is_local(e, paths):
        import lm_eval

        return {f"{task}": f"lm-eval {getattr(lm_eval, '__version__', '?')} built-in"}
    parts: dict[str, str] = {}
    root = Path(e.yaml_path).resolve().parent
    todo, seen = [Path(e.yaml_path).resolve()], set()

    def name(p: Path) -> str:
        try:
            return f"{task}: {p.resolve().relative_to(root)}"
        except ValueError:
            return f"{task}: {p.resolve()}"

    while todo:
        y = todo.pop(0)
        if y in seen or not y.is_file():
            continue
        seen.add(y)
        parts[name(y)] = sha256_file(y)
        text = y.read_text(encoding="utf-8", errors="replace")
        todo += [(y.parent / m).resolve() for m in _INCLUDE.findall(text)]
        for fn in _FUNCTION.findall(text):
            py = y.parent / (fn.rsplit(".", 1)[0].replace(".", "/") + ".py")
            if py.is_file():
                parts[name(py)] = sha256_file(py)
    for value in ti.data_files_of(getattr(e, "cfg", None) or {}):
        resolved = ti.resolve_data_path(value, root)
        if resolved and "://" not in resolved and Path(resolved).is_file():
            parts[f"{task}: {value}"] = sha256_file(Path(resolved))
    return parts


def _objective_field(obj: Any, paths: tuple[str, ...] | None) -> dict[str, Any]:
    from evaluators import task_index as ti

    settings = obj.model_dump(mode="json")
    parts: dict[str, str] = {"settings": _json_sha(settings)}
    tasks = [obj.task, obj.heldout_task] + [c.task for c in obj.components or []]
    if obj.evaluator == "lm_eval" and paths is not None:
        for t in dict.fromkeys(x for x in tasks if x):
            parts.update(_task_parts(t, paths))
            held = f"{t}_heldout"
            if obj.heldout_task is None and ti.entry(ti.manager_for([t], paths), held) is not None:
                parts.update(_task_parts(held, paths))
    for f in obj.files or []:
        p = Path(f).expanduser()
        parts[f"file {f}"] = sha256_file(p) if p.is_file() else "missing"
    if obj.task:
        summary = f"task {obj.task}"
    elif obj.components:
        summary = "tasks " + "+".join(c.task for c in obj.components)
    elif obj.files:
        summary = "files " + ", ".join(obj.files)
    else:
        summary = f"evaluator {obj.evaluator}"
    return {"summary": summary, "parts": parts}


def compute_identity(cfg: Any) -> dict[str, dict[str, Any]]:
    """The per-field digests of ``cfg`` (a SearchConfig) and the files it names, in a fixed order."""
    from evaluators import task_index as ti

    m = cfg.models
    fields: dict[str, dict[str, Any]] = {}
    if m.base is not None:
        fields["models.base"] = _model_field(m.base, m.revision)
    for i, ref in enumerate(m.sources):
        fields[f"models.sources[{i}]"] = _model_field(ref, m.revision)
    if m.tokenizer_source is not None:
        fields["models.tokenizer_source"] = _model_field(m.tokenizer_source, m.revision)
    fields["models"] = {"summary": "model settings", "parts": {"settings": _json_sha(
        {"allow_pickle": m.allow_pickle, "trust_remote_code": m.trust_remote_code, "revision": m.revision})}}
    uses_lm_eval = any(o.evaluator == "lm_eval" for o in cfg.objectives)
    paths = ti.include_paths(cfg.evaluation.include_paths) if uses_lm_eval else None
    for i, obj in enumerate(cfg.objectives):
        fields[f"objectives[{i}]"] = _objective_field(obj, paths)
    merge = cfg.merge.model_dump(mode="json", exclude={"fused"})
    fields["merge"] = {"summary": "methods " + ", ".join(cfg.merge.methods), "parts": {"settings": _json_sha(merge)}}
    for section in ("space", "optimizer", "evaluation"):
        data = _without_later_defaults(getattr(cfg, section), LATER_FIELDS.get(section, ()))
        fields[section] = {"summary": f"{section} settings", "parts": {"settings": _json_sha(data)}}
    return fields


#: config fields added after runs already existed: at their default they mean what the older
#: versions did, so they are left out of the digest and an older run dir still resumes
LATER_FIELDS: dict[str, tuple[str, ...]] = {
    "space": ("repeats", "scaling", "scale_bounds", "max_path_length", "fixed_ends", "embed_from"),
    "evaluation": ("fidelity", "estimator", "irt", "record_items"),
}


def _without_later_defaults(section: Any, later: tuple[str, ...]) -> dict[str, Any]:
    data = section.model_dump(mode="json")
    defaults = type(section)().model_dump(mode="json") if later else {}
    for key in later:
        if key in data and data[key] == defaults.get(key):
            del data[key]
    return data


def identity_record(cfg: Any) -> dict[str, Any]:
    """What identity.json holds: the fields, and the budget the optimizer was created with."""
    return {"version": VERSION, "created_at": time.time(), "optimizer_budget": cfg.budget.evaluations,
            "fields": compute_identity(cfg)}


def read_identity(run_dir: str | Path) -> dict[str, Any] | None:
    """identity.json of a run dir, or None when it has none (a run dir older than it)."""
    path = Path(run_dir) / IDENTITY
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise RunDirError(f"{path} is unreadable; restore it from a backup, or delete it to record the "
                          f"models and tasks as they are now") from None
    if not isinstance(data, dict) or not isinstance(data.get("fields"), dict):
        raise RunDirError(f"{path} does not hold a run identity; restore it from a backup, or delete it to "
                          f"record the models and tasks as they are now")
    return data


def first_change(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """``field changed since the run started (what)`` for the first field that differs, else None."""
    for key in list(old) + [k for k in new if k not in old]:
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if a is None or b is None:
            what = "added" if a is None else "removed"
            return f"{key} changed since the run started ({what})"
        sa, sb = a.get("summary"), b.get("summary")
        if sa != sb:
            wa, _, ra = str(sa).partition(" ")
            wb, _, rb = str(sb).partition(" ")
            shown = rb if wa == wb and ra and rb else sb  # "task a -> b", not "task a -> task b"
            return f"{key} changed since the run started ({sa} -> {shown})"
        pa, pb = a.get("parts") or {}, b.get("parts") or {}
        for part in list(pa) + [p for p in pb if p not in pa]:
            if pa.get(part) != pb.get(part):
                how = "is new" if part not in pa else "is gone" if part not in pb else "changed"
                return f"{key} changed since the run started ({part} {how})"
        return f"{key} changed since the run started"
    return None


def check_identity(run_dir: str | Path, cfg: Any) -> dict[str, Any] | None:
    """Refuse (one line) a run whose models, tasks or settings changed; None when it has no identity yet."""
    stored = read_identity(run_dir)
    if stored is None:
        return None
    change = first_change(stored["fields"], compute_identity(cfg))
    if change is not None:
        raise RunDirError(f"{change}; start a new run dir or pass --overwrite to `evomerge search`")
    return stored


def write_identity(run_dir: str | Path, record: dict[str, Any]) -> None:
    atomic_write(Path(run_dir) / IDENTITY, json.dumps(record, indent=2) + "\n")
