"""Central finite differences against the hand-written backward (float64).

For a parameter entry p_i the numerical derivative is the fourth-order central difference

    dL/dp_i ~ (L(p_i - 2h) - 8 L(p_i - h) + 8 L(p_i + h) - L(p_i + 2h)) / 12h

with O(h^4) truncation and O(eps_machine / h) rounding error; h = 1e-4 keeps both near 1e-12 in float64.
(The two-point (L(p+h) - L(p-h)) / 2h has O(h^2) truncation, which tiny models with strongly curved
LayerNorms - n_embd = 2 - push past 1e-6.)

The error reported for a tensor is

    max_i |analytic_i - numeric_i| / max(max_i |analytic_i|, max_i |numeric_i|, floor)

over the checked entries: the worst deviation relative to the tensor's gradient scale (a plain
per-entry ratio blows up on entries that are zero up to rounding). ``floor`` = 1e-4 because rounding
alone puts ~|L| * 1e-16 / h ~ 1e-12 |L| of noise on every numerical derivative, more on the strongly
curved tiny models the tests draw: a tensor whose gradients are all below 1e-4 is compared absolutely,
at 1e-4 times the tolerance (1e-10 for a relative tolerance of 1e-6).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mapper.config import GPT2Config
from numpy_gpt2.model import loss, loss_and_grads

GRADIENT_FLOOR = 1e-4


def relative_error(analytic: np.ndarray, numeric: np.ndarray, floor: float = GRADIENT_FLOOR) -> float:
    """max |a - n| / max(max |a|, max |n|, floor) over all entries."""
    scale = max(float(np.abs(analytic).max(initial=0.0)), float(np.abs(numeric).max(initial=0.0)), floor)
    return float(np.abs(analytic - numeric).max(initial=0.0)) / scale


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
) -> dict[str, float]:
    """Relative error (module docstring) of ``loss_and_grads``' gradient, per parameter tensor.

    ``params`` must be float64. ``entries_per_tensor`` random entries are checked per tensor, plus
    the entry with the largest analytic gradient; None checks every entry.
    """
    for name, p in params.items():
        if p.dtype != np.float64:
            raise ValueError(f"gradient checks need float64 parameters; {name!r} is {p.dtype}")
    params = {k: np.ascontiguousarray(v).copy() for k, v in params.items()}  # perturbed in place below
    _, grads = loss_and_grads(params, config, tokens, targets)
    rng = np.random.default_rng(seed)

    def f() -> float:
        return loss(params, config, tokens, targets)

    errors = {}
    for name, p in params.items():
        g = grads[name].reshape(-1)
        if entries_per_tensor is None or entries_per_tensor >= p.size:
            idx = np.arange(p.size)
        else:
            idx = np.unique(np.append(rng.choice(p.size, entries_per_tensor, replace=False), np.argmax(np.abs(g))))
        errors[name] = relative_error(g[idx], numeric_gradient(f, p, idx, h))
    return errors
