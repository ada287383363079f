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
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from mapper import tf_checkpoint
from mapper.config import PRESETS, GPT2Config
from mapper.errors import CheckpointError, ConfigError
from mapper.layouts import ATTENTION_LAYOUTS, from_module_state, to_module_state
from mapper.lora import LoraConfig, check_lora_params, is_lora_key
from mapper.schema import describe_key_mismatch, param_shapes, validate_params

# Buffers, not parameters: the causal mask (``attn.bias`` [1, 1, P, P]) and the mask fill value
# (``attn.masked_bias``). Matched on the whole key: ``h.0.attn.c_attn.bias`` also ends in "attn.bias".
_BUFFER_KEY = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
_HF_PREFIX = "transformer."
_SAFETENSORS_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
_SAFETENSORS_CODE = {np.dtype("float32"): "F32", np.dtype("float64"): "F64"}
_LAYOUT_KEY = "gpt2_layout"  # metadata / config.json field naming a torch-module layout (custom or fused)
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit; a larger "length" means this is not one
_LORA_METADATA_KEY = "gpt2_lora"  # safetensors metadata of an adapters file: the LoraConfig as JSON


@dataclass(frozen=True)
class _Stored:
    """One tensor in a checkpoint, not yet read: its stored shape and how to read it."""

    key: str  # the name in the file, for messages
    shape: tuple[int, ...]
    read: Callable[[], np.ndarray]  # -> writable C-contiguous float32/float64 array of ``shape``


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
            raw = _safetensors_source(file)
            layout = _safetensors_metadata(file).get(_LAYOUT_KEY)
            if layout is not None:
                return _load_module_layout(raw, layout, file)
        elif fmt == "safetensors-sharded":
            file = p / "model.safetensors.index.json" if p.is_dir() else p
            raw = _sharded_safetensors_source(file)
        else:
            file = p / "pytorch_model.bin" if p.is_dir() else p
            raw = _torch_source(file)
        origin = str(file)
        stored = _canonical_keys(raw, origin)
        config = _read_config_json(file.parent / "config.json")
    return _assemble(stored, origin, config)


def _canonical_keys(raw: dict[str, _Stored], origin: str) -> dict[str, _Stored]:
    """Strip the ``transformer.`` prefix and drop the attention-mask buffers."""
    out: dict[str, _Stored] = {}
    for key, tensor in raw.items():
        name = key[len(_HF_PREFIX) :] if key.startswith(_HF_PREFIX) else key
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
    stored: dict[str, _Stored], origin: str, config: GPT2Config | None
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


def _infer_config(stored: dict[str, _Stored], origin: str) -> GPT2Config:
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


def _matrix_shape(stored: dict[str, _Stored], name: str, origin: str) -> tuple[int, int]:
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


# ----- safetensors -----


