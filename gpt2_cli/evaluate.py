"""``gpt2 eval gsm8k``: exact-match accuracy of greedy answers on GSM8K, or of a predictions file;
``gpt2 eval instruct``: ROUGE-L of greedy responses on the instruction test split; ``gpt2 eval loss``: a model's
train/validation loss on a text with the course's windows."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gpt2_cli.common import add_model_args, non_negative_int, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model: its loss on a text, or a benchmark (gsm8k, instruct)",
                       description="Evaluations with a real metric.")
    benches = p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK", help="loss, gsm8k or instruct")
    add_loss_parser(benches)
    i = benches.add_parser(
        "instruct", help="ROUGE-L on the instruction test split",
        description="Greedy responses to the test split of an instruction file (the split `gpt2 finetune instruct "
        "--seed S` makes: 85/10/5 of a seeded permutation) in the Alpaca template, scored by ROUGE-L against the "
        "references. Any model: --weights, or GPT-2's init (or the course's, --init course) of --preset/--config "
        "with --init-seed (the untrained baseline a fine-tune is compared with).")
    add_model_args(i, "gpt2, the 124M shape")
    i.add_argument("--data", required=True, metavar="FILE", help="instruction JSON (instruction, input, output)")
    i.add_argument("--seed", type=non_negative_int, default=123,
                   help="the split's seed, gpt2 finetune instruct's --seed (default 123)")
    i.add_argument("--init-seed", type=non_negative_int, default=123,
                   help="the seed of the init when no --weights (default 123)")
    i.add_argument("--limit", type=positive_int, default=None, help="the first N test records only")
    i.add_argument("--max-new-tokens", type=positive_int, default=256, help="tokens per response at most (default 256)")
    i.add_argument("--backend", choices=["numpy", "torch"], default="torch",
                   help="which implementation (default torch)")
    i.add_argument("--device", default=None, help="torch device (default: cuda > mps > cpu)")
    i.add_argument("--out", required=True, metavar="FILE", help="the responses and the score, as JSON")
    i.add_argument("--force", action="store_true", help="replace an existing --out file")
    i.add_argument("--tokenizer", default=None, metavar="PATH", help="GPT-2 tokenizer files")
    i.set_defaults(func=run_instruct)
    g = benches.add_parser(
        "gsm8k", help="GSM8K exact-match accuracy",
        description="Greedy answers to GSM8K questions in the reasoning format (question, <think>, <answer>); "
        "the number inside <answer> is compared by value with the reference after `####` ($30.00 equals 30). "
        "Every prediction is written as a JSON line {index, response, predicted, reference, correct} as soon as "
        "it is made (an interrupted run keeps them); --predictions scores such a file without a model. Records "
        "without a final `#### answer` line are skipped and counted. The outputs are checked writable before "
        "any model is loaded.")
    source = g.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", metavar="DIR", help="the model (e.g. a gpt2 finetune reason folder)")
    source.add_argument("--predictions", metavar="FILE", help="score these JSON lines {index, response} instead")
    g.add_argument("--data", required=True, metavar="FILE", help="GSM8K JSON lines (question, answer)")
    g.add_argument("--limit", type=positive_int, default=None, help="the first N questions only")
    g.add_argument("--backend", choices=["numpy", "torch"], default="torch", help="which implementation")
    g.add_argument("--device", default=None, help="torch device (default: cuda > mps > cpu)")
    g.add_argument("--max-new-tokens", type=positive_int, default=256, help="tokens per response at most")
    g.add_argument("--out", metavar="FILE", default=None,
                   help="where the predictions go (default: NAME-gsm8k.jsonl beside the --weights folder or file NAME)")
    g.add_argument("--json", metavar="OUT", default=None, help="write {accuracy, correct, n} here")
    g.add_argument("--force", action="store_true", help="replace an existing --out or --json file")
    g.add_argument("--tokenizer", default=None, metavar="PATH", help="GPT-2 tokenizer files")
    g.set_defaults(func=run)


def predictions_path(args: argparse.Namespace) -> Path:
    """--out, or NAME-gsm8k.jsonl beside the weights NAME (never inside an input's folder)."""
    if args.out:
        return Path(args.out)
    weights = Path(args.weights).resolve()
    name = weights.name if weights.is_dir() else weights.stem
    return weights.parent / f"{name}-gsm8k.jsonl"


def add_loss_parser(benches: argparse._SubParsersAction) -> None:
    from tasks.eval_loss import COURSE_CONTEXT, COURSE_STRIDE, COURSE_VAL_FRACTION, EVAL_BATCH

    g = benches.add_parser(
        "loss", help="train and validation loss on a text, with the course's windows",
        description="The mean next-token cross-entropy of a model on text files split into a training head and a "
        "validation tail by characters (the course's 90/10), each cut into windows of --context tokens every "
        "--stride tokens (a last partial window dropped), as chapter 5 computes it for OpenAI's weights; any "
        "checkpoint or model name works (e.g. --weights gpt2 or openai:124M on data/the-verdict.txt).")
    g.add_argument("--weights", required=True, metavar="PATH_OR_NAME",
                   help="a checkpoint in any readable format, or a model name (gpt2, owner/name, openai:124M, ...)")
    g.add_argument("--data", required=True, nargs="+", metavar="FILE", help="UTF-8 text files (joined with "
                   "<|endoftext|>)")
    g.add_argument("--context", type=positive_int, default=COURSE_CONTEXT,
                   help=f"tokens per window (default {COURSE_CONTEXT}, the course's)")
    g.add_argument("--stride", type=positive_int, default=COURSE_STRIDE,
                   help=f"tokens between window starts (default {COURSE_STRIDE})")
    g.add_argument("--val-fraction", type=float, default=COURSE_VAL_FRACTION,
                   help=f"share of the characters, at the end, that is the validation tail (default "
                        f"{COURSE_VAL_FRACTION})")
    g.add_argument("--batch-size", type=positive_int, default=EVAL_BATCH,
                   help=f"windows per forward pass (default {EVAL_BATCH}, the course's; the mean does not change)")
    g.add_argument("--backend", choices=["numpy", "torch"], default="torch",
                   help="which implementation (default torch)")
    g.add_argument("--device", default=None, help="torch device (default: cuda > mps > cpu)")
    g.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="arithmetic (default float32)")
    g.add_argument("--json", metavar="OUT", default=None, help="also write the figures here as JSON")
    g.add_argument("--force", action="store_true", help="replace an existing --json file")
    g.add_argument("--tokenizer", default=None, metavar="PATH", help="GPT-2 tokenizer files")
    g.set_defaults(func=run_loss)


