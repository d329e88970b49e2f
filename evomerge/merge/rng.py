"""Device-independent random numbers for DARE / DELLA masks.

Why not ``torch.Generator``: CPU and CUDA generators produce different streams for the
same seed, so a merge searched on a GPU would not reproduce bit for bit when exported on
a CPU (or on another GPU model). Instead every random draw is a pure function of
``(seed, element index)``: a counter-based hash evaluated with integer tensor ops that
behave identically on every device.

The hash is two rounds of ``lowbias32`` (Chris Wellons' hash-prospector; an avalanche
bias of about 0.17) over a Weyl sequence of the element index. Everything is held in
int64 with values below 2**32, and both multipliers are below 2**31, so no product ever
overflows int64 and every right shift of a non-negative number is a logical shift:
the arithmetic is exact, portable integer math, not reliance on wrap-around.

Per (recipe seed, tensor, source) streams come from :func:`tensor_seed`, a cryptographic
hash of the three, so tensors and sources get unrelated masks.
"""

from __future__ import annotations

import hashlib

import torch

_M32 = 0xFFFFFFFF
_WEYL = 0x61C88647  # 2**32 / golden ratio, folded below 2**31 (odd)
_MUL1 = 0x21F0AAAD  # lowbias32 multipliers: both odd and < 2**31
_MUL2 = 0x735A2D97
#: Elements hashed per chunk. On CPU a chunk stays in L2 cache and below torch's
#: parallel grain size (32768): measured 15-50x faster than big chunks on a busy
#: 2-core machine, where OpenMP fork/join stalls. On accelerators big chunks keep
#: kernel launches few while bounding the int64 scratch (8 bytes each) to 128 MiB.
CPU_CHUNK = 1 << 15
DEVICE_CHUNK = 1 << 24
#: Resolution of a uniform draw: 24 bits, so it converts exactly to float32.
UNIFORM_BITS = 24
_UNIFORM_SCALE = 1.0 / (1 << UNIFORM_BITS)


def tensor_seed(recipe_seed: int, tensor_name: str, source_index: int) -> int:
    """The 63-bit seed of one source's mask on one tensor.

    Hash-derived (not ``seed + index``) so that neighbouring seeds, tensors or sources
    never share or shift streams.
    """
    key = f"evomerge-mask\x1f{int(recipe_seed)}\x1f{tensor_name}\x1f{int(source_index)}".encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _lowbias32_(x: torch.Tensor) -> torch.Tensor:
    """In place: one lowbias32 round on int64 values in [0, 2**32)."""
    x ^= x >> 16
    x *= _MUL1
    x &= _M32
    x ^= x >> 15
    x *= _MUL2
    x &= _M32
    x ^= x >> 15
    return x


def seed_keys(seed: int) -> tuple[int, int]:
    """The two 32-bit keys of a 63-bit stream seed (see :func:`hash_index_`)."""
    return seed & _M32, (seed >> 32) & _M32


def hash_index_(x: torch.Tensor, k1: "int | torch.Tensor", k2: "int | torch.Tensor") -> torch.Tensor:
    """In place: element indices (int64) -> their 32 random bits (int64 in [0, 2**32)).

    Pure elementwise integer math, so the fused merge kernel runs it inside its loop
    (keys as 0-d tensors there) and gets the bits this module's masks get.
    """
    x *= _WEYL
    x += k1
    x &= _M32
    _lowbias32_(x)
    x ^= k2
    return _lowbias32_(x)


def keep_threshold(p: float) -> int:
    """Bernoulli(p) as ``(bits >> 8) < threshold`` on 24-bit draws."""
    return int(round(min(max(float(p), 0.0), 1.0) * (1 << UNIFORM_BITS)))


def _bits_chunk(seed: int, start: int, stop: int, device: torch.device | str) -> torch.Tensor:
    """32 random bits (int64 in [0, 2**32)) for element indices ``start..stop-1``."""
    return hash_index_(torch.arange(start, stop, dtype=torch.int64, device=device), *seed_keys(seed))


def random_bits(seed: int, numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """32 random bits per element, as a flat int64 tensor of length ``numel``."""
    _check_numel(numel)
    out = torch.empty(numel, dtype=torch.int64, device=device)
    chunk = _chunk(device)
    for start in range(0, numel, chunk):
        stop = min(numel, start + chunk)
        out[start:stop] = _bits_chunk(seed, start, stop, device)
    return out


def uniform(seed: int, shape: tuple[int, ...] | torch.Size, device: torch.device | str = "cpu") -> torch.Tensor:
    """Float32 uniforms in [0, 1) on a 2**-24 grid, identical on every device."""
    numel = _numel(shape)
    _check_numel(numel)
    out = torch.empty(numel, dtype=torch.float32, device=device)
    chunk = _chunk(device)
    for start in range(0, numel, chunk):
        stop = min(numel, start + chunk)
        bits = _bits_chunk(seed, start, stop, device) >> (32 - UNIFORM_BITS)
        out[start:stop] = bits.to(torch.float32) * _UNIFORM_SCALE
    return out.reshape(shape)


def bernoulli_mask(
    seed: int, shape: tuple[int, ...] | torch.Size, p: float, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Boolean mask, True with probability ``p`` (to within 2**-24), independently per element.

    Compares integers (no float rounding) so the mask is the same on every device.
    """
    numel = _numel(shape)
    _check_numel(numel)
    threshold = keep_threshold(p)
    out = torch.empty(numel, dtype=torch.bool, device=device)
    chunk = _chunk(device)
    for start in range(0, numel, chunk):
        stop = min(numel, start + chunk)
        bits = _bits_chunk(seed, start, stop, device) >> (32 - UNIFORM_BITS)
        torch.lt(bits, threshold, out=out[start:stop])
    return out.reshape(shape)


def _chunk(device: torch.device | str) -> int:
    return CPU_CHUNK if torch.device(device).type == "cpu" else DEVICE_CHUNK


def _numel(shape: tuple[int, ...] | torch.Size) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _check_numel(numel: int) -> None:
    # Indices are hashed as 32-bit counters; beyond that streams would repeat.
    if numel >= 1 << 32:
        raise ValueError(f"tensor has {numel} elements; random masks support fewer than 2**32")
