"""dtype names, in one place: safetensors header codes, byte sizes and what a merge may use.

Why: the loader reads safetensors headers (code -> torch dtype name), the folder writer
writes them (name -> code), the actors build the live model in the output dtype, and the
recipe checks name the dtypes a merge computes and writes in. One table here, inverses
derived, so no two copies can disagree. Names, not ``torch.dtype`` objects, keep torch
out of import time (it is resolved by :func:`torch_dtype` when tensors are touched).

Imports nothing from evomerge but its errors: ``evomerge.merge.sources`` imports this module.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import TYPE_CHECKING, Mapping

from evomerge.errors import RecipeError

if TYPE_CHECKING:
    import torch

#: safetensors header code -> (torch dtype name, bytes per element).
_SAFETENSORS: Mapping[str, tuple[str, int]] = MappingProxyType({
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
})
#: safetensors header code -> torch dtype name.
ST_DTYPES: Mapping[str, str] = MappingProxyType({code: name for code, (name, _) in _SAFETENSORS.items()})
#: torch dtype name -> safetensors header code (the inverse of :data:`ST_DTYPES`).
ST_CODES: Mapping[str, str] = MappingProxyType({name: code for code, name in ST_DTYPES.items()})
#: torch dtype name -> bytes per element.
ITEMSIZE: Mapping[str, int] = MappingProxyType({name: size for name, size in _SAFETENSORS.values()})
#: Floating dtypes: the tensors a merge merges (integer buffers keep the base's values).
FLOATS = frozenset({"float64", "float32", "float16", "bfloat16"})
#: dtypes a merged model may be written (and the live model built) in.
OUTPUT_DTYPES = ("float32", "bfloat16", "float16")
#: dtypes a merge may compute in.
COMPUTE_DTYPES = ("float32", "float64", "bfloat16", "float16")


def output_dtype(name: str, error: type[Exception]) -> "torch.dtype":
    """The torch dtype a folder is written in; ``error`` (one line) for a name no writer supports."""
    if name not in OUTPUT_DTYPES:
        raise error(f"output dtype {name!r} is not supported; use one of {', '.join(OUTPUT_DTYPES)}")
    return torch_dtype(name)


def torch_dtype(name: "str | torch.dtype") -> "torch.dtype":
    """The torch dtype called ``name`` ("float32" or "torch.float32"); RecipeError otherwise."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    dt = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise RecipeError(f"unknown dtype {name!r}; use one of {', '.join(COMPUTE_DTYPES)}")
    return dt


def dtype_name(dt: "str | torch.dtype") -> str:
    """"float32" for ``torch.float32`` (or for "float32")."""
    return str(dt).removeprefix("torch.")
