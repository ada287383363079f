"""What several commands share: model arguments, loading a model, the tokenizer, argument checks."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from mapper.config import PRESETS, GPT2Config
from mapper.errors import TokenizerError

# The default shape of commands that work on small models (gradcheck).
TINY_DEFAULT = dict(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4)


def add_model_args(parser: argparse.ArgumentParser, default_desc: str, weights: bool = True) -> None:
    """--weights / --preset / --config."""
    if weights:
        parser.add_argument("--weights", metavar="PATH_OR_NAME",
                            help="a checkpoint file or folder in any format `gpt2 convert` reads, or a model name: "
                                 "gpt2, gpt2-medium, gpt2-large, gpt2-xl, owner/name[@revision] (Hugging Face Hub), "
                                 "openai:124M|355M|774M|1558M (OpenAI's files); fetched once, then from the cache")
    parser.add_argument("--preset", choices=list(PRESETS), help=f"a GPT-2 size, random init (default: {default_desc})")
    parser.add_argument("--config", metavar="SPEC",
                        help="a config JSON file (Hugging Face config.json or this project's fields), or overrides "
                             "such as 'n_layer=2,n_embd=64' applied to the preset or default")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
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


def same_path(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name the same file or folder (after resolving links and '..')."""
    return Path(a).resolve() == Path(b).resolve()


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
