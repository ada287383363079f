"""The NumPy spec as a backend of the training loop (``tasks.loop``) and of inference (the loop's interface: one
optimizer step, a loss, class logits, a greedy continuation, the parameters and the optimizer state in and out)."""

from __future__ import annotations

import numpy as np

from mapper.config import GPT2Config
from mapper.dropout import draw_dropout_masks, dropout_seed
from mapper.lora import LoraConfig, merge_lora
from mapper.sampling import cut_at_eos, new_token_budget
from mapper.training import Batch, check_finite_loss
from numpy_gpt2.generate import generate
from numpy_gpt2.model import classify, classify_loss_and_grads, loss, loss_and_grads
from numpy_gpt2.ops import softmax_cross_entropy_forward
from numpy_gpt2.optim import FastAdamW, clip_grad_norm


class NumpyBackend:
    """Parameters, AdamW (``FastAdamW``: the spec's update, chunked on all cores) and the fast kernels.

    Gradient accumulation averages the micro-batches' gradients, as torch does when each micro-batch's mean
    loss is divided by their number. ``trainable`` (canonical names; None: all) limits what AdamW updates: the
    spec computes every gradient and the frozen ones are not used, which is simple to read, not fast.
    With dropout in the config, each step's masks come from a generator seeded by (``seed``, step)
    (``mapper.dropout.dropout_seed``), one set per micro-batch, so a resumed run draws what the uninterrupted run
    drew; losses for evaluation and decoding drop nothing.
    A backend made by :meth:`for_inference` has no optimizer settings and refuses ``step``.
    """

    name = "numpy"
    is_main = True

    def __init__(self, config: GPT2Config, params: dict[str, np.ndarray], weight_decay: float | None, decay: str,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, fast: bool = True,
                 trainable: set[str] | None = None, lora: LoraConfig | None = None, seed: int = 0) -> None:
        self.config = config
        self.seed = seed
        self.lora = lora
        self._params = {k: np.ascontiguousarray(v).copy() for k, v in params.items()}
        self.trainable = sorted(self._params) if trainable is None else sorted(trainable)
        self._adamw = None if weight_decay is None else dict(betas=betas, eps=eps, weight_decay=weight_decay,
                                                               decay=decay)
        self._optimizer: FastAdamW | None = None
        self.fast = fast

    @classmethod
    def for_inference(cls, config: GPT2Config, params: dict[str, np.ndarray], lora: LoraConfig | None = None
                      ) -> NumpyBackend:
        """A backend for losses, class logits and greedy decoding only (``gpt2 classify``, ``gpt2 eval``)."""
        return cls(config, params, None, "matrices", lora=lora)

    @property
    def optimizer(self) -> FastAdamW:
        """AdamW over the trained parameters, made on first use, so evaluation never allocates its two moments."""
        if self._adamw is None:
            raise ValueError("this backend was made for inference (NumpyBackend.for_inference): it cannot train")
        if self._optimizer is None:
            updated = {k: self._params[k] for k in self.trainable}  # the same arrays: updated in place
            self._optimizer = FastAdamW(updated, lr=0.0, **self._adamw)
        return self._optimizer

    def _loss_and_grads(self, batch: Batch, rng: np.random.Generator | None) -> tuple[float, dict[str, np.ndarray]]:
        masks = None if rng is None else draw_dropout_masks(self.config, *batch.tokens.shape, rng)
        with np.errstate(over="ignore", invalid="ignore"):  # a diverging run is reported by step(), once
            if batch.is_classification:
                return classify_loss_and_grads(self._params, self.config, batch.tokens, batch.lengths,
                                               batch.labels, fast=self.fast, lora=self.lora, dropout_masks=masks)
            return loss_and_grads(self._params, self.config, batch.tokens, batch.targets, fast=self.fast,
                                  lora=self.lora, dropout_masks=masks)

    def step(self, micro_batches: list[Batch], lr: float, grad_clip: float | None) -> tuple[float, float]:
        losses, total = [], None
        rng = np.random.default_rng(dropout_seed(self.seed, self.optimizer.t)) if self.config.has_dropout else None
        for batch in micro_batches:
            value, grads = self._loss_and_grads(batch, rng)
            losses.append(value)
            grads = {k: grads[k] for k in self.trainable}
            if total is None:
                total = grads
            else:
                for name, g in grads.items():
                    total[name] += g
        mean_loss = float(np.mean(losses))
        check_finite_loss(mean_loss)
        if len(micro_batches) > 1:
            for g in total.values():
                g /= len(micro_batches)
        norm = clip_grad_norm(total, grad_clip)
        self.optimizer.step({k: self._params[k] for k in self.trainable}, total, lr=lr)
        return mean_loss, norm

    def loss(self, batch: Batch) -> float:
        if batch.is_classification:
            logits = self.class_logits(batch)
            return float(softmax_cross_entropy_forward(logits, batch.labels)[0])
        return loss(self._params, self.config, batch.tokens, batch.targets, fast=self.fast, lora=self.lora)

    def class_logits(self, batch: Batch) -> np.ndarray:
        return classify(self._params, self.config, batch.tokens, batch.lengths, fast=self.fast, lora=self.lora)

    def greedy(self, prompt: list[int], max_new_tokens: int, eos_token_id: int | None) -> list[int]:
        n = new_token_budget(len(prompt), max_new_tokens, self.config)
        params = self._params if self.lora is None else merge_lora(self._params, self.lora)  # decoding: plain GPT-2
        out = generate(params, self.config, np.array([prompt]), n, eos_token_id=eos_token_id, fast=self.fast)
        return cut_at_eos(out[0, len(prompt):], eos_token_id)

    def params(self) -> dict[str, np.ndarray]:
        return self._params

    def optimizer_state(self) -> dict[str, np.ndarray]:
        state = self.optimizer.state_dict()
        return {k: (np.array([v], dtype=np.float64) if k == "t" else v) for k, v in state.items()}

    def load_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        self.optimizer.load_state_dict({k: (int(v[0]) if k == "t" else v) for k, v in state.items()})

    def barrier(self) -> None:
        pass

    def max_over_ranks(self, value: int) -> int:
        return value  # one process: nothing to agree with
