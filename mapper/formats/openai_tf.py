"""OpenAI's original TensorFlow-1 GPT-2 checkpoint, read without TensorFlow.

A TF1 ``Saver`` checkpoint with prefix ``P`` (OpenAI's is ``model.ckpt``) is a "tensor bundle":

* ``P.index``: a LevelDB-format table (SSTable) mapping each variable name to a ``BundleEntryProto``
  (dtype, shape, shard id, byte offset, byte size, crc32c). The key ``""`` holds a ``BundleHeaderProto``
  (number of shards, endianness).
* ``P.data-SSSSS-of-NNNNN``: the shards, each tensor's raw little-endian bytes at ``[offset, offset+size)``.

Nothing is trusted unchecked: every block of the index carries a masked CRC-32C of its bytes, which is verified
before the block is parsed; the tensors' byte ranges must lie inside their shard and must not overlap; and each
tensor's bytes are checked against the masked CRC-32C its entry stores (``google-crc32c``, in C: ~10 GB/s, so
the 1558M model's 6 GB cost well under a second beside reading them). Any mismatch is a ``CheckpointError``.

OpenAI's names and the canonical ones (``[in, out]`` in both, so no transpose)::

    model/wte [V, C] -> wte.weight              model/wpe [P, C] -> wpe.weight
    model/h{i}/ln_1/g, b -> h.{i}.ln_1.weight, .bias          (ln_2 and ln_f likewise)
    model/h{i}/attn/c_attn/w [1, C, 3C] -> h.{i}.attn.c_attn.weight [C, 3C]    .../b -> .bias
    (attn/c_proj, mlp/c_fc, mlp/c_proj likewise: the leading 1 of OpenAI's conv1d kernel is dropped)
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numpy as np

from mapper.errors import CheckpointError

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_SIZE = 48  # two varint block handles padded to 40 bytes + the 8-byte magic
_BLOCK_TRAILER_SIZE = 5  # compression type byte + masked crc32c of block and type byte

# TensorFlow's DataType enum values this reader accepts.
_TF_DTYPES = {1: np.dtype("<f4"), 2: np.dtype("<f8"), 19: np.dtype("<f2")}
_TF_DTYPE_NAMES = {3: "int32", 9: "int64", 10: "bool", 14: "bfloat16"}


@dataclass(frozen=True)
class TensorEntry:
    """Where one variable lies: ``size`` bytes at ``offset`` in shard ``shard_id``."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int  # masked crc32c of the bytes, as TensorFlow stores it (proto3 leaves out a 0)


def resolve_prefix(path: str | Path) -> Path:
    """The checkpoint prefix ``P`` (``P.index`` exists) for a directory, a prefix, or the ``.index`` file.

    A directory's ``checkpoint`` file names the prefix (``model_checkpoint_path: "..."``, relative to the
    directory or absolute); without one, ``model.ckpt`` is assumed.
    """
    path = Path(path)
    if path.is_dir():
        prefix = path / "model.ckpt"
        state = path / "checkpoint"
        if state.is_file():
            try:
                text = state.read_bytes().decode("utf-8")
            except UnicodeDecodeError as e:
                raise CheckpointError(f"{state} is not the text file TensorFlow writes (byte {e.start} is not "
                                      "UTF-8)") from None
            found = re.search(r'^model_checkpoint_path:\s*"(.*)"\s*$', text, re.MULTILINE)
            if found is None:
                raise CheckpointError(f"{state} has no 'model_checkpoint_path: \"...\"' line")
            prefix = path / found.group(1)  # an absolute path replaces the directory
    elif path.name.endswith(".index"):
        prefix = path.with_name(path.name[: -len(".index")])
    else:
        prefix = path
    if not Path(f"{prefix}.index").is_file():
        raise CheckpointError(f"TensorFlow checkpoint index {prefix}.index does not exist")
    return prefix


