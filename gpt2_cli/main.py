"""The ``gpt2`` command's entry point: the parser and the one place errors become one-line messages."""

from __future__ import annotations

import argparse
import sys
from importlib import metadata

from gpt2_cli import convert, generate, gradcheck, parity

COMMANDS = (parity, generate, convert, gradcheck)


def version() -> str:
    try:
        return metadata.version("gpt2-from-scratch")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpt2",
        description="GPT-2 from scratch: a hand-differentiated NumPy spec and a PyTorch engine that agree. "
        "Run `gpt2 COMMAND --help` for each command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from numpy_gpt2.runtime import keep_freed_memory

    keep_freed_memory()  # NumPy's big temporaries: reuse freed memory instead of page-faulting fresh maps
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # ConfigError, CheckpointError, TokenizerError are ValueErrors
        print(f"gpt2 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gpt2 {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly, as Unix tools do
        sys.stderr.close()
        return 141
