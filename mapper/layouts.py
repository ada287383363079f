"""Canonical parameters <-> the torch engine's module state, for both attention layouts.

This is the only place that knows how the torch module stores a weight. The canonical schema keeps
Conv1D ``[in, out]`` matrices (``y = x @ W + b``); the engine uses ``nn.Linear``, which stores
``[out, in]`` (``y = x @ W.T + b``), so every matrix below is transposed on the way in and out.

Module state names (``torch_gpt2.GPT2.state_dict()``), ``C`` = n_embd, ``V`` = vocab, ``P`` = n_positions::

    wte.weight [V, C]  wpe.weight [P, C]  ln_f.weight / .bias [C]      (identical to canonical)
    h.{i}.ln_1.* / h.{i}.ln_2.* [C]                                   (identical to canonical)
    h.{i}.attn.c_proj.weight [C, C]     = canonical.T   (square: only a value check sees a missing .T)
    h.{i}.mlp.c_fc.weight    [4C, C]    = canonical.T   h.{i}.mlp.c_proj.weight [C, 4C] = canonical.T
    fused:  h.{i}.attn.c_attn.weight [3C, C] = c_attn.weight.T, rows q | k | v;  .bias [3C] unchanged
    custom: h.{i}.attn.q_proj.weight [C, C]  = c_attn.weight[:, 0:C].T     .bias = c_attn.bias[0:C]
            h.{i}.attn.k_proj.weight [C, C]  = c_attn.weight[:, C:2C].T    .bias = c_attn.bias[C:2C]
            h.{i}.attn.v_proj.weight [C, C]  = c_attn.weight[:, 2C:3C].T   .bias = c_attn.bias[2C:3C]
    lm_head.weight [V, C]          (untied head only; canonical is already nn.Linear's [out, in])
    score.weight [n_classes, C]    = canonical.T    (classification head only; no bias, as in Hugging Face)

LoRA adapters (``lora``, a :class:`mapper.lora.LoraConfig`), per adapted layer, in nn.Linear orientation like
the weight they adapt (``y += scale * (x @ lora_A.T) @ lora_B.T``)::

    h.{i}.<layer>.lora_A [r, in]   = canonical lora_A.T     h.{i}.<layer>.lora_B [out, r] = canonical lora_B.T

Adapters on ``attn.c_attn`` exist only in the fused layout: the custom layout's three projections would need
one ``lora_A`` shared between them, which that layout has no place for (``check_lora_layout`` says so).

The tied LM head has no entry of its own: the module computes ``logits = h @ wte.weight.T``.
All biases keep their shape. Every returned array is a fresh C-contiguous copy, never a view of the input.
"""

from __future__ import annotations

import numpy as np

from mapper.config import GPT2Config
from mapper.errors import describe_key_mismatch
from mapper.lora import LoraConfig, is_lora_key
from mapper.schema import param_shapes, validate_params

ATTENTION_LAYOUTS = ("custom", "fused")