def run_loss(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from gpt2_cli.common import inference_backend, load_tokenizer_for
    from mapper.atomic import atomic_write
    from mapper.models import resolve_model
    from mapper.outputs import Output, check_outputs
    from tasks.eval_loss import text_losses

    if not 0.0 <= args.val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.json:
        check_outputs([Output("--json", Path(args.json))], {"--weights": args.weights, "--data": args.data,
                                                           "--tokenizer": args.tokenizer}, force=args.force)
    encoder = load_tokenizer_for(args.tokenizer)
    source = resolve_model(args.weights, None, None, args.dtype, 0)
    backend = inference_backend(args.backend, source.config, source.params, args.device)
    result = text_losses(backend, source.config, args.data, encoder, args.context, args.stride, args.val_fraction,
                         args.batch_size)
    val = "" if result.val_loss is None else f", validation loss {result.val_loss:.4f} ({result.val_windows} windows)"
    print(f"train loss {result.train_loss:.4f} ({result.train_windows} windows of {result.context} tokens, stride "
          f"{result.stride}){val}; {source.description}")
    if args.json:
        atomic_write(Path(args.json), lambda f: f.write((json.dumps(asdict(result)) + "\n").encode()))
    return 0


def run(args: argparse.Namespace) -> int:
    from mapper.atomic import atomic_write
    from mapper.outputs import Output, check_outputs
    from tasks.reason import read_gsm8k, read_predictions, score_gsm8k

    outputs = [Output("--out", predictions_path(args))] if args.weights else []
    outputs += [Output("--json", Path(args.json))] if args.json else []
    check_outputs(outputs, {"--weights": args.weights, "--data": args.data, "--predictions": args.predictions,
                            "--tokenizer": args.tokenizer}, force=args.force)
    data = read_gsm8k(args.data, strict=False)
    if data.skipped_lines:
        lines = ", ".join(map(str, data.skipped_lines[:5])) + (" ..." if len(data.skipped_lines) > 5 else "")
        print(f"note: {args.data}: {len(data.skipped_lines)} record(s) without a final '#### answer' line skipped "
              f"(line {lines})", file=sys.stderr)
    if args.limit:
        data = type(data)(list(data)[: args.limit], data.skipped_lines)
    if args.predictions:
        predictions = read_predictions(args.predictions)
        if args.limit:
            keep = {e.index for e in data}
            predictions = [p for p in predictions if p["index"] in keep]
    else:
        predictions = predict(args, data, outputs[0].path)
    scored = score_gsm8k(predictions, data)
    summary = {k: scored[k] for k in ("accuracy", "correct", "n", "parse_rate")}
    if args.json:
        atomic_write(Path(args.json), lambda f: f.write((json.dumps(summary) + "\n").encode()))
    print(f"GSM8K exact match: {scored['correct']}/{scored['n']} = {scored['accuracy']:.2%} "
          f"({scored['n_no_answer']} responses without an <answer>; {scored['parse_rate']:.0%} of the answers hold a "
          f"number; {len(data.skipped_lines)} records skipped)")
    return 0


def predict(args: argparse.Namespace, data, out: Path) -> list[dict]:
    """Greedy responses of the model in --weights to each question, stopping at EOS; each one is scored and
    appended to ``out`` as a JSON line the moment it is made."""
    from gpt2_cli.common import inference_backend, load_tokenizer_for
    from mapper import load_checkpoint
    from tasks.inference import greedy_all
    from tasks.reason import format_reason_prompt, score_gsm8k

    config, params = load_checkpoint(args.weights)
    encoder = load_tokenizer_for(args.tokenizer)
    backend = inference_backend(args.backend, config, params, args.device)
    prompts = [encoder.encode(format_reason_prompt(e.question)) for e in data]
    predictions: list[dict] = []
    with open(out, "w", encoding="utf-8") as f:
        print(f"predictions go to {out} as they are made", file=sys.stderr)

        def record(i: int, text: str) -> None:
            prediction = {"index": data[i].index, "response": "<think>\n" + text}
            result = score_gsm8k([prediction], [data[i]])["results"][0]
            f.write(json.dumps({**prediction, **result}) + "\n")
            f.flush()
            predictions.append(prediction)

        greedy_all(backend, prompts, args.max_new_tokens, encoder, "gsm8k", on_response=record)
    return predictions


def run_instruct(args: argparse.Namespace) -> int:
    from gpt2_cli.common import inference_backend, load_tokenizer_for
    from mapper.atomic import atomic_write
    from mapper.models import resolve_model
    from mapper.outputs import Output, check_outputs
    from tasks.inference import instruction_responses
    from tasks.instruct import read_instructions, split_instructions

    out = Path(args.out)
    config_file = args.config if args.config and Path(args.config).is_file() else None
    check_outputs([Output("--out", out)], {"--weights": args.weights, "--data": args.data, "--config": config_file,
                                           "--tokenizer": args.tokenizer}, force=args.force)
    entries = read_instructions(args.data)
    _, _, test_idx = split_instructions(len(entries), args.seed)
    test = [entries[i] for i in test_idx][: args.limit]
    encoder = load_tokenizer_for(args.tokenizer)
    source = resolve_model(args.weights, args.preset, args.config, "float32", args.init_seed, init=args.init)
    backend = inference_backend(args.backend, source.config, source.params, args.device)
    records, rouge = instruction_responses(backend, test, encoder, args.max_new_tokens)
    result = {"model": source.description, "rouge_l": rouge, "n_test": len(records), "responses": records}
    atomic_write(out, lambda f: f.write((json.dumps(result, indent=2) + "\n").encode()))
    print(f"ROUGE-L {rouge:.4f} over {len(records)} test responses of {source.description}; responses in {out}")
    return 0
