"""The NumPy spec as a training backend of ``tasks.training`` (the readable loop's arithmetic, on the fast path)."""

from __future__ import annotations

import math

import numpy as np

from mapper.config import GPT2Config
from numpy_gpt2.fast import FastAdamW
from numpy_gpt2.generate import generate
from numpy_gpt2.model import loss, loss_and_grads
from numpy_gpt2.optim import clip_grad_norm


class NumpyBackend:
    """Parameters, AdamW (``FastAdamW``: the spec's update, chunked on all cores) and the fast kernels.

    Gradient accumulation averages the micro-batches' gradients, as torch does when each micro-batch's mean
    loss is divided by their number.
    """

    name = "numpy"
    is_main = True

    def __init__(self, config: GPT2Config, params: dict[str, np.ndarray], weight_decay: float, decay: str,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, fast: bool = True) -> None:
        self.config = config
        self._params = {k: np.ascontiguousarray(v).copy() for k, v in params.items()}
        self.optimizer = FastAdamW(self._params, lr=0.0, betas=betas, eps=eps, weight_decay=weight_decay, decay=decay)
        self.fast = fast

    def step(self, micro_batches: list[tuple[np.ndarray, np.ndarray]], lr: float, grad_clip: float | None
             ) -> tuple[float, float]:
        losses, total = [], None
        for tokens, targets in micro_batches:
            with np.errstate(over="ignore", invalid="ignore"):  # a diverging run is reported below, once
                value, grads = loss_and_grads(self._params, self.config, tokens, targets, fast=self.fast)
            losses.append(value)
            if total is None:
                total = grads
            else:
                for name, g in grads.items():
                    total[name] += g
        mean_loss = float(np.mean(losses))
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"the loss is {mean_loss}; parameters left unchanged")
        if len(micro_batches) > 1:
            for g in total.values():
                g /= len(micro_batches)
        norm = clip_grad_norm(total, grad_clip if grad_clip else math.inf)
        self.optimizer.step(self._params, total, lr=lr)
        return mean_loss, norm

    def loss(self, tokens: np.ndarray, targets: np.ndarray) -> float:
        return loss(self._params, self.config, tokens, targets, fast=self.fast)

    def greedy(self, prompt: list[int], max_new_tokens: int, eos_token_id: int | None) -> list[int]:
        n = min(max_new_tokens, self.config.n_positions - len(prompt))
        out = generate(self._params, self.config, np.array([prompt]), n, eos_token_id=eos_token_id, fast=self.fast)
        ids = out[0, len(prompt):].tolist()
        return ids[: ids.index(eos_token_id)] if eos_token_id in ids else ids

    def params(self) -> dict[str, np.ndarray]:
        return self._params

    def optimizer_state(self) -> dict[str, np.ndarray]:
        state = self.optimizer.state_dict()
        return {k: (np.array([v], dtype=np.float64) if k == "t" else v) for k, v in state.items()}

    def load_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        self.optimizer.load_state_dict({k: (int(v[0]) if k == "t" else v) for k, v in state.items()})

    def barrier(self) -> None:
        pass
