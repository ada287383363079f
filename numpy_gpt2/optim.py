"""AdamW in NumPy, updated in place, and a training step.

The update follows torch.optim.AdamW's single-tensor algorithm line for line, so the torch engine and
this spec take the same steps to float64 precision (t = step count, starting at 1):

    p <- p * (1 - lr * wd)                          decoupled weight decay (tensors with ndim >= 2 only)
    m <- m + (1 - beta1) * (g - m)                  first moment (torch's lerp)
    v <- beta2 * v + (1 - beta2) * g * g            second moment
    p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mapper.config import GPT2Config
from numpy_gpt2.model import empty_grads, loss_and_grads


class AdamW:
    """Bias-corrected AdamW over a dict of parameters; state and scratch are allocated once."""

    def __init__(
        self,
        params: dict[str, np.ndarray],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        chunk: int = 1 << 17,
        threads: int | None = None,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid AdamW settings lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.t = 0
        for name, p in params.items():
            if not p.flags.c_contiguous:
                raise ValueError(f"parameter {name!r} is not C-contiguous; AdamW updates parameters in place")
        self.chunk = chunk
        self.threads = max(1, threads if threads is not None else min(os.cpu_count() or 1, 8))
        dtype = next(iter(params.values())).dtype
        self._scratch = [np.empty(chunk, dtype=dtype) for _ in range(self.threads)]
        self._pool: ThreadPoolExecutor | None = None

    def decays(self, name: str, param: np.ndarray) -> bool:
        """Weight decay applies to matrices (ndim >= 2: embeddings and weights), not to biases or LN gains."""
        return param.ndim >= 2

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray], lr: float | None = None) -> None:
        """Update every parameter in place from ``grads``."""
        lr = self.lr if lr is None else lr
        beta1, beta2 = self.betas
        self.t += 1
        constants = (
            lr / (1.0 - beta1**self.t),  # step size: lr / (1 - beta1^t)
            math.sqrt(1.0 - beta2**self.t),  # sqrt(1 - beta2^t)
            1.0 - lr * self.weight_decay,  # decay factor
        )
        # The update is elementwise, so it splits into independent chunks small enough to stay in L2 cache
        # (the ~14 passes below then read p, g, m, v from memory once, not 14 times), shared out among
        # threads (NumPy releases the GIL inside each operation).
        chunks = [(name, start) for name, p in params.items() for start in range(0, p.size, self.chunk)]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        groups = [chunks[i :: self.threads] for i in range(self.threads)]
        if self._pool is None:
            self._update_chunks(groups[0], params, grads, self._scratch[0], constants)
        else:
            jobs = [self._pool.submit(self._update_chunks, group, params, grads, self._scratch[i], constants)
                    for i, group in enumerate(groups)]
            for job in jobs:
                job.result()

    def _update_chunks(self, chunks: list[tuple[str, int]], params: dict[str, np.ndarray], grads: dict[str, np.ndarray],
                       scratch: np.ndarray, constants: tuple[float, float, float]) -> None:
        step_size, bias_correction2_sqrt, decay = constants
        beta1, beta2 = self.betas
        for name, start in chunks:
            p = params[name]
            end = start + self.chunk
            pc = p.reshape(-1)[start:end]  # views: every tensor is C-contiguous (checked in __init__)
            g, m, v = (a[name].reshape(-1)[start:end] for a in (grads, self.m, self.v))
            tmp = scratch[: pc.size]
            if self.decays(name, p):
                pc *= decay  # p (1 - lr wd)
            np.subtract(g, m, out=tmp)
            tmp *= 1.0 - beta1
            m += tmp  # m + (1 - beta1)(g - m)
            v *= beta2
            np.multiply(g, g, out=tmp)
            tmp *= 1.0 - beta2
            v += tmp  # beta2 v + (1 - beta2) g^2
            np.sqrt(v, out=tmp)
            tmp /= bias_correction2_sqrt
            tmp += self.eps  # sqrt(v_hat) + eps, with v_hat = v / (1 - beta2^t)
            np.divide(m, tmp, out=tmp)
            tmp *= step_size
            pc -= tmp  # p - lr / (1 - beta1^t) * m / (sqrt(v_hat) + eps)


def clip_grad_norm(grads: dict[str, np.ndarray], max_norm: float) -> float:
    """Scale all gradients so their global L2 norm is at most ``max_norm`` (as torch's clip_grad_norm_).

    Returns the norm before clipping. coefficient = min(1, max_norm / (norm + 1e-6)).
    """
    total = math.sqrt(sum(float(np.vdot(g, g)) for g in grads.values()))
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in grads.values():
            g *= coef
    return total


class Trainer:
    """Forward + backward + (optional clipping) + AdamW, with the gradient buffers kept between steps."""

    def __init__(
        self, params: dict[str, np.ndarray], config: GPT2Config, optimizer: AdamW, max_grad_norm: float | None = None
    ) -> None:
        self.params, self.config, self.optimizer, self.max_grad_norm = params, config, optimizer, max_grad_norm
        self.grads = empty_grads(params)

    def step(self, tokens: np.ndarray, targets: np.ndarray, lr: float | None = None) -> float:
        """One training step; returns the loss. A non-finite loss raises before any parameter changes."""
        loss, _ = loss_and_grads(self.params, self.config, tokens, targets, grads=self.grads)
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss} at optimizer step {self.optimizer.t + 1}; parameters left unchanged"
            )
        if self.max_grad_norm is not None:
            clip_grad_norm(self.grads, self.max_grad_norm)
        self.optimizer.step(self.params, self.grads, lr=lr)
        return loss
