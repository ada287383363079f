"""Safetensors files: read (the header checked, each tensor read straight into a fresh array) and written.

Reading validates first, with the ``safetensors`` library itself (the format's reference): its ``safe_open``
parses the header and checks the dtypes, shapes and byte ranges (contiguous, non-overlapping, covering the data
exactly) without reading the tensors. Only a file it accepts reaches the header parse here, whose readers then
fill each fresh array with ``readinto``, so a load costs 1.0x the file in memory.

Layout: u64 little-endian header length N, N bytes of JSON (``{key: {dtype, shape, data_offsets}}`` and an
optional ``__metadata__`` of strings), then the tensors' bytes. Also the sharded form: an index JSON whose
``weight_map`` names the shard of each key.
"""

from __future__ import annotations

import functools
import json
import math
import os
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from safetensors import SafetensorError, safe_open

from mapper.atomic import atomic_write
from mapper.errors import CheckpointError
from mapper.formats.stored import Stored, bfloat16_to_float32

SAFETENSORS_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
SAFETENSORS_CODE = {np.dtype("float32"): "F32", np.dtype("float64"): "F64"}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit; a larger "length" means this is not one


def safetensors_source(file: Path) -> dict[str, Stored]:
    """The header of a safetensors file (u64 LE length N, N bytes of JSON, then the data) as ``Stored``.

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
            if header_len > min(MAX_HEADER_BYTES, file_size - 8):
                raise CheckpointError(
                    f"{file} is not a valid safetensors file (truncated or corrupt): header length "
                    f"{header_len} but the file has {file_size} bytes"
                )
            validate_safetensors(file)
            header = json.loads(f.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not a valid safetensors file: its header is not JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {file}: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file} is not a valid safetensors file: its header is not a JSON object")
    data_start = 8 + header_len
    out: dict[str, Stored] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            code, shape, (begin, end) = (
                info["dtype"],
                tuple(int(d) for d in info["shape"]),
                info["data_offsets"],
            )
            itemsize = SAFETENSORS_ITEMSIZE[code]
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
        out[key] = Stored(key, shape, _safetensors_reader(file, key, code, shape, data_start + begin))
    return out


# safetensors' reasons, in this project's words where its own are cryptic
_REASONS = {
    "incomplete metadata, file not fully covered": "its tensors' byte ranges do not cover the file's data exactly "
    "(truncated, or bytes appended)",
    "invalid offset for tensor": "the tensors' byte ranges overlap or leave a gap, at tensor",
}


def validate_safetensors(file: Path) -> None:
    """``CheckpointError`` (one line) unless the ``safetensors`` library accepts the file's header: valid JSON of
    bounded depth, known dtypes, integer shapes and offsets, byte ranges that tile the data. Reads no tensor."""
    try:
        with safe_open(str(file), framework="numpy"):
            pass
    except SafetensorError as e:
        reason = str(e).removeprefix("Error while deserializing header: ")
        reason = next((words + reason[len(key):] for key, words in _REASONS.items() if reason.startswith(key)),
                      reason)
        raise CheckpointError(f"{file} is not a valid safetensors file: {reason}") from None


def safetensors_metadata(file: Path) -> dict[str, str]:
    """The ``__metadata__`` entry of a safetensors header (the file was already checked by the caller)."""
    with open(file, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        metadata = json.loads(f.read(header_len)).get("__metadata__") or {}
    return metadata if isinstance(metadata, dict) else {}


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
            return bfloat16_to_float32(raw)
        return raw.astype(np.float32) if code == "F16" else raw

    return read


# Reading a large tensor: the kernel's copy out of the page cache and the page faults of the fresh array run on the
# calling thread, so one read() of GPT-2's 154 MB wte keeps one core busy while the others idle. Blocks of
# READ_BLOCK bytes read by os.preadv on READ_THREADS threads (the GIL is released in the system call) went from
# 0.22-1.2 s to 0.15-0.18 s for the 475 MiB 124M file in fresh processes (2-core AMD EPYC, page cache warm;
# safetensors' load_file: 0.42-0.53 s at 2x the memory), still one copy, 1.0x the file.
READ_BLOCK = 8 << 20
READ_THREADS = max(1, min(os.cpu_count() or 1, 4))


@functools.cache
def _reader_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(READ_THREADS, thread_name_prefix="mapper.safetensors")


def _read_exact(file: Path, offset: int, out: np.ndarray, key: str) -> None:
    """Fill ``out`` with the file's bytes from ``offset`` (in parallel blocks where the OS has ``preadv``)."""
    view = memoryview(out).cast("B")
    with open(file, "rb") as f:
        if not hasattr(os, "preadv") or out.nbytes <= READ_BLOCK or READ_THREADS == 1:
            f.seek(offset)
            got = f.readinto(view)
        else:
            fd = f.fileno()
            blocks = [(start, view[start : start + READ_BLOCK]) for start in range(0, out.nbytes, READ_BLOCK)]
            got = sum(_reader_pool().map(lambda block: _pread_fully(fd, block[1], offset + block[0]), blocks))
    if got != out.nbytes:
        raise CheckpointError(f"{file} is truncated: read {got} of {out.nbytes} bytes of {key!r}")


def _pread_fully(fd: int, view: memoryview, offset: int) -> int:
    """preadv until ``view`` is full or the file ends; the bytes read."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            break
        done += got
    return done


def sharded_safetensors_source(index_file: Path) -> dict[str, Stored]:
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_file} is not a safetensors index (needs a 'weight_map' object): {e}") from None
    out: dict[str, Stored] = {}
    for shard_name in sorted(set(weight_map.values())):
        shard = index_file.parent / shard_name
        if not shard.is_file():
            raise CheckpointError(
                f"{index_file} names shard {shard_name!r}, which does not exist in {index_file.parent}"
            )
        tensors = safetensors_source(shard)
        for key, shard_of_key in weight_map.items():
            if shard_of_key == shard_name:
                if key not in tensors:
                    raise CheckpointError(f"{index_file} puts {key!r} in {shard_name}, but that shard lacks it")
                out[key] = tensors[key]
    return out


def write_safetensors(f: BinaryIO, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """The safetensors layout: u64 LE header length, JSON header padded to 8 bytes, tensors back to back."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, arr in tensors.items():
        header[name] = {
            "dtype": SAFETENSORS_CODE[np.dtype(arr.dtype)],
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


def save_tensors(path: str | os.PathLike[str], tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
                 ) -> None:
    """Write float32/float64 arrays under any names to one safetensors file, atomically (e.g. optimizer state)."""
    for name, arr in tensors.items():
        if np.dtype(arr.dtype) not in SAFETENSORS_CODE:
            raise CheckpointError(f"cannot save {name!r}: dtype {arr.dtype}; only float32/float64 are written")
    atomic_write(Path(path), lambda f: write_safetensors(f, tensors, {"format": "pt", **(metadata or {})}))


def load_tensors(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read every tensor of a safetensors file and its metadata (what ``save_tensors`` wrote)."""
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"{file} does not exist")
    return {key: stored.read() for key, stored in safetensors_source(file).items()}, safetensors_metadata(file)
