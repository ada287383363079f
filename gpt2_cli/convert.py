"""``gpt2 convert``: any readable checkpoint -> safetensors + config.json (with the tokenizer and generation files
for Hugging Face's layout) or llm.c's model file, verified by reading it back."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from mapper.formats.stored import bfloat16_to_float32, float32_to_bfloat16
from mapper.outputs import Output, check_outputs
from mapper.save import CHECKPOINT_FILES, PIPELINE_FILES


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a checkpoint between formats and layouts",
        description="Read any supported checkpoint (HF safetensors, sharded safetensors, pytorch_model.bin, "
        "OpenAI's TensorFlow checkpoint, nanoGPT's ckpt.pt, the course's model.pth, llm.c's .bin, ours) or a model "
        "by name (gpt2, owner/name[@revision], openai:124M, ...), and write it as safetensors + config.json in "
        "Hugging Face's layout (--to hf: transformers loads it, and with the tokenizer files and "
        "generation_config.json written beside it, transformers.pipeline('text-generation', model=OUT) runs "
        "offline), the torch engine's module layout (--to custom|fused), or llm.c's model file (--to llmc: OUT is "
        "the .bin; version 3 float32, or 5 with --dtype bfloat16), which llm.c's C/CUDA trainers continue from. "
        "The output is read back and compared bit for bit before the command reports success. It never writes "
        "into, over or around its own input, and replaces an existing model only with --force. Weights that are "
        "not finite (NaN, inf) are refused before anything is written unless --allow-nonfinite.",
    )
    p.add_argument("input", help="checkpoint file or folder, or a model name")
    p.add_argument("output", help="output folder (created), or the .bin file with --to llmc")
    p.add_argument("--to", choices=["hf", "custom", "fused", "llmc"], default="hf",
                   help="hf: Hugging Face names and layout; custom/fused: the torch engine's module state; llmc: "
                        "llm.c's model file (default hf)")
    p.add_argument("--dtype", choices=["float32", "float64", "bfloat16"], default=None,
                   help="cast the weights (default: keep); bfloat16 only with --to llmc")
    p.add_argument("--force", action="store_true", help="overwrite the model files of an existing output folder")
    p.add_argument("--allow-nonfinite", action="store_true", help="convert weights holding NaN or inf as they are")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mapper import detect_format, load_checkpoint, save_checkpoint, save_llmc, save_pipeline_files
    from mapper.download import locate_checkpoint

    check_target(args)
    out = Path(args.output)
    output = Output("OUT", out) if args.to == "llmc" else Output("OUT", out, CHECKPOINT_FILES + PIPELINE_FILES)
    check_outputs([output], {"IN": args.input}, force=args.force)  # before any download
    source = locate_checkpoint(args.input)
    check_outputs([output], {"IN": source}, force=args.force)  # a model name's downloaded files
    fmt_in = detect_format(source)
    config, params = load_checkpoint(source)
    nonfinite = [k for k, v in params.items() if not np.isfinite(v).all()]
    if nonfinite and not args.allow_nonfinite:
        raise ValueError(f"{args.input} holds weights that are not finite (NaN or inf in {', '.join(nonfinite[:3])}"
                         f"{' and more' if len(nonfinite) > 3 else ''}); nothing was written. Pass "
                         "--allow-nonfinite to convert them as they are")
    if args.to == "llmc":
        params = {k: v.astype(np.float32) for k, v in params.items()}
        save_llmc(params, config, out, dtype=args.dtype or "float32")
        written = f"llm.c model file, version {5 if args.dtype == 'bfloat16' else 3}"
        if args.dtype == "bfloat16":  # what the file holds: each value rounded to bfloat16, as llm.c writes it
            params = {k: bfloat16_to_float32(float32_to_bfloat16(v)) for k, v in params.items()}
    else:
        if args.dtype:
            params = {k: v.astype(args.dtype) for k, v in params.items()}
        save_checkpoint(params, config, out, fmt=args.to)
        extras = save_pipeline_files(config, out) if args.to == "hf" else []
        written = f"{args.to} layout, safetensors + config.json" + "".join(f" + {name}" for name in extras)
    again_config, again = load_checkpoint(out)
    if args.to == "llmc":  # its header has no place for how the model was drawn or trained (init, dropout)
        again_config, config = again_config.computation(), config.computation()
    if again_config != config or not all(_bitwise_equal(again[k], params[k]) for k in params):
        raise ValueError(f"reading {out} back did not reproduce the parameters; the output is not trustworthy")
    print(f"converted {args.input} ({fmt_in}) -> {out} ({written}); {len(params)} tensors, read back identical")
    return 0


def _bitwise_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal bit for bit (so a NaN equals the same NaN, and -0.0 differs from 0.0)."""
    bits = np.dtype(f"u{a.dtype.itemsize}")
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(bits), b.view(bits))


def check_target(args: argparse.Namespace) -> None:
    """The flags that go together, checked before anything is read."""
    if args.dtype == "bfloat16" and args.to != "llmc":
        raise ValueError("--dtype bfloat16 is for --to llmc (llm.c's version-5 file); safetensors here hold float32 "
                         "or float64")
    if args.to == "llmc" and args.dtype == "float64":
        raise ValueError("--to llmc writes float32 (version 3) or bfloat16 (version 5), not --dtype float64")
    if args.to == "llmc" and not args.output.endswith(".bin"):
        raise ValueError(f"--to llmc writes one file: give the output as a .bin path (e.g. gpt2_124M.bin), not "
                         f"{args.output}")
