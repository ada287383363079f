"""The seed repository's OpenAI-compatible model: the course's module tree (``mapper.formats.book``: ``tok_emb``,
``pos_emb``, ``trf_blocks``, ``norm1`` / ``norm2``, ``final_norm``, ``out_head``) with OpenAI's attention and MLP
inside each block, as ``nn.Linear`` layers (``[out, in]``, transposed on the way in)::

    trf_blocks.{i}.attn.c_attn.weight [3C, C] -> h.{i}.attn.c_attn.weight [C, 3C]   (rows q | k | v -> columns)
    trf_blocks.{i}.attn.c_proj.weight [C, C]  -> h.{i}.attn.c_proj.weight (transposed)
    trf_blocks.{i}.mlp.c_fc.weight [4C, C]    -> h.{i}.mlp.c_fc.weight (transposed)
    trf_blocks.{i}.mlp.c_proj.weight [C, 4C]  -> h.{i}.mlp.c_proj.weight (transposed)
    their .bias unchanged; trf_blocks.{i}.attn.mask / .bias (a causal-mask buffer) dropped
"""

from __future__ import annotations

import re

from mapper.formats.book import BLOCK_KEY, NORM_NAMES, rename_outer
from mapper.formats.stored import Stored, transposed

_LINEAR = re.compile(r"(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.(weight|bias)")
_SEED_BUFFERS = ("attn.mask", "attn.bias", "attn.masked_bias")


def is_seed_layout(state: dict[str, Stored]) -> bool:
    """Whether a state dict is the seed's model (the course's tree, OpenAI's fused ``c_attn`` in each block)."""
    return "tok_emb.weight" in state and any(
        m[2] == "attn.c_attn.weight" for k in state if (m := BLOCK_KEY.fullmatch(k))
    )


def seed_source(state: dict[str, Stored]) -> dict[str, Stored]:
    """The seed's state dict (``Stored`` under its own names) -> canonical names and orientation."""
    out: dict[str, Stored] = {}
    for key, stored in state.items():
        block = BLOCK_KEY.fullmatch(key)
        if block is None:
            rename_outer(key, stored, out)
            continue
        i, rest = block.groups()
        if rest in _SEED_BUFFERS:
            continue
        if found := _LINEAR.fullmatch(rest):
            out[f"h.{i}.{rest}"] = transposed(stored) if found[2] == "weight" else stored
        elif rest in NORM_NAMES:
            out[f"h.{i}.{NORM_NAMES[rest]}"] = stored
        else:
            out[key] = stored
    return out
