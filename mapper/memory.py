"""Will a model fit? Its parameters' bytes, estimated from the config before anything is allocated, against the
memory this machine has available, so ``--config n_layer=1000000`` is one line naming the estimate instead of an
allocation that runs until MemoryError (or the system's out-of-memory killer)."""

from __future__ import annotations

import os

import numpy as np

from mapper.config import GPT2Config
from mapper.schema import count_params

# What a command holds per parameter, in copies of the weights: the weights alone, or the weights, their
# gradients and AdamW's two moments for training.
INFERENCE_COPIES, TRAINING_COPIES = 1, 4


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux's MemAvailable, else the physical memory), or None
    where neither can be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits_memory(config: GPT2Config, dtype: str | np.dtype, copies: int = INFERENCE_COPIES,
                      available: int | None = None) -> None:
    """``ValueError`` naming the estimate when ``copies`` copies of the parameters of ``config`` in ``dtype``
    exceed the ``available`` bytes (default: :func:`available_memory`; no check when that is unknown)."""
    available = available_memory() if available is None else available
    if available is None:
        return
    n = count_params(config)
    need = n * np.dtype(dtype).itemsize * copies
    if need > available:
        training = "" if copies == 1 else (f", x {copies} for training (weights, gradients, AdamW's two moments) = "
                                           f"{_gb(need)}")
        raise ValueError(f"the model does not fit in memory: {n:,} parameters of {np.dtype(dtype)} take "
                         f"{_gb(n * np.dtype(dtype).itemsize)}{training}, and {_gb(available)} is available "
                         f"(L={config.n_layer}, C={config.n_embd}, V={config.vocab_size}, P={config.n_positions})")


def _gb(n: int) -> str:
    return f"{n / 1e9:,.1f} GB"
