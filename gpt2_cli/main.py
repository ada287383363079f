"""The ``gpt2`` command's entry point: the parser and the one place errors become one-line messages."""

from __future__ import annotations

import argparse
import sys
from importlib import metadata

from gpt2_cli import (
    bench,
    chat,
    classify,
    convert,
    data,
    download,
    evaluate,
    finetune,
    generate,
    gradcheck,
    lora,
    parity,
    plot,
    train,
)
from gpt2_cli.common import Parser

COMMANDS = (parity, generate, chat, download, convert, gradcheck, train, finetune, classify, evaluate, lora, plot,
            data, bench)


def version() -> str:
    try:
        return metadata.version("gpt2-from-scratch")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


class VersionAction(argparse.Action):
    """``--version``: the package's version, the kernels NumPy runs on and those torch's CPU linear layers take
    (who chose them; the latter measured on first use, see ``torch_gpt2.onednn``)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0,
                         help="print the version and the CPU kernels NumPy and torch use, then exit")

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        import numpy as np

        from numpy_gpt2.runtime import openblas_kernels

        blas = openblas_kernels()
        print(f"gpt2 {version()}; numpy {np.__version__} on OpenBLAS's {blas['core']} kernels "
              f"(chosen by {blas['chosen_by']})")
        try:
            import torch
        except ImportError:
            print("torch: not installed")
        else:
            from torch_gpt2.onednn import preferred_linear

            try:
                choice = preferred_linear().describe()
            except ValueError as e:  # a bad GPT2_ONEDNN_LINEAR
                parser.exit(2, f"gpt2: error: {e}\n")
            print(f"torch {torch.__version__}: float32 CPU linear layers on {choice}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="gpt2",
        description="GPT-2 from scratch: a hand-differentiated NumPy spec and a PyTorch engine that agree. "
        "Run `gpt2 COMMAND --help` for each command.",
    )
    parser.add_argument("--version", action=VersionAction)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``gpt2`` command. Run as a command (``argv`` None), it first restarts itself with OpenBLAS's AVX-512
    kernels where OpenBLAS under-detects an AVX-512 CPU (``numpy_gpt2.runtime``); never in-process callers."""
    from numpy_gpt2.runtime import keep_freed_memory, restart_with_best_openblas

    if argv is None:
        restart_with_best_openblas(sys.orig_argv)
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # NumPy's big temporaries: reuse freed memory instead of page-faulting fresh maps
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:  # Config/Checkpoint/TokenizerError: ValueErrors
        print(f"gpt2 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gpt2 {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly, as Unix tools do
        sys.stderr.close()
        return 141
    except OSError as e:  # a full disk, a folder that turned read-only: what the system said, about which path
        where = f"{e.filename}: " if e.filename else ""
        print(f"gpt2 {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
