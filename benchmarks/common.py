"""Benchmark plumbing shared by every measurement: timing, FLOP and byte counts, memory, the machine.

FLOPs are 2*M*N*K over every matrix product of the model (the block projections, attention's full T x T
products with the masked half included, the LM head); a train step counts 3x the forward (the backward's two
products per forward product). Decoding is memory-bound, so its figure is the bytes one step must read: every
weight once, and every layer's cached keys and values (at batch 32 and context 1000 the cache is ~5x the 124M
weights).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator

from mapper.config import GPT2Config
from mapper.host import cpu_identity
from numpy_gpt2.runtime import keep_freed_memory

__all__ = [
    "HeapPeak",
    "decode_bytes",
    "decode_weight_bytes",
    "default_threads",
    "forward_flops",
    "keep_freed_memory",
    "machine",
    "pin_threads",
    "summary",
    "timed",
    "train_step_flops",
]


def forward_flops(config: GPT2Config, B: int, T: int) -> int:
    """2*M*N*K over every matmul of a forward pass of B sequences of T tokens."""
    C, V, L = config.n_embd, config.vocab_size, config.n_layer
    projections = 2 * B * T * (C * 3 * C + C * C + C * 4 * C + 4 * C * C)  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    attention = 2 * (2 * B * T * T * C)  # q k^T and att v, every head, the full T x T
    return L * (projections + attention) + 2 * B * T * C * V  # + the LM head


def train_step_flops(config: GPT2Config, B: int, T: int) -> int:
    """The usual convention: forward + backward = 3x the forward."""
    return 3 * forward_flops(config, B, T)


def decode_weight_bytes(config: GPT2Config, itemsize: int = 4) -> int:
    """Bytes of weights one decoding step reads: every parameter except the position table (one row is read)."""
    from mapper.schema import count_params

    return (count_params(config) - config.n_positions * config.n_embd) * itemsize


def decode_bytes(config: GPT2Config, B: int, context: float, itemsize: int = 4) -> float:
    """Bytes one decoding step of B rows at ``context`` cached positions reads: the weights, and the keys and
    values of every layer, 2 * L * B * context * C entries (``itemsize`` bytes each, as the weights)."""
    return decode_weight_bytes(config, itemsize) + 2 * config.n_layer * B * context * config.n_embd * itemsize


def default_threads() -> int:
    """The bench's thread count when none is given: every CPU this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def summary(seconds: list[float]) -> dict[str, float | list[float]]:
    """Median, min, max and every value of a list of timings."""
    return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds), "all": seconds}


def pin_threads(n: int) -> dict[str, object]:
    """Fix the thread counts: NumPy's BLAS (threadpoolctl) and torch's intra-op pool."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(n)
    info: dict[str, object] = {"blas_threads": n}
    try:
        import torch

        torch.set_num_threads(n)
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


class HeapPeak:
    """Peak bytes in use on the C heap (glibc's ``mallinfo2``: heap + mmapped blocks in use), sampled every 2 ms
    in a background thread while the ``with`` block runs. NumPy and torch's CPU allocator both allocate through
    malloc, so this is the CPU's counterpart of ``torch.cuda.max_memory_allocated``; memory glibc keeps after a
    free does not count (unlike RSS). ``available`` is False where glibc's mallinfo2 is missing."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = 0
        self.start = 0
        try:
            self._mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
            self._mallinfo2.restype = _MallInfo2
            self.available = True
        except (OSError, AttributeError):
            self.available = False

    def in_use(self) -> int:
        info = self._mallinfo2()
        return int(info.uordblks + info.hblkhd)

    @contextlib.contextmanager
    def watch(self) -> Iterator[HeapPeak]:
        if not self.available:
            yield self
            return
        self.start = self.peak = self.in_use()
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(self.interval):
                self.peak = max(self.peak, self.in_use())

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            self.peak = max(self.peak, self.in_use())


def _first_line(path: str, prefix: str) -> str | None:
    try:
        with open(path) as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(prefix)), None)
    except OSError:
        return None


def blas_libraries() -> list[dict[str, object]]:
    """The BLAS libraries loaded in this process (threadpoolctl): which, which version, which kernels, threads."""
    from threadpoolctl import threadpool_info

    return [{k: lib.get(k) for k in ("internal_api", "version", "architecture", "num_threads", "filepath")}
            for lib in threadpool_info() if lib.get("user_api") == "blas"]


def machine() -> dict[str, object]:
    """What the figures were measured on: CPU and GPU model, cores, memory, library versions, BLAS kernels."""
    import numpy as np

    from numpy_gpt2.runtime import openblas_kernels

    info: dict[str, object] = {
        "cpu": cpu_identity(),
        "logical_cpus": os.cpu_count(),
        "memory_gib": round(int((_first_line("/proc/meminfo", "MemTotal") or "0 kB").split()[0]) / 2**20, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "openblas": openblas_kernels(),
        "blas": blas_libraries(),
        "gpu": None,
    }
    try:
        import torch

        from torch_gpt2.onednn import preferred_linear

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        info["torch_cpu_linear"] = preferred_linear().describe()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                           "count": torch.cuda.device_count(), "capability": f"{props.major}.{props.minor}"}
    except ImportError:
        info["torch"] = None
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    return info
