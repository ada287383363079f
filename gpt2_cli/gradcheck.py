"""``gpt2 gradcheck``: the spec's hand-written gradients against finite differences."""

from __future__ import annotations

import argparse
import time

import numpy as np

from gpt2_cli.common import (
    TINY_DEFAULT,
    add_model_args,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from mapper.config import GPT2Config
from mapper.dropout import draw_dropout_masks
from mapper.tokens import check_fits_context


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "gradcheck",
        help="check the NumPy backward against finite differences (float64)",
        description="Compare every parameter gradient of the NumPy spec's hand-written backward with "
        "fourth-order central finite differences in float64, on a small model (default V=64, n_ctx=16, C=32, "
        "2 layers, 4 heads) with GPT-2's init (or --init course) plus noise. A model with dropout (--init course, "
        "--dropout) is checked with one fixed set of masks, drawn from --seed. Prints the max relative error per "
        "tensor; exits 1 if any exceeds --tol.",
    )
    add_model_args(p, "a tiny model, V=64 C=32 L=2 NH=4", weights=False, dropout=True)
    p.add_argument("--batch", type=positive_int, default=2, help="batch size B (default 2)")
    p.add_argument("--seq", type=positive_int, default=8, help="sequence length T (default 8)")
    p.add_argument("--entries", type=non_negative_int, default=6,
                   help="random entries checked per tensor, plus the largest (default 6); 0 = every entry")
    p.add_argument("--tol", type=positive_float, default=1e-6, help="max relative error allowed (default 1e-6)")
    p.add_argument("--noise", type=non_negative_float, default=0.3, help="std of the noise added to the init")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the init, the noise and the batch")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mapper import init_params
    from numpy_gpt2.gradcheck import check_model_gradients

    config = GPT2Config.from_spec(args.preset, args.config, **TINY_DEFAULT)
    if args.init:
        config = config.with_init(args.init)
    if args.dropout is not None:
        config = config.with_dropout(args.dropout)
    check_fits_context("--seq", args.seq, config)
    rng = np.random.default_rng(args.seed)
    # the init plus noise so LayerNorm gains and every bias carry non-trivial gradients
    params = {
        k: v + args.noise * rng.standard_normal(v.shape)
        for k, v in init_params(config, args.seed, np.float64).items()
    }
    tokens = rng.integers(0, config.vocab_size, (args.batch, args.seq))
    targets = rng.integers(0, config.vocab_size, (args.batch, args.seq))
    masks = draw_dropout_masks(config, args.batch, args.seq, rng) if config.has_dropout else None
    entries = args.entries or None
    print(
        f"gradcheck: float64, fourth-order central differences, {config.n_layer} layer(s), C={config.n_embd}, "
        f"NH={config.n_head}, V={config.vocab_size}, B={args.batch}, T={args.seq}, "
        f"{'all' if entries is None else entries} entries per tensor (+ the largest), tolerance {args.tol:g}"
        + ("" if masks is None else ", dropout with one fixed set of masks"),
        flush=True,
    )
    start = time.perf_counter()
    errors = check_model_gradients(params, config, tokens, targets, entries_per_tensor=entries, seed=args.seed,
                                   dropout_masks=masks)
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
