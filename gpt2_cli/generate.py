"""``gpt2 generate``: stream a continuation token by token with either backend."""

from __future__ import annotations

import argparse
import sys
import time

from gpt2_cli.common import TokenStreams, add_model_args, load_tokenizer_for, non_negative_int
from mapper.models import resolve_model
from tasks.inference import decode_stream

SAMPLING_FLAGS = {"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text, streaming tokens as they come",
        description="Generate a continuation of --prompt with the NumPy spec or the torch engine (KV cache). "
        "Temperature 0 is greedy; otherwise sampling after top-k/top-p filtering, reproducible with --seed. "
        "Stops at <|endoftext|> for GPT-2-vocabulary models unless --no-eos.",
    )
    add_model_args(p, "gpt2 shape, untrained, if no --weights")
    p.add_argument("--backend", choices=["numpy", "torch"], default="torch",
                   help="which implementation (default torch)")
    p.add_argument("--attention", choices=["custom", "fused"], default=None,
                   help="torch attention layout (default fused; the numpy backend has one)")
    p.add_argument("--device", default=None, help="torch device: cpu, cuda, cuda:N, mps (default: cuda > mps > cpu)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="arithmetic (default float32)")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=non_negative_int, default=50,
                   help="at most this many new tokens, fewer if the context is full (default 50)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples (default 0)")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample only among the most likely tokens whose probabilities add up to p (0 < p <= 1)")
    p.add_argument("--seed", type=non_negative_int, default=None,
                   help="seed of the sampler and of an untrained model's init")
    p.add_argument("--no-eos", action="store_true", help="do not stop at <|endoftext|>")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="gpt2.tiktoken, vocab.bpe/encoder.json, or a folder holding them (default: "
                        "$GPT2_TOKENIZER_PATH when set, else the copy shipped with this package)")
    p.set_defaults(func=run)


def ignored_options(args: argparse.Namespace) -> list[str]:
    """Options given that change nothing in this combination, each in words (never silently dropped)."""
    lines = []
    if args.temperature == 0:
        ignored = [SAMPLING_FLAGS[k] for k in ("top_k", "top_p") if getattr(args, k) is not None]
        if ignored:
            lines.append(f"{' and '.join(ignored)} only shape sampling, and --temperature 0 decodes greedily: "
                         "ignored (give --temperature > 0 to sample)")
    if args.backend == "numpy":
        ignored = [flag for flag, value in (("--attention", args.attention), ("--device", args.device)) if value]
        if ignored:
            lines.append(f"{' and '.join(ignored)} only shape the torch engine, and --backend numpy runs the spec: "
                         "ignored")
    return lines


def run(args: argparse.Namespace) -> int:
    from mapper.sampling import validate_sampling_args
    from mapper.tokens import check_generation

    # every argument is checked before any model is built or loaded
    validate_sampling_args(args.temperature, args.top_k, args.top_p, SAMPLING_FLAGS)
    for line in ignored_options(args):
        print(f"note: {line}", file=sys.stderr)
    device = None
    if args.backend == "torch":
        import torch

        from torch_gpt2 import resolve_device

        device = resolve_device(args.device, torch.float64 if args.dtype == "float64" else torch.float32)
    enc = load_tokenizer_for(args.tokenizer)
    prompt = enc.encode(args.prompt, allowed_special="all")
    if not prompt:
        raise ValueError("--prompt is empty: give at least one character to continue")

    source = resolve_model(args.weights, args.preset, args.config, args.dtype, args.seed or 0, init=args.init)
    config, params, origin = source.config, source.params, source.description
    if max(prompt) >= config.vocab_size:
        raise ValueError(f"the prompt encodes to id {max(prompt)}, outside this model's vocabulary of "
                         f"{config.vocab_size}: the checkpoint does not use the GPT-2 tokenizer")
    if len(prompt) >= config.n_positions:
        raise ValueError(f"the prompt is {len(prompt)} tokens long; the model's context of {config.n_positions} "
                         "tokens leaves no room for a new one")
    max_new = min(args.max_new_tokens, config.n_positions - len(prompt))
    if max_new < args.max_new_tokens:
        print(f"note: {max_new} new tokens fit after the {len(prompt)}-token prompt in the context of "
              f"{config.n_positions} (--max-new-tokens {args.max_new_tokens})", file=sys.stderr)
    eos = None if args.no_eos else config.eos_token_id
    check_generation([len(prompt)], max_new, config, eos)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eos_token_id=eos,
                    seed=args.seed)
    if not args.weights:
        print(f"note: no --weights given, generating from an untrained model ({origin}): expect noise",
              file=sys.stderr)
    steps = TokenStreams(args.backend, config, params, args.attention or "fused", device)(prompt, max_new, **sampling)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    start, n = time.perf_counter(), 0

    def counting(stream):
        nonlocal n
        for ids in stream:
            n += 1
            yield ids

    for piece in decode_stream(counting(steps), enc, eos):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    elapsed = time.perf_counter() - start
    print(f"[{n} tokens in {elapsed:.2f} s, {1000 * elapsed / max(n, 1):.1f} ms/token, backend {args.backend}]",
          file=sys.stderr)
    return 0
