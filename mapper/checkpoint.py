"""Checkpoints in and out: every GPT-2 weight format -> the canonical ``dict[str, np.ndarray]`` and back.

Read (``load_checkpoint``, a file or a directory; ``detect_format`` names what it found):

* ``safetensors``: Hugging Face ``model.safetensors``, with or without the ``transformer.`` prefix, with or
  without the ``h.N.attn.bias`` mask buffers of the Hub's files; also what ``save_checkpoint`` writes.
* ``safetensors-sharded``: ``model.safetensors.index.json`` + the shards its ``weight_map`` names.
* ``pytorch``: ``pytorch_model.bin`` (zip or legacy format), read with ``torch.load(weights_only=True)``.
* ``openai-tf``: OpenAI's TensorFlow-1 checkpoint (``hparams.json``, ``checkpoint``, ``model.ckpt.*``).
* ``pytorch`` also holds the peers' ``torch.save`` files, told apart by their content: nanoGPT's ``ckpt.pt`` (and
  its bare state dicts), the course's ``GPTModel`` (``model.pth``, ``model_and_optimizer.pth``) and the seed
  repository's OpenAI-compatible variant of it (``mapper/formats/nanogpt.py``, ``book.py``, ``seed.py``).
* ``llmc``: llm.c's ``gpt2_124M.bin`` family (``mapper/formats/llmc.py``), recognised by its magic number.

``path`` may also be a model name (``gpt2``, ``owner/name[@revision]``, ``openai:124M``, ...): ``mapper.download``
fetches it, or finds it in its cache; a local path of that name wins.

The config comes from ``config.json`` (Hugging Face's, or the course's config dict) or ``hparams.json`` beside the
weights, else from the file itself (nanoGPT's ``model_args``, llm.c's header), else from the shapes.
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
from mapper.config import COURSE_CONFIG_KEYS, PRESETS, QKV_BIAS_KEY, GPT2Config
from mapper.download import locate_checkpoint
from mapper.errors import CheckpointError, ConfigError, describe_key_mismatch
from mapper.formats import openai_tf
from mapper.formats.book import book_source, is_book_layout
from mapper.formats.llmc import is_llmc_file, llmc_source
from mapper.formats.nanogpt import is_linear_layout, is_nanogpt_checkpoint, nanogpt_config, nanogpt_source
from mapper.formats.safetensors_file import (
    load_tensors,
    safetensors_metadata,
    safetensors_source,
    save_tensors,
    sharded_safetensors_source,
)
from mapper.formats.seed import is_seed_layout, seed_source
from mapper.formats.stored import Stored
from mapper.formats.torch_file import load_torch, tensor_source
from mapper.layouts import ATTENTION_LAYOUTS, from_module_state
from mapper.save import (
    HF_PREFIX,
    LAYOUT_KEY,
    load_lora_adapters,
    save_checkpoint,
    save_llmc,
    save_lora_adapters,
    save_pipeline_files,
)
from mapper.schema import param_shapes, validate_params

__all__ = [
    "CheckpointError",
    "atomic_write",
    "detect_format",
    "load_checkpoint",
    "load_lora_adapters",
    "load_tensors",
    "save_checkpoint",
    "save_llmc",
    "save_lora_adapters",
    "save_pipeline_files",
    "save_tensors",
]

# Buffers, not parameters: the causal mask (``attn.bias`` [1, 1, P, P]) and the mask fill value
# (``attn.masked_bias``). Matched on the whole key: ``h.0.attn.c_attn.bias`` also ends in "attn.bias".
_BUFFER_KEY = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")


# ----- format detection -----


# A folder's weights, by file name, in the order a folder holding several is resolved (safetensors first: no pickle)
_FOLDER_FILES = (
    ("model.safetensors", "safetensors"),
    ("model.safetensors.index.json", "safetensors-sharded"),
    ("pytorch_model.bin", "pytorch"),
    ("checkpoint", "openai-tf"),
    ("model.ckpt.index", "openai-tf"),
    ("ckpt.pt", "pytorch"),  # nanoGPT
    ("model.pth", "pytorch"),  # the course
    ("model_and_optimizer.pth", "pytorch"),
)


def detect_format(path: str | os.PathLike[str]) -> str:
    """The format ``path`` holds: ``safetensors``, ``safetensors-sharded``, ``pytorch``, ``openai-tf`` or ``llmc``.

    ``path`` is a directory, a weights file, or an OpenAI checkpoint prefix (``.../model.ckpt``). A directory holding
    several formats resolves in ``_FOLDER_FILES`` order, then an llm.c ``.bin``. A file is known by its content
    (a zip archive or a pickle is a ``torch.save`` file, llm.c's magic number an llm.c file) or its name.
    """
    p = Path(path)
    if p.is_dir():
        for filename, fmt in _FOLDER_FILES:
            if (p / filename).is_file():
                return fmt
        if _llmc_file_in(p) is not None:
            return "llmc"
        raise CheckpointError(
            f"directory {p} holds no GPT-2 checkpoint: expected model.safetensors, "
            "model.safetensors.index.json, pytorch_model.bin, an OpenAI TensorFlow checkpoint "
            "(hparams.json + checkpoint + model.ckpt.*), nanoGPT's ckpt.pt, the course's model.pth or an llm.c .bin"
        )
    if p.is_file():
        if p.name.endswith(".safetensors.index.json"):
            return "safetensors-sharded"
        if p.suffix == ".safetensors":
            return "safetensors"
        if p.suffix == ".index":
            return "openai-tf"
        head = _head(p)
        if is_llmc_file(head):
            return "llmc"
        if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # a zip archive, or a pickle (legacy torch)
            return "pytorch"
        if p.suffix in (".bin", ".pt", ".pth"):
            raise CheckpointError(
                f"{p} is neither a torch.save file (a zip archive or a pickle) nor an llm.c model file (magic "
                f"20240326): its first bytes are {head[:8].hex(' ')}"
            )
        if len(head) == 9 and head[8:9] == b"{":  # u64 header length, then the JSON header
            return "safetensors"
        raise CheckpointError(
            f"{p} is not a checkpoint format this project reads (safetensors, pytorch_model.bin, OpenAI "
            "TensorFlow checkpoint, nanoGPT's ckpt.pt, the course's model.pth, llm.c's .bin)"
        )
    if Path(f"{p}.index").is_file():
        return "openai-tf"
    raise CheckpointError(f"checkpoint path {p} does not exist")


def _head(file: Path) -> bytes:
    try:
        with open(file, "rb") as f:
            return f.read(9)
    except OSError as e:
        raise CheckpointError(f"cannot read {file}: {e.strerror}") from None


def _llmc_file_in(folder: Path) -> Path | None:
    """The one llm.c model file in ``folder`` (llm.c's folders also hold its tokenizer and debug state, whose magic
    numbers differ); ``CheckpointError`` if there are several."""
    found = sorted(f for f in folder.glob("*.bin") if f.is_file() and is_llmc_file(_head(f)))
    if len(found) > 1:
        names = ", ".join(f.name for f in found)
        raise CheckpointError(f"directory {folder} holds {len(found)} llm.c model files ({names}); name one")
    return found[0] if found else None


def _weights_file(p: Path, fmt: str) -> Path:
    """The file of format ``fmt`` that the path ``p`` (a folder or that file) names."""
    if not p.is_dir():
        return p
    if fmt == "llmc":
        return _llmc_file_in(p)
    return next(p / name for name, f in _FOLDER_FILES if f == fmt and (p / name).is_file())


# ----- loading -----


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[GPT2Config, dict[str, np.ndarray]]:
    """Load any supported GPT-2 checkpoint into ``(config, params)`` in the canonical schema.

    ``path``: a file, a folder, or a model name (``gpt2``, ``gpt2-xl``, ``owner/name@revision``, ``openai:355M``,
    ...; ``mapper.download.locate_checkpoint``: downloaded once, then read from the cache; a local path wins).
    ``params``: flat dict, canonical names, Conv1D ``[in, out]`` orientation (``wte.weight`` [V, C],
    ``h.{i}.attn.c_attn.weight`` [C, 3C], ...), in ``param_shapes(config)`` order; fresh writable C-contiguous
    arrays, float32/float64 as stored, float16/bfloat16 upcast to float32. A stored ``lm_head.weight`` equal
    to ``wte.weight`` is dropped (tied head); a different one makes the config untied.
    Raises ``CheckpointError``.
    """
    p = locate_checkpoint(path)
    fmt = detect_format(p)
    if fmt == "openai-tf":
        stored, origin, config = _openai_tf_source(p)
        return _assemble(stored, origin, config)
    file = _weights_file(p, fmt)
    origin = str(file)
    if fmt == "llmc":
        stored, config = llmc_source(file)
    elif fmt == "pytorch":
        stored, config = _torch_source(file)
    else:
        raw = safetensors_source(file) if fmt == "safetensors" else sharded_safetensors_source(file)
        if fmt == "safetensors" and (layout := safetensors_metadata(file).get(LAYOUT_KEY)) is not None:
            return _load_module_layout(raw, layout, file)
        stored = _canonical_keys(raw, origin)
        config = _read_config_json(file.parent / "config.json")
    return _assemble(stored, origin, config)


def _torch_source(file: Path) -> tuple[dict[str, Stored], GPT2Config | None]:
    """A ``torch.save`` file, told apart by its content: nanoGPT's ``ckpt.pt``, the course's checkpoint with
    ``model_state_dict``, or a state dict in Hugging Face's, nanoGPT's, the course's or the seed's names."""
    obj = load_torch(file)
    config = _read_config_json(file.parent / "config.json")
    if is_nanogpt_checkpoint(obj):
        state = tensor_source(obj["model"], file, "'model' entry")
        return nanogpt_source(state), config or nanogpt_config(obj["model_args"], str(file))
    if isinstance(obj, dict) and "model_state_dict" in obj:  # the course's model_and_optimizer.pth
        state = tensor_source(obj["model_state_dict"], file, "'model_state_dict' entry")
    else:
        state = tensor_source(obj, file)
    if is_book_layout(state):
        return book_source(state, str(file)), config
    if is_seed_layout(state):
        return seed_source(state), config
    if is_linear_layout(state):  # a bare nanoGPT state dict
        return nanogpt_source(state), config
    return _canonical_keys(state, str(file)), config


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
    """A Hugging Face ``config.json`` beside the weights, or the course's config dict saved under that name."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and COURSE_CONFIG_KEYS <= set(data):
            return GPT2Config.from_course_dict(data)
        return GPT2Config.from_hf_dict(data)
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
    """V, C from wte; P from wpe; L from the h.N keys; n_head from the preset of that width, else C // 64; the q/k/v
    bias from its presence.

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
            vocab_size=V, n_positions=P, n_embd=C, n_layer=max(layers) + 1, n_head=n_head, n_classes=n_classes,
            qkv_bias="h.0.attn.c_attn.bias" in stored,
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
