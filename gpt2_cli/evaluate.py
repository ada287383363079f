"""``gpt2 eval gsm8k``: exact-match accuracy of greedy answers on GSM8K, or of a predictions file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gpt2_cli.common import positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model on a benchmark (gsm8k)",
                       description="Benchmarks with a real metric.")
    benches = p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK", help="gsm8k")
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
    summary = {k: scored[k] for k in ("accuracy", "correct", "n")}
    if args.json:
        atomic_write(Path(args.json), lambda f: f.write((json.dumps(summary) + "\n").encode()))
    print(f"GSM8K exact match: {scored['correct']}/{scored['n']} = {scored['accuracy']:.2%} "
          f"({scored['n_no_answer']} responses without an <answer>; {len(data.skipped_lines)} records skipped)")
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
