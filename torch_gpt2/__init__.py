"""Floor 2: the PyTorch engine of GPT-2 (two attention layouts, SDPA, KV-cache decoding, training utilities)."""

from torch_gpt2.generate import KVCache, generate, generate_stream
from torch_gpt2.model import GPT2, resolve_device
from torch_gpt2.train import configure_adamw, lr_at, train_step

__all__ = [
    "GPT2",
    "KVCache",
    "configure_adamw",
    "generate",
    "generate_stream",
    "lr_at",
    "resolve_device",
    "train_step",
]
