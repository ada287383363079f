"""Floor 2: the NumPy spec of GPT-2, forward and hand-written backward (no autograd)."""

from numpy_gpt2.generate import generate, generate_stream
from numpy_gpt2.model import (
    classify,
    classify_loss,
    classify_loss_and_grads,
    forward,
    from_pretrained,
    loss,
    loss_and_grads,
)
from numpy_gpt2.optim import AdamW, FastAdamW, clip_grad_norm

__all__ = [
    "AdamW",
    "FastAdamW",
    "classify",
    "classify_loss",
    "classify_loss_and_grads",
    "clip_grad_norm",
    "forward",
    "from_pretrained",
    "generate",
    "generate_stream",
    "loss",
    "loss_and_grads",
]
