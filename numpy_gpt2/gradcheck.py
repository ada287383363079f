"""Central finite differences against the hand-written backward (float64).

For a parameter entry p_i the numerical derivative is the fourth-order central difference

    dL/dp_i ~ (L(p_i - 2h) - 8 L(p_i - h) + 8 L(p_i + h) - L(p_i + 2h)) / 12h

with O(h^4) truncation and O(eps_machine / h) rounding error; h = 1e-4 keeps both near 1e-12 in float64.
(The two-point (L(p+h) - L(p-h)) / 2h has O(h^2) truncation, which tiny models with strongly curved
LayerNorms - n_embd = 2 - push past 1e-6.)

The error reported for a tensor is ``mapper.parity.scaled_error`` over the checked entries,

    max_i |analytic_i - numeric_i| / max(max_i |analytic_i|, max_i |numeric_i|, floor)

with the floor of ``mapper.parity.FINITE_DIFFERENCES`` (1e-4: rounding alone puts ~1e-12 |L| of noise on every
numerical derivative, so a tensor whose gradients are all below 1e-4 is compared absolutely).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mapper.config import GPT2Config
from mapper.dropout import DropoutMasks
from mapper.parity import FINITE_DIFFERENCES, scaled_error
from numpy_gpt2.model import loss, loss_and_grads


def numeric_gradient(f: Callable[[], float], x: np.ndarray, indices: np.ndarray, h: float = 1e-4) -> np.ndarray:
    """Fourth-order central differences of the scalar ``f()`` w.r.t. ``x.flat[indices]`` (x perturbed in place)."""
    flat = x.reshape(-1)  # a view: x must be contiguous
    out = np.empty(len(indices), dtype=np.float64)

    def f_at(i: int, value: float) -> float:
        flat[i] = value
        return f()

    for j, i in enumerate(indices):
        orig = flat[i]
        minus2, minus1, plus1, plus2 = (f_at(i, orig + k * h) for k in (-2, -1, 1, 2))
        out[j] = (minus2 - 8 * minus1 + 8 * plus1 - plus2) / (12 * h)
        flat[i] = orig
    return out


def check_model_gradients(
    params: dict[str, np.ndarray],
    config: GPT2Config,
    tokens: np.ndarray,
    targets: np.ndarray,
    entries_per_tensor: int | None = 6,
    seed: int = 0,
    h: float = 1e-4,
    dropout_masks: DropoutMasks | None = None,
) -> dict[str, float]:
    """Relative error (module docstring) of ``loss_and_grads``' gradient, per parameter tensor.

    ``params`` must be float64. ``entries_per_tensor`` random entries are checked per tensor, plus
    the entry with the largest analytic gradient; None checks every entry. ``dropout_masks``: one fixed set of
    keep-masks for the analytic gradient and every evaluation of the loss (dropout is then a fixed linear map).
    """
    for name, p in params.items():
        if p.dtype != np.float64:
            raise ValueError(f"gradient checks need float64 parameters; {name!r} is {p.dtype}")
    params = {k: np.ascontiguousarray(v).copy() for k, v in params.items()}  # perturbed in place below
    _, grads = loss_and_grads(params, config, tokens, targets, dropout_masks=dropout_masks)
    rng = np.random.default_rng(seed)

    def f() -> float:
        return loss(params, config, tokens, targets, dropout_masks=dropout_masks)

    errors = {}
    for name, p in params.items():
        g = grads[name].reshape(-1)
        if entries_per_tensor is None or entries_per_tensor >= p.size:
            idx = np.arange(p.size)
        else:
            idx = np.unique(np.append(rng.choice(p.size, entries_per_tensor, replace=False), np.argmax(np.abs(g))))
        errors[name] = scaled_error(g[idx], numeric_gradient(f, p, idx, h), FINITE_DIFFERENCES.floor)
    return errors
