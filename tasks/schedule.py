"""The learning-rate schedules, one definition for both backends."""

from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine")


def lr_at(step: int, max_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Learning rate of 0-based ``step``: linear warm-up, then cosine decay to ``min_lr`` at ``total_steps``.

    warm-up (step < W):      max_lr * (step + 1) / W
    decay (W <= step < N):   min_lr + (max_lr - min_lr) * (1 + cos(pi * (step - W) / (N - W))) / 2
    after (step >= N):       min_lr
    """
    if warmup_steps < 0 or total_steps < 0 or step < 0:
        raise ValueError(f"step {step}, warmup_steps {warmup_steps} and total_steps {total_steps} must be >= 0")
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)  # in [0, 1)
    return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def schedule_lr(schedule: str, step: int, lr: float, warmup_steps: int, total_steps: int, min_lr: float) -> float:
    """``constant``: ``lr`` after a linear warm-up (none by default, as the course trains); ``cosine``: warm-up,
    then cosine to ``min_lr`` at the last planned step."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "cosine":
        return lr_at(step, lr, warmup_steps, total_steps, min_lr)
    return lr * (step + 1) / warmup_steps if step < warmup_steps else lr
