"""OpenAI's TF1 checkpoint, read without TensorFlow.

Two independent sources: the fixture written by TensorFlow's own ``Saver`` (compared with the Hugging Face
safetensors of the same weights), and bundles written here by a small writer that follows the LevelDB table
and tensor-bundle formats, in the real 124M name layout, with several shards and blocks.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from mapper.checkpoint import CheckpointError, load_checkpoint
from mapper.config import GPT2Config
from mapper.formats import openai_tf as tf_checkpoint
from parity_tests.conftest import FIXTURES

OPENAI_TINY = FIXTURES / "openai_tiny"


def hf_reference() -> dict[str, np.ndarray]:
    """The same weights as OpenAI_TINY, as Hugging Face saved them (prefix stripped by hand)."""
    return {k.removeprefix("transformer."): v for k, v in load_file(FIXTURES / "hf_tiny" / "model.safetensors").items()}


def tf_names(n_layer: int) -> list[str]:
    names = ["model/wte", "model/wpe", "model/ln_f/g", "model/ln_f/b"]
    for i in range(n_layer):
        for sub in ("ln_1/g", "ln_1/b", "ln_2/g", "ln_2/b"):
            names.append(f"model/h{i}/{sub}")
        for sub in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj"):
            names += [f"model/h{i}/{sub}/w", f"model/h{i}/{sub}/b"]
    return names


# ----- the TensorFlow-written fixture -----


def test_index_of_fixture() -> None:
    num_shards, entries = tf_checkpoint.read_index(OPENAI_TINY / "model.ckpt")
    assert num_shards == 1
    assert sorted(entries) == sorted(tf_names(2))
    assert entries["model/h1/attn/c_attn/w"].shape == (1, 16, 48)
    assert entries["model/h0/mlp/c_proj/w"].shape == (1, 64, 16)
    assert entries["model/wte"].shape == (97, 16)
    assert all(e.dtype == np.float32 and e.shard_id == 0 for e in entries.values())
    # TF writes the tensors back to back in key order: the byte ranges tile the data file exactly.
    spans = sorted((e.offset, e.size) for e in entries.values())
    assert spans[0][0] == 0
    assert all(a + n == b for (a, n), (b, _) in zip(spans, spans[1:], strict=False))
    assert spans[-1][0] + spans[-1][1] == (OPENAI_TINY / "model.ckpt.data-00000-of-00001").stat().st_size


def test_fixture_values_equal_hf_weights() -> None:
    ref = hf_reference()
    prefix = tf_checkpoint.resolve_prefix(OPENAI_TINY)
    num_shards, entries = tf_checkpoint.read_index(prefix)
    for name, entry in entries.items():
        value = tf_checkpoint.read_tensor(prefix, num_shards, entry)
        canonical = tf_checkpoint.canonical_name(name)
        expected = ref[canonical]
        if name.endswith("/w"):
            assert value.shape == (1, *expected.shape)
            value = value[0]  # OpenAI's conv1d kernel is [1, in, out]; HF's Conv1D is [in, out]: no transpose
        np.testing.assert_array_equal(value, expected)


def test_canonical_names() -> None:
    assert tf_checkpoint.canonical_name("model/wte") == "wte.weight"
    assert tf_checkpoint.canonical_name("model/wpe") == "wpe.weight"
    assert tf_checkpoint.canonical_name("model/ln_f/g") == "ln_f.weight"
    assert tf_checkpoint.canonical_name("model/h11/ln_2/b") == "h.11.ln_2.bias"
    assert tf_checkpoint.canonical_name("model/h3/attn/c_attn/w") == "h.3.attn.c_attn.weight"
    assert tf_checkpoint.canonical_name("model/h0/mlp/c_proj/b") == "h.0.mlp.c_proj.bias"
    for other in ("global_step", "model/h0/attn/c_attn/w/Adam", "model/h0/ln_1/w", "model/wte/x"):
        assert tf_checkpoint.canonical_name(other) is None
    assert tf_checkpoint.canonical_shape("model/h0/attn/c_attn/w", (1, 8, 24)) == (8, 24)
    assert tf_checkpoint.canonical_shape("model/wte", (1, 8)) == (1, 8)


def test_crc32c_check_value() -> None:
    assert tf_checkpoint.crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value
    data = np.random.default_rng(0).standard_normal((7, 5)).astype(np.float32)
    assert tf_checkpoint.crc32c(data) == _bitwise_crc32c(data.tobytes())  # an array's bytes, read in place
    assert tf_checkpoint.masked_crc32c(data) == _masked(data.tobytes()) and data.flags.writeable


@pytest.mark.parametrize("state_line", ['"model.ckpt"', '"sub/model.ckpt"', "ABSOLUTE", None])
def test_prefix_resolution(tmp_path: Path, state_line: str | None) -> None:
    sub = tmp_path / "sub" if state_line in ('"sub/model.ckpt"', "ABSOLUTE") else tmp_path
    sub.mkdir(exist_ok=True)
    for f in OPENAI_TINY.iterdir():
        if f.name != "checkpoint":
            shutil.copy(f, sub / f.name)
    if state_line == "ABSOLUTE":
        state_line = f'"{sub / "model.ckpt"}"'
    if state_line is not None:
        (tmp_path / "checkpoint").write_text(f"model_checkpoint_path: {state_line}\n")
    assert tf_checkpoint.resolve_prefix(tmp_path) == sub / "model.ckpt"
    config, params = load_checkpoint(tmp_path)
    assert config == GPT2Config(vocab_size=97, n_positions=32, n_embd=16, n_layer=2, n_head=4)
    np.testing.assert_array_equal(params["h.1.attn.c_proj.weight"], hf_reference()["h.1.attn.c_proj.weight"])


# ----- corruption of the fixture -----


@pytest.fixture
def tiny_copy(tmp_path: Path) -> Path:
    d = tmp_path / "openai_tiny"
    shutil.copytree(OPENAI_TINY, d)
    for f in d.iterdir():
        f.chmod(0o644)
    return d


def test_bad_magic(tiny_copy: Path) -> None:
    index = tiny_copy / "model.ckpt.index"
    data = bytearray(index.read_bytes())
    data[-1] ^= 0xFF
    index.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.ckpt\.index is not a TensorFlow checkpoint index: magic"):
        load_checkpoint(tiny_copy)


@pytest.mark.parametrize("keep", [0, 20, 400])
def test_truncated_index(tiny_copy: Path, keep: int) -> None:
    index = tiny_copy / "model.ckpt.index"
    index.write_bytes(index.read_bytes()[:keep])
    with pytest.raises(CheckpointError, match=r"model\.ckpt\.index"):
        load_checkpoint(tiny_copy)


def test_truncated_data_file(tiny_copy: Path) -> None:
    data = tiny_copy / "model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"data-00000-of-00001 is truncated: variable 'model/wte' needs bytes"):
        load_checkpoint(tiny_copy)


def test_missing_data_file(tiny_copy: Path) -> None:
    (tiny_copy / "model.ckpt.data-00000-of-00001").unlink()
    with pytest.raises(CheckpointError, match="data shard .* does not exist"):
        load_checkpoint(tiny_copy)


FLIPS = (0x01, 0x80, 0xFF)  # the lowest bit, a varint's continuation bit, every bit


def index_fuzz(directory: Path) -> Counter:
    """Every single-byte flip (``FLIPS``) of the fixture's index, loaded: how many gave the reference weights
    ("identical"), raised CheckpointError ("refused"), or loaded anything else ("silently different")."""
    _, reference = load_checkpoint(OPENAI_TINY)
    index = directory / "model.ckpt.index"
    original = index.read_bytes()
    outcomes: Counter = Counter()
    for position in range(len(original)):
        for flip in FLIPS:
            mutated = bytearray(original)
            mutated[position] ^= flip
            index.write_bytes(bytes(mutated))
            try:
                _, params = load_checkpoint(directory)
            except CheckpointError:
                outcomes["refused"] += 1
                continue
            same = params.keys() == reference.keys() and all(
                params[k].dtype == reference[k].dtype and np.array_equal(params[k], reference[k]) for k in params)
            outcomes["identical" if same else "silently different"] += 1
    index.write_bytes(original)
    return outcomes


def test_every_single_byte_flip_of_the_index_loads_the_same_weights_or_is_refused(tiny_copy: Path) -> None:
    outcomes = index_fuzz(tiny_copy)
    size = (OPENAI_TINY / "model.ckpt.index").stat().st_size
    assert sum(outcomes.values()) == size * len(FLIPS)
    assert outcomes["silently different"] == 0, outcomes
    # only the footer's padding and its unused metaindex handle are outside every block's crc
    assert outcomes["refused"] > 0.9 * size * len(FLIPS), outcomes


@pytest.mark.parametrize("span", [(200, 208), (0, 1), (34620, 34624)])
def test_overwritten_shard_bytes_are_refused(tiny_copy: Path, span: tuple[int, int]) -> None:
    data_path = tiny_copy / "model.ckpt.data-00000-of-00001"
    data = bytearray(data_path.read_bytes())
    begin, end = span
    data[begin:end] = bytes(b ^ 0x5A for b in data[begin:end])
    data_path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"data-00000-of-00001: variable '.*' is corrupt: crc32c"):
        load_checkpoint(tiny_copy)


def test_a_corrupt_index_block_is_named(tiny_copy: Path) -> None:
    index = tiny_copy / "model.ckpt.index"
    data = bytearray(index.read_bytes())
    data[72] ^= 1  # inside the first data block: h0/attn/c_attn/w's offset, 192 -> 64, before block crcs were read
    index.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.ckpt\.index is corrupt: the block at byte 0 has crc32c"):
        load_checkpoint(tiny_copy)


def test_a_binary_checkpoint_state_file_is_named(tiny_copy: Path) -> None:
    (tiny_copy / "checkpoint").write_bytes(b"\xff\xfe model_checkpoint_path")
    with pytest.raises(CheckpointError, match=r"checkpoint is not the text file TensorFlow writes \(byte 0"):
        load_checkpoint(tiny_copy)


def test_flipped_byte_fails_checksum(tiny_copy: Path) -> None:
    data_path = tiny_copy / "model.ckpt.data-00000-of-00001"
    data = bytearray(data_path.read_bytes())
    data[5000] ^= 0x01
    data_path.write_bytes(bytes(data))
    prefix = tf_checkpoint.resolve_prefix(tiny_copy)
    num_shards, entries = tf_checkpoint.read_index(prefix)
    hit = next(e for e in entries.values() if e.offset <= 5000 < e.offset + e.size)
    with pytest.raises(CheckpointError, match=f"variable '{hit.name}' is corrupt: crc32c"):
        tf_checkpoint.read_tensor(prefix, num_shards, hit)


# ----- bundles written here: the 124M name layout, several blocks and shards -----


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire_type) + payload


def _bitwise_crc32c(data: bytes) -> int:
    """CRC-32C one bit at a time (the reflected Castagnoli polynomial), independent of the reader's C library."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
    crc = _bitwise_crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _entry_proto(dtype: int, shape: tuple[int, ...], shard: int, offset: int, size: int, crc: int) -> bytes:
    dims = b"".join(_field(2, 2, _varint(len(d)) + d) for d in (_field(1, 0, _varint(s)) for s in shape))
    msg = _field(1, 0, _varint(dtype)) + _field(2, 2, _varint(len(dims)) + dims)
    if shard:
        msg += _field(3, 0, _varint(shard))
    if offset:  # proto3 leaves zero-valued fields out, as TensorFlow does
        msg += _field(4, 0, _varint(offset))
    return msg + _field(5, 0, _varint(size)) + _field(6, 5, struct.pack("<I", crc))


