"""``gpt2 convert``: any readable checkpoint -> safetensors + config.json, verified by reading it back."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from mapper.outputs import Output, check_outputs
from mapper.save import CHECKPOINT_FILES


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a checkpoint between formats and layouts",
        description="Read any supported checkpoint (HF safetensors, sharded safetensors, pytorch_model.bin, "
        "OpenAI's TensorFlow checkpoint, ours) and write it as safetensors + config.json in Hugging Face's "
        "layout (--to hf, loadable by transformers) or the torch engine's module layout (--to custom|fused). "
        "The output is read back and compared bit for bit before the command reports success. It never writes "
        "into, over or around its own input, and replaces an existing model only with --force. Weights that are "
        "not finite (NaN, inf) are refused before anything is written unless --allow-nonfinite.",
    )
    p.add_argument("input", help="checkpoint file or folder")
    p.add_argument("output", help="output folder (created)")
    p.add_argument("--to", choices=["hf", "custom", "fused"], default="hf",
                   help="hf: Hugging Face names and layout; custom/fused: the torch engine's module state (default hf)")
    p.add_argument("--dtype", choices=["float32", "float64"], default=None, help="cast the weights (default: keep)")
    p.add_argument("--force", action="store_true", help="overwrite the model files of an existing output folder")
    p.add_argument("--allow-nonfinite", action="store_true", help="convert weights holding NaN or inf as they are")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mapper import detect_format, load_checkpoint, save_checkpoint

    source = Path(args.input)
    out = Path(args.output)
    # a file input's folder counts as the input too: its config.json is read beside the weights
    inputs = {"IN": [source, source.parent] if source.is_file() else source}
    check_outputs([Output("OUT", out, CHECKPOINT_FILES)], inputs, force=args.force)
    fmt_in = detect_format(args.input)
    config, params = load_checkpoint(args.input)
    if args.dtype:
        params = {k: v.astype(args.dtype) for k, v in params.items()}
    nonfinite = [k for k, v in params.items() if not np.isfinite(v).all()]
    if nonfinite and not args.allow_nonfinite:
        raise ValueError(f"{args.input} holds weights that are not finite (NaN or inf in {', '.join(nonfinite[:3])}"
                         f"{' and more' if len(nonfinite) > 3 else ''}); nothing was written. Pass "
                         "--allow-nonfinite to convert them as they are")
    save_checkpoint(params, config, out, fmt=args.to)
    again_config, again = load_checkpoint(out)
    if again_config != config or not all(_bitwise_equal(again[k], params[k]) for k in params):
        raise ValueError(f"reading {out} back did not reproduce the parameters; the output is not trustworthy")
    print(f"converted {args.input} ({fmt_in}) -> {out} ({args.to} layout, safetensors + config.json); "
          f"{len(params)} tensors, read back identical")
    return 0


def _bitwise_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal bit for bit (so a NaN equals the same NaN, and -0.0 differs from 0.0)."""
    bits = np.dtype(f"u{a.dtype.itemsize}")
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(bits), b.view(bits))
