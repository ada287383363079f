"""``gpt2 bench``: NumPy-CPU vs torch-CPU vs torch-GPU vs Hugging Face, against the machine's measured limits."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gpt2_cli.common import non_negative_int, positive_int


def comma_list(text: str) -> tuple[str, ...]:
    items = tuple(part.strip() for part in text.split(",") if part.strip())
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def add_parser(sub: argparse._SubParsersAction) -> None:
    from benchmarks.backends import ALL_BACKENDS, GROUPS
    from benchmarks.common import default_threads
    from benchmarks.suite import DEFAULT_BACKENDS, EXTRA_WORKLOADS, WORKLOADS
    from mapper.config import PRESETS

    p = sub.add_parser(
        "bench",
        help="benchmark NumPy vs torch (CPU, GPU) vs Hugging Face: forward, train step, decoding",
        description="Measure forward (prefill), a full train step (forward + backward + AdamW) and KV-cache decoding "
        "for every backend present, side by side (backends alternate within each repeat; medians, min/max), "
        "against the machine's own limits measured in the same run: the best float32 matmul rate of any kernel "
        "(OpenBLAS's kernel sets, oneDNN, MKL; on a GPU bf16/TF32/fp32) and the memory bandwidth. Prints a "
        "markdown table and writes DIR/results.json and PNG plots. GPU rows are skipped with a reason when no "
        "GPU is present; a size that does not fit in memory is skipped, never crashed on.",
    )
    p.add_argument("--quick", action="store_true",
                   help="fewer points and repeats (the goals' points plus short sweeps; ~3 min on 2 CPU cores)")
    p.add_argument("--backends", type=comma_list, default=DEFAULT_BACKENDS, metavar="LIST",
                   help=f"comma-separated: groups {', '.join(GROUPS)} or single backends "
                        f"({', '.join(ALL_BACKENDS)}); default: all groups")
    p.add_argument("--sizes", type=comma_list, default=("gpt2",), metavar="LIST",
                   help=f"comma-separated presets: {', '.join(PRESETS)} (default gpt2, the 124M shape)")
    p.add_argument("--workloads", type=comma_list, default=WORKLOADS, metavar="LIST",
                   help=f"comma-separated: {', '.join(WORKLOADS)} (default: these three); also "
                        + "; ".join(f"{k}: {v}" for k, v in EXTRA_WORKLOADS.items()))
    p.add_argument("--config", metavar="SPEC", default=None,
                   help="measure this shape instead of --sizes (e.g. 'n_layer=2,n_embd=64,n_head=4'; random init)")
    p.add_argument("--threads", type=positive_int, default=default_threads(),
                   help="CPU threads for NumPy's BLAS and torch (default: every CPU this process may use, here "
                   f"{default_threads()})")
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="timed repeats per point after one warm-up (default 5; 3 with --quick)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the weights and the inputs (default 0)")
    p.add_argument("--out", type=Path, default=Path("bench_results"), metavar="DIR",
                   help="where results.json and the plots go (default ./bench_results)")
    p.add_argument("--force", action="store_true", help="replace the results and plots of an earlier run in --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import importlib.util

    missing = [m for m in ("threadpoolctl", "matplotlib", "tqdm") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"gpt2 bench needs {', '.join(missing)}: pip install 'gpt2-from-scratch[bench]' "
                         "(or bash scripts/setup in a checkout)")
    from benchmarks.plots import PLOTS
    from benchmarks.suite import Settings, render_markdown
    from benchmarks.suite import run as run_suite
    from mapper.outputs import Output, check_outputs
    from numpy_gpt2.runtime import CORETYPE_ENV, openblas_kernels

    config_file = args.config if args.config and Path(args.config).is_file() else None
    check_outputs([Output("--out", args.out, ("results.json", *PLOTS))], {"--config": config_file}, force=args.force)

    settings = Settings(quick=args.quick, backends=args.backends, sizes=args.sizes, workloads=args.workloads,
                        threads=args.threads, repeats=args.repeats, seed=args.seed, config=args.config)
    blas = openblas_kernels()
    if blas["slower_forced"]:
        print(f"note: {CORETYPE_ENV}={blas['core']} is set in the environment, so NumPy runs OpenBLAS's "
              f"{blas['core']} kernels on this AVX-512 CPU; the limits below show what its AVX-512 kernels reach "
              f"(unset {CORETYPE_ENV} or set it to SkylakeX to use them)", file=sys.stderr)
    report = run_suite(settings, args.out, log=lambda line: print(line, file=sys.stderr))
    print(render_markdown(report))
    print(f"\nwrote {args.out / 'results.json'} and the plots in {args.out}/", file=sys.stderr)
    return 0
