"""Shared benchmark plumbing: thread pinning, allocator settings, timing, FLOP counts, machine description."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

from mapper.config import GPT2Config
from numpy_gpt2.runtime import keep_freed_memory

__all__ = ["forward_flops", "keep_freed_memory", "machine", "median", "pin_threads", "timed", "train_step_flops"]

def pin_threads(n: int) -> dict[str, int]:
    """Fix BLAS/OpenMP thread counts (NumPy's OpenBLAS via threadpoolctl, torch via set_num_threads)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(n)
    info = {"blas_threads": n}
    try:
        import torch

        torch.set_num_threads(n)
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def machine() -> dict[str, object]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    import numpy as np

    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def forward_flops(config: GPT2Config, B: int, T: int) -> int:
    """2*M*N*K over every matmul of a forward pass: the block projections, attention's full T x T
    products (q k^T and att v, the masked half included) and the LM head."""
    C, V, L = config.n_embd, config.vocab_size, config.n_layer
    projections = 2 * B * T * (C * 3 * C + C * C + C * 4 * C + 4 * C * C)
    attention = 2 * (2 * B * T * T * C)
    return L * (projections + attention) + 2 * B * T * C * V


def train_step_flops(config: GPT2Config, B: int, T: int) -> int:
    """The usual convention: forward + backward = 3x the forward."""
    return 3 * forward_flops(config, B, T)