def _with_trailer(block: bytes) -> bytes:
    """A block, its compression type (0: none) and the masked crc32c of both."""
    return block + b"\x00" + struct.pack("<I", _masked(block + b"\x00"))


def _block(records: list[tuple[bytes, bytes]]) -> bytes:
    """LevelDB block: prefix-compressed records, one restart point at 0, then the restart count."""
    out, prev = bytearray(), b""
    for key, value in records:
        shared = 0
        while shared < min(len(prev), len(key)) and prev[shared] == key[shared]:
            shared += 1
        out += _varint(shared) + _varint(len(key) - shared) + _varint(len(value)) + key[shared:] + value
        prev = key
    return bytes(out) + struct.pack("<II", 0, 1)


def write_bundle(
    prefix: Path,
    tensors: dict[str, np.ndarray],
    *,
    num_shards: int = 1,
    records_per_block: int = 5,
    size_fix: dict[str, int] | None = None,
    dtype_fix: dict[str, int] | None = None,
    offset_fix: dict[str, int] | None = None,
) -> None:
    """A TF tensor bundle; tensor i goes to shard i % num_shards. Every block and tensor carries its crc32c."""
    codes = {np.dtype("float32"): 1, np.dtype("float64"): 2, np.dtype("float16"): 19}
    shards = [bytearray() for _ in range(num_shards)]
    records = [(b"", _field(1, 0, _varint(num_shards)) + _field(3, 0, _varint(1)))]
    for i, name in enumerate(sorted(tensors)):
        arr = np.ascontiguousarray(tensors[name])
        shard = i % num_shards
        size = (size_fix or {}).get(name, arr.nbytes)
        code = (dtype_fix or {}).get(name, codes[arr.dtype])
        offset = (offset_fix or {}).get(name, len(shards[shard]))
        records.append((name.encode(), _entry_proto(code, arr.shape, shard, offset, size, _masked(arr.tobytes()))))
        shards[shard] += arr.tobytes()
    for s, data in enumerate(shards):
        Path(f"{prefix}.data-{s:05d}-of-{num_shards:05d}").write_bytes(bytes(data))
    table, index_records = bytearray(), []
    for start in range(0, len(records), records_per_block):
        chunk = records[start : start + records_per_block]
        block = _block(chunk)
        index_records.append((chunk[-1][0], _varint(len(table)) + _varint(len(block))))
        table += _with_trailer(block)
    meta = _block([])
    meta_handle = _varint(len(table)) + _varint(len(meta))
    table += _with_trailer(meta)
    index = _block(index_records)
    index_handle = _varint(len(table)) + _varint(len(index))
    table += _with_trailer(index)
    handles = meta_handle + index_handle
    table += handles + b"\x00" * (40 - len(handles)) + struct.pack("<Q", 0xDB4775248B80FB57)
    Path(f"{prefix}.index").write_bytes(bytes(table))


