"""Recipe -> a Hugging Face folder: the merge streamed tensor by tensor into its shards.

``merge_to_folder`` checks everything before the folder is touched
(:func:`evomerge.merge.validate.validate_recipe`), plans the shards from the tensor shapes
up front and streams each merged tensor straight into its shard file, so memory stays at
about one tensor per source however large the model is. Every tensor gets exactly the
inputs the search's in-place merger (:mod:`evomerge.merge.inplace`) gives it, so the
folder holds bit for bit what the search scored. Files are written atomically (temp
file, fsync, rename); ``write_shards`` is that sharded safetensors writer, shared with the
layer stacks of data-flow merges (``layer_stack.py``). Recipe files are read by
``recipe_files.py``.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from evomerge.errors import ConfigError, RecipeError
from evomerge.fileio import atomic_file, fsync_dir
from evomerge.merge.dtypes import FLOATS, ITEMSIZE, OUTPUT_DTYPES, ST_CODES, output_dtype, torch_dtype
from evomerge.merge.inplace import InPlaceMerger
from evomerge.merge.inputs import read_inputs
from evomerge.merge.recipe import MergeRecipe
from evomerge.merge.validate import GroupPlan, plan_group, source_indices, validate_recipe

if TYPE_CHECKING:
    import torch

    from evomerge.merge.sources import ModelSet

# InPlaceMerger (inplace.py) and validate_recipe (validate.py) are also reached through here.
__all__ = ["InPlaceMerger", "file_in_the_way", "merge_to_folder", "parse_size",
           "stream_merge", "validate_recipe", "write_shards"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json")
SAFE_INDEX = "model.safetensors.index.json"
_WEIGHT_FILE = re.compile(r"^(model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|"
                          r"pytorch_model(-\d{5}-of-\d{5})?\.bin|pytorch_model\.bin\.index\.json)$")


def parse_size(size: str | int) -> int:
    """'2GB' -> 2_000_000_000, '500MiB' -> 524_288_000 (as transformers reads max_shard_size)."""
    if isinstance(size, int) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(size), re.IGNORECASE)
    if not m:
        raise ConfigError(f"max_shard_size {size!r} is not a size; write e.g. 2GB, 500MB or 1GiB")
    unit = m.group(2).upper().rstrip("B")
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    value = float(m.group(1)) * ((1024 if unit.endswith("I") else 1000) ** power)
    if value < 1:
        raise ConfigError(f"max_shard_size {size!r} must be positive")
    return int(value)


def _write_json(path: Path, data: Any) -> None:
    with atomic_file(path, "w") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _copy_file(src: Path, dst: Path) -> None:
    with open(src, "rb") as fin, atomic_file(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout)


def _check_device(device: str) -> "torch.device":
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device {device!r} is not a torch device; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is visible; use --device cpu")
    return dev


#: what a streamed merge writes; a folder holding only these holds an earlier merge and may be rewritten
_MERGE_FILE = re.compile(r"^(config\.json|generation_config\.json|" + "|".join(re.escape(f) for f in TOKENIZER_FILES)
                         + r"|\..+\.tmp-\d+)$")


def _foreign_files(out: Path) -> list[str]:
    """Entries of ``out`` that no merge writes (their presence means the folder is someone else's)."""
    return sorted(p.name for p in out.iterdir()
                  if not (p.is_file() and (_WEIGHT_FILE.match(p.name) or _MERGE_FILE.match(p.name))))


def file_in_the_way(out: Path) -> Path | None:
    """The nearest existing path at or above ``out`` when it is a file (mkdir would fail deep inside)."""
    for parent in [out, *out.parents]:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def _check_out_dir(out: Path, model_set: "ModelSet") -> None:
    """--out must be a new folder, an empty one, or one holding an earlier merge (rewritten in place).

    A folder with anything else in it is refused: a merge would leave those files next to
    its weights (a stale adapter or README mixed into the new model), and export refuses the same.
    """
    blocker = file_in_the_way(out)
    if blocker is not None:
        raise ConfigError(f"--out {out}: {blocker} is a file, not a folder; pass a folder path")
    if out.is_dir():
        foreign = _foreign_files(out)
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise ConfigError(f"--out {out} is not empty and does not hold an earlier merge ({shown}); "
                              f"remove those files or choose another folder")
    target = out.expanduser().resolve()
    for m in model_set.models:
        p = m.path.resolve()
        if target == p or p in target.parents:
            raise ConfigError(f"--out {out} is inside model {m.ref}'s folder; write the merge elsewhere")
    if target == model_set.tokenizer_path.resolve():
        raise ConfigError(f"--out {out} is the tokenizer source's folder; write the merge elsewhere")


def _plan_shards(sizes: list[tuple[str, int]], limit: int) -> list[list[str]]:
    """Greedy, in order, like transformers: start a new shard when the next tensor would overflow."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > limit:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def _tensor_bytes(t: "torch.Tensor") -> memoryview:
    import torch

    t = t.detach().to("cpu").contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())


def write_shards(out: Path, entries: Sequence[tuple[str, str, Sequence[int]]], max_shard_bytes: int,
                 tensor_for: Callable[[str], "torch.Tensor"]) -> None:
    """The safetensors weights of a folder: ``model.safetensors``, or shards and their index.

    ``entries``: (name, dtype name, shape) of each tensor, in file order; shards are planned from
    their byte sizes up front (:func:`_plan_shards`, at most ``max_shard_bytes`` each
    unless one tensor is larger). ``tensor_for(name)`` gives each tensor (already in its output
    dtype) when its turn comes, under ``torch.no_grad``, so memory stays at about one tensor.
    Earlier weights in ``out`` are removed first; each file is written atomically.
    """
    import torch

    sizes = [(name, math.prod(shape) * ITEMSIZE[dtype]) for name, dtype, shape in entries]
    meta = {name: (dtype, shape) for name, dtype, shape in entries}
    shards = _plan_shards(sizes, max_shard_bytes)
    files = (["model.safetensors"] if len(shards) == 1
             else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    size_of = dict(sizes)

    out.mkdir(parents=True, exist_ok=True)
    # Weights of an earlier merge in this folder go first: were this merge interrupted after
    # replacing some shards, the old index and the other old shards would load as a silent
    # mix of two merges; an incomplete set fails to load instead.
    for stale in out.iterdir():
        if _WEIGHT_FILE.match(stale.name):
            stale.unlink()
    fsync_dir(out)
    weight_map: dict[str, str] = {}
    with torch.no_grad():
        for file, shard in zip(files, shards):
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for n in shard:
                dtype, shape = meta[n]
                header[n] = {"dtype": ST_CODES[dtype], "shape": list(shape),
                             "data_offsets": [offset, offset + size_of[n]]}
                offset += size_of[n]
                weight_map[n] = file
            hbytes = json.dumps(header, separators=(",", ":")).encode()
            hbytes += b" " * (-len(hbytes) % 8)
            with atomic_file(out / file) as f:
                f.write(struct.pack("<Q", len(hbytes)))
                f.write(hbytes)
                for n in shard:
                    data = _tensor_bytes(tensor_for(n))
                    if data.nbytes != size_of[n]:
                        raise RuntimeError(f"internal error: {n} has {data.nbytes} bytes, planned {size_of[n]}")
                    f.write(data)
    if len(files) > 1:
        _write_json(out / SAFE_INDEX, {"metadata": {"total_size": sum(size_of.values())}, "weight_map": weight_map})


def stream_merge(recipe: MergeRecipe, model_set: "ModelSet", out: Path, *, max_shard_size: str | int = "2GB",
                 dtype: str | None = None, device: str = "cpu") -> Path:
    """Write the merged weights and metadata of a validated recipe into ``out``."""
    from evomerge.merge.methods import merge_tensor

    limit = parse_size(max_shard_size)
    dev = _check_device(device)
    out_name = dtype or recipe.dtype
    out_dtype = output_dtype(out_name, RecipeError)
    cd = torch_dtype(recipe.compute_dtype)
    ref = model_set.reference
    idx = source_indices(recipe, model_set)
    srcs = [model_set.sources[i] for i in idx]
    names = model_set.tensor_names
    dtypes = {n: (out_name if ref.dtype(n) in FLOATS else ref.dtype(n)) for n in names}
    entries = [(n, dtypes[n], ref.shape(n)) for n in names]
    plans: dict[str, GroupPlan] = {}

    def tensor_for(n: str) -> "torch.Tensor":
        t = _merge_one(n, recipe, model_set, srcs, plans, cd, dev, merge_tensor)
        return t.to(out_dtype) if dtypes[n] == out_name else t

    write_shards(out, entries, limit, tensor_for)

    config = dict(ref.config)
    config["dtype"] = out_name
    if "torch_dtype" in config:
        config["torch_dtype"] = out_name
    _write_json(out / "config.json", config)
    if (ref.path / "generation_config.json").is_file():
        _copy_file(ref.path / "generation_config.json", out / "generation_config.json")
    for tf in TOKENIZER_FILES:
        if (model_set.tokenizer_path / tf).is_file():
            _copy_file(model_set.tokenizer_path / tf, out / tf)
    fsync_dir(out)
    return out


def _merge_one(name: str, recipe: MergeRecipe, model_set: "ModelSet", srcs: list[Any],
               plans: dict[str, GroupPlan], cd: "torch.dtype", dev: "torch.device", merge_tensor: Any) -> "torch.Tensor":
    """One merged tensor (compute dtype), from one tensor per source read off the mmap."""
    ref = model_set.reference
    if ref.dtype(name) not in FLOATS:
        return ref.get_tensor(name)
    key, _ = recipe.group_for(model_set.groups[name])
    gp = plans.get(key)
    if gp is None:
        gp = plans[key] = plan_group(recipe, key)
    base, deltas = read_inputs(model_set, name, srcs, cd, dev)  # as the in-place merger reads them
    return merge_tensor(gp.method, base, deltas, gp.source_params, gp.params, seed=recipe.seed, tensor_name=name,
                        has_base=model_set.base is not None)


def merge_to_folder(recipe: MergeRecipe, out_dir: str | Path, *, max_shard_size: str | int = "2GB",
                    dtype: str | None = None, device: str = "cpu", allow_pickle: bool = False,
                    revision: str | None = None, model_set: "ModelSet | None" = None) -> Path:
    """Merge ``recipe`` into a Hugging Face folder; everything is checked before ``out_dir`` is touched.

    ``revision``: the hub revision of models given as hub ids (the search config's
    ``models.revision``; recipes name models, not revisions). ``model_set``: the recipe's
    models when the caller resolved them already (export does, for the layout); closed here."""
    from evomerge.merge.sources import load_model_set

    out = Path(out_dir)
    parse_size(max_shard_size)
    _check_device(device)
    if dtype is not None and dtype not in OUTPUT_DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not supported; use one of {', '.join(OUTPUT_DTYPES)}")
    if model_set is None:
        model_set = load_model_set(recipe.base, recipe.sources, tokenizer_source=recipe.tokenizer_source,
                                   allow_pickle=allow_pickle, revision=revision)
    validate_recipe(recipe, model_set)
    _check_out_dir(out, model_set)
    try:
        return stream_merge(recipe, model_set, out, max_shard_size=max_shard_size, dtype=dtype, device=device)
    finally:
        for m in model_set.models:
            m.close()
