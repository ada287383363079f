"""PyTorch ``torch.save`` files (``pytorch_model.bin``, zip or legacy format), read with ``weights_only=True``:
torch's restricted unpickler, which builds tensors and plain containers and runs no code from the file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from mapper.errors import CheckpointError
from mapper.formats.stored import Stored


def torch_source(file: Path) -> dict[str, Stored]:
    """A ``torch.save``-d state dict (zip or legacy), read with ``weights_only=True`` (no pickled code)."""
    import torch  # only this reader needs torch

    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        raise CheckpointError(f"{file} is not a loadable pytorch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file} does not hold a state dict of tensors (a flat name -> tensor mapping)")
    seen_storages: set[int] = set()

    def reader(key: str, tensor: torch.Tensor) -> Callable[[], np.ndarray]:
        def read() -> np.ndarray:
            if not tensor.is_floating_point():
                raise CheckpointError(f"{file}: key {key!r} has dtype {tensor.dtype}; GPT-2 parameters are floats")
            t = tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()
            # Tensors sharing a storage (a tied lm_head is wte's) must not become aliased numpy arrays.
            storage = t.untyped_storage().data_ptr()
            copy = storage in seen_storages or not t.is_contiguous()
            seen_storages.add(storage)
            return np.array(t.numpy(), order="C") if copy else t.numpy()

        return read

    return {k: Stored(k, tuple(v.shape), reader(k, v)) for k, v in state.items()}
