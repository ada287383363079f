"""``gpt2 classify``: label texts with a classifier trained by ``gpt2 finetune classify``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("classify", help="label texts with a fine-tuned classifier",
                       description="Print the predicted label and its probability for each text, read at the last "
                       "token of the text (no padding is involved: one text at a time). A text longer than the "
                       "model's context is cut to its first tokens, and a note says so.")
    p.add_argument("texts", nargs="+", metavar="TEXT", help="the texts to classify")
    p.add_argument("--weights", required=True, metavar="DIR", help="a gpt2 finetune classify folder")
    p.add_argument("--backend", choices=["numpy", "torch"], default="torch", help="which implementation")
    p.add_argument("--tokenizer", default=None, metavar="PATH", help="GPT-2 tokenizer files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from gpt2_cli.common import inference_backend, load_tokenizer_for
    from mapper import load_checkpoint
    from mapper.training import Batch

    config, params = load_checkpoint(args.weights)
    if config.n_classes is None:
        raise ValueError(f"{args.weights} holds a language model, not a classifier (no score.weight)")
    names = _class_names(Path(args.weights), config.n_classes)
    encoder = load_tokenizer_for(args.tokenizer)
    backend = inference_backend(args.backend, config, params, device="cpu")
    for number, text in enumerate(args.texts, start=1):
        ids = encoder.encode(text)
        if not ids:
            raise ValueError("an empty text cannot be classified")
        if len(ids) > config.n_positions:
            print(f"note: text {number} is {len(ids)} tokens long; the classifier reads its first {config.n_positions} "
                  "(the model's context)", file=sys.stderr)
            ids = ids[: config.n_positions]
        logits = backend.class_logits(Batch(np.array([ids]), lengths=np.array([len(ids)]), labels=np.zeros(1, int)))
        p = np.exp(logits[0] - logits[0].max())
        p /= p.sum()
        k = int(p.argmax())
        print(f"{names[k]}\t{p[k]:.4f}\t{text}")
    return 0


def _class_names(run_dir: Path, n: int) -> list[str]:
    """The class names saved with the run (checkpoint/state.json), else "0", "1", ..."""
    state = run_dir / "checkpoint" / "state.json"
    if state.is_file():
        names = json.loads(state.read_text())["args"].get("options", {}).get("class_names")
        if names and len(names) == n:
            return names
    return [str(i) for i in range(n)]
