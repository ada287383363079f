"""Checkpoints in and out: every GPT-2 weight format -> the canonical ``dict[str, np.ndarray]`` and back.

Read (``load_checkpoint``, a file or a directory; ``detect_format`` names what it found):

* ``safetensors``: Hugging Face ``model.safetensors``, with or without the ``transformer.`` prefix, with or
  without the ``h.N.attn.bias`` mask buffers of the Hub's files; also what ``save_checkpoint`` writes.
* ``safetensors-sharded``: ``model.safetensors.index.json`` + the shards its ``weight_map`` names.
* ``pytorch``: ``pytorch_model.bin`` (zip or legacy format), read with ``torch.load(weights_only=True)``.
* ``openai-tf``: OpenAI's TensorFlow-1 checkpoint (``hparams.json``, ``checkpoint``, ``model.ckpt.*``).

The config comes from ``config.json`` (or ``hparams.json``) beside the weights, else from the shapes.
Every problem is a ``CheckpointError`` that names the file, the key and both shapes where they apply,
raised before any parameter is returned: a checkpoint loads whole or not at all.

Write (``save_checkpoint``): a directory with ``model.safetensors`` (Hugging Face names and layout, so
``transformers.GPT2LMHeadModel.from_pretrained(dir)`` loads it) and ``config.json``, each written atomically.

Classification heads are Hugging Face's ``score.weight`` without bias. Files this project wrote before that
change also hold a ``score.bias``: one that is exactly zero is dropped (the head computes the same logits
without it); a nonzero one is refused, because no bias-free head reproduces it.

LoRA adapters are never written into a model checkpoint: transformers would ignore the unknown keys and
silently compute the base model. ``save_checkpoint`` refuses them and names the two ways out:
``mapper.merge_lora`` (a plain GPT-2 every loader reads) or ``save_lora_adapters`` (the adapters alone, with
their LoraConfig, beside an unchanged base checkpoint; ``load_lora_adapters`` reads them back).

This file detects the format and assembles the canonical parameters; each format's reader and the writers live
in ``mapper/formats/`` and ``mapper/save.py``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from mapper.atomic import atomic_write
from mapper.config import PRESETS, QKV_BIAS_KEY, GPT2Config
from mapper.errors import CheckpointError, ConfigError, describe_key_mismatch
from mapper.formats import openai_tf
from mapper.formats.safetensors_file import (
    load_tensors,
    safetensors_metadata,
    safetensors_source,
    save_tensors,
    sharded_safetensors_source,
)
from mapper.formats.stored import Stored
from mapper.formats.torch_file import torch_source
from mapper.layouts import ATTENTION_LAYOUTS, from_module_state
from mapper.save import HF_PREFIX, LAYOUT_KEY, load_lora_adapters, save_checkpoint, save_lora_adapters
from mapper.schema import param_shapes, validate_params

__all__ = [
    "CheckpointError",
    "atomic_write",
    "detect_format",
    "load_checkpoint",
    "load_lora_adapters",
    "load_tensors",
    "save_checkpoint",
    "save_lora_adapters",
    "save_tensors",
]

# Buffers, not parameters: the causal mask (``attn.bias`` [1, 1, P, P]) and the mask fill value
# (``attn.masked_bias``). Matched on the whole key: ``h.0.attn.c_attn.bias`` also ends in "attn.bias".
_BUFFER_KEY = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")


# ----- format detection -----


def detect_format(path: str | os.PathLike[str]) -> str:
    """The format ``path`` holds: ``safetensors``, ``safetensors-sharded``, ``pytorch`` or ``openai-tf``.

    ``path`` is a directory, a weights file, or an OpenAI checkpoint prefix (``.../model.ckpt``).
    A directory holding several formats resolves in that order (safetensors first: it needs no pickle).
    """
    p = Path(path)
    if p.is_dir():
        for filename, fmt in (
            ("model.safetensors", "safetensors"),
            ("model.safetensors.index.json", "safetensors-sharded"),
            ("pytorch_model.bin", "pytorch"),
            ("checkpoint", "openai-tf"),
            ("model.ckpt.index", "openai-tf"),
        ):
            if (p / filename).is_file():
                return fmt
        raise CheckpointError(
            f"directory {p} holds no GPT-2 checkpoint: expected model.safetensors, "
            "model.safetensors.index.json, pytorch_model.bin, or an OpenAI TensorFlow checkpoint "
            "(hparams.json + checkpoint + model.ckpt.*)"
        )
    if p.is_file():
        if p.name.endswith(".safetensors.index.json"):
            return "safetensors-sharded"
        if p.suffix == ".safetensors":
            return "safetensors"
        if p.suffix in (".bin", ".pt", ".pth"):
            return "pytorch"
        if p.suffix == ".index":
            return "openai-tf"
        with open(p, "rb") as f:
            head = f.read(9)
        if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # a zip archive, or a pickle (legacy torch)
            return "pytorch"
        if len(head) == 9 and head[8:9] == b"{":  # u64 header length, then the JSON header
            return "safetensors"
        raise CheckpointError(
            f"{p} is not a checkpoint format this project reads (safetensors, pytorch_model.bin, OpenAI "
            "TensorFlow checkpoint)"
        )
    if Path(f"{p}.index").is_file():
        return "openai-tf"
    raise CheckpointError(f"checkpoint path {p} does not exist")


# ----- loading -----


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[GPT2Config, dict[str, np.ndarray]]:
    """Load any supported GPT-2 checkpoint into ``(config, params)`` in the canonical schema.

    ``params``: flat dict, canonical names, Conv1D ``[in, out]`` orientation (``wte.weight`` [V, C],
    ``h.{i}.attn.c_attn.weight`` [C, 3C], ...), in ``param_shapes(config)`` order; fresh writable C-contiguous
    arrays, float32/float64 as stored, float16/bfloat16 upcast to float32. A stored ``lm_head.weight`` equal
    to ``wte.weight`` is dropped (tied head); a different one makes the config untied.
    Raises ``CheckpointError``.
    """
    p = Path(path)
    fmt = detect_format(p)
    if fmt == "openai-tf":
        stored, origin, config = _openai_tf_source(p)
    else:
        if fmt == "safetensors":
            file = p / "model.safetensors" if p.is_dir() else p
            raw = safetensors_source(file)
            layout = safetensors_metadata(file).get(LAYOUT_KEY)
            if layout is not None:
                return _load_module_layout(raw, layout, file)
        elif fmt == "safetensors-sharded":
            file = p / "model.safetensors.index.json" if p.is_dir() else p
            raw = sharded_safetensors_source(file)
        else:
            file = p / "pytorch_model.bin" if p.is_dir() else p
            raw = torch_source(file)
        origin = str(file)
        stored = _canonical_keys(raw, origin)
        config = _read_config_json(file.parent / "config.json")
    return _assemble(stored, origin, config)


def _canonical_keys(raw: dict[str, Stored], origin: str) -> dict[str, Stored]:
    """Strip the ``transformer.`` prefix and drop the attention-mask buffers."""
    out: dict[str, Stored] = {}
    for key, tensor in raw.items():
        name = key[len(HF_PREFIX) :] if key.startswith(HF_PREFIX) else key
        if _BUFFER_KEY.fullmatch(name):
            continue
        if name in out:
            raise CheckpointError(f"{origin} holds {name!r} twice: as {out[name].key!r} and as {key!r}")
        out[name] = tensor
    return out


def _read_config_json(path: Path) -> GPT2Config | None:
    if not path.is_file():
        return None
    try:
        return GPT2Config.from_hf_dict(json.loads(path.read_text()))
    except (ConfigError, json.JSONDecodeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path} is not a usable GPT-2 config.json: {e}") from None


def _assemble(
    stored: dict[str, Stored], origin: str, config: GPT2Config | None
) -> tuple[GPT2Config, dict[str, np.ndarray]]:
    """Check names and shapes against the schema (nothing read yet), then read and tie/untie the head."""
    if "wte.weight" not in stored:
        keys = list(stored)
        raise CheckpointError(
            f"{origin} is not a GPT-2 checkpoint: it has no 'wte.weight' (nor 'transformer.wte.weight'). "
            f"Its first keys: {', '.join(keys[:5]) or '(none)'}{' ...' if len(keys) > 5 else ''}"
        )
    if config is None:
        config = _infer_config(stored, origin)

    # The stored layout differs from the canonical one only for score.weight (nn.Linear: [n_classes, C]).
    expected = dict(param_shapes(config))
    if "score.weight" in expected:
        expected["score.weight"] = expected["score.weight"][::-1]
    if config.tie_word_embeddings and "lm_head.weight" in stored:
        expected["lm_head.weight"] = (config.vocab_size, config.n_embd)
    if "score.bias" in stored and "score.weight" in expected:
        stored = dict(stored)
        _check_zero_score_bias(stored.pop("score.bias").read(), origin)
    if not config.qkv_bias:  # our own Hugging Face export of a model without it holds zeros there
        stored = dict(stored)
        for i in range(config.n_layer):
            bias = stored.pop(f"h.{i}.attn.c_attn.bias", None)
            if bias is not None and np.any(bias.read() != 0):
                raise CheckpointError(
                    f"{origin}: its config says the model has no q/k/v bias ({QKV_BIAS_KEY}: false), but "
                    f"{bias.key!r} is not zero; remove that field from config.json to load the bias"
                )
    missing = [k for k in expected if k not in stored]
    unexpected = [stored[k].key for k in stored if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{origin} does not match the GPT-2 config {_describe(config)}: "
            f"{describe_key_mismatch(missing, unexpected)}. Check that the config (config.json or hparams.json "
            "beside the weights) belongs to these weights."
        )
    for name, shape in expected.items():
        if name in stored and stored[name].shape != shape:
            raise CheckpointError(
                f"{origin}: key {stored[name].key!r} has shape {stored[name].shape}, but the config "
                f"{_describe(config)} expects {shape}"
            )

    params: dict[str, np.ndarray] = {}
    for name in expected:
        if name in stored:
            params[name] = stored[name].read()
    dtypes = sorted({str(a.dtype) for a in params.values()})
    if len(dtypes) != 1:
        raise CheckpointError(f"{origin} mixes dtypes {dtypes}; this project keeps one dtype per model")
    if "score.weight" in params:
        params["score.weight"] = np.ascontiguousarray(params["score.weight"].T)
    if config.tie_word_embeddings and "lm_head.weight" in params:
        if np.array_equal(params["lm_head.weight"], params["wte.weight"]):
            del params["lm_head.weight"]
        else:
            config = config.replace(tie_word_embeddings=False)
    return config, {name: params[name] for name in param_shapes(config)}


def _check_zero_score_bias(bias: np.ndarray, origin: str) -> None:
    """An older file's ``score.bias``: dropped when it is exactly zero, refused otherwise (module docstring)."""
    if np.any(bias != 0):
        raise CheckpointError(
            f"{origin} holds a nonzero 'score.bias' (max |b| = {float(np.abs(bias).max()):.3g}); classification heads "
            "here are Hugging Face's score.weight without bias, and no bias-free head computes the same logits. "
            "Retrain the head, or load the file with an older version of this project"
        )


