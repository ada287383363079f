"""AdamW and gradient clipping, in NumPy.

The update follows torch.optim.AdamW's single-tensor algorithm, so the torch engine and this spec take the
same steps to float64 precision (t = step count, starting at 1):

    p <- p * (1 - lr * wd)                          decoupled weight decay (by default matrices only)
    m <- m + (1 - beta1) * (g - m)                  first moment (torch's lerp form of beta1 m + (1 - beta1) g)
    v <- beta2 * v + (1 - beta2) * g^2              second moment
    p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

:class:`FastAdamW` computes the same update in cache-sized chunks on all cores (bit-identical results).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mapper.training import check_decay_rule, decays


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
        check_decay_rule(decay)
        for name, p in params.items():
            if not p.flags.c_contiguous or not p.flags.writeable:
                raise ValueError(f"parameter {name!r} must be a writable C-contiguous array: AdamW updates it in place")
        self.lr, self.betas, self.eps, self.weight_decay, self.decay = lr, betas, eps, weight_decay, decay
        self.m = {k: np.zeros_like(v) for k, v in params.items()}  # first moments
        self.v = {k: np.zeros_like(v) for k, v in params.items()}  # second moments
        self.t = 0  # steps taken

    def decays(self, param: np.ndarray) -> bool:
        """Whether weight decay applies to this tensor (``mapper.training.decays``)."""
        return decays(param.ndim, self.decay)

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


def clip_grad_norm(grads: dict[str, np.ndarray], max_norm: float | None) -> float:
    """Scale all gradients in place so their global L2 norm is at most ``max_norm`` (as torch's clip_grad_norm_);
    ``max_norm`` None only measures. Returns the norm before clipping. coefficient = min(1, max_norm / (norm + 1e-6)).
    """
    total = math.sqrt(sum(float(np.vdot(g, g)) for g in grads.values()))
    if max_norm is None:
        return total
    coefficient = max_norm / (total + 1e-6)
    if coefficient < 1.0:
        for g in grads.values():
            g *= coefficient
    return total


# ------------------------------------------------------------------------------------------------------
# AdamW in cache-sized chunks on all cores. The spec's update makes ~8 passes over [n] arrays per tensor;
# here each chunk of p, g, m, v is read from memory once and the ~14 elementwise steps run on it while it sits
# in L2 cache, the chunks shared out among threads (NumPy releases the GIL inside each operation).
# The arithmetic is the spec's, in the same order, so the results are bit-identical. Measured: 311 -> 134 ms
# per step on 124M parameters, 15% of a train step at B=4 T=64.
# ------------------------------------------------------------------------------------------------------


class FastAdamW(AdamW):
    """:class:`AdamW` (same arguments, state and results) with a chunked, threaded ``step``."""

    def __init__(
        self, params: dict[str, np.ndarray], *args, chunk: int = 1 << 17, threads: int | None = None, **kwargs
    ) -> None:
        super().__init__(params, *args, **kwargs)
        self.chunk = chunk
        self.threads = max(1, threads if threads is not None else min(os.cpu_count() or 1, 8))
        dtype = next(iter(params.values())).dtype
        self._scratch = [np.empty(chunk, dtype=dtype) for _ in range(self.threads)]
        self._pool: ThreadPoolExecutor | None = None

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray], lr: float | None = None) -> None:
        lr = self.lr if lr is None else lr
        beta1, beta2 = self.betas
        self.t += 1
        constants = (lr / (1.0 - beta1**self.t), math.sqrt(1.0 - beta2**self.t), 1.0 - lr * self.weight_decay)
        chunks = [(name, start) for name, p in params.items() for start in range(0, p.size, self.chunk)]
        groups = [chunks[i :: self.threads] for i in range(self.threads)]
        if self.threads == 1:
            self._update_chunks(groups[0], params, grads, self._scratch[0], constants)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads)
        jobs = [self._pool.submit(self._update_chunks, group, params, grads, self._scratch[i], constants)
                for i, group in enumerate(groups)]
        for job in jobs:
            job.result()

    def _update_chunks(self, chunks: list[tuple[str, int]], params: dict[str, np.ndarray],
                       grads: dict[str, np.ndarray], scratch: np.ndarray, constants: tuple[float, float, float]
                       ) -> None:
        step_size, bias_correction2_sqrt, decay_factor = constants
        beta1, beta2 = self.betas
        for name, start in chunks:
            p = params[name]
            end = start + self.chunk
            p_chunk = p.reshape(-1)[start:end]  # views: every tensor is C-contiguous (checked by AdamW)
            g, m, v = (a[name].reshape(-1)[start:end] for a in (grads, self.m, self.v))
            tmp = scratch[: p_chunk.size]
            if self.decays(p):
                p_chunk *= decay_factor  # p (1 - lr wd)
            np.subtract(g, m, out=tmp)
            tmp *= 1.0 - beta1
            m += tmp  # m + (1 - beta1)(g - m)
            np.multiply(g, g, out=tmp)
            tmp *= 1.0 - beta2
            v *= beta2
            v += tmp  # beta2 v + (1 - beta2) g^2
            np.sqrt(v, out=tmp)
            tmp /= bias_correction2_sqrt
            tmp += self.eps  # sqrt(v) / sqrt(1 - beta2^t) + eps
            np.divide(m, tmp, out=tmp)
            tmp *= step_size
            p_chunk -= tmp  # p - lr / (1 - beta1^t) * m / (...)
