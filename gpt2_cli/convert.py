"""``gpt2 convert``: any readable checkpoint -> safetensors + config.json, verified by reading it back."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from gpt2_cli.common import same_path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a checkpoint between formats and layouts",
        description="Read any supported checkpoint (HF safetensors, sharded safetensors, pytorch_model.bin, "
        "OpenAI's TensorFlow checkpoint, ours) and write it as safetensors + config.json in Hugging Face's "
        "layout (--to hf, loadable by transformers) or the torch engine's module layout (--to custom|fused). "
        "The output is read back and compared before the command reports success. It never writes into its "
        "own input, and an existing output folder is replaced only with --force.",
    )
    p.add_argument("input", help="checkpoint file or folder")
    p.add_argument("output", help="output folder (created)")
    p.add_argument("--to", choices=["hf", "custom", "fused"], default="hf",
                   help="hf: Hugging Face names and layout; custom/fused: the torch engine's module state (default hf)")
    p.add_argument("--dtype", choices=["float32", "float64"], default=None, help="cast the weights (default: keep)")
    p.add_argument("--force", action="store_true", help="overwrite the model files of an existing output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mapper import detect_format, load_checkpoint, save_checkpoint

    fmt_in = detect_format(args.input)
    source = Path(args.input)
    out = Path(args.output)
    if same_path(out, source) or (source.is_file() and same_path(out, source.parent)):
        raise ValueError(f"the output {out} is the input's own folder; choose another output folder")
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not args.force:
        raise ValueError(f"the output {out} already exists; pass --force to overwrite its model files")
    config, params = load_checkpoint(args.input)
    if args.dtype:
        params = {k: v.astype(args.dtype) for k, v in params.items()}
    save_checkpoint(params, config, out, fmt=args.to)
    again_config, again = load_checkpoint(out)
    if again_config != config or not all(np.array_equal(again[k], params[k]) for k in params):
        raise ValueError(f"reading {out} back did not reproduce the parameters; the output is not trustworthy")
    print(f"converted {args.input} ({fmt_in}) -> {out} ({args.to} layout, safetensors + config.json); "
          f"{len(params)} tensors, read back identical")
    return 0