def random_openai_tensors(config: GPT2Config, dtype: str, seed: int = 0) -> dict[str, np.ndarray]:
    """OpenAI-named tensors in OpenAI's shapes ([1, in, out] kernels) with random values."""
    V, P, C = config.vocab_size, config.n_positions, config.n_embd
    rng = np.random.default_rng(seed)
    shapes = {
        "attn/c_attn": (C, 3 * C),
        "attn/c_proj": (C, C),
        "mlp/c_fc": (C, 4 * C),
        "mlp/c_proj": (4 * C, C),
    }
    out = {}
    for name in tf_names(config.n_layer):
        if name == "model/wte":
            shape: tuple[int, ...] = (V, C)
        elif name == "model/wpe":
            shape = (P, C)
        elif name.endswith("/w"):
            shape = (1, *shapes[name.split("/", 2)[2][:-2]])
        elif name.endswith("/b") and "/ln_" not in name:
            shape = (shapes[name.split("/", 2)[2][:-2]][1],)
        else:
            shape = (C,)
        out[name] = rng.standard_normal(shape).astype(dtype)
    return out


def write_openai_dir(d: Path, config: GPT2Config, tensors: dict[str, np.ndarray], **kwargs: object) -> None:
    d.mkdir(parents=True, exist_ok=True)
    hparams = {
        "n_vocab": config.vocab_size, "n_ctx": config.n_positions, "n_embd": config.n_embd,
        "n_head": config.n_head, "n_layer": config.n_layer,
    }  # fmt: skip
    (d / "hparams.json").write_text(json.dumps(hparams))
    (d / "checkpoint").write_text('model_checkpoint_path: "model.ckpt"\n')
    write_bundle(d / "model.ckpt", tensors, **kwargs)


