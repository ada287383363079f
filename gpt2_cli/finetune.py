"""``gpt2 finetune classify|instruct|reason``: the course's fine-tunes through the loop of ``gpt2 train``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from gpt2_cli.common import positive_float, positive_int
from gpt2_cli.train import (
    add_run_args,
    backend_factory,
    check_args,
    check_run_outputs,
    common_run_args,
    execute,
    fill_from_saved_run,
    model_config,
    resolve_run_device,
)
from mapper.schema import param_shapes
from mapper.tokens import check_fits_context
from mapper.training import distributed_world


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune: spam classifier, instruction following, reasoning",
                       description="The course's fine-tunes, each through the training loop of `gpt2 train` "
                       "(same checkpoints, --resume, signals, the folder's lock, log.jsonl and loss.png).")
    tasks = p.add_subparsers(dest="task", required=True, metavar="TASK", help="classify, instruct or reason")

    c = tasks.add_parser("classify", help="a classifier head on the last non-padding token",
                         description="Balance the classes, split 70/10/20 (seeded), pad with <|endoftext|> and "
                         "train a head score.weight (no bias, as Hugging Face's GPT2ForSequenceClassification) on "
                         "the hidden state of each row's last non-padding token. Writes DIR/metrics.json "
                         "(train/val/test accuracy, confusion matrix); DIR loads in transformers.")
    c.add_argument("--data", metavar="FILE", help="label<TAB>text lines, or a CSV with text,label (required, except "
                   "with --resume)")
    add_run_args(c, batch_size=8, lr=5e-5, eval_every=50, what="rows", epochs=5)
    c.add_argument("--max-length", type=positive_int, default=None, help="pad/truncate rows to this many tokens "
                   "(default: the longest training text)")
    c.add_argument("--trainable", choices=["last-block", "all", "lora"], default="last-block",
                   help="what trains: the last block + final LayerNorm + head (the course), everything, or LoRA "
                   "adapters + head")
    add_lora_args(c, head=True)
    c.set_defaults(func=run_classify)

    for name, help_text, desc in (
        ("instruct", "Alpaca-format instruction following",
         "The course's chapter 7: the Alpaca prompt, split 85/10/5 (seeded), EOS kept as a target and later "
         "padding ignored. After training, greedy responses to the test set go to DIR/test_responses.json with "
         "ROUGE-L against the references (DIR/metrics.json)."),
        ("reason", "question -> <think>...</think> -> <answer>...</answer>",
         "Reasoning fine-tune on the AM-DeepSeek-R1-distilled layout or GSM8K (question, answer ending in "
         "`#### N`), loss on the response only by default. Samples longer than the context keep their answer: the "
         "thinking is shortened, or the sample dropped (both counted). Validation: 10% of the samples, seeded."),
    ):
        t = tasks.add_parser(name, help=help_text, description=desc)
        t.add_argument("--data", metavar="FILE",
                       help=("instruction JSON (instruction, input, output)" if name == "instruct" else
                             "AM-format or GSM8K JSON lines") + " (required, except with --resume)")
        course = name == "instruct"  # the course's chapter 7: 2 epochs, an evaluation every 5 steps
        add_run_args(t, batch_size=8, lr=5e-5, eval_every=5 if course else 50, what="examples",
                     epochs=2 if course else None)
        t.add_argument("--max-length", type=positive_int, default=None,
                       help="tokens per example at most (default: the model's context)")
        masked = t.add_mutually_exclusive_group()
        masked.add_argument("--mask-prompt", dest="mask_prompt", action="store_true", default=name == "reason",
                            help="no loss on the prompt's tokens" + (" (default)" if name == "reason" else ""))
        masked.add_argument("--no-mask-prompt", dest="mask_prompt", action="store_false",
                            help="loss on every token, prompt included" + (" (default)" if name == "instruct" else ""))
        t.add_argument("--trainable", choices=["all", "last-block", "lora"], default="all", help="what trains")
        t.add_argument("--max-new-tokens", type=positive_int, default=256, help="tokens per generated response")
        if name == "instruct":
            t.add_argument("--test-limit", type=positive_int, default=None,
                           help="generate only the first N test responses")
        add_lora_args(t, head=False)
        t.set_defaults(func=run_instruct if name == "instruct" else run_reason)


def add_lora_args(p: argparse.ArgumentParser, head: bool) -> None:
    trained = "the adapters and the classifier's head" if head else "the adapters"
    p.add_argument("--lora-rank", type=positive_int, default=None, help="LoRA rank r (enables LoRA; with "
                   f"--trainable lora only {trained} train)")
    p.add_argument("--lora-alpha", type=positive_float, default=16.0,
                   help="LoRA alpha: the update is (alpha / r) x A B")
    p.add_argument("--lora-targets", default="attn", help="comma-separated: attn (c_attn, c_proj), mlp (c_fc, "
                   "c_proj)")


# ---------------------------------------------------------------------------------------------- shared


def _begin(args: argparse.Namespace, writes: tuple[str, ...]) -> None:
    """Before the data is read: --resume's saved arguments, the argument checks, and the run folder (``writes``:
    the files the task adds beside the run's own)."""
    fill_from_saved_run(args, data_is_list=False)
    check_args(args)
    if distributed_world()[1] > 1:
        raise ValueError("fine-tunes run in one process (torchrun is for gpt2 train)")
    check_run_outputs(args, writes)