# Canonical Conv1D names inside a block whose module weight is the transpose (c_attn is handled per layout).
_TRANSPOSED_BLOCK_WEIGHTS = ("attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_QKV_NAMES = ("q_proj", "k_proj", "v_proj")


def check_attention_layout(attention: str) -> None:
    """Raise ``ValueError`` unless ``attention`` is ``"custom"`` or ``"fused"``."""
    if attention not in ATTENTION_LAYOUTS:
        raise ValueError(f"attention layout must be one of {ATTENTION_LAYOUTS}, got {attention!r}")


def check_lora_layout(attention: str, lora: LoraConfig | None) -> None:
    """Raise ``ValueError`` if ``lora`` adapts attention and ``attention`` is the custom layout."""
    check_attention_layout(attention)
    if lora is not None and "attn" in lora.targets and attention == "custom":
        raise ValueError(
            "LoRA on attention needs the fused layout (attention='fused'): the custom layout's separate q_proj, "
            "k_proj, v_proj cannot share the one lora_A of attn.c_attn; LoRA on 'mlp' alone works in both layouts"
        )


def _transposed(name: str) -> bool:
    """Canonical names whose module tensor is the transpose (c_attn.weight is handled per layout)."""
    block_name = name.split(".", 2)[2] if name.startswith("h.") else None
    return block_name in _TRANSPOSED_BLOCK_WEIGHTS or name == "score.weight" or is_lora_key(name)


def _copy(a: np.ndarray) -> np.ndarray:
    return np.array(a, order="C", copy=True)


def module_state_shapes(
    config: GPT2Config, attention: str, lora: LoraConfig | None = None
) -> dict[str, tuple[int, ...]]:
    """Every module state name and its shape, for ``attention`` = ``"custom"`` or ``"fused"`` (and ``lora``)."""
    check_lora_layout(attention, lora)
    C = config.n_embd
    shapes: dict[str, tuple[int, ...]] = {}
    for name, shape in param_shapes(config, lora).items():
        block_name = name.split(".", 2)[2] if name.startswith("h.") else None
        if block_name == "attn.c_attn.weight":
            if attention == "fused":
                shapes[name] = (3 * C, C)
            else:
                for proj in _QKV_NAMES:
                    shapes[name.replace("c_attn.weight", f"{proj}.weight")] = (C, C)
        elif block_name == "attn.c_attn.bias":
            if attention == "fused":
                shapes[name] = (3 * C,)
            else:
                for proj in _QKV_NAMES:
                    shapes[name.replace("c_attn.bias", f"{proj}.bias")] = (C,)
        elif _transposed(name):
            shapes[name] = shape[::-1]
        else:
            shapes[name] = shape
    return shapes


def to_module_state(
    params: dict[str, np.ndarray], config: GPT2Config, attention: str, lora: LoraConfig | None = None
) -> dict[str, np.ndarray]:
    """Canonical params (with the adapters of ``lora``, if given) -> the torch module's state (module docstring)."""
    check_lora_layout(attention, lora)
    validate_params(params, config, lora)
    C = config.n_embd
    state: dict[str, np.ndarray] = {}
    for name, value in params.items():
        block_name = name.split(".", 2)[2] if name.startswith("h.") else None
        if block_name == "attn.c_attn.weight":  # [C, 3C], columns q | k | v
            if attention == "fused":
                state[name] = _copy(value.T)  # [3C, C], rows q | k | v
            else:
                for j, proj in enumerate(_QKV_NAMES):
                    state[name.replace("c_attn.weight", f"{proj}.weight")] = _copy(value[:, j * C : (j + 1) * C].T)
        elif block_name == "attn.c_attn.bias" and attention == "custom":
            for j, proj in enumerate(_QKV_NAMES):
                state[name.replace("c_attn.bias", f"{proj}.bias")] = _copy(value[j * C : (j + 1) * C])
        elif _transposed(name):
            state[name] = _copy(value.T)
        else:
            state[name] = _copy(value)
    return state


def from_module_state(
    state: dict[str, np.ndarray], config: GPT2Config, attention: str, lora: LoraConfig | None = None
) -> dict[str, np.ndarray]:
    """The torch module's state (or anything keyed like it, e.g. its gradients) -> canonical params.

    With ``lora`` the state holds that config's adapters too, and so does the result. Raises ``ValueError``
    naming missing/unexpected keys or a wrong shape.
    """
    expected = module_state_shapes(config, attention, lora)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(f"module state does not match the {attention!r} layout of the config: "
                         + describe_key_mismatch(missing, unexpected))
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise ValueError(f"module state {name!r} has shape {tuple(state[name].shape)}, expected {shape}")
    params: dict[str, np.ndarray] = {}
    for name in param_shapes(config, lora):
        block_name = name.split(".", 2)[2] if name.startswith("h.") else None
        if block_name == "attn.c_attn.weight":
            if attention == "fused":
                params[name] = _copy(state[name].T)
            else:  # [C, C] x 3 (out x in) -> columns q | k | v of [C, 3C]
                parts = [state[name.replace("c_attn.weight", f"{proj}.weight")].T for proj in _QKV_NAMES]
                params[name] = np.ascontiguousarray(np.concatenate(parts, axis=1))
        elif block_name == "attn.c_attn.bias" and attention == "custom":
            parts = [state[name.replace("c_attn.bias", f"{proj}.bias")] for proj in _QKV_NAMES]
            params[name] = np.concatenate(parts)
        elif _transposed(name):
            params[name] = _copy(state[name].T)
        else:
            params[name] = _copy(state[name])
    return params
