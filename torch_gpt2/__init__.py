"""Floor 2: the PyTorch engine of GPT-2 (two attention layouts, SDPA, KV-cache decoding, optimizer utilities)."""

from torch_gpt2.generate import generate, generate_stream
from torch_gpt2.model import GPT2, KVCache, resolve_device
from torch_gpt2.optim import configure_adamw, train_step

__all__ = [
    "GPT2",
    "KVCache",
    "configure_adamw",
    "generate",
    "generate_stream",
    "resolve_device",
    "train_step",
]
