"""The order in which a task's examples are visited: seeded epochs for training, in order for evaluation."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def epoch_order(n: int, batch_size: int, epoch: int, seed: int) -> list[np.ndarray]:
    """Epoch ``epoch``'s batches of indices 0..n-1: a permutation seeded by (seed, epoch), cut into ``batch_size``
    rows; an incomplete last batch is dropped (the course's ``shuffle=True, drop_last=True``). Depending only on
    (seed, epoch) is what lets a resumed run see exactly the batches the uninterrupted run saw."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(n // batch_size)]


def in_order(n: int, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
    """Indices 0..n-1 in order, ``batch_size`` at a time (the last batch may be smaller), at most ``limit``."""
    for i, start in enumerate(range(0, n, batch_size)):
        if limit is not None and i >= limit:
            return
        yield np.arange(start, min(start + batch_size, n))
