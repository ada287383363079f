"""``gpt2 chat``: talk to an instruction or reasoning fine-tune in the prompt template it was trained with."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gpt2_cli.common import TokenStreams, load_tokenizer_for, non_negative_int, positive_int

SAMPLING_FLAGS = {"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    from tasks.inference import TEMPLATES

    p = sub.add_parser(
        "chat", help="talk to a fine-tuned model in its own prompt template",
        description="Wrap your text in the prompt template the model was fine-tuned with (the Alpaca instruction "
        "template of `gpt2 finetune instruct`, or the question -> <think> template of `gpt2 finetune reason`, read "
        "from DIR's run state unless --template says), stream the answer and stop at <|endoftext|>. With "
        "--prompt: one answer. Otherwise, at a terminal: a loop (Ctrl-D to leave); from a pipe: one answer per "
        "line of input. The reasoning template prints the thinking and the answer apart.")
    p.add_argument("weights", metavar="DIR", help="a gpt2 finetune instruct|reason folder, or any checkpoint with "
                   "--template")
    p.add_argument("--prompt", default=None, help="one instruction or question, answered once")
    p.add_argument("--input", default=None, help="the instruction's input (Alpaca's '### Input:' block)")
    p.add_argument("--template", choices=TEMPLATES, default=None,
                   help="the prompt template (default: the fine-tune's own, from DIR's checkpoint/state.json)")
    p.add_argument("--max-new-tokens", type=positive_int, default=256, help="tokens per answer at most (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample only among the most likely tokens whose "
                   "probabilities add up to p")
    p.add_argument("--seed", type=non_negative_int, default=None, help="seed of the sampler")
    p.add_argument("--backend", choices=["numpy", "torch"], default="torch",
                   help="which implementation (default torch)")
    p.add_argument("--device", default=None, help="torch device (default: cuda > mps > cpu)")
    p.add_argument("--tokenizer", default=None, metavar="PATH", help="GPT-2 tokenizer files")
    p.set_defaults(func=run)


def run_template(weights: Path) -> str | None:
    """The template of the fine-tune whose run folder (or checkpoint folder) is ``weights``, else None."""
    from tasks.inference import TASK_TEMPLATES
    from tasks.run_folder import existing_run, read_state

    checkpoint = existing_run(weights) or (weights if (weights / "state.json").is_file() else None)
    if checkpoint is None:
        return None
    return TASK_TEMPLATES.get(read_state(checkpoint)["args"].get("task"))


def run(args: argparse.Namespace) -> int:
    from mapper import load_checkpoint
    from mapper.sampling import validate_sampling_args

    validate_sampling_args(args.temperature, args.top_k, args.top_p, SAMPLING_FLAGS)
    template = args.template or run_template(Path(args.weights))
    if template is None:
        raise ValueError(f"{args.weights} is not a `gpt2 finetune instruct|reason` run (no run state naming its "
                         "task); pass --template alpaca or --template reason")
    if template == "reason" and args.input:
        raise ValueError("--input belongs to the alpaca template; the reason template takes a question only")
    encoder = load_tokenizer_for(args.tokenizer)
    config, params = load_checkpoint(args.weights)
    if config.eos_token_id is None:
        raise ValueError(f"{args.weights} does not use GPT-2's vocabulary ({config.vocab_size} ids): chat needs its "
                         "<|endoftext|> to end an answer")
    device = None
    if args.backend == "torch":
        from torch_gpt2 import resolve_device

        device = resolve_device(args.device)
    streams = TokenStreams(args.backend, config, params, device=device)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                    eos_token_id=config.eos_token_id)

    def answer(text: str) -> None:
        answer_one(text, template, args, streams, encoder, config, sampling)

    if args.prompt is not None:
        answer(args.prompt)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"gpt2 chat: {args.weights} ({template} template); Ctrl-D to leave", file=sys.stderr)
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not interactive and not line:
            return 0
        if line.strip():
            answer(line.rstrip("\n"))


def answer_one(text: str, template: str, args: argparse.Namespace, streams: TokenStreams, encoder, config,
               sampling: dict) -> None:
    """Stream the model's answer to ``text`` to stdout (the reasoning template: thinking and answer apart)."""
    from mapper.sampling import new_token_budget
    from tasks.inference import decode_stream, template_prompt
    from tasks.reason import ReasoningSections

    prompt = encoder.encode(template_prompt(template, text, args.input), allowed_special=set())
    budget = new_token_budget(len(prompt), args.max_new_tokens, config)
    if budget == 0:
        raise ValueError(f"the prompt is {len(prompt)} tokens in the template; the model's context of "
                         f"{config.n_positions} leaves no room for an answer")
    pieces = decode_stream(streams(prompt, budget, **sampling), encoder, config.eos_token_id)
    if template == "reason":
        sections = ReasoningSections()
        shown = None
        for piece in pieces:
            for section, part in sections.feed(piece):
                if section != shown:
                    sys.stdout.write(("\n" if shown else "") + f"{section}: ")
                    part, shown = part.lstrip(), section
                sys.stdout.write(part)
                sys.stdout.flush()
        for _, part in sections.close():
            sys.stdout.write(part)
        sys.stdout.write("\n")
    else:
        first = True
        for piece in pieces:
            if first:
                piece, first = piece.lstrip(), not piece.strip()
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    sys.stdout.flush()
