"""Model sources: where the weights of the base and the fine-tuned models come from.

A source is a local Hugging Face folder (one ``model.safetensors`` or shards listed by
``model.safetensors.index.json``) or a hub id resolved through ``huggingface_hub``'s
cache (``HF_HOME`` / ``HF_HUB_CACHE`` / ``HF_HUB_OFFLINE`` are honoured at call time, so a
cluster node reads the same cache the user prepared). Tensors are read lazily from
memory-mapped safetensors files: resolving a 70B model costs a few header reads, and a
merge touches one tensor per source at a time.

Pickle checkpoints (``.bin``/``.pt``/``.pth``) can run arbitrary code when loaded, so they
are refused unless the user opts in with ``allow_pickle``.

Before any merge the whole set is validated (same architecture, same tensor names and
shapes, same vocabulary) so that a mismatch is one line naming the two models and the
first tensor that differs, instead of a shape error deep inside a Ray actor.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from evomerge.errors import SourceError
from evomerge.merge.dtypes import ST_DTYPES
from evomerge.merge.groups import Layout, TensorGroup, detect_layout, group_tensors, num_layers
from evomerge.registry import Registry

if TYPE_CHECKING:  # torch is slow to import; only needed when tensors are read
    import torch

    from evomerge.config import ModelsConfig

SAFE_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
#: Files a hub snapshot may fetch: weights (safetensors only), configs and tokenizers.
HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth"]
#: Training leftovers that sit next to weights but are not weights.
_NOT_WEIGHTS = re.compile(r"^(training_args|optimizer|scheduler|rng_state.*|trainer_state|scaler)\.(bin|pt|pth)$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
#: Model refs that are neither a folder nor a hub id, by kind -> the function giving their folder.
#: ``<run dir>#<evaluation id | knee>`` is a member of an earlier run, merged once into
#: ``<run dir>/members/<id>/`` (``evomerge.merge.run_member``). A lazy "module:attribute" entry, as in
#: the plug-in registries (``evomerge.registry``): run_member merges through ``materialise``, which
#: resolves its models here, so importing it from this module would close an import circle.
RUN_MEMBER = "run member"
REF_KINDS: Registry[Callable[[str], Path]] = Registry(
    "model ref kind", {RUN_MEMBER: "evomerge.merge.run_member:member_folder"}, SourceError)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it looks like, known without reading its data."""

    file: str  # file name inside the source folder
    shape: tuple[int, ...]
    dtype: str  # torch dtype name, e.g. "bfloat16"


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (8-byte length + JSON); reads no tensor data.

    Also checks the file holds every byte the header promises: a truncated download would
    otherwise pass pre-flight and fail later, inside a Ray actor, without naming the file.
    """
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ValueError("header length is implausible")
            header = json.loads(f.read(n))
        size = os.path.getsize(path)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (OSError, ValueError, struct.error) as err:
        raise SourceError(f"{path}: not a readable safetensors file ({err}); re-download or re-save it") from None
    ends = [int(m["data_offsets"][1]) for k, m in header.items()
            if k != "__metadata__" and isinstance(m, dict) and isinstance(m.get("data_offsets"), list)
            and len(m["data_offsets"]) == 2]
    need = 8 + n + max(ends, default=0)
    if size < need:
        raise SourceError(f"{path}: truncated safetensors file ({size} bytes, its header needs {need}); "
                          f"re-download or re-save it")
    return header


class ModelSource:
    """One model: its folder, config and a lazy, memory-mapped view of its tensors.

    ``ref`` is the string the user wrote (a path, a hub id or a run member such as
    ``runs/demo#knee``); recipes name models by it, and ``path`` is where its files are.
    File handles are opened on first use and dropped when pickled, so a source can be
    sent to a Ray actor and re-opened there.
    """

    def __init__(self, ref: str, path: Path, config: dict[str, Any], tensors: dict[str, TensorInfo],
                 pickle_files: bool = False) -> None:
        self.ref = ref
        self.path = path
        self.config = config
        self.model_type: str = str(config.get("model_type", ""))
        self._tensors = tensors
        self._pickle = pickle_files
        self._handles: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"ModelSource({self.ref!r}, path={str(self.path)!r}, tensors={len(self._tensors)})"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    # -- metadata (no tensor data read) ------------------------------------------------
    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def has(self, name: str) -> bool:
        return name in self._tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise SourceError(f"model {self.ref}: has no tensor {name!r}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> str:
        return self.info(name).dtype

    def open_files(self) -> list[str]:
        """Files currently open (memory-mapped); for tests and diagnostics."""
        return sorted(self._handles)

    # -- data ----------------------------------------------------------------------------
    def get_tensor(self, name: str, device: "str | torch.device" = "cpu") -> "torch.Tensor":
        """Read one tensor from its memory-mapped file (only the bytes of that tensor)."""
        info = self.info(name)
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = self._open(info.file)
        t = handle.get_tensor(name) if not self._pickle else handle[name]
        return t if str(device) == "cpu" else t.to(device)

    def _open(self, file: str) -> Any:
        path = self.path / file
        if self._pickle:
            import torch

            try:  # weights_only: tensors and containers only, no arbitrary objects
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as err:  # noqa: BLE001 - any unpickling failure is a source error
                raise SourceError(f"model {self.ref}: cannot load {path} ({type(err).__name__}); "
                                  f"convert it to safetensors") from None
        from safetensors import safe_open

        return safe_open(str(path), framework="pt", device="cpu")

    def close(self) -> None:
        self._handles.clear()


# -- resolving one source ---------------------------------------------------------------
def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_cache_dir() -> str | None:
    """HF_HUB_CACHE, else HF_HOME/hub, read now (huggingface_hub reads them at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def _download(ref: str, *, revision: str | None, patterns: list[str]) -> Path:
    """Resolve a hub id to a local snapshot folder (cache first; offline mode honoured)."""
    from huggingface_hub import constants, snapshot_download

    offline = _env_flag("HF_HUB_OFFLINE") or bool(constants.HF_HUB_OFFLINE)
    try:
        folder = snapshot_download(ref, revision=revision, cache_dir=_hub_cache_dir(), allow_patterns=patterns,
                                   local_files_only=offline)
    except Exception as err:  # noqa: BLE001 - hub errors come in many classes; report one line
        first = (str(err).strip().splitlines() or [""])[0][:200]
        how = ("it is not in the local hub cache and HF_HUB_OFFLINE is set; download it first or unset HF_HUB_OFFLINE"
               if offline else "check the id, the revision and your HF token / network")
        raise SourceError(f"model {ref!r} is not a local folder and could not be fetched from the hub "
                          f"({type(err).__name__}: {first}); {how}") from None
    return Path(folder)


def _is_pickle_weight(p: Path) -> bool:
    return p.suffix in (".bin", ".pt", ".pth") and not _NOT_WEIGHTS.match(p.name)


def _index_tensors(ref: str, folder: Path, allow_pickle: bool) -> tuple[dict[str, TensorInfo], bool]:
    """Map every tensor name to its file, shape and dtype; returns (tensors, is_pickle)."""
    tensors: dict[str, TensorInfo] = {}
    index = folder / SAFE_INDEX
    if index.is_file():
        weight_map = _read_json(index, ref).get("weight_map") or {}
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if files:
        for file in files:
            path = folder / file
            if not path.is_file():
                raise SourceError(f"model {ref}: {index.name} lists {file}, which is missing from {folder}; "
                                  f"re-download the model")
            for name, meta in read_safetensors_header(path).items():
                if name == "__metadata__":
                    continue
                dtype = ST_DTYPES.get(meta["dtype"])
                if dtype is None:
                    raise SourceError(f"model {ref}: tensor {name!r} has unsupported dtype {meta['dtype']}")
                tensors[name] = TensorInfo(file, tuple(int(s) for s in meta["shape"]), dtype)
        return tensors, False

    pickles = sorted(p for p in folder.iterdir() if p.is_file() and _is_pickle_weight(p))
    if not pickles:
        raise SourceError(f"model {ref}: no weights in {folder} (expected model.safetensors or a "
                          f"{SAFE_INDEX} with shards)")
    if not allow_pickle:
        raise SourceError(f"model {ref}: only pickle checkpoints ({pickles[0].name}) in {folder}; pickle can run "
                          f"code when loaded: convert to safetensors, or pass --allow-pickle / "
                          f"models.allow_pickle: true if you trust it")
    import torch

    pindex = folder / PICKLE_INDEX
    if pindex.is_file():
        files = sorted(set((_read_json(pindex, ref).get("weight_map") or {}).values()))
    else:
        files = [p.name for p in pickles]
    for file in files:
        try:
            state = torch.load(folder / file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # noqa: BLE001
            raise SourceError(f"model {ref}: cannot load {folder / file} ({type(err).__name__}); "
                              f"convert it to safetensors") from None
        for name, t in state.items():
            if hasattr(t, "shape"):
                tensors[name] = TensorInfo(file, tuple(t.shape), str(t.dtype).removeprefix("torch."))
    return tensors, True


def _read_json(path: Path, ref: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SourceError(f"model {ref}: cannot read {path} ({err})") from None
    if not isinstance(data, dict):
        raise SourceError(f"model {ref}: {path} is not a JSON object")
    return data


def _locate(ref: str, *, revision: str | None, patterns: list[str]) -> Path:
    """A local folder for ``ref``: the path itself if it exists, a run member's folder, else a hub snapshot.

    A run member (``<run dir>#<evaluation id>`` or ``<run dir>#knee``) is merged once into
    ``<run dir>/members/<id>/`` (``evomerge.merge.run_member``); a real folder whose name
    holds '#' is taken as it is.
    """
    p = Path(ref).expanduser()
    if p.exists():
        if not p.is_dir():
            raise SourceError(f"model {ref}: {p} is a file; pass the model's folder (with config.json)")
        return p
    if "#" in ref:  # ``runs/demo#e000218`` / ``runs/demo#knee``: a member of an earlier run (no hub id has '#')
        return REF_KINDS.get(RUN_MEMBER)(ref)
    looks_local = ref.startswith((".", "/", "~")) or ref.count("/") > 1 or "\\" in ref or not _REPO_ID.match(ref)
    if looks_local:
        raise SourceError(f"model {ref}: folder {p} does not exist; check the path (relative paths are "
                          f"relative to {Path.cwd()})")
    return _download(ref, revision=revision, patterns=patterns)


def resolve_source(ref: str, *, allow_pickle: bool = False, revision: str | None = None) -> ModelSource:
    """A ModelSource for a local HF folder or a hub id; reads headers only, not tensors."""
    patterns = HUB_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    folder = _locate(ref, revision=revision, patterns=patterns)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise SourceError(f"model {ref}: no config.json in {folder}; pass a Hugging Face model folder")
    config = _read_json(cfg_path, ref)
    tensors, is_pickle = _index_tensors(ref, folder, allow_pickle)
    return ModelSource(ref, folder, config, tensors, pickle_files=is_pickle)


# -- vocabularies ---------------------------------------------------------------------------
def _vocab_size(src: ModelSource) -> int | None:
    cfg = src.config
    v = cfg.get("vocab_size")
    if v is None and isinstance(cfg.get("text_config"), dict):
        v = cfg["text_config"].get("vocab_size")
    return int(v) if v is not None else None


def tokenizer_vocab(folder: Path) -> dict[str, int] | bytes | None:
    """The token -> id map of a folder's tokenizer (or raw bytes of a sentencepiece model)."""
    tj = folder / "tokenizer.json"
    if tj.is_file():
        try:
            data = json.loads(tj.read_text())
        except (OSError, ValueError):
            return None
        model = data.get("model") or {}
        raw = model.get("vocab")
        vocab: dict[str, int] = {}
        if isinstance(raw, dict):
            vocab.update({str(k): int(v) for k, v in raw.items()})
        elif isinstance(raw, list):  # unigram: [[piece, score], ...]
            vocab.update({str(item[0]): i for i, item in enumerate(raw)})
        for tok in data.get("added_tokens") or []:
            vocab[str(tok.get("content"))] = int(tok.get("id"))
        return vocab
    vj = folder / "vocab.json"
    if vj.is_file():
        try:
            return {str(k): int(v) for k, v in json.loads(vj.read_text()).items()}
        except (OSError, ValueError, AttributeError):
            return None
    sp = folder / "tokenizer.model"
    if sp.is_file():
        return sp.read_bytes()
    return None


def _vocab_difference(a: dict[str, int] | bytes, b: dict[str, int] | bytes) -> str | None:
    """None if equal, else a short description of the first difference."""
    if isinstance(a, bytes) or isinstance(b, bytes):
        return None if a == b else "tokenizer files differ"
    if a == b:
        return None
    for tok in sorted(set(a) | set(b), key=lambda t: (min(a.get(t, 1 << 62), b.get(t, 1 << 62)), t)):
        ia, ib = a.get(tok), b.get(tok)
        if ia != ib:
            return f"token {tok!r} has id {ia} vs {ib}"
    return "tokenizers differ"


# -- the set ------------------------------------------------------------------------------------
@dataclass
class ModelSet:
    """Base + sources, checked to be mergeable, with the tensor grouping they share."""

    base: ModelSource | None
    sources: list[ModelSource]
    layout: Layout
    groups: dict[str, TensorGroup]  # tensor name -> group, in merge order
    num_layers: int
    tokenizer_path: Path
    tensor_names: list[str] = field(default_factory=list)

    @property
    def models(self) -> list[ModelSource]:
        return ([self.base] if self.base is not None else []) + list(self.sources)

    @property
    def reference(self) -> ModelSource:
        """The model whose config and metadata a merge inherits (base, else first source)."""
        return self.base if self.base is not None else self.sources[0]

    def by_ref(self, ref: str) -> ModelSource:
        for m in self.models:
            if m.ref == ref:
                return m
        for m in self.models:  # same folder written differently ("./a" vs "a")
            try:
                if Path(ref).expanduser().resolve() == m.path.resolve():
                    return m
            except OSError:
                pass
        known = ", ".join(m.ref for m in self.models)
        raise SourceError(f"model {ref!r} is not one of the loaded models ({known}); name it as in models:")


def _tensor_order(names: Iterable[str], groups: dict[str, TensorGroup]) -> list[str]:
    """Embeddings, layers in order, final norm, lm_head: the order HF checkpoints read naturally."""
    rank = {"embed": 0, "layer": 1, "final_norm": 2, "lm_head": 3}
    return sorted(names, key=lambda n: (rank[groups[n].kind], groups[n].layer or 0, n))


def check_compatible(a: ModelSource, b: ModelSource, *, same_vocab: bool = True) -> None:
    """Raise one line naming ``a``, ``b`` and the first thing that makes them unmergeable."""
    if a.model_type != b.model_type:
        raise SourceError(f"models {a.ref} and {b.ref} have different architectures (model_type "
                          f"{a.model_type!r} vs {b.model_type!r}); merge only models of one architecture")
    if same_vocab:
        va, vb = _vocab_size(a), _vocab_size(b)
        if va is not None and vb is not None and va != vb:
            raise SourceError(f"models {a.ref} and {b.ref} have different vocabularies (vocab_size {va} vs {vb}); "
                              f"merge models that share a tokenizer, or set tokenizer_source")
        ta, tb = tokenizer_vocab(a.path), tokenizer_vocab(b.path)
        if ta is not None and tb is not None:
            diff = _vocab_difference(ta, tb)
            if diff:
                raise SourceError(f"models {a.ref} and {b.ref} have different vocabularies ({diff}); "
                                  f"merge models that share a tokenizer, or set tokenizer_source")
    na, nb = set(a.tensor_names()), set(b.tensor_names())
    for name in sorted(na ^ nb):
        has, lacks = (a, b) if name in na else (b, a)
        raise SourceError(f"models {a.ref} and {b.ref} have different tensors: {name!r} is in {has.ref} but not "
                          f"in {lacks.ref}; merge only models of one architecture")
    for name in sorted(na):
        if a.shape(name) != b.shape(name):
            raise SourceError(f"models {a.ref} and {b.ref} differ in tensor {name!r}: shape {list(a.shape(name))} "
                              f"vs {list(b.shape(name))}; merge only models of one architecture and size")


def tokenizer_folder(ref: str, models: list[ModelSource], revision: str | None) -> Path:
    """The folder of ``tokenizer_source``: one of the merge's own models, else a model folder located
    for its tokenizer files only (an error in one line when it has none)."""
    for m in models:
        if m.ref == ref:
            return m.path
    folder = _locate(ref, revision=revision, patterns=["*.json", "tokenizer*", "*.model", "*.tiktoken", "*.txt",
                                                       "*.jinja"])
    if tokenizer_vocab(folder) is None:
        raise SourceError(f"tokenizer_source {ref}: no tokenizer files (tokenizer.json, vocab.json, tokenizer.model) "
                          f"in {folder}")
    return folder


def load_model_set(base: str | None, sources: list[str], *, tokenizer_source: str | None = None,
                   allow_pickle: bool = False, revision: str | None = None) -> ModelSet:
    """Resolve base and sources and check they can be merged; every failure is one line."""
    if not sources:
        raise SourceError("no source models given; list at least one under models.sources")
    base_src = resolve_source(base, allow_pickle=allow_pickle, revision=revision) if base else None
    srcs = [resolve_source(s, allow_pickle=allow_pickle, revision=revision) for s in sources]
    models = ([base_src] if base_src else []) + srcs
    ref = models[0]
    for other in models[1:]:
        check_compatible(ref, other, same_vocab=tokenizer_source is None)
    names = ref.tensor_names()
    layout = detect_layout(names, ref.model_type)
    groups = group_tensors(names, layout)
    order = _tensor_order(names, groups)
    if tokenizer_source in (None, "base"):
        tok_path = ref.path
    else:
        tok_path = tokenizer_folder(tokenizer_source, models, revision)
    return ModelSet(base=base_src, sources=srcs, layout=layout, groups={n: groups[n] for n in order},
                    num_layers=num_layers(groups.values()), tokenizer_path=tok_path, tensor_names=order)


def model_set_for(models_cfg: "ModelsConfig") -> ModelSet:
    """The config's ``models:`` resolved and checked (``load_model_set``): once per command, by the plan."""
    return load_model_set(models_cfg.base, list(models_cfg.sources), tokenizer_source=models_cfg.tokenizer_source,
                          allow_pickle=models_cfg.allow_pickle, revision=models_cfg.revision)
