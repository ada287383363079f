"""AdamW, gradient clipping and one training step, in NumPy.

The update follows torch.optim.AdamW's single-tensor algorithm, so the torch engine and this spec take the
same steps to float64 precision (t = step count, starting at 1):

    p <- p * (1 - lr * wd)                          decoupled weight decay (by default matrices only)
    m <- m + (1 - beta1) * (g - m)                  first moment (torch's lerp form of beta1 m + (1 - beta1) g)
    v <- beta2 * v + (1 - beta2) * g^2              second moment
    p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

``numpy_gpt2.fast.FastAdamW`` computes the same update in cache-sized chunks on all cores.
"""

from __future__ import annotations

import math

import numpy as np

from mapper.config import GPT2Config
from numpy_gpt2.model import loss_and_grads

DECAY_RULES = ("matrices", "all")


class AdamW:
    """Bias-corrected AdamW over a dict of parameters, updated in place.

    ``decay``: "matrices" (GPT-2 / nanoGPT: weight decay on tensors with ndim >= 2, never on biases or
    LayerNorm gains) or "all" (what ``torch.optim.AdamW(model.parameters())`` does).
    """

    def __init__(
        self,
        params: dict[str, np.ndarray],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        decay: str = "matrices",
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid AdamW settings lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        if decay not in DECAY_RULES:
            raise ValueError(f"decay must be one of {DECAY_RULES}, got {decay!r}")
        for name, p in params.items():
            if not p.flags.c_contiguous or not p.flags.writeable:
                raise ValueError(f"parameter {name!r} must be a writable C-contiguous array: AdamW updates it in place")
        self.lr, self.betas, self.eps, self.weight_decay, self.decay = lr, betas, eps, weight_decay, decay
        self.m = {k: np.zeros_like(v) for k, v in params.items()}  # first moments
        self.v = {k: np.zeros_like(v) for k, v in params.items()}  # second moments
        self.t = 0  # steps taken

    def decays(self, param: np.ndarray) -> bool:
        """Whether weight decay applies to this tensor (see ``decay``)."""
        return self.decay == "all" or param.ndim >= 2

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray], lr: float | None = None) -> None:
        """Update every parameter in place from ``grads``; ``lr`` overrides the learning rate for this step."""
        lr = self.lr if lr is None else lr
        beta1, beta2 = self.betas
        self.t += 1
        step_size = lr / (1.0 - beta1**self.t)  # lr / (1 - beta1^t): m's bias correction folded in
        bias_correction2_sqrt = math.sqrt(1.0 - beta2**self.t)  # sqrt(1 - beta2^t)
        for name, p in params.items():
            g, m, v = grads[name], self.m[name], self.v[name]
            if self.decays(p):
                p *= 1.0 - lr * self.weight_decay
            m += (1.0 - beta1) * (g - m)
            v[...] = beta2 * v + (1.0 - beta2) * (g * g)
            p -= step_size * (m / (np.sqrt(v) / bias_correction2_sqrt + self.eps))

    def state_dict(self) -> dict[str, np.ndarray | int]:
        """The optimizer's state as flat arrays (``m.<name>``, ``v.<name>``) and the step count ``t``."""
        state: dict[str, np.ndarray | int] = {"t": self.t}
        state.update({f"m.{k}": v for k, v in self.m.items()})
        state.update({f"v.{k}": v for k, v in self.v.items()})
        return state

    def load_state_dict(self, state: dict[str, np.ndarray | int]) -> None:
        """Restore ``state_dict()``'s output (shapes and dtypes must match the parameters)."""
        for moments, prefix in ((self.m, "m."), (self.v, "v.")):
            for name, buf in moments.items():
                saved = state.get(prefix + name)
                if saved is None or np.shape(saved) != buf.shape:
                    raise ValueError(f"optimizer state lacks {prefix + name} of shape {buf.shape}")
                buf[...] = saved
        self.t = int(state["t"])


def clip_grad_norm(grads: dict[str, np.ndarray], max_norm: float) -> float:
    """Scale all gradients in place so their global L2 norm is at most ``max_norm`` (as torch's clip_grad_norm_).

    Returns the norm before clipping. coefficient = min(1, max_norm / (norm + 1e-6)).
    """
    total = math.sqrt(sum(float(np.vdot(g, g)) for g in grads.values()))
    coefficient = max_norm / (total + 1e-6)
    if coefficient < 1.0:
        for g in grads.values():
            g *= coefficient
    return total


class Trainer:
    """Forward + backward + (optional clipping) + AdamW. ``fast`` picks the kernels (see ``numpy_gpt2.model``)."""

    def __init__(
        self,
        params: dict[str, np.ndarray],
        config: GPT2Config,
        optimizer: AdamW,
        max_grad_norm: float | None = None,
        fast: bool = False,
    ) -> None:
        self.params, self.config, self.optimizer = params, config, optimizer
        self.max_grad_norm, self.fast = max_grad_norm, fast

    def step(self, tokens: np.ndarray, targets: np.ndarray, lr: float | None = None) -> float:
        """One training step; returns the loss. A non-finite loss raises before any parameter changes."""
        loss, grads = loss_and_grads(self.params, self.config, tokens, targets, fast=self.fast)
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss} at optimizer step {self.optimizer.t + 1}; parameters left unchanged"
            )
        if self.max_grad_norm is not None:
            clip_grad_norm(grads, self.max_grad_norm)
        self.optimizer.step(self.params, grads, lr=lr)
        return loss