SMALL_124M_LAYOUT = GPT2Config(vocab_size=11, n_positions=5, n_embd=8, n_layer=12, n_head=2)


@pytest.mark.parametrize(("dtype", "num_shards"), [("float32", 1), ("float64", 3), ("float16", 2)])
def test_written_bundle_in_124m_layout(tmp_path: Path, dtype: str, num_shards: int) -> None:
    tensors = random_openai_tensors(SMALL_124M_LAYOUT, dtype)
    assert len(tensors) == 148  # as in the real 124M checkpoint: 2 + 12 * 12 + 2
    write_openai_dir(tmp_path, SMALL_124M_LAYOUT, tensors, num_shards=num_shards)
    config, params = load_checkpoint(tmp_path)
    assert config == SMALL_124M_LAYOUT
    assert len(params) == 148
    want_dtype = np.float32 if dtype == "float16" else np.dtype(dtype)
    for tf_name, value in tensors.items():
        got = params[tf_checkpoint.canonical_name(tf_name)]
        assert got.dtype == want_dtype and got.flags.writeable and got.flags.c_contiguous
        np.testing.assert_array_equal(got, value[0] if tf_name.endswith("/w") else value)


def test_written_bundle_size_mismatch(tmp_path: Path) -> None:
    tensors = random_openai_tensors(SMALL_124M_LAYOUT, "float32")
    write_openai_dir(tmp_path, SMALL_124M_LAYOUT, tensors, size_fix={"model/h3/mlp/c_fc/b": 12})
    with pytest.raises(CheckpointError, match=r"'model/h3/mlp/c_fc/b' says 12 bytes, but float32 \[32\] needs 128"):
        load_checkpoint(tmp_path)