def _setup(args: argparse.Namespace, n_classes: int | None = None):
    """Device, config and initial params (with a fresh head and LoRA adapters where asked)."""
    from mapper import init_params
    from mapper.lora import LoraConfig, init_lora_params

    lora = None
    if args.lora_rank is not None:
        lora = LoraConfig(args.lora_rank, args.lora_alpha, tuple(t for t in args.lora_targets.split(",") if t))
    elif args.trainable == "lora":
        raise ValueError("--trainable lora needs --lora-rank")
    device = resolve_run_device(args)
    config, params, init = model_config(args)
    if n_classes is not None:
        config = config.replace(n_classes=n_classes)
    if args.max_length is not None:
        check_fits_context("--max-length", args.max_length, config)
    if args.init_from is None and not args.resume:
        print(f"gpt2 finetune: starting from a random initialisation ({init}), not from pretrained weights; the "
              "course fine-tunes OpenAI's weights: --init-from gpt2", file=sys.stderr)
    if not args.resume:
        if params is None:
            params = init_params(config, args.seed, args.dtype)
        elif n_classes is not None and "score.weight" not in params:  # a language model gets a new head
            rng = np.random.default_rng([args.seed, 1])
            params["score.weight"] = (0.02 * rng.standard_normal((config.n_embd, n_classes))).astype(args.dtype)
        if lora is not None:
            params = {**params, **init_lora_params(config, lora, args.seed, args.dtype)}
    return config, params, init, lora, device


def _trainable(args, config, lora) -> set[str]:
    from tasks.finetune import trainable_names

    return trainable_names(list(param_shapes(config, lora)), config.n_layer, args.trainable)


def _options(args, lora, **extra) -> dict:
    return {"trainable": args.trainable, "lora": None if lora is None else lora.to_dict(),
            "max_length": args.max_length, **extra}


def _sha256(path: str) -> str:
    import hashlib

    file = Path(path)
    if not file.is_file():
        raise ValueError(f"data file {path} does not exist")
    return hashlib.sha256(file.read_bytes()).hexdigest()


def _final_backend(args, config, lora, device):
    """The trained model of DIR's last checkpoint as a backend, for the final metrics."""
    from tasks.run_folder import CHECKPOINT, load_run

    config, params, _, _ = load_run(Path(args.out) / CHECKPOINT)
    return backend_factory(args, device, lora=lora)(config, params)


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _write_json(path: Path, value) -> None:
    from mapper.atomic import atomic_write

    atomic_write(path, lambda f: f.write((json.dumps(value, indent=2) + "\n").encode()))


# ---------------------------------------------------------------------------------------------- classify


