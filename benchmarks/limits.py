"""The machine's own limits, measured in the same run as the workloads: matmul throughput and memory bandwidth.

CPU, float32, the 1024x768 @ 768x3072 product of GPT-2 124M's MLP at T=1024, by every kernel at hand:

* NumPy's OpenBLAS with the kernel set this process runs, and (each in a fresh process, since OpenBLAS reads
  ``OPENBLAS_CORETYPE`` only when it loads) with OpenBLAS's own choice and with the AVX-512 "SkylakeX" kernels
  forced where the CPU has them;
* torch's oneDNN (``torch.ops.mkldnn._linear_pointwise``) and torch's default ``F.linear`` (MKL).

The **machine limit** is the best rate any of them reached; every float32 result is reported as a fraction of
it. Where the CPU multiplies bf16 (AVX512-BF16, AMX-BF16) or fp16 (AVX512-FP16, AMX-FP16) natively, torch's
``F.linear`` is also timed in that type, the limit bf16 rows are set against (on an AMX Xeon bf16 ran at 7x
float32); elsewhere it is skipped with the reason (torch would only time an emulation).
Memory read bandwidth: the sum of a 1 GiB array by torch (all pinned threads) and by NumPy (one thread); the
larger is the limit a decoding step (which reads every weight once) is compared with.

GPU (when present): bf16, TF32 and float32 products of 8192^3 and the bandwidth of a 2 GiB device copy, each
after >= 0.2 s of warm-up (the clocks ramp up under load) and timed with CUDA events.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from mapper.host import cpu_flags, low_precision_support

M, K, N = 1024, 768, 3072
MATMUL_FLOPS = 2 * M * K * N


def _rate(fn, flops: int, reps: int) -> float:
    """FLOP/s (or bytes/s) of ``fn`` from the median of ``reps`` timed calls after one warm-up (CPU)."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return flops / statistics.median(times)


def numpy_matmul_gflops(reps: int = 7) -> float:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((M, K), dtype=np.float32), rng.standard_normal((K, N), dtype=np.float32)
    out = np.empty((M, N), np.float32)
    return _rate(lambda: np.matmul(a, b, out=out), MATMUL_FLOPS, reps) / 1e9


def torch_matmul_gflops(reps: int = 7) -> dict[str, float]:
    """torch's two CPU paths: oneDNN's linear and the default F.linear (MKL)."""
    import torch
    import torch.nn.functional as F

    from torch_gpt2.onednn import onednn_linear_available

    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(M, K, generator=gen), torch.randn(N, K, generator=gen)
    rates = {}
    with torch.no_grad():
        if onednn_linear_available():
            op = torch.ops.mkldnn._linear_pointwise
            rates["torch oneDNN"] = _rate(lambda: op(x, w, None, "none", [], ""), MATMUL_FLOPS, reps) / 1e9
        rates["torch F.linear (MKL)"] = _rate(lambda: F.linear(x, w), MATMUL_FLOPS, reps) / 1e9
    return rates


def torch_low_precision_gflops(reps: int = 7) -> tuple[dict[str, float], dict[str, str]]:
    """torch's ``F.linear`` on the same product in bf16 and fp16, for each type the CPU multiplies natively:
    ({type: GFLOP/s}, {type: why it was skipped})."""
    import torch
    import torch.nn.functional as F

    rates, skipped = {}, {}
    for name, reason in low_precision_support(cpu_flags()).items():
        if reason:
            skipped[name] = reason
            continue
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[name]
        gen = torch.Generator().manual_seed(0)
        x, w = torch.randn(M, K, generator=gen).to(dtype), torch.randn(N, K, generator=gen).to(dtype)
        with torch.no_grad():
            rates[name] = _rate(lambda x=x, w=w: F.linear(x, w), MATMUL_FLOPS, reps) / 1e9
    return rates, skipped


