"""What each speed trick of ``numpy_gpt2/fast.py`` buys on the GPT-2 124M shape (``gpt2 bench --workloads tricks``).

Whole-model timings on this shared machine move by 10% between runs, more than a trick is worth, so each
trick is timed where it acts: its spec op (forward and backward) against its fast op, alternating, on exactly
the arrays the workload feeds it, times the number of calls per step. Its gain is that time saved as a fraction
of the fast path's whole step, also measured here. Workloads: forward B=1 T=1024 and a train step B=4 T=64
(forward + backward + AdamW). ``numpy_gpt2/fast.py`` keeps a trick only if it buys >= ~3% on a workload.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import numpy as np

import numpy_gpt2
from benchmarks.common import timed
from mapper import GPT2Config, init_params
from mapper.training import Batch
from numpy_gpt2 import fast, ops
from numpy_gpt2.backend import NumpyBackend


def alternate(a: Callable[[], object], b: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median seconds of ``a`` and of ``b``, timed alternately after one warm-up each."""
    a(), b()
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(timed(a))
        tb.append(timed(b))
    return statistics.median(ta), statistics.median(tb)


def op_pair(module, forward: str, backward: str, args: tuple, dy: object | None, **kw) -> Callable[[], object]:
    """One forward of ``module``'s op and, when ``dy`` is given, its backward."""

    def run() -> object:
        y, cache = getattr(module, forward)(*args, **kw)
        return y if dy is None else getattr(module, backward)(dy, cache)

    return run


def tricks_of(config: GPT2Config, B: int, T: int, backward: bool, rng: np.random.Generator) -> dict:
    """trick -> (calls per step, the baseline's op pair, the trick's op pair), on the arrays a step feeds them."""
    C, L, NH = config.n_embd, config.n_layer, config.n_head  # noqa: N806
    qkv = (0.5 * rng.standard_normal((B, T, 3 * C))).astype(np.float32)
    att_up = rng.standard_normal((B, T, C)).astype(np.float32)
    up = (lambda a: a) if backward else (lambda a: None)
    tricks = {
        "attention in query blocks": (L, op_pair(ops, "attention_forward", "attention_backward", (qkv, NH), up(att_up)),
                                      op_pair(fast, "attention_forward", "attention_backward", (qkv, NH),
                                              up(att_up))),
    }
    return tricks


def time_adamw(params: dict[str, np.ndarray], repeats: int, rng: np.random.Generator) -> tuple[float, float]:
    """Median seconds of one spec AdamW step and one FastAdamW step, each on its own copy of the parameters."""
    grads = {k: (1e-3 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in params.items()}
    spec_params = {k: v.copy() for k, v in params.items()}
    fast_params = {k: v.copy() for k, v in params.items()}
    spec_opt = numpy_gpt2.AdamW(spec_params, lr=1e-5, weight_decay=0.1)
    fast_opt = numpy_gpt2.FastAdamW(fast_params, lr=1e-5, weight_decay=0.1)
    return alternate(lambda: spec_opt.step(spec_params, grads), lambda: fast_opt.step(fast_params, grads), repeats)


def run(preset: str, repeats: int) -> dict:
    config = GPT2Config.from_preset(preset)
    V = config.vocab_size  # noqa: N806
    rng = np.random.default_rng(0)
    params = init_params(config, seed=0, dtype=np.float32)

    # whole workloads on the fast path, to express each gain as a share of them
    tokens = rng.integers(0, V, (1, min(1024, config.n_positions)))
    data = rng.integers(0, V, (4, 65))
    trainer = NumpyBackend(config, params, 0.1, "matrices")  # the path `gpt2 train --backend numpy` runs
    batch = [Batch(data[:, :-1], data[:, 1:])]
    workloads = {
        "forward B=1 T=1024": (lambda: numpy_gpt2.forward(params, config, tokens, fast=True), tokens.shape, False),
        "train step B=4 T=64": (lambda: trainer.step(batch, lr=1e-5, grad_clip=None), (4, 64), True),
    }
    results: dict = {}
    for name, (work, (B, T), backward) in workloads.items():
        work()
        whole = statistics.median([timed(work) for _ in range(max(3, repeats // 3))])
        rows = {"whole_step_fast_s": whole}
        for trick, (calls, baseline, faster) in tricks_of(config, B, T, backward, rng).items():
            spec_s, fast_s = alternate(baseline, faster, repeats)
            rows[trick] = {"spec_s": calls * spec_s, "fast_s": calls * fast_s,
                           "gain": calls * (spec_s - fast_s) / whole}
        if backward:
            spec_s, fast_s = time_adamw(params, repeats, rng)
            rows["chunked threaded AdamW"] = {"spec_s": spec_s, "fast_s": fast_s, "gain": (spec_s - fast_s) / whole}
        results[name] = rows
    return results


def measure(preset: str, repeats: int) -> list[dict]:
    """One row per (workload, trick): spec and fast seconds for the trick's calls of one step, and its gain."""
    rows = []
    for workload, tricks in run(preset, repeats).items():
        whole = tricks.pop("whole_step_fast_s")
        for trick, r in tricks.items():
            rows.append({"size": preset, "workload": "tricks", "backend": trick, "step": workload,
                         "whole_step_fast_s": whole, **r})
    return rows


if __name__ == "__main__":  # python -m benchmarks.fast_tricks [REPEATS]: the table alone, without gpt2 bench
    import sys

    from numpy_gpt2.runtime import keep_freed_memory

    keep_freed_memory()
    for r in measure("gpt2", int(sys.argv[1]) if len(sys.argv) > 1 else 7):
        print(f"{r['step']:<20} {r['backend']:<32} spec {1e3 * r['spec_s']:7.1f} ms  fast {1e3 * r['fast_s']:7.1f} ms"
              f"  {100 * r['gain']:5.1f}% of the step ({1e3 * r['whole_step_fast_s']:.0f} ms)")
