"""Where a command's model comes from: a checkpoint, or a seeded initialisation (GPT-2's or the course's) of a
preset or config.

One function for every command, so ``--weights`` / ``--init-from`` / ``--preset`` / ``--config`` / ``--init`` /
``--dropout`` mean the same everywhere. The initialisation can wait (``materialize=False``) until the caller's
other checks have passed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mapper.checkpoint import load_checkpoint
from mapper.config import GPT2Config
from mapper.download import is_local_path, locate_checkpoint
from mapper.memory import INFERENCE_COPIES, check_fits_memory
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
                  materialize: bool = True, weights_flag: str = "--weights", copies: int = INFERENCE_COPIES,
                  init: str | None = None, dropout: float | None = None) -> ResolvedModel:
    """A checkpoint (``weights``: a path, or a model name such as ``gpt2`` or ``openai:124M``, fetched once; cast to
    ``dtype``), or a fresh model from ``seed`` of ``preset`` and/or ``config_spec`` (``GPT2Config.from_spec``;
    default the 124M shape ``gpt2`` unless the spec is a config file), drawn as ``init`` says
    (``GPT2Config.with_init``: "gpt2" or "course"; None: as the config says, GPT-2's by default). ``dropout`` sets
    all three dropout probabilities; None keeps a fresh config's (0.1 for the course's model, else what the config
    says) and gives a checkpoint none (its config.json's record of how it was trained before is not repeated unless
    asked). ``weights_flag`` names the flag in the one-line errors. A run records a local checkpoint by its
    resolved path and a model by its name. A model whose ``copies`` copies of the parameters (``mapper.memory``)
    exceed the available memory is refused before its init is allocated."""
    if weights:
        if init:
            raise ValueError(f"--init {init} draws a fresh model; {weights_flag} starts from trained weights: give one")
        if preset or config_spec:
            raise ValueError(f"give either {weights_flag} or --preset/--config, not both")
        path = locate_checkpoint(weights)
        config, params = load_checkpoint(path)
        check_fits_memory(config, dtype, copies)
        local = is_local_path(weights)
        start = str(path.resolve()) if local else weights
        return ResolvedModel(config.with_dropout(dropout or 0.0),
                             {k: v.astype(dtype, copy=False) for k, v in params.items()}, start,
                             f"weights {weights}" + ("" if local else f" ({path})"))
    spec_is_file = bool(config_spec) and Path(config_spec).is_file()
    preset = preset or (None if spec_is_file else "gpt2")  # overrides apply to the 124M shape by default
    config = GPT2Config.from_spec(preset, config_spec)
    if init:
        config = config.with_init(init)
    if dropout is not None:
        config = config.with_dropout(dropout)
    check_fits_memory(config, dtype, copies)
    name = " + ".join(part for part in (preset, config_spec) if part)
    params = init_params(config, seed, dtype) if materialize else None
    how = "GPT-2 init" if config.init == "gpt2" else "the course's init"
    return ResolvedModel(config, params, f"seed {seed}", f"{name} shape, {how} (seed {seed}), no download")