def read_index(prefix: str | Path) -> tuple[int, dict[str, TensorEntry]]:
    """Parse ``prefix.index``: (number of data shards, variable name -> ``TensorEntry``), in key order."""
    index_path = Path(f"{prefix}.index")
    data = index_path.read_bytes()
    if len(data) < _FOOTER_SIZE:
        raise CheckpointError(f"{index_path} is truncated: {len(data)} bytes, shorter than the 48-byte footer")
    (magic,) = struct.unpack_from("<Q", data, len(data) - 8)
    if magic != _TABLE_MAGIC:
        raise CheckpointError(
            f"{index_path} is not a TensorFlow checkpoint index: magic {magic:#018x}, expected {_TABLE_MAGIC:#018x}"
        )
    footer = _Reader(data, len(data) - _FOOTER_SIZE, len(data) - 8, index_path)
    footer.varint(), footer.varint()  # the metaindex block: unused by tensor bundles
    index_block = _read_block(data, footer.varint(), footer.varint(), index_path)

    num_shards = 1
    entries: dict[str, TensorEntry] = {}
    for _, handle in _block_entries(index_block, index_path):
        handle_reader = _Reader(handle, 0, len(handle), index_path)
        block = _read_block(data, handle_reader.varint(), handle_reader.varint(), index_path)
        for key, value in _block_entries(block, index_path):
            if key == b"":
                num_shards = _parse_header(value, index_path)
            else:
                name = key.decode("utf-8", errors="replace")
                entries[name] = _parse_entry(name, value, index_path)
    for entry in entries.values():
        if not 0 <= entry.shard_id < num_shards:
            raise CheckpointError(
                f"{index_path}: variable {entry.name!r} is in shard {entry.shard_id}, but there are {num_shards} shards"
            )
    _check_no_overlap(entries, index_path)
    return num_shards, entries


def _check_no_overlap(entries: dict[str, TensorEntry], index_path: Path) -> None:
    """Two variables may not claim the same bytes of a shard (one would be read as the other)."""
    spans = sorted((e.shard_id, e.offset, e.offset + e.size, e.name) for e in entries.values() if e.size)
    for (shard, _, end, name), (next_shard, begin, _, next_name) in zip(spans, spans[1:], strict=False):
        if shard == next_shard and begin < end:
            raise CheckpointError(
                f"{index_path} is corrupt: variables {name!r} and {next_name!r} overlap in shard {shard} (bytes "
                f"{begin}..{end})"
            )


def read_tensor(prefix: str | Path, num_shards: int, entry: TensorEntry) -> np.ndarray:
    """One variable's value, in its stored dtype and shape: a fresh, writable, C-contiguous array.

    The bytes are read straight into the array (no intermediate buffer), then checked against the entry's
    crc32c; a mismatch is a ``CheckpointError``.
    """
    shard = Path(f"{prefix}.data-{entry.shard_id:05d}-of-{num_shards:05d}")
    out = np.empty(entry.shape, dtype=entry.dtype)
    try:
        with open(shard, "rb") as f:
            file_size = f.seek(0, 2)
            if entry.offset + entry.size > file_size:
                raise CheckpointError(
                    f"{shard} is truncated: variable {entry.name!r} needs bytes [{entry.offset}, "
                    f"{entry.offset + entry.size}) but the file has {file_size} bytes"
                )
            f.seek(entry.offset)
            got = f.readinto(memoryview(out).cast("B"))
    except FileNotFoundError:
        raise CheckpointError(f"data shard {shard} of TensorFlow checkpoint {prefix} does not exist") from None
    if got != entry.size:
        raise CheckpointError(f"{shard}: read {got} of {entry.size} bytes of variable {entry.name!r}")
    actual = masked_crc32c(out)
    if actual != entry.crc32c:
        raise CheckpointError(
            f"{shard}: variable {entry.name!r} is corrupt: crc32c {actual:#010x}, the index says {entry.crc32c:#010x}"
        )
    return out