def _safetensors_source(file: Path) -> dict[str, _Stored]:
    """The header of a safetensors file (u64 LE length N, N bytes of JSON, then the data) as ``_Stored``.

    The data is read with ``readinto`` straight into each fresh array: a load costs one copy of the weights
    in memory (safetensors' own numpy reader holds a transient second copy; measured 1.9x the file size).
    """
    try:
        with open(file, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{file} is truncated or empty: {file_size} bytes, no safetensors header")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(_MAX_HEADER_BYTES, file_size - 8):
                raise CheckpointError(
                    f"{file} is not a valid safetensors file (truncated or corrupt): header length "
                    f"{header_len} but the file has {file_size} bytes"
                )
            header = json.loads(f.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not a valid safetensors file: its header is not JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {file}: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file} is not a valid safetensors file: its header is not a JSON object")
    data_start = 8 + header_len
    out: dict[str, _Stored] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            code, shape, (begin, end) = (
                info["dtype"],
                tuple(int(d) for d in info["shape"]),
                info["data_offsets"],
            )
            itemsize = _SAFETENSORS_ITEMSIZE[code]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: the header entry for {key!r} is malformed: {info!r}") from None
        if end - begin != math.prod(shape) * itemsize or begin < 0:
            raise CheckpointError(
                f"{file}: key {key!r} ({code} {list(shape)}) spans bytes [{begin}, {end}), which does not "
                "fit its dtype and shape"
            )
        if data_start + end > file_size:
            raise CheckpointError(
                f"{file} is truncated: key {key!r} ends at byte {data_start + end} but the file has {file_size} bytes"
            )
        out[key] = _Stored(key, shape, _safetensors_reader(file, key, code, shape, data_start + begin))
    return out


def _safetensors_metadata(file: Path) -> dict[str, str]:
    """The ``__metadata__`` entry of a safetensors header (the file was already checked by the caller)."""
    with open(file, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        metadata = json.loads(f.read(header_len)).get("__metadata__") or {}
    return metadata if isinstance(metadata, dict) else {}


def _load_module_layout(raw: dict[str, _Stored], layout: str, file: Path) -> tuple[GPT2Config, dict[str, np.ndarray]]:
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


def _safetensors_reader(
    file: Path, key: str, code: str, shape: tuple[int, ...], offset: int
) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        if code in ("F32", "F64", "F16"):
            raw = np.empty(shape, dtype={"F32": "<f4", "F64": "<f8", "F16": "<f2"}[code])
        elif code == "BF16":
            raw = np.empty(shape, dtype="<u2")
        else:
            raise CheckpointError(f"{file}: key {key!r} has dtype {code}; GPT-2 parameters must be floating point")
        _read_exact(file, offset, raw, key)
        if code == "BF16":
            # bfloat16 is the top half of a float32: shift the 16 stored bits into place.
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return raw.astype(np.float32) if code == "F16" else raw

    return read


def _read_exact(file: Path, offset: int, out: np.ndarray, key: str) -> None:
    with open(file, "rb") as f:
        f.seek(offset)
        got = f.readinto(memoryview(out).cast("B"))
    if got != out.nbytes:
        raise CheckpointError(f"{file} is truncated: read {got} of {out.nbytes} bytes of {key!r}")


def _sharded_safetensors_source(index_file: Path) -> dict[str, _Stored]:
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_file} is not a safetensors index (needs a 'weight_map' object): {e}") from None
    out: dict[str, _Stored] = {}
    for shard_name in sorted(set(weight_map.values())):
        shard = index_file.parent / shard_name
        if not shard.is_file():
            raise CheckpointError(
                f"{index_file} names shard {shard_name!r}, which does not exist in {index_file.parent}"
            )
        tensors = _safetensors_source(shard)
        for key, shard_of_key in weight_map.items():
            if shard_of_key == shard_name:
                if key not in tensors:
                    raise CheckpointError(f"{index_file} puts {key!r} in {shard_name}, but that shard lacks it")
                out[key] = tensors[key]
    return out


# ----- pytorch_model.bin -----


def _torch_source(file: Path) -> dict[str, _Stored]:
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

    return {k: _Stored(k, tuple(v.shape), reader(k, v)) for k, v in state.items()}


# ----- OpenAI TensorFlow checkpoint -----


def _openai_tf_source(path: Path) -> tuple[dict[str, _Stored], str, GPT2Config | None]:
    prefix = tf_checkpoint.resolve_prefix(path)
    num_shards, entries = tf_checkpoint.read_index(prefix)
    stored: dict[str, _Stored] = {}
    for tf_name, entry in entries.items():
        name = tf_checkpoint.canonical_name(tf_name) or tf_name
        shape = tf_checkpoint.canonical_shape(tf_name, entry.shape)

        def read(entry: tf_checkpoint.TensorEntry = entry, shape: tuple[int, ...] = shape) -> np.ndarray:
            arr = tf_checkpoint.read_tensor(prefix, num_shards, entry).reshape(shape)
            return arr.astype(np.float32) if arr.dtype == np.float16 else arr

        stored[name] = _Stored(tf_name, shape, read)
    hparams = prefix.parent / "hparams.json"
    config = None
    if hparams.is_file():
        try:
            config = GPT2Config.from_openai_hparams(json.loads(hparams.read_text()))
        except (ConfigError, json.JSONDecodeError, TypeError) as e:
            raise CheckpointError(f"{hparams} is not a usable GPT-2 hparams.json: {e}") from None
    return stored, f"{prefix}.index", config


# ----- saving -----


def save_checkpoint(
    params: dict[str, np.ndarray], config: GPT2Config, path: str | os.PathLike[str], *, fmt: str = "hf"
) -> Path:
    """Write ``params`` (canonical schema, float32/float64) to the directory ``path``; return it.

    ``fmt="hf"`` (default) is described below. ``fmt="custom"`` / ``"fused"`` writes the torch engine's module
    state instead (``mapper.layouts``; nn.Linear ``[out, in]`` matrices, split or fused q/k/v), with the layout
    in the safetensors metadata and config.json (``"gpt2_layout"``); ``load_checkpoint`` reads it back.

    Writes ``model.safetensors`` in Hugging Face's names and layout (``transformer.`` prefix on the body,
    ``lm_head.weight`` only when untied, ``score.weight`` transposed to nn.Linear's [n_classes, C], no bias, so
    ``transformers.GPT2ForSequenceClassification.from_pretrained`` reads a classifier; its config.json carries
    ``pad_token_id``), metadata ``{"format": "pt"}``, and ``config.json``; each file atomically (temp file in
    the same directory, fsync, rename), so a crash leaves the old file or the new one, never half of one.

    Parameters holding LoRA adapters are refused (module docstring): merge them first (``mapper.merge_lora``),
    or write the adapters alone with :func:`save_lora_adapters`.
    """
    if fmt not in ("hf", *ATTENTION_LAYOUTS):
        raise CheckpointError(f"unknown checkpoint layout {fmt!r}; choose 'hf', 'custom' or 'fused'")
    directory = Path(path)
    adapters = [k for k in params if is_lora_key(k)]
    if adapters:
        raise CheckpointError(
            f"cannot save to {directory}: the parameters hold {len(adapters)} LoRA adapter tensor(s) ({adapters[0]}, "
            "...), which transformers and every GPT-2 loader would ignore. Save mapper.merge_lora(params, lora) for "
            "a plain GPT-2, or the adapters alone with mapper.save_lora_adapters(params, lora, path)"
        )
    try:
        validate_params(params, config)
    except ValueError as e:
        raise CheckpointError(f"cannot save to {directory}: {e}") from None
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"cannot save to {directory}: it exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)

    tensors: dict[str, np.ndarray] = {}
    metadata = {"format": "pt"}
    config_dict = config.to_hf_dict()
    if fmt == "hf":
        for name in param_shapes(config):
            if name == "score.weight":
                tensors[name] = params[name].T  # canonical [C, n_classes] -> nn.Linear [n_classes, C]
            elif name == "lm_head.weight":
                tensors[name] = params[name]
            else:
                tensors[_HF_PREFIX + name] = params[name]
    else:  # the torch engine's own module state; the layout is recorded so the loader can undo it
        tensors = to_module_state(params, config, fmt)
        metadata[_LAYOUT_KEY] = fmt
        config_dict[_LAYOUT_KEY] = fmt
    atomic_write(directory / "model.safetensors", lambda f: _write_safetensors(f, tensors, metadata))
    config_bytes = (json.dumps(config_dict, indent=2) + "\n").encode()
    atomic_write(directory / "config.json", lambda f: f.write(config_bytes))
    return directory


def save_lora_adapters(
    params: dict[str, np.ndarray], lora: LoraConfig, path: str | os.PathLike[str]
) -> Path:
    """Write the LoRA adapters of ``params`` (canonical names and ``[in, out]`` orientation; any other key is
    left out) to the safetensors file ``path``, with ``lora`` in its metadata; atomically. Returns the path.

    The adapters must be complete for ``lora`` (every target layer of every block). Their base model is saved
    separately (``save_checkpoint`` of the params without adapters), usually once.
    """
    try:
        check_lora_params(params, lora)
    except ValueError as e:
        raise CheckpointError(f"cannot save LoRA adapters to {path}: {e}") from None
    adapters = {k: v for k, v in params.items() if is_lora_key(k)}
    save_tensors(path, adapters, {_LORA_METADATA_KEY: json.dumps(lora.to_dict())})
    return Path(path)


def load_lora_adapters(path: str | os.PathLike[str]) -> tuple[LoraConfig, dict[str, np.ndarray]]:
    """What :func:`save_lora_adapters` wrote: ``(lora, adapters)``; add them to the base parameters with
    ``{**params, **adapters}`` (``validate_params(params, config, lora)`` then checks that they fit)."""
    tensors, metadata = load_tensors(path)
    if _LORA_METADATA_KEY not in metadata:
        raise CheckpointError(f"{path} is not a LoRA adapters file: its metadata has no {_LORA_METADATA_KEY!r}")
    try:
        lora = LoraConfig.from_dict(json.loads(metadata[_LORA_METADATA_KEY]))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: unusable LoRA settings in its metadata ({e})") from None
    foreign = [k for k in tensors if not is_lora_key(k)]
    if foreign:
        raise CheckpointError(f"{path} holds tensors that are not LoRA adapters: {', '.join(foreign[:4])}")
    return lora, tensors


def _write_safetensors(f: BinaryIO, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """The safetensors layout: u64 LE header length, JSON header padded to 8 bytes, tensors back to back."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, arr in tensors.items():
        header[name] = {
            "dtype": _SAFETENSORS_CODE[np.dtype(arr.dtype)],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keeps every tensor 8-byte aligned in the file
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for arr in tensors.values():
        little = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
        f.write(memoryview(little).cast("B"))


def atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Write ``path`` so that a crash leaves the old file or the new one, never half of one: ``write(f)`` fills a
    temporary file in the same folder, which is fsynced, then renamed over ``path``; the rename is fsynced too."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared model from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # Make the rename itself durable.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_tensors(path: str | os.PathLike[str], tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
                 ) -> None:
    """Write float32/float64 arrays under any names to one safetensors file, atomically (e.g. optimizer state)."""
    for name, arr in tensors.items():
        if np.dtype(arr.dtype) not in _SAFETENSORS_CODE:
            raise CheckpointError(f"cannot save {name!r}: dtype {arr.dtype}; only float32/float64 are written")
    atomic_write(Path(path), lambda f: _write_safetensors(f, tensors, {"format": "pt", **(metadata or {})}))


def load_tensors(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read every tensor of a safetensors file and its metadata (what ``save_tensors`` wrote)."""
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"{file} does not exist")
    return {key: stored.read() for key, stored in _safetensors_source(file).items()}, _safetensors_metadata(file)
