"""The course's ``GPTModel`` ("Build a Large Language Model From Scratch", chapter 4): its state dict, as
``torch.save(model.state_dict(), "model.pth")`` writes it, or inside ``model_and_optimizer.pth``
(``{"model_state_dict": ..., "optimizer_state_dict": ...}``, the chapter-5 checkpoint).

Its names and the canonical ones (``nn.Linear`` stores ``[out, in]``: every matrix is transposed on the way in)::

    tok_emb.weight [V, C] -> wte.weight          pos_emb.weight [P, C] -> wpe.weight
    trf_blocks.{i}.norm1.scale, .shift -> h.{i}.ln_1.weight, .bias         (norm2 -> ln_2 likewise)
    trf_blocks.{i}.att.W_query | W_key | W_value .weight [C, C] -> h.{i}.attn.c_attn.weight [C, 3C],
        columns q | k | v, each the transpose;  their .bias [C] (only with the course's qkv_bias=True) -> .bias [3C]
    trf_blocks.{i}.att.out_proj.weight [C, C] -> h.{i}.attn.c_proj.weight (transposed), .bias
    trf_blocks.{i}.ff.layers.0 .weight [4C, C] -> h.{i}.mlp.c_fc.weight (transposed), .bias
    trf_blocks.{i}.ff.layers.2 .weight [C, 4C] -> h.{i}.mlp.c_proj.weight (transposed), .bias
    final_norm.scale, .shift -> ln_f.weight, .bias
    out_head.weight [V, C] -> lm_head.weight     (no bias; equal to tok_emb after the course loads OpenAI's weights,
                                                  then the head is tied; otherwise it stays untied)
    trf_blocks.{i}.att.mask [P, P]               the causal mask, a buffer: dropped

The book's model has GPT-2's arithmetic (LayerNorm eps 1e-5 with the biased variance, the tanh GELU, scale
1/sqrt(head_dim)), so these weights give the same logits here. The seed repository's variant of this tree
(``mapper.formats.seed``) shares everything outside the blocks' attention and MLP.
"""

from __future__ import annotations

import re

from mapper.errors import CheckpointError
from mapper.formats.stored import Stored, concatenated, transposed

BLOCK_KEY = re.compile(r"trf_blocks\.(\d+)\.(.+)")
# outside the blocks; LayerNorms as the course writes them (scale/shift) or as nn.LayerNorm does (weight/bias)
OUTER_NAMES = {
    "tok_emb.weight": "wte.weight", "pos_emb.weight": "wpe.weight", "out_head.weight": "lm_head.weight",
    "final_norm.scale": "ln_f.weight", "final_norm.shift": "ln_f.bias",
    "final_norm.weight": "ln_f.weight", "final_norm.bias": "ln_f.bias",
}  # fmt: skip
NORM_NAMES = {
    f"norm{n}.{theirs}": f"ln_{n}.{ours}"
    for n in (1, 2)
    for theirs, ours in (("scale", "weight"), ("shift", "bias"), ("weight", "weight"), ("bias", "bias"))
}
_BOOK_BLOCK_NAMES = {
    "att.out_proj.weight": "attn.c_proj.weight", "att.out_proj.bias": "attn.c_proj.bias",
    "ff.layers.0.weight": "mlp.c_fc.weight", "ff.layers.0.bias": "mlp.c_fc.bias",
    "ff.layers.2.weight": "mlp.c_proj.weight", "ff.layers.2.bias": "mlp.c_proj.bias",
}  # fmt: skip
_QKV = re.compile(r"att\.W_(query|key|value)\.(weight|bias)")
_BOOK_BUFFERS = ("att.mask",)


def is_book_layout(state: dict[str, Stored]) -> bool:
    """Whether a state dict is the course's ``GPTModel`` (separate W_query / W_key / W_value)."""
    return "tok_emb.weight" in state and any(_QKV.fullmatch(m[2]) for k in state if (m := BLOCK_KEY.fullmatch(k)))


def rename_outer(key: str, stored: Stored, out: dict[str, Stored]) -> None:
    """The names outside the blocks; an unknown key is kept as it is, so the schema check reports it."""
    out[OUTER_NAMES.get(key, key)] = stored


def book_source(state: dict[str, Stored], origin: str) -> dict[str, Stored]:
    """The course's state dict (``Stored`` under its own names) -> canonical names and orientation (module
    docstring). Raises ``CheckpointError`` when the three q/k/v projections of a block do not fit together."""
    out: dict[str, Stored] = {}
    qkv: dict[tuple[str, str], dict[str, Stored]] = {}
    for key, stored in state.items():
        block = BLOCK_KEY.fullmatch(key)
        if block is None:
            rename_outer(key, stored, out)
            continue
        i, rest = block.groups()
        if rest in _BOOK_BUFFERS:
            continue
        if found := _QKV.fullmatch(rest):
            qkv.setdefault((i, found[2]), {})[found[1]] = stored
        elif rest in _BOOK_BLOCK_NAMES:
            out[f"h.{i}.{_BOOK_BLOCK_NAMES[rest]}"] = transposed(stored) if rest.endswith("weight") else stored
        elif rest in NORM_NAMES:
            out[f"h.{i}.{NORM_NAMES[rest]}"] = stored
        else:
            out[key] = stored
    for (i, kind), parts in sorted(qkv.items()):
        out[f"h.{i}.attn.c_attn.{kind}"] = _fused_qkv(parts, kind, f"trf_blocks.{i}.att", origin)
    return out


def _fused_qkv(parts: dict[str, Stored], kind: str, where: str, origin: str) -> Stored:
    """W_query, W_key, W_value ([C, C] each, nn.Linear) -> c_attn [C, 3C] with columns q | k | v; biases -> [3C]."""
    names = ("query", "key", "value")
    absent = [f"{where}.W_{n}.{kind}" for n in names if n not in parts]
    if absent:
        raise CheckpointError(f"{origin}: {', '.join(absent)} missing while the other projections have a {kind}")
    shapes = {parts[n].shape for n in names}
    expected_rank = 2 if kind == "weight" else 1
    if len(shapes) != 1 or len(next(iter(shapes))) != expected_rank:
        described = ", ".join(f"W_{n} {parts[n].shape}" for n in names)
        raise CheckpointError(f"{origin}: {where}'s q/k/v {kind}s do not fit together ({described})")
    if kind == "weight":
        return concatenated([transposed(parts[n]) for n in names], axis=1)
    return concatenated([parts[n] for n in names], axis=0)
