"""The loss of any model on a text, with the course's windows: the check chapter 5 makes of OpenAI's weights.

The text is split 90/10 by characters, each part tokenized on its own and cut into windows of 256 tokens every
256 (``tasks.text``, as ``gpt2 train`` prepares data), and each part's loss is the mean cross-entropy of every
next-token prediction over all its full windows. Every window holds the same number of tokens, so this is the
mean of the course's batch losses (``calc_loss_loader``, batches of 2) whenever its batches are full, as they are
on *The Verdict* (18 training windows, 2 validation windows); the order of the windows does not matter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mapper.config import GPT2Config
from mapper.training import Batch
from tasks.order import in_order
from tasks.text import Windows, prepare

COURSE_CONTEXT = 256
COURSE_STRIDE = 256
COURSE_VAL_FRACTION = 0.1
EVAL_BATCH = 2  # windows per forward pass, the course's batch size (the mean does not depend on it)


@dataclass(frozen=True)
class TextLosses:
    """The mean loss over the training head's and the validation tail's windows, and how many windows each had."""

    train_loss: float
    val_loss: float | None  # None with val_fraction 0
    train_windows: int
    val_windows: int
    context: int
    stride: int


def text_losses(backend, config: GPT2Config, paths: Sequence[str | Path], encoder, context: int = COURSE_CONTEXT,
                stride: int = COURSE_STRIDE, val_fraction: float = COURSE_VAL_FRACTION,
                batch_size: int = EVAL_BATCH) -> TextLosses:
    """Train and validation loss of ``backend`` (anything with the loop's ``loss(Batch)``) on the files ``paths``,
    split, tokenized by ``encoder`` and windowed as the module docstring says. ``ValueError`` naming the flag when
    the context exceeds the model's, a part holds no window, or the text encodes outside the vocabulary."""
    if context > config.n_positions:
        raise ValueError(f"--context {context} is longer than the model's context of {config.n_positions} positions")
    data = prepare(paths, encoder, context, stride, val_fraction, batch_size)
    largest = max(int(data.train.ids.max()), int(data.val.ids.max()) if len(data.val.ids) else 0)
    if largest >= config.vocab_size:
        raise ValueError(f"the text encodes to token id {largest}, outside the model's vocabulary of "
                         f"{config.vocab_size}: the model does not use this tokenizer")
    val = _mean_loss(backend, data.val, batch_size) if val_fraction > 0 else None
    return TextLosses(_mean_loss(backend, data.train, batch_size), val, len(data.train), len(data.val), context,
                      stride)


def _mean_loss(backend, windows: Windows, batch_size: int) -> float:
    """Mean over every prediction of every window: each batch's mean weighted by its number of windows."""
    total = 0.0
    for indices in in_order(len(windows), batch_size):
        tokens, targets = windows.batch(indices)
        total += backend.loss(Batch(tokens, targets)) * len(indices)
    return total / len(windows)
