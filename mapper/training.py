"""What the two training backends and the loop share: the micro-batch, the weight-decay rule, the non-finite loss
check, and the process world of a distributed run. Each is defined once here and called by ``numpy_gpt2``,
``torch_gpt2`` and ``tasks``, none of which imports another.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

DECAY_RULES = ("matrices", "all")


@dataclass(frozen=True)
class Batch:
    """One micro-batch, as a task hands it to a backend. Language modelling (pretraining, instruction and reasoning
    fine-tunes) has ``targets`` (the next token at each position, ``IGNORE_INDEX`` where no loss is taken);
    classification has ``lengths`` (real tokens per row: the head reads position ``lengths - 1``) and ``labels``."""

    tokens: np.ndarray  # [B, T] int64
    targets: np.ndarray | None = None  # [B, T] int64
    lengths: np.ndarray | None = None  # [B] int64
    labels: np.ndarray | None = None  # [B] int64

    @property
    def is_classification(self) -> bool:
        return self.labels is not None


def check_decay_rule(decay: str) -> None:
    """``ValueError`` unless ``decay`` is one of ``DECAY_RULES``."""
    if decay not in DECAY_RULES:
        raise ValueError(f"decay must be one of {DECAY_RULES}, got {decay!r}")


def decays(ndim: int, decay: str) -> bool:
    """Whether AdamW's weight decay applies to a tensor of ``ndim`` dimensions under the rule ``decay``:
    "matrices" (GPT-2, nanoGPT: matrices and embeddings, never biases or LayerNorm gains) or "all" (what
    ``torch.optim.AdamW(model.parameters())`` does, as the course trains)."""
    check_decay_rule(decay)
    return decay == "all" or ndim >= 2


def check_finite_loss(loss: float) -> None:
    """Raise ``FloatingPointError`` for a NaN or infinite loss; a backend calls it before its optimizer moves."""
    if not math.isfinite(loss):
        raise FloatingPointError(f"the loss is {loss}; the optimizer step was skipped, parameters left unchanged")


def distributed_world() -> tuple[int, int]:
    """(rank, world size) of this process from torchrun's environment (``RANK``, ``WORLD_SIZE``); (0, 1) outside it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    """This process's index on its machine (torchrun's ``LOCAL_RANK``; the global rank when that is not set)."""
    return int(os.environ.get("LOCAL_RANK", distributed_world()[0]))
