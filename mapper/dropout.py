"""Dropout's keep-masks, drawn from a seeded NumPy generator, and the seed of each training step's masks.

Dropout multiplies an activation by a keep-mask (1 with probability 1 - p, else 0) and by 1 / (1 - p), so its
expectation is unchanged. It sits at three places (``GPT2Config``'s ``embd_pdrop``, ``attn_pdrop``,
``resid_pdrop``): after the embeddings, on the attention weights after the softmax, and on each block's two
residual branches before they are added.

The NumPy spec always takes its masks from here (:class:`DropoutMasks`, one per forward pass). The torch engine
draws its own with torch's native dropout in normal runs, and takes these masks when it is given them: that is
how both backends are run with identical masks and compared (``parity_tests/test_parity.py``, ``gpt2 parity``).

Resuming a run with dropout reproduces its masks without storing any generator state: each optimizer step's masks
come from a generator seeded by (run seed, step, rank) (:func:`dropout_seed`), on both backends.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mapper.config import GPT2Config


@dataclass(frozen=True)
class DropoutMasks:
    """The keep-masks (bool, True = kept) of one forward pass over a [B, T] batch; None where that probability is 0.

    ``embd`` [B, T, C] after the embeddings; per layer i, ``attn[i]`` [B, NH, T, T] on the attention weights
    (entries above the causal diagonal multiply weights that are 0 anyway), ``attn_resid[i]`` [B, T, C] on the
    attention branch's output and ``mlp_resid[i]`` [B, T, C] on the MLP's, each before its residual add.
    """

    embd: np.ndarray | None
    attn: tuple[np.ndarray | None, ...]
    attn_resid: tuple[np.ndarray | None, ...]
    mlp_resid: tuple[np.ndarray | None, ...]

    def layer(self, i: int) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        """(attention weights, attention branch, MLP branch) masks of block ``i``."""
        return self.attn[i], self.attn_resid[i], self.mlp_resid[i]


def draw_dropout_masks(config: GPT2Config, batch: int, seq: int, rng: np.random.Generator) -> DropoutMasks:
    """Fresh keep-masks for a [batch, seq] forward pass of ``config``'s model: each entry kept with probability
    1 - p (a float32 uniform draw >= p), drawn in the order embd, then per layer attn, attn_resid, mlp_resid."""

    def keep(p: float, shape: tuple[int, ...]) -> np.ndarray | None:
        return None if p == 0.0 else rng.random(shape, dtype=np.float32) >= p

    B, T, C, NH = batch, seq, config.n_embd, config.n_head
    embd = keep(config.embd_pdrop, (B, T, C))
    attn, attn_resid, mlp_resid = [], [], []
    for _ in range(config.n_layer):
        attn.append(keep(config.attn_pdrop, (B, NH, T, T)))
        attn_resid.append(keep(config.resid_pdrop, (B, T, C)))
        mlp_resid.append(keep(config.resid_pdrop, (B, T, C)))
    return DropoutMasks(embd, tuple(attn), tuple(attn_resid), tuple(mlp_resid))


def check_dropout_masks(masks: DropoutMasks, config: GPT2Config, batch: int, seq: int) -> None:
    """``ValueError`` unless ``masks`` fit a [batch, seq] pass of ``config``: a bool mask of the right shape exactly
    where the probability is above 0, one per layer."""
    B, T, C, NH = batch, seq, config.n_embd, config.n_head
    if not len(masks.attn) == len(masks.attn_resid) == len(masks.mlp_resid) == config.n_layer:
        raise ValueError(f"dropout masks for {len(masks.attn)} layers, the model has {config.n_layer}")
    sites = [("embd", masks.embd, config.embd_pdrop, (B, T, C))]
    for i in range(config.n_layer):
        sites += [(f"attn[{i}]", masks.attn[i], config.attn_pdrop, (B, NH, T, T)),
                  (f"attn_resid[{i}]", masks.attn_resid[i], config.resid_pdrop, (B, T, C)),
                  (f"mlp_resid[{i}]", masks.mlp_resid[i], config.resid_pdrop, (B, T, C))]
    for name, mask, p, shape in sites:
        if (mask is None) != (p == 0.0):
            state = "missing" if mask is None else "given"
            raise ValueError(f"dropout mask {name}: {state}, but the model's probability there is {p}")
        if mask is not None and (mask.dtype != np.bool_ or mask.shape != shape):
            raise ValueError(f"dropout mask {name} is {mask.dtype} {mask.shape}; expected bool {shape}")


def dropout_seed(seed: int, step: int, rank: int = 0) -> int:
    """The seed of the masks of optimizer step ``step`` (0-based) on process ``rank`` of a run seeded ``seed``: a
    function of the three alone, so a resumed run draws the masks the uninterrupted run drew."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])