def _infer_config(stored: dict[str, Stored], origin: str) -> GPT2Config:
    """V, C from wte; P from wpe; L from the h.N keys; n_head from the preset of that width, else C // 64.

    The head is tied here; ``_assemble`` unties it if a stored ``lm_head.weight`` differs from ``wte``.
    """
    V, C = _matrix_shape(stored, "wte.weight", origin)
    P, _ = _matrix_shape(stored, "wpe.weight", origin)
    layers = {int(m.group(1)) for k in stored if (m := re.match(r"h\.(\d+)\.", k))}
    if not layers:
        raise CheckpointError(f"{origin} has embeddings but no transformer blocks (h.0.*); not a GPT-2 model")
    n_head = next((p["n_head"] for p in PRESETS.values() if p["n_embd"] == C), None)
    if n_head is None:
        if C % 64 != 0:
            raise CheckpointError(
                f"{origin}: cannot infer n_head for n_embd={C} (no GPT-2 preset has that width and it is "
                "not a multiple of 64); put a config.json with 'n_head' beside the weights"
            )
        n_head = C // 64  # every released GPT-2 has head size 64
    # A classification head's size comes from its weight (Hugging Face layout [n_classes, C]).
    n_classes = stored["score.weight"].shape[0] if "score.weight" in stored else None
    try:
        return GPT2Config(
            vocab_size=V, n_positions=P, n_embd=C, n_layer=max(layers) + 1, n_head=n_head, n_classes=n_classes
        )
    except ConfigError as e:
        raise CheckpointError(f"{origin}: the shapes give no valid GPT-2 config ({e}); add a config.json") from None


