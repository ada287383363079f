"""``gpt2 parity`` (the main job): the NumPy spec against the torch engine in both layouts, on one batch."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from gpt2_cli.common import add_model_args, non_negative_int, positive_int
from mapper.dropout import DropoutMasks, draw_dropout_masks
from mapper.models import resolve_model
from mapper.parity import TOLERANCES, Comparison, ModelOutputs, compare_outputs
from mapper.tokens import check_fits_context

LAYOUTS = ("custom", "fused")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "parity",
        help="run NumPy, torch-custom and torch-fused on one batch and compare everything (the main job)",
        description="Run the same batch through the NumPy spec and the torch engine in both attention layouts, "
        "forward and backward, and print max absolute/relative differences of the logits, the loss and every "
        "gradient. Exits 1 if any exceeds its tolerance (mapper/parity.py). Default: the GPT-2 124M shape with "
        "GPT-2's seeded initialisation in float64 (no download). A model with dropout (--init course, --dropout) is "
        "compared as it trains: both backends drop with the same masks, drawn from --seed.",
    )
    add_model_args(p, "gpt2, i.e. the 124M shape", dropout=True)
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                   help="arithmetic of both backends (default float64: agreement to round-off)")
    p.add_argument("--device", default=None, help="torch device: cpu, cuda, cuda:N, mps (default: cuda > mps > cpu)")
    p.add_argument("--batch", type=positive_int, default=2, help="batch size (default 2)")
    p.add_argument("--seq", type=positive_int, default=64, help="sequence length (default 64)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the init and of the batch (default 0)")
    p.set_defaults(func=run)


def stage(label: str) -> float:
    """Say on stderr what is starting (the 124M shape takes seconds per stage); return the start time."""
    print(f"  {label} ...", end="", file=sys.stderr, flush=True)
    return time.perf_counter()


def done(start: float, loss: float) -> None:
    print(f" {time.perf_counter() - start:.1f} s, loss {loss:.6f}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    import torch

    import numpy_gpt2
    from torch_gpt2 import GPT2, resolve_device

    torch_dtype = torch.float64 if args.dtype == "float64" else torch.float32
    device = resolve_device(args.device, torch_dtype)  # a device torch cannot use fails here, before any work
    source = resolve_model(args.weights, args.preset, args.config, args.dtype, args.seed, init=args.init,
                           dropout=args.dropout)
    config, params, origin = source.config, source.params, source.description
    check_fits_context("--seq", args.seq, config)
    rng = np.random.default_rng(args.seed)
    data = rng.integers(0, config.vocab_size, (args.batch, args.seq + 1))
    tokens, targets = data[:, :-1], data[:, 1:]
    masks = draw_dropout_masks(config, args.batch, args.seq, rng) if config.has_dropout else None
    dropout = "" if masks is None else (f", dropout {config.embd_pdrop:g}/{config.attn_pdrop:g}/{config.resid_pdrop:g} "
                                        "(embeddings/attention/residual) with the same masks on both backends")
    print(f"parity: {origin}; {config.n_layer} layers, C={config.n_embd}, NH={config.n_head}, V={config.vocab_size}; "
          f"{args.dtype}, batch {args.batch}x{args.seq}, torch on {device}{dropout}", flush=True)

    start = stage("numpy spec: forward + backward")
    ref = ModelOutputs(*_numpy_outputs(numpy_gpt2, params, config, tokens, targets, masks))
    done(start, ref.loss)
    results: dict[str, list[Comparison]] = {}
    for layout in LAYOUTS:
        start = stage(f"torch {layout}: forward + backward")
        # float64 takes the written-out attention: SDPA's kernels may reorder sums on some devices
        model = GPT2.from_params(params, config, layout, device=device,
                                 attn_impl="math" if args.dtype == "float64" else "sdpa")
        got = ModelOutputs(_torch_logits(model, tokens, masks), *model.loss_and_grads(tokens, targets, masks))
        done(start, got.loss)
        results[layout] = compare_outputs(got, ref, TOLERANCES[args.dtype])
        del model
    return report(results)


def _torch_logits(model, tokens: np.ndarray, masks: DropoutMasks | None) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(model.to_device(tokens), dropout_masks=masks).cpu().numpy()


def _numpy_outputs(numpy_gpt2, params, config, tokens, targets, masks: DropoutMasks | None
                   ) -> tuple[np.ndarray, float, dict]:
    logits = numpy_gpt2.forward(params, config, tokens, dropout_masks=masks)
    loss, grads = numpy_gpt2.loss_and_grads(params, config, tokens, targets, dropout_masks=masks)
    return logits, loss, grads


def report(results: dict[str, list[Comparison]]) -> int:
    """Print one row per quantity with each layout's differences; return the exit code (1 on any failure)."""
    rows = list(zip(*results.values(), strict=True))
    width = max(len(r[0].name) for r in rows)
    header = "  ".join(f"{layout + ' max|d|':>13} {'rel':>9}" for layout in results)
    print(f"\n{'quantity':<{width}} {'shape':>15}  {header}  {'tolerance':>16}")
    for row in rows:
        cells = "  ".join(f"{c.max_abs:13.2e} {c.relative:9.1e}" for c in row)
        ok = all(c.ok for c in row)
        print(f"{row[0].name:<{width}} {str(row[0].shape):>15}  {cells}  {row[0].tolerance.describe():>16}"
              f"{'' if ok else '  FAIL'}")
    failed = [row[0].name for row in rows if not all(c.ok for c in row)]
    print("\nlogits and loss: |d| <= atol + rtol*|numpy| everywhere; "
          "gradients: max|d| / max(|torch|, |numpy|) per tensor")
    if failed:
        print(f"FAILED: {len(failed)} of {len(rows)} quantities exceed their tolerance: {', '.join(failed[:5])}")
        return 1
    print(f"OK: NumPy spec, torch {' and torch '.join(results)} agree on all {len(rows)} quantities "
          f"(logits, loss, {len(rows) - 2} gradients)")
    return 0
