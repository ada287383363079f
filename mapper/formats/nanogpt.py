"""nanoGPT's checkpoints: ``ckpt.pt`` as its ``train.py`` writes it (``{"model": state dict, "model_args": {...},
"optimizer", "iter_num", "best_val_loss", "config"}``), or a bare ``model.state_dict()``.

nanoGPT names its modules as Hugging Face's GPT-2 (``transformer.wte``, ``transformer.h.{i}.attn.c_attn``, ...) but
builds them from ``nn.Linear``, which stores ``[out, in]``: the four block matrices are transposed on the way in
(``c_attn.weight`` [3C, C], rows q | k | v -> canonical [C, 3C], columns q | k | v). Also:

* ``_orig_mod.`` before every key when the model was compiled (``torch.compile``), removed by the torch reader;
* ``lm_head.weight`` is the same tensor as ``wte`` (tied), and ``h.{i}.attn.bias`` a causal-mask buffer (only
  without flash attention): dropped;
* ``model_args`` is the config: ``n_layer``, ``n_head``, ``n_embd``, ``block_size`` (the context), ``vocab_size``
  (50304 when trained from scratch: GPT-2's 50257 padded; kept as it is), ``bias``, ``dropout`` (training only);
* ``bias=False`` means no bias in any ``nn.Linear`` or LayerNorm: the q/k/v bias is absent here too
  (``qkv_bias=False``), every other bias is read as zeros, which computes exactly the same.
"""

from __future__ import annotations

import re
from typing import Any

from mapper.config import GPT2Config
from mapper.errors import CheckpointError, ConfigError
from mapper.formats.stored import Stored, transposed, zeros_like

_LINEAR_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_BLOCK_KEY = re.compile(r"h\.(\d+)\.(.+)")
_PREFIX = "transformer."
# weights whose module has a bias in GPT-2 but not in nanoGPT with bias=False (c_attn: the config's qkv_bias)
_HAS_BIAS = re.compile(r"(h\.\d+\.(ln_1|ln_2|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)|ln_f)\.weight")


def is_nanogpt_checkpoint(obj: Any) -> bool:
    """Whether a loaded ``torch.save`` object is nanoGPT's ``ckpt.pt`` (a dict with ``model`` and ``model_args``)."""
    return isinstance(obj, dict) and "model" in obj and "model_args" in obj


def is_linear_layout(state: dict[str, Stored]) -> bool:
    """Whether a Hugging-Face-named state dict stores its block matrices as ``nn.Linear`` (nanoGPT): its ``c_attn``
    is ``[3C, C]`` where Hugging Face's Conv1D is ``[C, 3C]``."""
    wte = state.get(f"{_PREFIX}wte.weight") or state.get("wte.weight")
    c_attn = state.get(f"{_PREFIX}h.0.attn.c_attn.weight") or state.get("h.0.attn.c_attn.weight")
    return wte is not None and c_attn is not None and len(wte.shape) == 2 and c_attn.shape == (3 * wte.shape[1],
                                                                                                  wte.shape[1])


def nanogpt_config(model_args: Any, origin: str) -> GPT2Config:
    """``model_args`` of a ``ckpt.pt`` -> the config."""
    if not isinstance(model_args, dict):
        raise CheckpointError(f"{origin}: its 'model_args' is not a dict of nanoGPT's GPTConfig fields")
    try:
        return GPT2Config(
            vocab_size=model_args["vocab_size"], n_positions=model_args["block_size"], n_embd=model_args["n_embd"],
            n_layer=model_args["n_layer"], n_head=model_args["n_head"], qkv_bias=bool(model_args.get("bias", True)),
        )
    except KeyError as e:
        raise CheckpointError(f"{origin}: its 'model_args' lacks nanoGPT's field {e.args[0]!r}") from None
    except ConfigError as e:
        raise CheckpointError(f"{origin}: its 'model_args' gives no valid GPT-2 config ({e})") from None


def nanogpt_source(state: dict[str, Stored]) -> dict[str, Stored]:
    """nanoGPT's state dict (``Stored``, compile prefix already gone) -> canonical names and orientation. Without
    any q/k/v bias (``bias=False``), every other bias a block or LayerNorm leaves out is read as zeros."""
    out: dict[str, Stored] = {}
    for key, stored in state.items():
        name = key.removeprefix(_PREFIX)
        block = _BLOCK_KEY.fullmatch(name)
        if block is not None and block[2] == "attn.bias":  # the causal mask, a buffer
            continue
        out[name] = transposed(stored) if block is not None and block[2] in _LINEAR_WEIGHTS else stored
    if not any(name.endswith("attn.c_attn.bias") for name in out):  # bias=False
        small = out.get("ln_f.weight")  # its dtype is the zeros' (read instead of a big matrix)
        for name, weight in list(out.items()):
            bias = name.removesuffix(".weight") + ".bias"
            if _HAS_BIAS.fullmatch(name) and bias not in out:  # [C] gains and [in, out] matrices: [out] zeros
                out[bias] = zeros_like(f"{bias} (absent: bias=False)", weight.shape[-1:], small or weight)
    return out
