"""PyTorch ``torch.save`` files (``pytorch_model.bin``, nanoGPT's ``ckpt.pt``, the course's ``model.pth``), read with
``weights_only=True``: torch's restricted unpickler, which builds tensors and plain containers and runs no code from
the file. Only a file that is a zip archive or a pickle ever reaches ``torch.load`` (``mapper.checkpoint`` sniffs
the first bytes), so no other file gets torch's advice to retry with ``weights_only=False``."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mapper.errors import CheckpointError
from mapper.formats.stored import Stored

# torch.compile wraps a module, so the state dict of a compiled model (nanoGPT's, the course's) has this prefix
COMPILED_PREFIX = "_orig_mod."


def load_torch(file: Path) -> Any:
    """The object ``torch.save`` wrote to ``file`` (zip or legacy format), tensors on the CPU, no pickled code run."""
    import torch  # only the torch readers need torch

    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        message = str(e)
        if "weights_only" in message or "allowed global" in message:  # torch's advice to load it anyway: not given
            found = re.search(r"GLOBAL ([\w.]+)", message)
            raise CheckpointError(
                f"{file} holds Python objects beyond tensors and plain containers"
                f"{f' (it names {found[1]})' if found else ''}; unpickling them could run code, so it is refused. "
                "Save the model's state_dict instead"
            ) from None
        first = message.strip().splitlines()[0] if message.strip() else ""
        raise CheckpointError(f"{file} is not a loadable pytorch checkpoint ({type(e).__name__}: {first})") from None


def tensor_source(state: Any, file: Path, what: str = "state dict") -> dict[str, Stored]:
    """A flat ``name -> tensor`` mapping as ``Stored``, the ``_orig_mod.`` prefix of a compiled model removed."""
    import torch

    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file}: its {what} is not a flat mapping of names to tensors")
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

    out: dict[str, Stored] = {}
    for key, value in state.items():
        name = key.removeprefix(COMPILED_PREFIX)
        if name in out:
            raise CheckpointError(f"{file} holds {name!r} twice: with and without the {COMPILED_PREFIX!r} prefix")
        out[name] = Stored(key, tuple(value.shape), reader(key, value))
    return out
