"""``gpt2 train``: pretrain GPT-2 on text files with either backend (the loop itself is ``tasks.loop``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gpt2_cli.common import (
    add_model_args,
    fraction,
    load_tokenizer_for,
    non_negative_float,
    non_negative_int,
    positive_int,
)
from mapper.config import GPT2Config
from mapper.memory import TRAINING_COPIES
from mapper.models import resolve_model
from mapper.outputs import Output, check_outputs
from mapper.schema import count_params
from mapper.tokens import check_fits_context
from mapper.training import distributed_world

# RunArgs fields that --resume takes from the saved run when the command line leaves them out, by the
# argparse destination of their option; device and compile are how this process runs, the user's to choose
RESUMED_FIELDS = ("backend", "dtype", "context", "stride", "batch_size", "grad_accum", "lr", "schedule", "min_lr",
                  "warmup_steps", "weight_decay", "decay", "grad_clip", "epochs", "max_steps", "eval_every",
                  "eval_batches", "val_fraction", "seed", "sample_prompt", "sample_tokens", "save_every", "autocast",
                  "tf32", "deterministic")
RESUMED_OPTIONS = ("trainable", "max_length", "mask_prompt")
MODEL_FLAGS = {"preset", "config", "init_from", "init", "dropout"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="pretrain on text files (resumable; torchrun for several processes)",
        description="Pretrain GPT-2 from a seeded initialisation (GPT-2's, or the course's with --init course) or "
        "from --init-from, on text files, as the "
        "course's chapter 5 does on The Verdict: the text is tokenized, split 90/10 by position into training "
        "and validation text, and cut into windows of --context tokens every --stride tokens. Every --eval-every "
        "steps the train and validation losses and a greedy sample are logged. DIR receives log.jsonl, loss.png, "
        "the model (Hugging Face layout: `gpt2 generate --weights DIR` and transformers load it) and a checkpoint "
        "that --resume continues bit-exactly (`--out DIR --resume` alone takes the run's own arguments). Ctrl-C, "
        "SIGTERM and SIGHUP finish the step, write a checkpoint and exit (130, 143, 129). Several processes: "
        "`torchrun --nproc-per-node N $(which gpt2) train --backend torch ...` (DistributedDataParallel).",
        epilog="The course's run: gpt2 train --data data/the-verdict.txt --out runs/verdict --init course --epochs 10 "
        "--decay all (the book's GPTModel of the 124M shape, 163M parameters with its untied head, dropout 0.1; "
        "context 256, batch 2, lr 4e-4, weight decay 0.1, eval every 5 steps).",
    )
    p.add_argument("--data", nargs="+", metavar="FILE", help="UTF-8 text files, joined with <|endoftext|> "
                   "(required, except with --resume)")
    add_run_args(p, batch_size=2, lr=4e-4, eval_every=5, what="windows")
    p.add_argument("--context", type=positive_int, default=256, help="tokens per training window")
    p.add_argument("--stride", type=positive_int, default=256, help="tokens between window starts")
    p.add_argument("--val-fraction", type=fraction, default=0.1, help="the text's tail kept for validation")
    p.add_argument("--sample-prompt", default="Every effort moves you", help="greedy sample at each evaluation "
                   "('' for none)")
    p.add_argument("--sample-tokens", type=non_negative_int, default=50, help="tokens per sample")
    p.set_defaults(func=run)


def add_run_args(p: argparse.ArgumentParser, batch_size: int, lr: float, eval_every: int, what: str,
                 epochs: int | None = None) -> None:
    """The options every training command shares (gpt2 train and gpt2 finetune ...)."""
    p.add_argument("--out", required=True, metavar="DIR", help="the run's folder (must not hold another run "
                   "unless --resume; locked while the run lasts)")
    p.add_argument("--backend", choices=["numpy", "torch"], default="torch",
                   help="the NumPy spec (readable loop) or the torch engine")
    add_model_args(p, "gpt2, the 124M shape", weights=False, dropout=True)
    p.add_argument("--init-from", metavar="CHECKPOINT",
                   help="start from these weights instead of the seeded init: a checkpoint, or a model name (gpt2, "
                        "owner/name, openai:124M, ...)")
    p.add_argument("--batch-size", type=positive_int, default=batch_size, help=f"{what} per micro-batch")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=non_negative_float, default=lr, help="peak learning rate")
    p.add_argument("--schedule", choices=["constant", "cosine"], default="constant",
                   help="constant (the course's) or linear warm-up then cosine to --min-lr at the last step")
    p.add_argument("--min-lr", type=non_negative_float, default=0.0, help="the cosine schedule's final lr")
    p.add_argument("--warmup-steps", type=non_negative_int, default=0, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=non_negative_float, default=0.1, help="AdamW's decoupled weight decay")
    p.add_argument("--decay", choices=["matrices", "all"], default="matrices",
                   help="which tensors decay: the >=2-D ones (GPT-2, nanoGPT) or all of them (the course's "
                   "torch.optim.AdamW(model.parameters()))")
    p.add_argument("--grad-clip", type=non_negative_float, default=0.0,
                   help="clip the global gradient norm to this (0: no clipping, as the course)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=positive_int, default=epochs, help="passes over the training set "
                        + ("(default 1 unless --max-steps)" if epochs is None else "(the course's; --max-steps "
                           "instead overrides it)"))
    length.add_argument("--max-steps", type=positive_int, default=None, help="optimizer steps instead of epochs")
    p.add_argument("--eval-every", type=positive_int, default=eval_every, help="evaluate every N steps (also "
                   "after the first and the last)")
    p.add_argument("--eval-batches", type=positive_int, default=5, help="batches per evaluation loss")
    p.add_argument("--seed", type=non_negative_int, default=123, help="seeds the init and the data order")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="parameters and arithmetic")
    p.add_argument("--device", default=None, help="torch device (default: cuda > mps > cpu)")
    p.add_argument("--autocast", choices=["bf16", "fp16"], default=None, help="torch mixed precision")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--tf32", action="store_true", help="CUDA float32 matmuls on TF32 tensor cores (faster, ~1e-3 "
                   "relative; off by default, as for the parity tests)")
    p.add_argument("--deterministic", action="store_true", help="deterministic torch kernels, so that --resume is "
                   "bit-exact on a GPU too (some backward kernels are slower)")
    p.add_argument("--save-every", type=non_negative_int, default=0,
                   help="checkpoint every N steps (0: at the end of each epoch)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out with its own arguments (any "
                   "given must equal them)")
    p.add_argument("--force", action="store_true", help="start afresh in an --out whose run stopped before its "
                   "first checkpoint, or whose model files belong to no run (a run with a checkpoint is never "
                   "replaced)")
    p.add_argument("--stop-after", type=positive_int, default=None, metavar="K",
                   help="checkpoint after step K and exit (code 0), as Ctrl-C does (for --resume)")
    p.add_argument("--tokenizer", default=None, metavar="PATH", help="GPT-2 tokenizer files (default: the copy "
                   "shipped with this package)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def check_args(args: argparse.Namespace) -> None:
    """Combinations argparse cannot see; before anything is loaded or written."""
    if args.data is None:
        raise ValueError("--data is required (only --resume takes it from the run)")
    if args.backend == "numpy":
        for flag, value in (("--device", args.device), ("--autocast", args.autocast), ("--compile", args.compile),
                            ("--tf32", args.tf32), ("--deterministic", args.deterministic)):
            if value:
                raise ValueError(f"{flag} is a torch option; the numpy backend runs on the CPU in --dtype")
        if distributed_world()[1] > 1:
            raise ValueError("several processes (torchrun) train only with --backend torch")
    if args.autocast and args.dtype == "float64":
        raise ValueError("--autocast needs --dtype float32")
    if args.tf32 and args.dtype == "float64":
        raise ValueError("--tf32 is a mode of float32 matmuls; it needs --dtype float32")
    if args.min_lr > args.lr:
        raise ValueError(f"--min-lr {args.min_lr} is above --lr {args.lr}")


def fill_from_saved_run(args: argparse.Namespace, data_is_list: bool) -> None:
    """``--resume``: each option the command line left out takes the value the run in ``--out`` was started with
    (its checkpoint's state.json), so ``--out DIR --resume`` alone continues it; one given must still equal it."""
    from tasks.run_folder import saved_args

    if not args.resume:
        return
    saved = saved_args(Path(args.out))
    values = {name: saved[name] for name in RESUMED_FIELDS if name in saved}
    values["data"] = saved["data"] if data_is_list else saved["data"][0]
    options = saved.get("options") or {}
    values.update({name: options[name] for name in RESUMED_OPTIONS if name in options})
    if "lora" in options:
        lora = options["lora"] or {}
        values.update(lora_rank=lora.get("rank"), lora_alpha=lora.get("alpha", 16.0),
                      lora_targets=",".join(lora.get("targets", ("attn",))))
    for name, value in values.items():
        if name not in args.given and hasattr(args, name):
            setattr(args, name, value)


def check_run_outputs(args: argparse.Namespace, extra_files: tuple[str, ...] = ()) -> None:
    """The run folder's own state (``check_out_dir``), then the folder against the inputs (data, --init-from, a
    --config file, --tokenizer), its model files (not a run's: replaced only with --force) and a write probe."""
    from tasks.run_folder import RUN_FILES, check_out_dir, existing_run

    out = Path(args.out)
    data = args.data if isinstance(args.data, list) else [args.data]
    config_file = args.config if args.config and Path(args.config).is_file() else None
    inputs = {"--data": data, "--init-from": args.init_from, "--config": config_file, "--tokenizer": args.tokenizer}
    check_out_dir(out, args.resume, args.force)
    run_owned = args.resume or existing_run(out) is not None  # a run's model files are its own to replace
    check_outputs([Output("--out", out, () if run_owned else RUN_FILES + extra_files)], inputs, force=args.force)


def model_config(args: argparse.Namespace):
    """(config, params or None, init): the seeded init waits until every check has passed. ``--resume`` without
    --preset/--config/--init-from takes the run's own config and start."""
    from tasks.run_folder import saved_args

    if args.resume and not MODEL_FLAGS & args.given:
        saved = saved_args(Path(args.out))
        return GPT2Config(**saved["config"]), None, saved["init"]
    source = resolve_model(args.init_from, args.preset, args.config, args.dtype, args.seed, materialize=False,
                           weights_flag="--init-from", copies=TRAINING_COPIES, init=args.init, dropout=args.dropout)
    return source.config, source.params, source.init


def check_sample_prompt(prompt: list[int], config: GPT2Config) -> None:
    """A greedy sample needs room for one new token after its prompt (checked before any model is built)."""
    if len(prompt) >= config.n_positions:
        raise ValueError(f"--sample-prompt is {len(prompt)} tokens long; the model's context of {config.n_positions} "
                         "positions leaves no room for a sample (shorten it, or '' for none)")


def resolve_run_device(args: argparse.Namespace) -> str:
    """The torch device (checked) or "cpu" for the numpy backend."""
    if args.backend != "torch":
        return "cpu"
    import torch

    from torch_gpt2 import resolve_device

    device = str(resolve_device(args.device, torch.float64 if args.dtype == "float64" else torch.float32))
    if args.tf32 and not device.startswith("cuda"):
        raise ValueError(f"--tf32 needs a CUDA device (TF32 is a GPU tensor-core mode); this run is on {device}")
    return device


def backend_factory(args: argparse.Namespace, device: str, trainable: set[str] | None = None, lora=None):
    """make_backend(config, params) for ``tasks.loop.run``."""

    def make_backend(config, params):
        if args.backend == "numpy":
            from numpy_gpt2.backend import NumpyBackend

            return NumpyBackend(config, {k: v.astype(args.dtype, copy=False) for k, v in params.items()},
                                args.weight_decay, args.decay, trainable=trainable, lora=lora, seed=args.seed)
        from torch_gpt2.backend import TorchBackend

        return TorchBackend(config, params, args.weight_decay, args.decay, device=device, dtype=args.dtype,
                            autocast=args.autocast, compile=args.compile, trainable=trainable, lora=lora,
                            tf32=args.tf32, deterministic=args.deterministic, seed=args.seed)

    return make_backend


def common_run_args(args: argparse.Namespace, config, init: str, data: list[str], sha256: str, device: str,
                    **task) -> dict:
    """The RunArgs fields every training command fills the same way."""
    return dict(
        backend=args.backend, dtype=args.dtype, config=config.to_dict(), init=init,
        data=[str(Path(d).resolve()) for d in data], data_sha256=sha256, batch_size=args.batch_size,
        grad_accum=args.grad_accum, lr=args.lr, schedule=args.schedule, min_lr=args.min_lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, decay=args.decay, grad_clip=args.grad_clip,
        epochs=args.epochs, max_steps=args.max_steps, eval_every=args.eval_every, eval_batches=args.eval_batches,
        seed=args.seed, save_every=args.save_every, device=device, autocast=args.autocast, compile=args.compile,
        tf32=args.tf32, deterministic=args.deterministic, world_size=distributed_world()[1], **task)


def execute(command: str, args: argparse.Namespace, run_args, data, encoder, config, params, make_backend,
            description: str):
    """Run (or resume) the loop; returns its Progress, or the exit code when it stopped early on purpose (0 after
    --stop-after, 128 + the signal's number after a signal)."""
    from tasks import loop

    world = run_args.world_size
    say = print if distributed_world()[0] == 0 else (lambda *a, **k: None)
    if loop.steps_per_epoch(data, run_args) == 0:
        raise ValueError(f"one optimizer step needs {args.grad_accum} batches of {args.batch_size}, but the training "
                         f"set holds {data.n_train}")
    total = loop.planned_steps(data, run_args)
    say(f"gpt2 {command}: {args.backend} on {run_args.device}, {config.n_layer} layers x {config.n_embd}, "
        f"{count_params(config):,} parameters, {model_words(config, run_args.init)}; {description}; {total} steps"
        + (f" over {world} processes" if world > 1 else ""), file=sys.stderr)
    try:
        progress = loop.run(run_args, data, Path(args.out), encoder, config, params, make_backend,
                            resume=args.resume, stop_after=args.stop_after, show_progress=not args.quiet,
                            say=lambda line: say(line, file=sys.stderr), force=args.force)
    except loop.Stop as e:
        say(f"gpt2 {command}: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        if args.backend == "torch":
            from torch_gpt2.backend import finish

            finish()
    last = progress.history[-1] if progress.history else {}
    summary = ", ".join(f"{k.replace('_', ' ')} {last[k]:.3f}" for k in ("train_loss", "val_loss")
                        if last.get(k) is not None)
    say(f"gpt2 {command}: done, {progress.step} steps in {progress.elapsed:.1f} s ({summary}); model in {args.out}",
        file=sys.stderr)
    return progress


def model_words(config, init: str) -> str:
    """The run's model in words: where it starts and its dropout, e.g. "the course's init (seed 123), dropout 0.1"."""
    if init.startswith("seed "):  # a fresh model (mapper.models.resolve_model); else the checkpoint's path
        start = ("GPT-2 init" if config.init == "gpt2" else "the course's init") + f" ({init})"
    else:
        start = f"from {init}"
    rates = sorted({config.embd_pdrop, config.attn_pdrop, config.resid_pdrop})
    return start + (f", dropout {'/'.join(f'{p:g}' for p in rates)}" if config.has_dropout else "")


def run(args: argparse.Namespace) -> int:
    from mapper import init_params
    from tasks.loop import RunArgs
    from tasks.text import prepare

    fill_from_saved_run(args, data_is_list=True)
    check_args(args)
    world = distributed_world()[1]
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} does not split over {world} processes")
    check_run_outputs(args)
    device = resolve_run_device(args)
    out = Path(args.out)
    config, params, init = model_config(args)
    check_fits_context("--context", args.context, config)
    encoder = load_tokenizer_for(args.tokenizer)
    prompt = encoder.encode(args.sample_prompt, allowed_special="all")
    check_sample_prompt(prompt, config)
    data = prepare(args.data, encoder, args.context, args.stride, args.val_fraction, args.batch_size,
                   cache_dir=out)
    if data.train.ids.size and int(data.train.ids.max()) >= config.vocab_size:
        raise ValueError(f"the text holds token id {int(data.train.ids.max())}, outside the model's vocabulary "
                         f"of {config.vocab_size}")
    run_args = RunArgs(**common_run_args(
        args, config, init, args.data, data.sha256, device, context=args.context, stride=args.stride,
        val_fraction=args.val_fraction, sample_prompt=args.sample_prompt, sample_tokens=args.sample_tokens))
    if not args.resume and params is None:
        params = init_params(config, args.seed, args.dtype)
    description = (f"{len(data.train)} training / {len(data.val)} validation windows of {args.context} tokens")
    progress = execute("train", args, run_args, data, encoder, config, params, backend_factory(args, device),
                       description)
    if isinstance(progress, int):
        return progress
    if distributed_world()[0] == 0:
        print(f"gpt2 train: try `gpt2 generate --weights {out} --prompt {args.sample_prompt or 'Hello'!r}`",
              file=sys.stderr)
    return 0