def run_classify(args: argparse.Namespace) -> int:
    from gpt2_cli.common import load_tokenizer_for
    from tasks.classify import prepare_classification
    from tasks.finetune import ClassifyData
    from tasks.loop import RunArgs, steps_per_epoch
    from tasks.metrics import accuracy, confusion_matrix
    from tasks.order import in_order
    from tasks.plots import plot_classification

    _begin(args, ("metrics.json", "classify.png"))
    encoder = load_tokenizer_for(args.tokenizer)
    prepared = prepare_classification(args.data, encoder, args.seed, args.max_length)
    for warning in prepared.warnings:
        print(f"gpt2 finetune classify: warning: {warning}", file=sys.stderr)
    config, params, init, lora, device = _setup(args, n_classes=len(prepared.class_names))
    if prepared.length > config.n_positions:
        raise ValueError(f"the longest training text is {prepared.length} tokens, above the model's "
                         f"{config.n_positions} positions; pass --max-length")
    data = ClassifyData(prepared.train, prepared.val)
    run_args = RunArgs(**common_run_args(
        args, config, init, [args.data], _sha256(args.data), device, context=prepared.length, stride=0,
        val_fraction=0.1, sample_prompt="", sample_tokens=0, task="classify",
        options=_options(args, lora, class_names=prepared.class_names)))
    trainable = _trainable(args, config, lora)
    progress = execute("finetune classify", args, run_args, data, encoder, config, params,
                       backend_factory(args, device, trainable, lora), prepared.summary())
    if isinstance(progress, int):
        return progress
    backend = _final_backend(args, config, lora, device)
    metrics: dict = {"class_names": prepared.class_names}
    for name, split in (("train", prepared.train), ("val", prepared.val), ("test", prepared.test)):
        if len(split) == 0:
            continue
        pred = np.concatenate([backend.class_logits(ClassifyData.rows(split, idx)).argmax(-1)
                               for idx in in_order(len(split), args.batch_size)])
        metrics[f"{name}_accuracy"] = accuracy(pred, split.labels)
        metrics[f"{name}_confusion_matrix"] = confusion_matrix(pred, split.labels,
                                                               len(prepared.class_names)).tolist()
    metrics.update(steps=progress.step, train_seconds=round(progress.elapsed, 1), n_truncated=prepared.n_truncated)
    _write_json(Path(args.out) / "metrics.json", metrics)
    plot_classification(progress.history, steps_per_epoch(data, run_args), Path(args.out) / "classify.png")
    print("  ".join(f"{k.replace('_accuracy', '')} accuracy {metrics[k]:.2%}" for k in
                    ("train_accuracy", "val_accuracy", "test_accuracy") if k in metrics))
    if "test_confusion_matrix" in metrics:
        names = prepared.class_names
        print("test confusion matrix (rows: true, columns: predicted): " + "; ".join(
            f"{names[i]}: " + ", ".join(f"{names[j]} {n}" for j, n in enumerate(row))
            for i, row in enumerate(metrics["test_confusion_matrix"])))
    return 0


# ---------------------------------------------------------------------------------------------- instruct


