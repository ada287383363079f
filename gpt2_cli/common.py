"""What several commands share: the parser (one-line errors, one help formatter, the options a command line
gave), model arguments, loading a model, the tokenizer, argument checks."""

from __future__ import annotations

import argparse
import math

import numpy as np

from mapper.config import INITS, PRESETS, GPT2Config, check_dropout
from mapper.errors import TokenizerError

# The default shape of commands that work on small models (gradcheck).
TINY_DEFAULT = dict(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4)


def add_model_args(parser: argparse.ArgumentParser, default_desc: str, weights: bool = True,
                   dropout: bool = False) -> None:
    """--weights / --preset / --config / --init (and --dropout for commands that train or compare training)."""
    if weights:
        parser.add_argument("--weights", metavar="PATH_OR_NAME",
                            help="a checkpoint file or folder in any format `gpt2 convert` reads, or a model name: "
                                 "gpt2, gpt2-medium, gpt2-large, gpt2-xl, owner/name[@revision] (Hugging Face Hub), "
                                 "openai:124M|355M|774M|1558M (OpenAI's files); fetched once, then from the cache")
    parser.add_argument("--preset", choices=list(PRESETS), help=f"a GPT-2 size, random init (default: {default_desc})")
    parser.add_argument("--config", metavar="SPEC",
                        help="a config JSON file (Hugging Face config.json or this project's fields), or overrides "
                             "such as 'n_layer=2,n_embd=64' applied to the preset or default")
    parser.add_argument("--init", choices=list(INITS), default=None,
                        help="how a fresh model is drawn: gpt2 (GPT-2's initialisation; the default) or course (the "
                             "book's GPTModel: PyTorch's default initialisation, an untied head without bias, no "
                             "q/k/v bias, dropout 0.1; 163,009,536 parameters in the 124M shape)")
    if dropout:
        parser.add_argument("--dropout", type=probability, default=None, metavar="P",
                            help="dropout probability while training, after the embeddings, on the attention "
                                 "weights and on both residual branches (default: 0.1 with --init course, else 0; "
                                 "a checkpoint's own pdrop fields are not used)")


class HelpFormatter(argparse.HelpFormatter):
    """Every command's ``--help``: an option's default is shown once, and only where it is a value the option
    takes: not on required options, on-off flags, options without a default, or help that states its own."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (action.option_strings and not action.required and default is not None and default is not argparse.SUPPRESS
                and not isinstance(default, bool) and "default" not in text):
            text += " (default: %(default)s)"
        return text


class _RecordsGiven:
    """Mixed into argparse's actions: an option the command line gives is added to ``namespace.given``, so that
    ``--resume`` can tell a value the user chose from a default."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        super().__call__(parser, namespace, values, option_string)
        namespace.given = {*namespace.given, self.dest}


_TRACKED_ACTIONS = {
    name: type(f"Recorded{base.__name__}", (_RecordsGiven, base), {})
    for name, base in (("store", argparse._StoreAction), ("store_true", argparse._StoreTrueAction),
                       ("store_false", argparse._StoreFalseAction), ("store_const", argparse._StoreConstAction),
                       ("append", argparse._AppendAction))
}


class Parser(argparse.ArgumentParser):
    """The ``gpt2`` parser and (as argparse makes them with the parent's class) every command's: a bad argument is
    one line, ``gpt2 CMD: error: ...`` (exit 2); help goes through :class:`HelpFormatter`; ``namespace.given``
    holds the destinations of the options given on the command line."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        for name, action in _TRACKED_ACTIONS.items():
            self.register("action", name, action)
        self.register("action", None, _TRACKED_ACTIONS["store"])
        self.set_defaults(given=frozenset())

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def probability(text: str) -> float:
    """argparse type: a dropout probability in [0, 1)."""
    try:
        value = float(text)
        check_dropout("dropout", value)
    except ValueError:  # float() or check_dropout (a ConfigError is a ValueError)
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}") from None
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (a seed, a count)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0 (refuses nan and inf)."""
    value = float(text)
    if not (math.isfinite(value) and value >= 0.0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = float(text)
    if not (math.isfinite(value) and value > 0.0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1)."""
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def inference_backend(backend: str, config: GPT2Config, params: dict[str, np.ndarray], device: str | None = None):
    """A backend of the loop's interface (losses, class logits, greedy decoding) that cannot train, computing in the
    parameters' dtype."""
    if backend == "numpy":
        from numpy_gpt2.backend import NumpyBackend

        return NumpyBackend.for_inference(config, params)
    from torch_gpt2 import resolve_device
    from torch_gpt2.backend import TorchBackend

    dtype = str(next(iter(params.values())).dtype)
    return TorchBackend.for_inference(config, params, device=str(resolve_device(device)), dtype=dtype)


def load_tokenizer_for(flag_value: str | None):
    """The GPT-2 tokenizer, with errors that name the ``--tokenizer`` flag."""
    from mapper import load_tokenizer

    try:
        return load_tokenizer(flag_value)
    except TokenizerError as e:
        if flag_value:
            raise TokenizerError(f"--tokenizer {flag_value}: {e}") from None
        raise TokenizerError(f"{e}; pass --tokenizer PATH") from None


class TokenStreams:
    """One model, built once, that streams the next ids of a one-row prompt with the shared sampling rules:
    ``streams(prompt_ids, max_new_tokens, temperature=..., top_k=..., top_p=..., eos_token_id=..., seed=...)``
    yields an id array [1] per step (``gpt2 generate``, ``gpt2 chat``)."""

    def __init__(self, backend: str, config: GPT2Config, params: dict[str, np.ndarray], attention: str = "fused",
                 device=None) -> None:
        self.backend, self.config, self.params = backend, config, params
        self.model = None
        if backend == "torch":
            from torch_gpt2 import GPT2

            self.model = GPT2.from_params(params, config, attention, device=device)

    def __call__(self, prompt: list[int], max_new_tokens: int, **sampling):
        if self.model is None:
            import numpy_gpt2

            return numpy_gpt2.generate_stream(self.params, self.config, np.array([prompt]), max_new_tokens,
                                              fast=True, **sampling)
        from torch_gpt2 import generate_stream

        return generate_stream(self.model, [prompt], max_new_tokens, **sampling)