def test_written_bundle_unsupported_dtype(tmp_path: Path) -> None:
    tensors = random_openai_tensors(SMALL_124M_LAYOUT, "float32")
    write_openai_dir(tmp_path, SMALL_124M_LAYOUT, tensors, dtype_fix={"model/wpe": 14})
    with pytest.raises(CheckpointError, match="'model/wpe' has dtype bfloat16"):
        load_checkpoint(tmp_path)


def test_written_bundle_offset_past_end_of_shard(tmp_path: Path) -> None:
    tensors = random_openai_tensors(SMALL_124M_LAYOUT, "float32")
    write_openai_dir(tmp_path, SMALL_124M_LAYOUT, tensors, num_shards=2)
    shard = tmp_path / "model.ckpt.data-00001-of-00002"
    shard.write_bytes(shard.read_bytes()[:64])
    with pytest.raises(CheckpointError, match=r"data-00001-of-00002 is truncated: variable '.*' needs bytes"):
        load_checkpoint(tmp_path)


def test_written_bundle_overlapping_tensors(tmp_path: Path) -> None:
    # a consistent index (every crc right) in which wpe claims bytes that wte's last 16 floats occupy
    tensors = random_openai_tensors(SMALL_124M_LAYOUT, "float32")
    order = sorted(tensors)
    start = sum(tensors[n].nbytes for n in order[: order.index("model/wte")])
    end = start + tensors["model/wte"].nbytes
    write_openai_dir(tmp_path, SMALL_124M_LAYOUT, tensors, offset_fix={"model/wpe": end - 64})
    with pytest.raises(CheckpointError, match="variables 'model/wte' and 'model/wpe' overlap in shard 0"):
        load_checkpoint(tmp_path)


def test_written_bundle_extra_variable(tmp_path: Path) -> None:
    tensors = random_openai_tensors(SMALL_124M_LAYOUT, "float32")
    tensors["model/h0/attn/c_attn/w/Adam"] = np.zeros((1, 8, 24), np.float32)
    write_openai_dir(tmp_path, SMALL_124M_LAYOUT, tensors)
    with pytest.raises(CheckpointError, match="unexpected 1 key\\(s\\): model/h0/attn/c_attn/w/Adam"):
        load_checkpoint(tmp_path)


def test_written_bundle_wrong_kernel_shape(tmp_path: Path) -> None:
    tensors = random_openai_tensors(SMALL_124M_LAYOUT, "float32")
    tensors["model/h5/attn/c_proj/w"] = np.zeros((1, 8, 9), np.float32)
    write_openai_dir(tmp_path, SMALL_124M_LAYOUT, tensors)
    with pytest.raises(CheckpointError, match=r"'model/h5/attn/c_proj/w' has shape \(8, 9\).* expects \(8, 8\)"):
        load_checkpoint(tmp_path)
