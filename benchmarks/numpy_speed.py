"""How close the NumPy spec runs to this machine's matmul speed.

    python -m benchmarks.numpy_speed [--preset gpt2] [--repeats 5] [--threads 2] [--json OUT]

Each repeat times a reference float32 matmul (1024x768 @ 768x3072) right before the measured work, so
every ratio compares two numbers taken side by side; the medians of the ratios are reported.
The spec runs on its fast path (``fast=True``, ``numpy_gpt2.fast.FastAdamW``). Goals: forward at B=1,
T=1024 >= 75 % of the matmul rate; a full train step (forward + backward + AdamW) at B=4, T=64 >= 60 %.
FLOPs are 2*M*N*K over every matmul, attention's full T x T included; a train step counts 3x the forward.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from benchmarks.common import (
    forward_flops,
    keep_freed_memory,
    machine,
    median,
    pin_threads,
    timed,
    train_step_flops,
)
from mapper import GPT2Config, init_params
from numpy_gpt2.fast import FastAdamW


def matmul_rate(a: np.ndarray, b: np.ndarray, out: np.ndarray, reps: int = 3) -> float:
    """FLOP/s of a @ b (median of ``reps``)."""
    flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
    return flops / median([timed(lambda: np.matmul(a, b, out=out)) for _ in range(reps)])


def run(preset: str, repeats: int, threads: int, tune_malloc: bool) -> dict:
    import numpy_gpt2

    tuned = keep_freed_memory() if tune_malloc else False
    thread_info = pin_threads(threads)
    config = GPT2Config.from_preset(preset)
    params = init_params(config, seed=0, dtype=np.float32)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((1024, 768), dtype=np.float32)
    b = rng.standard_normal((768, 3072), dtype=np.float32)
    out = np.empty((1024, 3072), np.float32)

    results: dict = {"machine": machine(), "threads": thread_info, "malloc_tuned": tuned, "preset": preset}

    # forward, B=1, T=1024 (or the preset's context)
    T = min(1024, config.n_positions)
    tokens = rng.integers(0, config.vocab_size, (1, T))
    numpy_gpt2.forward(params, config, tokens, fast=True)  # warm-up
    rows = []
    for _ in range(repeats):
        mm = matmul_rate(a, b, out)
        t = timed(lambda: numpy_gpt2.forward(params, config, tokens, fast=True))
        rows.append((mm, t, forward_flops(config, 1, T) / t))
    results["forward"] = summarise(rows, goal=0.75, what=f"forward B=1 T={T}")

    # train step, B=4, T=64: forward + backward + AdamW (in place)
    B, T = 4, 64
    data = rng.integers(0, config.vocab_size, (B, T + 1))
    trainer = numpy_gpt2.Trainer(params, config, FastAdamW(params, lr=1e-5, weight_decay=0.1), fast=True)
    for _ in range(2):  # warm-up: first steps touch fresh gradient and optimizer memory
        trainer.step(data[:, :-1], data[:, 1:])
    rows = []
    for _ in range(repeats):
        mm = matmul_rate(a, b, out)
        t = timed(lambda: trainer.step(data[:, :-1], data[:, 1:]))
        rows.append((mm, t, train_step_flops(config, B, T) / t))
    results["train_step"] = summarise(rows, goal=0.60, what=f"train step B={B} T={T}")
    return results


def summarise(rows: list[tuple[float, float, float]], goal: float, what: str) -> dict:
    ratios = [rate / mm for mm, _, rate in rows]
    return {
        "what": what,
        "matmul_gflops_median": median([mm for mm, _, _ in rows]) / 1e9,
        "seconds_median": median([t for _, t, _ in rows]),
        "gflops_median": median([rate for _, _, rate in rows]) / 1e9,
        "fraction_of_matmul_median": median(ratios),
        "fraction_of_matmul_all": ratios,
        "goal": goal,
        "meets_goal": median(ratios) >= goal,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2", help="model size (default gpt2 = 124M)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of each measurement (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="BLAS threads (default 2)")
    parser.add_argument("--no-malloc-tuning", action="store_true", help="leave glibc's allocator at its defaults")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    results = run(args.preset, args.repeats, args.threads, not args.no_malloc_tuning)
    m = results["machine"]
    print(f"machine: {m['cpu']}, {m['logical_cpus']} logical CPUs; numpy {m['numpy']}; threads {results['threads']}; "
          f"malloc tuned: {results['malloc_tuned']}")
    print(f"{'measurement':<24} {'time (s)':>9} {'GFLOP/s':>8} {'matmul GFLOP/s':>15} {'fraction':>9} {'goal':>5}")
    for key in ("forward", "train_step"):
        r = results[key]
        print(f"{r['what']:<24} {r['seconds_median']:9.3f} {r['gflops_median']:8.1f} {r['matmul_gflops_median']:15.1f} "
              f"{r['fraction_of_matmul_median']:9.1%} {r['goal']:5.0%} {'met' if r['meets_goal'] else 'MISSED'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