def run_instruct(args: argparse.Namespace) -> int:
    from gpt2_cli.common import load_tokenizer_for
    from tasks.finetune import ExampleData
    from tasks.inference import instruction_responses
    from tasks.instruct import encode_examples, inference_prompt, read_instructions, split_instructions
    from tasks.loop import RunArgs

    _begin(args, ("metrics.json", "test_responses.json"))
    entries = read_instructions(args.data)
    train_idx, val_idx, test_idx = split_instructions(len(entries), args.seed)
    encoder = load_tokenizer_for(args.tokenizer)
    config, params, init, lora, device = _setup(args)
    limit = min(args.max_length or config.n_positions, config.n_positions)
    examples = encode_examples(entries, encoder)
    data = ExampleData([examples[i] for i in train_idx], [examples[i] for i in val_idx], args.mask_prompt, limit)
    n_cut = sum(len(ids) > limit for ids, _ in examples)
    run_args = RunArgs(**common_run_args(
        args, config, init, [args.data], _sha256(args.data), device, context=limit, stride=0, val_fraction=0.05,
        sample_prompt=inference_prompt(entries[val_idx[0]]) if len(val_idx) else "", sample_tokens=32,
        task="instruct", options=_options(args, lora, mask_prompt=args.mask_prompt)))
    description = (f"{len(train_idx)} train / {len(val_idx)} val / {len(test_idx)} test examples, {n_cut} longer "
                   f"than {limit} tokens truncated")
    progress = execute("finetune instruct", args, run_args, data, encoder, config, params,
                       backend_factory(args, device, _trainable(args, config, lora), lora), description)
    if isinstance(progress, int):
        return progress
    backend = _final_backend(args, config, lora, device)
    test = [entries[i] for i in test_idx][: args.test_limit]
    records, rouge = instruction_responses(backend, test, encoder, args.max_new_tokens)
    _write_json(Path(args.out) / "test_responses.json", records)
    val_loss = progress.history[-1].get("val_loss") if progress.history else None
    metrics = {"rouge_l": rouge, "val_loss": val_loss, "n_test": len(records), "steps": progress.step,
               "train_seconds": round(progress.elapsed, 1)}
    _write_json(Path(args.out) / "metrics.json", metrics)
    print(f"ROUGE-L {metrics['rouge_l']:.4f} over {len(records)} test responses, validation loss "
          f"{_number(val_loss)}; responses in {Path(args.out) / 'test_responses.json'}")
    return 0


# ---------------------------------------------------------------------------------------------- reason


def run_reason(args: argparse.Namespace) -> int:
    from gpt2_cli.common import load_tokenizer_for
    from tasks.finetune import ExampleData
    from tasks.loop import RunArgs
    from tasks.order import epoch_order
    from tasks.reason import fit_to_context, format_reason_prompt, read_reasoning

    _begin(args, ("metrics.json",))
    examples = read_reasoning(args.data)
    if len(examples) < 2:
        raise ValueError(f"{args.data}: {len(examples)} usable sample(s); need at least 2 (train and validation)")
    encoder = load_tokenizer_for(args.tokenizer)
    config, params, init, lora, device = _setup(args)
    limit = min(args.max_length or config.n_positions, config.n_positions)
    fitted, n_short, n_dropped = fit_to_context(examples, encoder, limit)
    if len(fitted) < 2:
        raise ValueError(f"only {len(fitted)} sample(s) fit in {limit} tokens ({n_dropped} dropped)")
    order = epoch_order(len(fitted), 1, 0, args.seed)
    n_val = max(1, len(fitted) // 10)
    val = [fitted[int(i[0])] for i in order[:n_val]]
    train = [fitted[int(i[0])] for i in order[n_val:]]
    data = ExampleData(train, val, args.mask_prompt, None)
    run_args = RunArgs(**common_run_args(
        args, config, init, [args.data], _sha256(args.data), device, context=limit, stride=0, val_fraction=0.1,
        sample_prompt=format_reason_prompt(examples[0].question), sample_tokens=48, task="reason",
        options=_options(args, lora, mask_prompt=args.mask_prompt)))
    description = (f"{len(examples)} samples ({len(examples.skipped_lines)} unusable lines skipped): {len(train)} "
                   f"train / {len(val)} val; {n_short} with shortened thinking, {n_dropped} dropped (context "
                   f"{limit})")
    progress = execute("finetune reason", args, run_args, data, encoder, config, params,
                       backend_factory(args, device, _trainable(args, config, lora), lora), description)
    if isinstance(progress, int):
        return progress
    val_loss = progress.history[-1].get("val_loss") if progress.history else None
    _write_json(Path(args.out) / "metrics.json", {"val_loss": val_loss, "steps": progress.step,
                                                  "train_seconds": round(progress.elapsed, 1),
                                                  "n_shortened": n_short, "n_dropped": n_dropped})
    print(f"validation loss {_number(val_loss)}; evaluate with `gpt2 eval gsm8k --weights {args.out} --data "
          "data/gsm8k/test.jsonl --limit 50`")
    return 0
