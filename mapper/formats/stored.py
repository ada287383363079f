"""A tensor of a checkpoint, not yet read, and the layout changes a reader applies to one before reading it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Stored:
    """One tensor in a checkpoint, not yet read: its stored shape and how to read it."""

    key: str  # the name in the file, for messages
    shape: tuple[int, ...]
    read: Callable[[], np.ndarray]  # -> writable C-contiguous float32/float64 array of ``shape``


def transposed(stored: Stored) -> Stored:
    """A matrix stored as ``nn.Linear`` keeps it, ``[out, in]``, read as the canonical Conv1D ``[in, out]``."""
    return Stored(stored.key, stored.shape[::-1], lambda: np.ascontiguousarray(stored.read().T))


def concatenated(parts: Sequence[Stored], axis: int) -> Stored:
    """Several tensors read as one, joined along ``axis`` (separate q, k, v -> the fused ``c_attn``). The parts must
    agree on every other axis (the caller checked their shapes); the key names the first part."""
    shape = list(parts[0].shape)
    shape[axis] = sum(p.shape[axis] for p in parts)
    return Stored(parts[0].key, tuple(shape), lambda: np.concatenate([p.read() for p in parts], axis=axis))


def zeros_like(key: str, shape: tuple[int, ...], dtype_of: Stored) -> Stored:
    """A bias a layout leaves out (nanoGPT's ``bias=False``): zeros, which compute the same as no bias, in the dtype
    of ``dtype_of`` (a small tensor of the same model)."""
    return Stored(key, shape, lambda: np.zeros(shape, dtype=dtype_of.read().dtype))


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 values stored as uint16 -> float32: a bfloat16 is the top half of a float32, so shift the 16 bits up."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bfloat16(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounded to nearest, ties to even, as torch's ``.to(torch.bfloat16)``: add
    just under half of the dropped 16 bits' range (plus the kept last bit, for the tie) and cut. NaN stays NaN."""
    u = np.ascontiguousarray(values, dtype="<f4").view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(values), np.uint16(0x7FC0), rounded)
