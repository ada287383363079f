"""The ``gpt2`` command: a thin layer over the packages (floor 3). Run ``gpt2 --help``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from mapper import GPT2Config
from mapper.config import PRESETS, ConfigError

TINY_DEFAULT = dict(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4)


def parse_config(preset: str | None, config: str | None, default: dict) -> GPT2Config:
    """A config from a preset and/or ``--config`` (a JSON file, or ``key=value,key=value`` overrides)."""
    fields: dict = {}
    if config:
        path = Path(config)
        if path.is_file():
            data = json.loads(path.read_text())
            return GPT2Config.from_hf_dict(data) if "n_embd" in data else GPT2Config(**data)
        for item in config.split(","):
            key, sep, value = item.partition("=")
            known = GPT2Config.__dataclass_fields__
            if not sep or key.strip() not in known:
                raise ConfigError(f"--config takes a JSON file or key=value pairs of {', '.join(known)}; got {item!r}")
            fields[key.strip()] = json.loads(value.strip().lower()) if value.strip() else None
    if preset:
        return GPT2Config.from_preset(preset, **fields)
    return GPT2Config(**{**default, **fields})


# ---------------------------------------------------------------------------------------------- gradcheck


def cmd_gradcheck(args: argparse.Namespace) -> int:
    from mapper import init_params
    from numpy_gpt2.gradcheck import check_model_gradients

    config = parse_config(args.preset, args.config, TINY_DEFAULT)
    if args.seq > config.n_positions:
        raise ValueError(f"--seq {args.seq} exceeds the model's context n_positions={config.n_positions}")
    rng = np.random.default_rng(args.seed)
    # GPT-2's init plus noise so LayerNorm gains and every bias carry non-trivial gradients
    params = {
        k: v + args.noise * rng.standard_normal(v.shape)
        for k, v in init_params(config, args.seed, np.float64).items()
    }
    tokens = rng.integers(0, config.vocab_size, (args.batch, args.seq))
    targets = rng.integers(0, config.vocab_size, (args.batch, args.seq))
    print(
        f"gradcheck: float64, fourth-order central differences, {config.n_layer} layer(s), C={config.n_embd}, "
        f"NH={config.n_head}, V={config.vocab_size}, B={args.batch}, T={args.seq}, "
        f"{'all' if args.entries is None else args.entries} entries per tensor (+ the largest), tolerance {args.tol:g}"
    )
    start = time.perf_counter()
    errors = check_model_gradients(params, config, tokens, targets, entries_per_tensor=args.entries, seed=args.seed)
    width = max(len(k) for k in errors)
    print(f"{'parameter':<{width}}  {'shape':>14}  {'max rel error':>13}")
    for name, err in errors.items():
        flag = "" if err <= args.tol else "  FAIL"
        print(f"{name:<{width}}  {str(params[name].shape):>14}  {err:13.3e}{flag}")
    worst = max(errors, key=errors.get)
    failed = [k for k, e in errors.items() if e > args.tol]
    print(
        f"worst: {worst} {errors[worst]:.3e}; {len(errors) - len(failed)}/{len(errors)} tensors within "
        f"{args.tol:g} ({time.perf_counter() - start:.1f} s)"
    )
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpt2",
        description="GPT-2 from scratch: a hand-differentiated NumPy spec and a PyTorch engine that agree.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def model_args(p: argparse.ArgumentParser, default_desc: str) -> None:
        p.add_argument("--preset", choices=list(PRESETS), help=f"a GPT-2 size (default: {default_desc})")
        p.add_argument(
            "--config",
            help="a config JSON file (Hugging Face config.json or our fields), or overrides such as "
            "'n_layer=1,n_embd=64' applied to the preset or default",
        )

    g = sub.add_parser(
        "gradcheck",
        help="check the NumPy backward against finite differences (float64)",
        description="Compare every parameter gradient of the NumPy spec's hand-written backward with "
        "fourth-order central finite differences in float64, on a small model (default V=64, n_ctx=16, C=32, "
        "2 layers, 4 heads) with GPT-2's init plus noise. Prints the max relative error per tensor; exits 1 "
        "if any exceeds --tol.",
    )
    model_args(g, "a tiny model, V=64 C=32 L=2 NH=4")
    g.add_argument("--batch", type=int, default=2, help="batch size B (default 2)")
    g.add_argument("--seq", type=int, default=8, help="sequence length T (default 8)")
    g.add_argument("--entries", type=int, default=6,
                   help="random entries checked per tensor, plus the largest (default 6); 0 = every entry")
    g.add_argument("--tol", type=float, default=1e-6, help="max relative error allowed (default 1e-6)")
    g.add_argument("--noise", type=float, default=0.3, help="std of the noise added to the init (default 0.3)")
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=cmd_gradcheck)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "entries", None) == 0:
        args.entries = None
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # ConfigError, CheckpointError and bad input are ValueErrors
        print(f"gpt2 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
