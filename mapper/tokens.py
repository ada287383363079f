"""Checks on token ids, targets and generation requests: one definition that both backends call.

Every check raises ``ValueError`` with the numbers in the message; nothing is clipped silently.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mapper.config import GPT2Config

IGNORE_INDEX = -100  # a target equal to this is left out of the loss (PyTorch's cross_entropy default)


def check_length(length: int, config: GPT2Config, pos0: int = 0) -> None:
    """Raise unless positions pos0 .. pos0 + length - 1 fit the model's context (n_positions)."""
    if pos0 + length > config.n_positions:
        what = f"sequence of length {length}" if pos0 == 0 else f"positions {pos0}..{pos0 + length - 1}"
        raise ValueError(f"{what} exceeds the model's context of n_positions={config.n_positions}")


def check_fits_context(flag: str, value: int, config: GPT2Config) -> None:
    """Refuse (never silently cut) a length ``value`` given by the option ``flag`` that exceeds the context."""
    if value > config.n_positions:
        raise ValueError(f"{flag} {value} exceeds the model's context of {config.n_positions} positions")


def check_token_shape(shape: tuple[int, ...], config: GPT2Config, name: str = "tokens", pos0: int = 0) -> None:
    """Raise unless ``shape`` is a non-empty [B, T] whose T fits the context from ``pos0``."""
    if len(shape) != 2:
        raise ValueError(f"{name} must have shape [B, T], got shape {tuple(shape)}")
    if 0 in shape:
        raise ValueError(f"{name} is empty (shape {tuple(shape)})")
    check_length(shape[1], config, pos0)


def check_tokens(tokens: np.ndarray, config: GPT2Config, name: str = "tokens", pos0: int = 0) -> np.ndarray:
    """``tokens`` as an int64 [B, T] array, after checking dtype, shape, context length and id range."""
    arr = np.asarray(tokens)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be an integer array, got dtype {arr.dtype}")
    check_token_shape(arr.shape, config, name, pos0)
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= config.vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} holds id {bad}, outside the vocabulary [0, {config.vocab_size})")
    return arr.astype(np.int64, copy=False)


def check_targets(targets: np.ndarray, shape: tuple[int, ...], config: GPT2Config) -> np.ndarray:
    """Targets as int64: the ``shape`` of the tokens, each id in [0, V) or IGNORE_INDEX."""
    arr = np.asarray(targets)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"targets must be an integer array, got dtype {arr.dtype}")
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"targets have shape {tuple(arr.shape)}, tokens have shape {tuple(shape)}; they must match")
    bad = (arr != IGNORE_INDEX) & ((arr < 0) | (arr >= config.vocab_size))
    if bad.any():
        raise ValueError(
            f"targets hold id {int(arr[bad][0])}, outside the vocabulary [0, {config.vocab_size}) "
            f"and not the ignore index {IGNORE_INDEX}"
        )
    return arr.astype(np.int64, copy=False)


def check_lengths(lengths: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Per-row lengths for a classifier as int64 [B]: the number of real tokens of each row of tokens ``shape``
    [B, T] (rows right-padded), each in 1 .. T; the head reads position ``lengths - 1``."""
    arr = np.asarray(lengths)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"lengths must be an integer array, got dtype {arr.dtype}")
    B, T = shape
    if tuple(arr.shape) != (B,):
        raise ValueError(f"lengths have shape {tuple(arr.shape)}, expected ({B},): one length per row of the tokens")
    bad = (arr < 1) | (arr > T)
    if bad.any():
        raise ValueError(f"lengths hold {int(arr[bad][0])}; each row has 1 .. {T} real tokens (T = {T})")
    return arr.astype(np.int64, copy=False)


def check_labels(labels: np.ndarray, batch: int, n_classes: int) -> np.ndarray:
    """Class labels as int64 [B], each in [0, n_classes)."""
    arr = np.asarray(labels)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be an integer array, got dtype {arr.dtype}")
    if tuple(arr.shape) != (batch,):
        raise ValueError(f"labels have shape {tuple(arr.shape)}, expected ({batch},): one class per row")
    bad = (arr < 0) | (arr >= n_classes)
    if bad.any():
        raise ValueError(f"labels hold {int(arr[bad][0])}, outside the classes [0, {n_classes})")
    return arr.astype(np.int64, copy=False)


def check_generation(
    prompt_lengths: Sequence[int], max_new_tokens: int, config: GPT2Config, eos_token_id: int | None = None
) -> None:
    """Raise unless every prompt is non-empty, the longest prompt + max_new_tokens fits the context and the
    EOS id (if any) is in the vocabulary."""
    if isinstance(max_new_tokens, (bool, np.bool_)) or not isinstance(max_new_tokens, (int, np.integer)) or (
        max_new_tokens < 0
    ):
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if len(prompt_lengths) == 0:
        raise ValueError("no prompts given (a batch of size 0)")
    for b, n in enumerate(prompt_lengths):
        if n == 0:
            raise ValueError(f"prompt {b} is empty; every prompt needs at least one token")
    if eos_token_id is not None and (
        isinstance(eos_token_id, (bool, np.bool_))
        or not isinstance(eos_token_id, (int, np.integer))
        or not 0 <= eos_token_id < config.vocab_size
    ):
        raise ValueError(f"eos_token_id must be an id in [0, {config.vocab_size}), got {eos_token_id!r}")
    T, P = max(prompt_lengths), config.n_positions
    if T > P:
        raise ValueError(f"the prompt is {T} tokens long, longer than the model's context of {P} tokens")
    if T + max_new_tokens > P:
        raise ValueError(
            f"prompt length {T} + max_new_tokens {max_new_tokens} = {T + max_new_tokens} exceeds the model's "
            f"context of n_positions={P}; at most {P - T} new tokens fit after this prompt"
        )
