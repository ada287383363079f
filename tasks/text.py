"""Pretraining data: text files -> GPT-2 tokens -> sliding windows of inputs and next-token targets.

As the course (chapter 5) prepares *The Verdict*:

* the text is split by position into a training head and a validation tail (``val_fraction`` = 0.1 of the
  characters), so the validation text is never seen in training;
* each part is tokenized on its own and cut into windows of ``context`` tokens starting every ``stride``
  tokens: window i is ``ids[s : s + context]`` with ``s = i * stride``, its targets the same positions shifted
  by one, ``ids[s + 1 : s + context + 1]``. A window is made only where all ``context + 1`` tokens exist, so a
  last partial window is dropped (the course's ``range(0, len(ids) - context, stride)``);
* several files are joined with ``<|endoftext|>`` between them, as GPT-2's training documents were.

Bad input is a ``ValueError`` saying which file and what: missing, empty, not UTF-8, too short for a window.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mapper.atomic import atomic_write
from mapper.training import Batch
from tasks.order import epoch_order, in_order

EOT = "<|endoftext|>"


def read_utf8(path: str | Path, what: str = "data file", normalize: bool = True) -> str:
    """The text of ``path``; ``ValueError`` if it is missing, not a file, not UTF-8 or holds only whitespace.

    With ``normalize`` a UTF-8 byte-order mark is dropped and ``\\r\\n`` line ends become ``\\n`` (the fine-tunes'
    record files); without it the text is exactly the file's (pretraining text, tokenized as it is).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {path} does not exist" if not path.exists() else f"{what} {path} is not a file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig" if normalize else "utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(f"{what} {path} is not UTF-8 text (byte {e.start}, line {line}: "
                         f"{raw[e.start:e.start + 4]!r})") from None
    if not text.strip():
        raise ValueError(f"{what} {path} is empty")
    return text.replace("\r\n", "\n") if normalize else text


def encode_plain(encoder, text: str, where: str) -> list[int]:
    """``encoder.encode(text)`` with no special tokens allowed: ``<|endoftext|>`` written in the data is refused
    with a ``ValueError`` naming ``where`` (e.g. "file.tsv line 3"), never turned into the end-of-text id."""
    try:
        return list(encoder.encode(text, allowed_special=set()))
    except ValueError as e:
        raise ValueError(f"{where}: the text cannot be encoded ({str(e).splitlines()[0]})") from None


def read_texts(paths: Sequence[str | Path]) -> str:
    """The files' text, joined with ``<|endoftext|>``. Raises ``ValueError`` naming the file for bad input."""
    if not paths:
        raise ValueError("no data files given")
    return EOT.join(read_utf8(path, normalize=False) for path in paths)


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """(training head, validation tail), split at ``int((1 - val_fraction) * len(text))`` characters."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    cut = int((1.0 - val_fraction) * len(text))
    return text[:cut], text[cut:]


def window_starts(n_tokens: int, context: int, stride: int) -> np.ndarray:
    """Start of every full window: s = 0, stride, 2 stride, ... while s + context + 1 <= n_tokens."""
    if context < 1 or stride < 1:
        raise ValueError(f"context and stride must be >= 1, got {context} and {stride}")
    return np.arange(0, max(n_tokens - context, 0), stride, dtype=np.int64)


@dataclass(frozen=True)
class Windows:
    """Sliding windows over one token stream: ``inputs(i)`` / ``targets(i)`` of window i, each [context]."""

    ids: np.ndarray  # [N] token ids
    context: int
    stride: int

    @property
    def starts(self) -> np.ndarray:
        return window_starts(len(self.ids), self.context, self.stride)

    def __len__(self) -> int:
        return len(self.starts)

    def batch(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(inputs [B, context], targets [B, context]) of the windows ``indices``."""
        starts = self.starts[np.asarray(indices, dtype=np.int64)]
        rows = starts[:, None] + np.arange(self.context + 1)[None, :]  # [B, context + 1]
        tokens = self.ids[rows].astype(np.int64)
        return tokens[:, :-1], tokens[:, 1:]


def tokenize(text: str, encoder, cache_dir: Path | None = None) -> tuple[np.ndarray, Path | None]:
    """GPT-2 token ids of ``text`` (``<|endoftext|>`` allowed) as uint16, and the cache file to write them to.

    ``cache_dir`` holds earlier results keyed by the text's sha256: a hit is read (and nothing is returned to
    write); a miss is tokenized and its cache path returned, so the caller writes it once its checks passed.
    """
    key = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    cache = None if cache_dir is None else Path(cache_dir) / f"tokens-{key}.npy"
    if cache is not None and cache.is_file():
        return np.load(cache, allow_pickle=False), None
    return np.asarray(encoder.encode(text, allowed_special={EOT}), dtype=np.uint16), cache  # GPT-2 ids < 2**16


@dataclass(frozen=True)
class TextData:
    """The training and validation windows of a pretraining run."""

    train: Windows
    val: Windows
    sha256: str = ""  # of the text the windows come from
    pending_cache: tuple[tuple[Path, np.ndarray], ...] = ()

    def save_cache(self) -> None:
        """Write the token ids that were tokenized now (not read from the cache), atomically."""
        for path, ids in self.pending_cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda f, ids=ids: np.save(f, ids, allow_pickle=False))

    @property
    def n_train(self) -> int:
        return len(self.train)

    def train_batch(self, indices: np.ndarray) -> Batch:
        """``mapper.training.Batch`` of training windows ``indices``: inputs and next-token targets."""
        tokens, targets = self.train.batch(indices)
        return Batch(tokens, targets)

    def val_batch(self, indices: np.ndarray) -> Batch:
        tokens, targets = self.val.batch(indices)
        return Batch(tokens, targets)

    def train_batches(self, batch_size: int, epoch: int, seed: int) -> list[np.ndarray]:
        """Epoch ``epoch``'s batches of window indices (``tasks.order.epoch_order``: seeded, drop_last)."""
        return epoch_order(len(self.train), batch_size, epoch, seed)

    def val_batches(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
        """Validation windows in order, ``batch_size`` at a time (the last batch may be smaller)."""
        return in_order(len(self.val), batch_size, limit)


def prepare(paths: Sequence[str | Path], encoder, context: int, stride: int, val_fraction: float,
            batch_size: int, cache_dir: Path | None = None) -> TextData:
    """Read, split, tokenize and window the files; ``ValueError`` when a part holds no full window. Nothing is
    written: ``TextData.save_cache()`` stores new token ids once the caller's checks have passed."""
    text = read_texts(paths)
    train_text, val_text = split_text(text, val_fraction)
    (train_ids, train_cache), (val_ids, val_cache) = (tokenize(t, encoder, cache_dir) for t in (train_text, val_text))
    train, val = Windows(train_ids, context, stride), Windows(val_ids, context, stride)
    pending = tuple((path, ids) for path, ids in ((train_cache, train_ids), (val_cache, val_ids)) if path is not None)
    if len(train) < batch_size:
        raise ValueError(f"the training text ({len(train.ids)} tokens) makes {len(train)} window(s) of "
                         f"--context {context} + 1 tokens with --stride {stride}: fewer than one batch of "
                         f"{batch_size}. Give more text, or a smaller --context or --batch-size")
    if val_fraction > 0 and len(val) == 0:
        raise ValueError(f"the validation tail ({len(val.ids)} tokens, --val-fraction {val_fraction}) is shorter "
                         f"than one window of --context {context} + 1 tokens; raise --val-fraction or lower "
                         "--context")
    return TextData(train, val, hashlib.sha256(text.encode("utf-8")).hexdigest(), pending)
