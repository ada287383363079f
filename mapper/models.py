"""Where a command's model comes from: a checkpoint, or GPT-2's seeded initialisation of a preset or config.

One function for every command, so ``--weights`` / ``--init-from`` / ``--preset`` / ``--config`` mean the same
everywhere. The initialisation can wait (``materialize=False``) until the caller's other checks have passed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mapper.checkpoint import load_checkpoint
from mapper.config import GPT2Config
from mapper.download import is_local_path, locate_checkpoint
from mapper.schema import init_params


@dataclass(frozen=True)
class ResolvedModel:
    """``config``; ``params`` (None when not materialized yet); ``init``, what a run records as its start ("seed N"
    or the checkpoint's resolved path); ``description``, the same in words for a command's first line."""

    config: GPT2Config
    params: dict[str, np.ndarray] | None
    init: str
    description: str


def resolve_model(weights: str | None, preset: str | None, config_spec: str | None, dtype: str, seed: int,
                  materialize: bool = True, weights_flag: str = "--weights") -> ResolvedModel:
    """A checkpoint (``weights``: a path, or a model name such as ``gpt2`` or ``openai:124M``, fetched once; cast to
    ``dtype``), or GPT-2's init from ``seed`` of ``preset`` and/or ``config_spec`` (``GPT2Config.from_spec``; default
    the 124M shape ``gpt2`` unless the spec is a config file). ``weights_flag`` names the flag in the one-line
    error for giving both. A run records a local checkpoint by its resolved path and a model by its name."""
    if weights:
        if preset or config_spec:
            raise ValueError(f"give either {weights_flag} or --preset/--config, not both")
        path = locate_checkpoint(weights)
        config, params = load_checkpoint(path)
        local = is_local_path(weights)
        init = str(path.resolve()) if local else weights
        return ResolvedModel(config, {k: v.astype(dtype, copy=False) for k, v in params.items()}, init,
                             f"weights {weights}" + ("" if local else f" ({path})"))
    spec_is_file = bool(config_spec) and Path(config_spec).is_file()
    preset = preset or (None if spec_is_file else "gpt2")  # overrides apply to the 124M shape by default
    config = GPT2Config.from_spec(preset, config_spec)
    name = " + ".join(part for part in (preset, config_spec) if part)
    params = init_params(config, seed, dtype) if materialize else None
    return ResolvedModel(config, params, f"seed {seed}", f"{name} shape, GPT-2 init (seed {seed}), no download")