def canonical_name(tf_name: str) -> str | None:
    """OpenAI's variable name -> the canonical one (``None`` for a name that is not a GPT-2 parameter)."""
    if tf_name in ("model/wte", "model/wpe"):
        return tf_name[len("model/") :] + ".weight"
    leaf = {"g": "weight", "w": "weight", "b": "bias"}
    m = re.fullmatch(r"model/ln_f/([gb])", tf_name)
    if m:
        return f"ln_f.{leaf[m.group(1)]}"
    m = re.fullmatch(r"model/h(\d+)/(ln_1|ln_2)/([gb])", tf_name)
    if m:
        return f"h.{int(m.group(1))}.{m.group(2)}.{leaf[m.group(3)]}"
    m = re.fullmatch(r"model/h(\d+)/(attn/c_attn|attn/c_proj|mlp/c_fc|mlp/c_proj)/([wb])", tf_name)
    if m:
        return f"h.{int(m.group(1))}.{m.group(2).replace('/', '.')}.{leaf[m.group(3)]}"
    return None


def canonical_shape(tf_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Drop the leading 1 of a conv1d kernel ``.../w`` [1, in, out] -> [in, out]; other shapes are kept."""
    if tf_name.endswith("/w") and len(shape) == 3 and shape[0] == 1:
        return shape[1:]
    return shape


# ----- LevelDB table and protobuf decoding -----


class _Reader:
    """Cursor over ``data[pos:end]`` decoding varints; running past ``end`` is a CheckpointError."""

    def __init__(self, data: bytes, pos: int, end: int, path: Path) -> None:
        self.data, self.pos, self.end, self.path = data, pos, end, path

    def varint(self) -> int:
        result, shift = 0, 0
        while True:
            if self.pos >= self.end or shift > 63:
                raise CheckpointError(f"{self.path} is corrupt: a varint runs past its record")
            byte = self.data[self.pos]
            self.pos += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return result

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise CheckpointError(f"{self.path} is corrupt: a {n}-byte field runs past its record")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk


def _read_block(data: bytes, offset: int, size: int, path: Path) -> bytes:
    """A block's bytes, after checking its trailer: the compression type (none) and the masked crc32c of the
    block and that type byte."""
    if offset + size + _BLOCK_TRAILER_SIZE > len(data):
        raise CheckpointError(
            f"{path} is truncated: a block at [{offset}, {offset + size}) plus its trailer lies past the "
            f"end of the {len(data)}-byte file"
        )
    (stored,) = struct.unpack_from("<I", data, offset + size + 1)
    actual = masked_crc32c(data[offset : offset + size + 1])
    if actual != stored:
        raise CheckpointError(
            f"{path} is corrupt: the block at byte {offset} has crc32c {actual:#010x}, its trailer says {stored:#010x}"
        )
    if data[offset + size] != 0:
        raise CheckpointError(f"{path}: block at {offset} is compressed (type {data[offset + size]}); unsupported")
    return data[offset : offset + size]


def _block_entries(block: bytes, path: Path) -> list[tuple[bytes, bytes]]:
    """Decode a block's prefix-compressed (key, value) records; the restart array is only for seeking."""
    if len(block) < 4:
        raise CheckpointError(f"{path} is corrupt: a {len(block)}-byte block has no restart count")
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    records_end = len(block) - 4 - 4 * num_restarts
    if records_end < 0:
        raise CheckpointError(f"{path} is corrupt: a block claims {num_restarts} restart points")
    reader = _Reader(block, 0, records_end, path)
    records, key = [], b""
    while reader.pos < records_end:
        shared, unshared, value_len = reader.varint(), reader.varint(), reader.varint()
        if shared > len(key):
            raise CheckpointError(f"{path} is corrupt: a key shares {shared} bytes with a {len(key)}-byte key")
        key = key[:shared] + reader.take(unshared)
        records.append((key, reader.take(value_len)))
    return records


def _proto_fields(message: bytes, path: Path) -> list[tuple[int, int | bytes]]:
    """(field number, value) pairs of a protobuf message: ints for varint/fixed fields, bytes for nested."""
    reader = _Reader(message, 0, len(message), path)
    fields: list[tuple[int, int | bytes]] = []
    while reader.pos < len(message):
        tag = reader.varint()
        number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            fields.append((number, reader.varint()))
        elif wire_type == 1:
            fields.append((number, struct.unpack("<Q", reader.take(8))[0]))
        elif wire_type == 2:
            fields.append((number, reader.take(reader.varint())))
        elif wire_type == 5:
            fields.append((number, struct.unpack("<I", reader.take(4))[0]))
        else:
            raise CheckpointError(f"{path} is corrupt: protobuf wire type {wire_type}")
    return fields


def _parse_header(value: bytes, path: Path) -> int:
    # BundleHeaderProto: 1 num_shards, 2 endianness (0 little, 1 big), 3 version.
    fields = dict(_proto_fields(value, path))
    if fields.get(2, 0) != 0:
        raise CheckpointError(f"{path} was written on a big-endian machine; only little-endian is supported")
    return int(fields.get(1, 1))


def _parse_entry(name: str, value: bytes, path: Path) -> TensorEntry:
    # BundleEntryProto: 1 dtype, 2 shape, 3 shard_id, 4 offset, 5 size, 6 crc32c (fixed32), 7 slices.
    fields = _proto_fields(value, path)
    scalars = {number: v for number, v in fields if isinstance(v, int)}
    if any(number == 7 for number, _ in fields):
        raise CheckpointError(f"{path}: variable {name!r} is stored in slices (partitioned); unsupported")
    code = scalars.get(1, 0)
    if code not in _TF_DTYPES:
        raise CheckpointError(
            f"{path}: variable {name!r} has dtype {_TF_DTYPE_NAMES.get(code, f'enum {code}')}; "
            "only float32, float64 and float16 are supported"
        )
    dims: list[int] = []
    for number, shape_msg in fields:
        if number == 2 and isinstance(shape_msg, bytes):
            # TensorShapeProto: 2 repeated Dim {1 size}; 3 unknown_rank.
            for dim_number, dim in _proto_fields(shape_msg, path):
                if dim_number == 3 and dim:
                    raise CheckpointError(f"{path}: variable {name!r} has an unknown rank")
                if dim_number == 2 and isinstance(dim, bytes):
                    size = dict(_proto_fields(dim, path)).get(1, 0)
                    if size >= 1 << 63:  # int64 stored as a two's-complement varint: -1 = unknown
                        raise CheckpointError(f"{path}: variable {name!r} has a dimension of unknown size")
                    dims.append(int(size))
    entry = TensorEntry(
        name=name,
        dtype=_TF_DTYPES[code],
        shape=tuple(dims),
        shard_id=int(scalars.get(3, 0)),
        offset=int(scalars.get(4, 0)),  # proto3 omits zeros: the first tensor has no offset field
        size=int(scalars.get(5, 0)),
        crc32c=int(scalars.get(6, 0)),
    )
    expected = math.prod(entry.shape) * entry.dtype.itemsize
    if entry.size != expected:
        raise CheckpointError(
            f"{path}: variable {name!r} says {entry.size} bytes, but {entry.dtype} {list(entry.shape)} needs {expected}"
        )
    return entry


# ----- crc32c (Castagnoli), as LevelDB and TensorFlow store it: masked -----


def crc32c(data: bytes | np.ndarray) -> int:
    """CRC-32C (Castagnoli polynomial, reflected) of ``data`` (bytes, or an array's raw bytes), in C."""
    if isinstance(data, np.ndarray):
        data = data.reshape(-1).view(np.uint8)
        data.flags.writeable = False  # google-crc32c takes read-only buffers; the view alone is locked
    return google_crc32c.value(data)


def masked_crc32c(data: bytes | np.ndarray) -> int:
    """The crc32c as stored: rotated and offset, so that the crc of data that holds crcs stays robust."""
    crc = crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF
