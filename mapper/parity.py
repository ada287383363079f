"""What "the two implementations agree" means: the comparisons and their tolerances, in one place.

``gpt2 parity``, the parity tests, the finite-difference checks and the benchmarks all compare through this
module, so a tolerance is stated once, next to the measurement that justifies it.

Two kinds of comparison:

* elementwise, for logits and the loss: every ``|got - ref| <= atol + rtol * |ref|``;
* scaled, for gradients: ``max|got - ref| / max(max|got|, max|ref|, floor) <= rtol``, the worst deviation
  measured on the tensor's own scale. A plain per-entry ratio would blow up on entries that are zero up to
  rounding; the ``floor`` makes a tensor whose gradients are all tiny compare absolutely (at floor * rtol),
  because rounding error follows the size of the terms a gradient sums, not the size of the sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np


def max_abs_diff(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| in float64 (0 for empty arrays)."""
    return float(np.abs(np.asarray(got, np.float64) - np.asarray(ref, np.float64)).max(initial=0.0))


def scaled_error(got: np.ndarray, ref: np.ndarray, floor: float = 0.0) -> float:
    """max |got - ref| / max(max|got|, max|ref|, floor); 0 when both are exactly zero everywhere."""
    diff = max_abs_diff(got, ref)
    scale = max(float(np.abs(got).max(initial=0.0)), float(np.abs(ref).max(initial=0.0)), floor)
    if scale == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / scale


@dataclass(frozen=True)
class Tolerance:
    """How close ``got`` must be to ``ref`` (see the module docstring for the two kinds)."""

    atol: float = 0.0
    rtol: float = 0.0
    scaled: bool = False
    floor: float = 0.0

    def allows(self, got: np.ndarray, ref: np.ndarray) -> bool:
        if self.scaled:
            return scaled_error(got, ref, self.floor) <= self.rtol
        got64, ref64 = np.asarray(got, np.float64), np.asarray(ref, np.float64)
        return bool(np.all(np.abs(got64 - ref64) <= self.atol + self.rtol * np.abs(ref64)))

    def describe(self) -> str:
        if self.scaled:
            return f"rel {self.rtol:.0e}"
        return f"abs {self.atol:.0e}" if self.rtol == 0 else f"{self.atol:.0e}+{self.rtol:.0e}|ref|"


@dataclass(frozen=True)
class ParityTolerances:
    """The tolerances of one comparison of two whole models: logits, loss, every gradient."""

    logits: Tolerance
    loss: Tolerance
    grads: Tolerance


# GPT-2-shaped models at GPT-2's initialisation (``gpt2 parity``).
# float64: the same math up to rounding; measured ~1e-14 on logits and gradients on the 124M shape.
# float32: measured on the 124M shape (B=2..4, T=64..128, three seeds): logits |d| <= 3.7e-6 with |logits| ~ 3,
# loss |d| <= 9.5e-7, gradients <= 1.3e-6 relative; the limits leave a 5-10x margin.
TOLERANCES: dict[str, ParityTolerances] = {
    "float64": ParityTolerances(Tolerance(atol=1e-10), Tolerance(atol=1e-12), Tolerance(rtol=1e-9, scaled=True)),
    "float32": ParityTolerances(
        Tolerance(atol=2e-5, rtol=1e-5), Tolerance(atol=1e-5, rtol=1e-6), Tolerance(rtol=1e-5, scaled=True)
    ),
}

# The tiny models the parity tests draw (1-3 heads of size 1-5, 1-2 layers) with noisy weights, which are worse
# conditioned than GPT-2's init. float64 as above, with a gradient floor of 1e-6 (tiny drawn models can have whole
# tensors of gradients ~1e-9 made of O(1) terms that cancel). float32 from measurement: over 2 x 300 draws the worst
# gaps were logits 4.4e-6 beyond 1e-5 |logits|, loss 1.8e-6 relative, gradients 4.9e-5 of their tensor's scale
# (median 1e-6); the limits leave a 4-5x margin.
DRAWN_MODEL_TOLERANCES: dict[str, ParityTolerances] = {
    "float64": ParityTolerances(
        Tolerance(atol=1e-10), Tolerance(atol=1e-12), Tolerance(rtol=1e-9, scaled=True, floor=1e-6)
    ),
    "float32": ParityTolerances(
        Tolerance(atol=2e-5, rtol=1e-5),
        Tolerance(atol=2e-5, rtol=2e-6),
        Tolerance(rtol=2e-4, scaled=True, floor=1e-3),
    ),
}

# Hand-written backward vs fourth-order central finite differences in float64 (numpy_gpt2.gradcheck): the
# differences carry ~|L| 1e-16 / h ~ 1e-12 |L| of rounding noise, more on strongly curved tiny models, so a
# tensor whose gradients are all below 1e-4 is compared absolutely, at 1e-10.
FINITE_DIFFERENCES = Tolerance(rtol=1e-6, scaled=True, floor=1e-4)


class ModelOutputs(NamedTuple):
    """What one implementation computed for one batch: logits [B, T, V], the mean loss, every gradient."""

    logits: np.ndarray
    loss: float
    grads: dict[str, np.ndarray]


@dataclass(frozen=True)
class Comparison:
    """One quantity of one candidate against the reference."""

    name: str
    shape: tuple[int, ...]
    max_abs: float
    relative: float  # max|d| / max(|got|, |ref|): shown for every quantity, decisive for gradients
    tolerance: Tolerance
    ok: bool


def compare(name: str, got: np.ndarray, ref: np.ndarray, tolerance: Tolerance) -> Comparison:
    got, ref = np.asarray(got), np.asarray(ref)
    if got.shape != ref.shape:
        raise ValueError(f"{name}: shapes differ, {got.shape} vs the reference's {ref.shape}")
    return Comparison(
        name, ref.shape, max_abs_diff(got, ref), scaled_error(got, ref, tolerance.floor), tolerance,
        tolerance.allows(got, ref),
    )


def compare_outputs(got: ModelOutputs, ref: ModelOutputs, tolerances: ParityTolerances) -> list[Comparison]:
    """Logits, loss and every gradient of ``got`` against ``ref``; gradients in the reference's key order."""
    if set(got.grads) != set(ref.grads):
        raise ValueError(f"gradient keys differ: {sorted(set(got.grads) ^ set(ref.grads))}")
    rows = [
        compare("logits", got.logits, ref.logits, tolerances.logits),
        compare("loss", np.array(got.loss), np.array(ref.loss), tolerances.loss),
    ]
    rows += [compare(f"grad {name}", got.grads[name], g, tolerances.grads) for name, g in ref.grads.items()]
    return rows
