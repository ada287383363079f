"""llm.c's model files (``gpt2_124M.bin``, ``gpt2_124M_bf16.bin``, and what its trainers write), read and written.

The layout (llm.c's ``train_gpt2.py`` ``write_model``; ``train_gpt2.c`` / ``train_gpt2.cu``
``gpt2_build_from_checkpoint`` and ``fill_in_parameter_sizes``):

* a header of 256 little-endian int32: ``[0]`` magic 20240326, ``[1]`` version (3: every tensor float32; 5: every
  tensor bfloat16), ``[2]`` maxT (the context), ``[3]`` V, ``[4]`` L, ``[5]`` NH, ``[6]`` C, ``[7]`` Vp (V padded
  up to a multiple of 128, e.g. 50304), the rest zero;
* then the parameters back to back, each per-layer kind stacked over the L layers, in this order::

      wte [Vp, C]  wpe [maxT, C]  ln1w [L, C]  ln1b [L, C]  qkvw [L, 3C, C]  qkvb [L, 3C]  attprojw [L, C, C]
      attprojb [L, C]  ln2w [L, C]  ln2b [L, C]  fcw [L, 4C, C]  fcb [L, 4C]  fcprojw [L, C, 4C]  fcprojb [L, C]
      lnfw [C]  lnfb [C]

  The matrices are ``nn.Linear``'s ``[out, in]`` (llm.c's model is written from a torch module), so each is the
  transpose of the canonical Conv1D ``[in, out]``. The head is tied to ``wte``; its Vp - V padding rows are never
  a token: cut on reading, zeros on writing.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np

from mapper.config import GPT2Config
from mapper.errors import CheckpointError, ConfigError
from mapper.formats.stored import Stored, bfloat16_to_float32, float32_to_bfloat16

LLMC_MAGIC = 20240326
LLMC_VERSIONS = {3: "float32", 5: "bfloat16"}
HEADER_INTS = 256
VOCAB_MULTIPLE = 128  # llm.c pads the vocabulary to a multiple of this

# (canonical name inside block i, or outside the blocks, and whether llm.c stores its transpose), in file order
_BLOCK_ORDER = (
    ("ln_1.weight", False), ("ln_1.bias", False), ("attn.c_attn.weight", True), ("attn.c_attn.bias", False),
    ("attn.c_proj.weight", True), ("attn.c_proj.bias", False), ("ln_2.weight", False), ("ln_2.bias", False),
    ("mlp.c_fc.weight", True), ("mlp.c_fc.bias", False), ("mlp.c_proj.weight", True), ("mlp.c_proj.bias", False),
)  # fmt: skip


def is_llmc_file(head: bytes) -> bool:
    """Whether a file's first 4 bytes are llm.c's model magic."""
    return len(head) >= 4 and int.from_bytes(head[:4], "little") == LLMC_MAGIC


def padded_vocab(vocab_size: int) -> int:
    """Vp: the vocabulary rounded up to a multiple of 128 (50257 -> 50304)."""
    return math.ceil(vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def _layout(config: GPT2Config, Vp: int) -> list[tuple[str, tuple[int, ...], bool]]:
    """Every tensor in file order: (canonical name, the shape llm.c stores, transposed?); wte with its Vp rows."""
    C, L, P = config.n_embd, config.n_layer, config.n_positions
    shapes = {"ln_1.weight": (C,), "ln_1.bias": (C,), "attn.c_attn.weight": (3 * C, C), "attn.c_attn.bias": (3 * C,),
              "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,), "ln_2.weight": (C,), "ln_2.bias": (C,),
              "mlp.c_fc.weight": (4 * C, C), "mlp.c_fc.bias": (4 * C,), "mlp.c_proj.weight": (C, 4 * C),
              "mlp.c_proj.bias": (C,)}
    out = [("wte.weight", (Vp, C), False), ("wpe.weight", (P, C), False)]
    for name, transpose in _BLOCK_ORDER:  # kind by kind, each over all layers
        out += [(f"h.{i}.{name}", shapes[name], transpose) for i in range(L)]
    return out + [("ln_f.weight", (C,), False), ("ln_f.bias", (C,), False)]


def llmc_source(file: Path) -> tuple[dict[str, Stored], GPT2Config]:
    """The header checked against the file's size, then every parameter as ``Stored`` (canonical names, Conv1D
    orientation, ``wte`` cut to V rows; bfloat16 upcast to float32), and the config the header gives."""
    with open(file, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        header = np.frombuffer(f.read(4 * HEADER_INTS), dtype="<i4")
    if len(header) < HEADER_INTS:
        raise CheckpointError(f"{file} is truncated: {file_size} bytes, shorter than llm.c's 1024-byte header")
    magic, version, maxT, V, L, NH, C, Vp = (int(x) for x in header[:8])
    if magic != LLMC_MAGIC:
        raise CheckpointError(f"{file} is not an llm.c model file: magic {magic}, expected {LLMC_MAGIC}")
    if version not in LLMC_VERSIONS:
        raise CheckpointError(
            f"{file} is llm.c's model format version {version}; only versions 3 (float32) and 5 (bfloat16) are read "
            "(older files: re-export them with llm.c's train_gpt2.py)"
        )
    try:
        config = GPT2Config(vocab_size=V, n_positions=maxT, n_embd=C, n_layer=L, n_head=NH)
    except ConfigError as e:
        raise CheckpointError(f"{file}: llm.c header gives no valid GPT-2 config ({e})") from None
    if Vp < V:
        raise CheckpointError(f"{file}: llm.c header's padded vocabulary {Vp} is smaller than its vocabulary {V}")
    dtype = np.dtype("<f4") if version == 3 else np.dtype("<u2")
    layout = _layout(config, Vp)
    expected = 4 * HEADER_INTS + sum(math.prod(shape) for _, shape, _ in layout) * dtype.itemsize
    if file_size != expected:
        raise CheckpointError(
            f"{file} is {'truncated' if file_size < expected else 'longer than its header says'}: {file_size} bytes, "
            f"but llm.c's header (version {version}, V={V}, Vp={Vp}, maxT={maxT}, L={L}, C={C}) needs {expected}"
        )
    out: dict[str, Stored] = {}
    offset = 4 * HEADER_INTS
    for name, shape, transpose in layout:
        rows = (V, C) if name == "wte.weight" else shape  # the first V of Vp rows; the padding is not read
        out[name] = Stored(f"{name} (llm.c, byte {offset})", rows[::-1] if transpose else rows,
                           _reader(file, offset, rows, dtype, transpose))
        offset += math.prod(shape) * dtype.itemsize
    return out, config


def _reader(file: Path, offset: int, shape: tuple[int, ...], dtype: np.dtype, transpose: bool):
    def read() -> np.ndarray:
        raw = np.empty(shape, dtype=dtype)
        with open(file, "rb") as f:
            f.seek(offset)
            got = f.readinto(memoryview(raw).cast("B"))
        if got != raw.nbytes:
            raise CheckpointError(f"{file} is truncated: read {got} of {raw.nbytes} bytes at byte {offset}")
        values = bfloat16_to_float32(raw) if dtype == np.dtype("<u2") else raw
        return np.ascontiguousarray(values.T) if transpose else values

    return read


def check_llmc_writable(config: GPT2Config) -> None:
    """``CheckpointError`` for a model llm.c's format cannot hold (it is GPT-2 with a tied head, nothing else)."""
    if not config.tie_word_embeddings:
        raise CheckpointError("llm.c's format ties the output head to wte; this model has its own lm_head.weight")
    if not config.qkv_bias:
        raise CheckpointError("llm.c's GPT-2 has a q/k/v bias; this model has none (qkv_bias false)")
    if config.n_classes is not None:
        raise CheckpointError("llm.c's format holds a language model; this one has a classification head")
    if config.layer_norm_epsilon != 1e-5:
        raise CheckpointError(f"llm.c's LayerNorm eps is 1e-5; this model's is {config.layer_norm_epsilon}")


def write_llmc(f: BinaryIO, params: dict[str, np.ndarray], config: GPT2Config, dtype: str) -> None:
    """llm.c's layout (module docstring), version 3 for ``dtype="float32"`` or 5 for ``"bfloat16"`` (rounded to
    nearest even, as torch rounds); ``wte`` padded with zero rows to Vp. ``params`` are canonical and checked."""
    version = {name: v for v, name in LLMC_VERSIONS.items()}[dtype]
    Vp = padded_vocab(config.vocab_size)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:8] = (LLMC_MAGIC, version, config.n_positions, config.vocab_size, config.n_layer, config.n_head,
                  config.n_embd, Vp)
    f.write(header.tobytes())
    for name, shape, transpose in _layout(config, Vp):
        value = params[name].T if transpose else params[name]
        if name == "wte.weight":
            value = np.concatenate([value, np.zeros((Vp - config.vocab_size, config.n_embd), value.dtype)])
        value = np.ascontiguousarray(value, dtype="<f4")
        assert value.shape == shape, (name, value.shape, shape)
        f.write((float32_to_bfloat16(value) if version == 5 else value).tobytes())
