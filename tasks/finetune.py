"""The fine-tunes' data as ``tasks.loop.Dataset``s, so they train through the one loop ``gpt2 train`` uses.

* :class:`ExampleData` (instruction and reasoning fine-tunes): (token ids, prompt length) examples, batched by
  ``tasks.instruct.collate`` (EOS appended, padding targets ignored, the prompt's targets ignored with
  ``mask_prompt``); each batch is as long as its longest example.
* :class:`ClassifyData` (spam classification): the rows of ``tasks.classify``'s padded splits with their
  lengths (the head reads the last non-padding token) and labels.

Which parameters a fine-tune trains is decided here too (:func:`trainable_names`), by canonical name, so both
backends freeze the same tensors.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from mapper.training import Batch
from tasks.classify import Split
from tasks.instruct import collate
from tasks.order import epoch_order, in_order

TRAINABLE = ("last-block", "all", "lora")


class _TrainVal:
    """Ordering shared by the fine-tune data sets: ``self.train`` and ``self.val`` support ``len``."""

    @property
    def n_train(self) -> int:
        return len(self.train)

    def train_batches(self, batch_size: int, epoch: int, seed: int) -> list[np.ndarray]:
        return epoch_order(len(self.train), batch_size, epoch, seed)

    def val_batches(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
        return in_order(len(self.val), batch_size, limit)

    def save_cache(self) -> None:
        """Nothing is cached: these data sets tokenize in a second."""


@dataclass(frozen=True)
class ExampleData(_TrainVal):
    """Training and validation examples of a language-modelling fine-tune."""

    train: Sequence[tuple[list[int], int]]
    val: Sequence[tuple[list[int], int]]
    mask_prompt: bool
    max_length: int | None = None

    def _batch(self, examples: Sequence[tuple[list[int], int]], indices: np.ndarray) -> Batch:
        inputs, targets = collate([examples[i] for i in indices], mask_prompt=self.mask_prompt,
                                  max_length=self.max_length)
        return Batch(inputs, targets)

    def train_batch(self, indices: np.ndarray) -> Batch:
        return self._batch(self.train, indices)

    def val_batch(self, indices: np.ndarray) -> Batch:
        return self._batch(self.val, indices)


@dataclass(frozen=True)
class ClassifyData(_TrainVal):
    """Training and validation rows of a classification fine-tune (``tasks.classify.Split``s)."""

    train: Split
    val: Split

    @staticmethod
    def rows(split: Split, indices: np.ndarray) -> Batch:
        """The rows ``indices`` of a split, cut to their longest real length (padding beyond it changes nothing)."""
        lengths = split.lengths[indices]
        width = int(lengths.max())
        return Batch(split.tokens[indices, :width], lengths=lengths, labels=split.labels[indices])

    def train_batch(self, indices: np.ndarray) -> Batch:
        return self.rows(self.train, indices)

    def val_batch(self, indices: np.ndarray) -> Batch:
        return self.rows(self.val, indices)


def trainable_names(names: Sequence[str], n_layer: int, mode: str) -> set[str]:
    """The canonical parameters a fine-tune updates.

    ``all``: every one. ``last-block``: the last transformer block, the final LayerNorm and the head(s) that are
    not tied to the embedding (``score.weight``, an untied ``lm_head.weight``), as the course's chapter 6 does.
    ``lora``: the adapters (``*.lora_A``, ``*.lora_B``) and ``score.weight``; the base weights stay frozen.
    """
    if mode not in TRAINABLE:
        raise ValueError(f"--trainable must be one of {TRAINABLE}, got {mode!r}")
    heads = {"score.weight", "lm_head.weight"}
    if mode == "all":
        return set(names)
    if mode == "lora":
        chosen = {n for n in names if n.endswith((".lora_A", ".lora_B")) or n == "score.weight"}
        if not any(n.endswith(".lora_A") for n in chosen):
            raise ValueError("--trainable lora needs LoRA adapters (--lora-rank)")
        return chosen
    last = f"h.{n_layer - 1}."
    return {n for n in names if n.startswith(last) or n.startswith("ln_f.") or n in heads}