def _matrix_shape(stored: dict[str, Stored], name: str, origin: str) -> tuple[int, int]:
    if name not in stored:
        raise CheckpointError(f"{origin} lacks {name!r}; cannot infer the config (add a config.json)")
    shape = stored[name].shape
    if len(shape) != 2:
        raise CheckpointError(f"{origin}: key {stored[name].key!r} has shape {shape}, expected a matrix [rows, C]")
    return shape[0], shape[1]


def _describe(config: GPT2Config) -> str:
    return (
        f"(V={config.vocab_size}, P={config.n_positions}, C={config.n_embd}, L={config.n_layer}, "
        f"NH={config.n_head}, tied={config.tie_word_embeddings}, n_classes={config.n_classes})"
    )


def _load_module_layout(raw: dict[str, Stored], layout: str, file: Path) -> tuple[GPT2Config, dict[str, np.ndarray]]:
    """A file written by ``save_checkpoint(fmt="custom" | "fused")``: module state -> canonical params."""
    if layout not in ATTENTION_LAYOUTS:
        raise CheckpointError(f"{file} records an unknown layout {layout!r} (expected one of {ATTENTION_LAYOUTS})")
    config = _read_config_json(file.parent / "config.json")
    if config is None:
        raise CheckpointError(f"{file} is in the torch engine's {layout!r} layout and needs its config.json beside it")
    state = {key: stored.read() for key, stored in raw.items()}
    if "score.bias" in state and config.n_classes is not None:
        _check_zero_score_bias(state.pop("score.bias"), str(file))
    try:
        params = from_module_state(state, config, layout)
        validate_params(params, config)
    except ValueError as e:
        raise CheckpointError(f"{file} ({layout} layout) does not match its config.json: {e}") from None
    return config, params


def _openai_tf_source(path: Path) -> tuple[dict[str, Stored], str, GPT2Config | None]:
    prefix = openai_tf.resolve_prefix(path)
    num_shards, entries = openai_tf.read_index(prefix)
    stored: dict[str, Stored] = {}
    for tf_name, entry in entries.items():
        name = openai_tf.canonical_name(tf_name) or tf_name
        shape = openai_tf.canonical_shape(tf_name, entry.shape)

        def read(entry: openai_tf.TensorEntry = entry, shape: tuple[int, ...] = shape) -> np.ndarray:
            arr = openai_tf.read_tensor(prefix, num_shards, entry).reshape(shape)
            return arr.astype(np.float32) if arr.dtype == np.float16 else arr

        stored[name] = Stored(tf_name, shape, read)
    hparams = prefix.parent / "hparams.json"
    config = None
    if hparams.is_file():
        try:
            config = GPT2Config.from_openai_hparams(json.loads(hparams.read_text()))
        except (ConfigError, json.JSONDecodeError, TypeError) as e:
            raise CheckpointError(f"{hparams} is not a usable GPT-2 hparams.json: {e}") from None
    return stored, f"{prefix}.index", config