def numpy_kernel_rates(threads: int) -> dict[str, dict[str, object]]:
    """NumPy's matmul rate under each OpenBLAS kernel choice, each measured in a fresh process."""
    from numpy_gpt2.runtime import AVX512_FLAGS, CORETYPE_ENV, SELECTED_ENV

    choices: dict[str, dict[str, str | None]] = {"OpenBLAS's own choice": {CORETYPE_ENV: None, SELECTED_ENV: None}}
    if AVX512_FLAGS <= cpu_flags():
        choices["SkylakeX (AVX-512) forced"] = {CORETYPE_ENV: "SkylakeX", SELECTED_ENV: None}
    out = {}
    for label, changes in choices.items():
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
        for key, value in changes.items():
            env.pop(key, None)
            if value is not None:
                env[key] = value
        proc = subprocess.run([sys.executable, "-m", "benchmarks.limits"], env=env, capture_output=True, text=True,
                              check=False)
        if proc.returncode == 0:
            out[label] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def memory_read_gbs(reps: int = 5) -> dict[str, float]:
    """GB/s reading a 1 GiB float32 array: torch.sum (all threads) and NumPy's sum (one thread)."""
    rates = {}
    data = np.ones(2**28, dtype=np.float32)
    rates["numpy sum (1 thread)"] = _rate(lambda: data.sum(), data.nbytes, reps) / 1e9
    try:
        import torch

        tensor = torch.from_numpy(data)
        rates["torch sum"] = _rate(lambda: tensor.sum(), data.nbytes, reps) / 1e9
    except ImportError:
        pass
    return rates


def cpu_limits(threads: int, reps: int = 7) -> dict[str, object]:
    """Every CPU figure above; ``best_matmul_gflops`` and ``memory_gbs`` are the limits results are set against."""
    from numpy_gpt2.runtime import openblas_core

    matmul = {f"numpy, this process ({openblas_core()})": numpy_matmul_gflops(reps)}
    time.sleep(0.3)
    for label, result in numpy_kernel_rates(threads).items():
        matmul[f"numpy, {label} ({result['core']})"] = result["gflops"]
    matmul.update(torch_matmul_gflops(reps))
    low, low_skipped = torch_low_precision_gflops(reps)
    time.sleep(0.3)  # torch's OpenMP threads spin a while after a parallel op; let them settle
    bandwidth = memory_read_gbs()
    return {
        "matmul_gflops": matmul,
        "best_matmul_gflops": max(matmul.values()),
        "best_matmul_kernel": max(matmul, key=matmul.get),
        "low_precision_matmul_gflops": low,
        "low_precision_skipped": low_skipped,
        "memory_read_gbs": bandwidth,
        "memory_gbs": max(bandwidth.values()),
    }


def cuda_rate(fn, work: float, reps: int = 10, warmup_s: float = 0.2) -> float:
    """``work`` per second of ``fn`` on the current CUDA device: calls until ``warmup_s`` seconds have passed (the
    GPU's clocks ramp up under load), then the median of ``reps`` calls each timed by a pair of CUDA events."""
    import torch

    torch.cuda.synchronize()
    start = time.perf_counter()
    while time.perf_counter() - start < warmup_s:
        fn()
        torch.cuda.synchronize()
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for begin, end in pairs:
        begin.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return work / (statistics.median(begin.elapsed_time(end) for begin, end in pairs) / 1e3)


def gpu_limits(reps: int = 10) -> dict[str, object]:
    """bf16 / TF32 / float32 matmul TFLOP/s and device-copy bandwidth on the current CUDA device."""
    import torch

    n = 8192
    out: dict[str, object] = {"matmul_tflops": {}}
    for label, dtype, tf32 in (("bf16", torch.bfloat16, False), ("tf32", torch.float32, True),
                               ("fp32", torch.float32, False)):
        a = torch.randn(n, n, device="cuda", dtype=dtype)
        b = torch.randn(n, n, device="cuda", dtype=dtype)
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            out["matmul_tflops"][label] = cuda_rate(lambda a=a, b=b: a @ b, 2 * n**3, reps) / 1e12
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
        del a, b
    src = torch.empty(2**29, device="cuda", dtype=torch.float32)  # 2 GiB
    dst = torch.empty_like(src)
    copy_bytes = 2 * src.numel() * 4  # read + write
    out["memory_gbs"] = cuda_rate(lambda s=src, d=dst: d.copy_(s), copy_bytes, reps) / 1e9
    del src, dst
    torch.cuda.empty_cache()
    return out


def quick_cpu_limit(reps: int = 3) -> float:
    """The best of this process's NumPy matmul and torch's oneDNN matmul, in GFLOP/s: a cheap probe taken beside
    each measured point, so a fraction of the limit compares two figures from the same minute."""
    rates = [numpy_matmul_gflops(reps)]
    try:
        rates.append(max(torch_matmul_gflops(reps).values()))
    except ImportError:
        pass
    return max(rates)


if __name__ == "__main__":  # one NumPy measurement in a fresh process (numpy_kernel_rates runs this)
    from numpy_gpt2.runtime import openblas_core

    print(json.dumps({"core": openblas_core(), "gflops": numpy_matmul_gflops()}))
