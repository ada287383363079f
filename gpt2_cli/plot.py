"""``gpt2 plot``: several training runs' loss curves on one figure, and their time per step."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plot",
        help="overlay the loss curves of training runs",
        description="Draw the train and validation losses of one or more `gpt2 train` folders against tokens "
        "seen on one figure (e.g. the numpy and torch backends from the same init), and print each run's "
        "median seconds per optimizer step.",
    )
    p.add_argument("runs", nargs="+", metavar="DIR", help="folders written by gpt2 train")
    p.add_argument("--out", required=True, metavar="PNG", help="the figure to write")
    p.add_argument("--labels", default=None, help="comma-separated names of the runs (default: folder names)")
    p.add_argument("--title", default=None, help="the figure's title")
    p.add_argument("--reference", nargs="+", default=[], metavar="JSON",
                   help="published points to draw as markers (a JSON object: label, points with tokens_seen and "
                   "train_loss/val_loss), e.g. benchmarks/results/pretrain-verdict/book.json")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mapper.outputs import Output, check_outputs
    from tasks.plots import plot_losses
    from tasks.runlog import read_reference, read_run_log, seconds_per_step

    labels = args.labels.split(",") if args.labels else [Path(d).name for d in args.runs]
    if len(labels) != len(args.runs):
        raise ValueError(f"--labels names {len(labels)} runs, but {len(args.runs)} folders are given")
    out = Path(args.out)
    check_outputs([Output("--out", out)], {"DIR": args.runs, "--reference": args.reference}, force=args.force)
    runs = {label: read_run_log(Path(d), warn=lambda line: print(f"note: {line}", file=sys.stderr))
            for label, d in zip(labels, args.runs, strict=True)}
    references = dict(read_reference(Path(f)) for f in args.reference)
    plot_losses(runs, out, args.title, references)
    for label, records in runs.items():
        last = records[-1]
        val = f", val loss {last['val_loss']:.3f}" if last.get("val_loss") is not None else ""
        print(f"{label}: {last['step']} steps, {seconds_per_step(records):.3f} s/step (median), train loss "
              f"{last['train_loss']:.3f}{val}")
    print(f"wrote {out}")
    return 0
