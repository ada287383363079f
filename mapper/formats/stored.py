"""A tensor of a checkpoint, not yet read."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Stored:
    """One tensor in a checkpoint, not yet read: its stored shape and how to read it."""

    key: str  # the name in the file, for messages
    shape: tuple[int, ...]
    read: Callable[[], np.ndarray]  # -> writable C-contiguous float32/float64 array of ``shape``
