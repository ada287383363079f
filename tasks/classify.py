"""Classification data (the course's chapter 6, spam or not): labelled texts -> balanced, split, padded tokens.

The data rules:

* **Files.** A ``.csv`` file is read with the ``csv`` module and needs a header holding ``text`` and ``label``
  columns (others are ignored). Any other file holds one message per line as ``label<TAB>text`` (the SMS Spam
  Collection's layout); the text is everything after the first tab, so it may hold tabs itself. Blank lines
  are skipped. A missing file, a file with no messages, a line without a tab, an empty label or an empty text
  is a ``ValueError`` naming the file and line.
* **Classes.** ``class_names`` sorts the distinct labels, so a label's id is its place in that order
  (``ham`` = 0, ``spam`` = 1). Fewer than two classes is refused (one class would "classify" perfectly);
  labels that differ only in case or spacing (``Spam`` and ``spam``) stay distinct classes, with a warning, as
  does a class so small that balancing leaves fewer than ``SMALL_CLASS`` texts of each.
* **Balance.** ``balance`` undersamples every class to the smallest class's count (the SMS data: 4,827 ``ham``
  -> 747, beside 747 ``spam``), choosing the kept messages with ``numpy.random.default_rng(seed)``; the kept
  messages stay in their original relative order (``split`` shuffles afterwards).
* **Split.** ``split`` cuts a seeded permutation into train / validation / test of ``int(0.7 n)``,
  ``int(0.1 n)`` and the rest (the course's 1045 / 149 / 300 of the 1,494 balanced messages).
* **Tokens.** Texts are GPT-2 tokens, the text ``<|endoftext|>`` inside a message is refused (it is not
  turned into the special id), and a text of no tokens is refused: a classifier needs a token to read. Either
  refusal names the message's line in the file.
  Rows are right-padded with ``pad_id`` (50256, ``<|endoftext|>``) to one length L: the longest training
  example, or ``max_length`` when given, in which case longer texts keep their first ``max_length`` tokens and
  are counted as truncated. Validation and test rows get the training L. ``lengths`` holds each row's number
  of real tokens, and the classifier reads the hidden state at ``last_token_index(lengths)``.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mapper.config import GPT2_EOS_TOKEN_ID
from tasks.text import encode_plain, read_utf8

PAD_ID = GPT2_EOS_TOKEN_ID  # 50256, <|endoftext|>, GPT-2's only special token, used as padding
SMALL_CLASS = 10  # fewer texts per class than this after balancing is worth a warning


def read_labelled(path: str | Path) -> tuple[list[str], list[str]]:
    """(texts, labels) of a ``label<TAB>text`` file or a CSV file with ``text`` and ``label`` columns."""
    texts, labels, _ = _read_labelled(path)
    return texts, labels


def _read_labelled(path: str | Path) -> tuple[list[str], list[str], list[str]]:
    """(texts, labels, where each text is: "FILE line N")."""
    path = Path(path)
    content = read_utf8(path)
    texts: list[str] = []
    labels: list[str] = []
    places: list[str] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(content, newline=""))
        header = reader.fieldnames or []
        missing = [c for c in ("text", "label") if c not in header]
        if missing:
            raise ValueError(f"{path}: the CSV header {header} lacks the column(s) {missing}; it needs 'text' and "
                             "'label'")
        for row in reader:
            where = f"{path} line {reader.line_num}"
            text, label = row["text"], row["label"]
            if text is None or label is None:
                raise ValueError(f"{where}: the row has fewer fields than the header")
            _add(texts, labels, text, label, where)
            places.append(where)
    else:
        for number, line in enumerate(content.split("\n"), start=1):
            if not line.strip():
                continue
            if "\t" not in line:
                raise ValueError(f"{path} line {number}: no tab; every line must be 'label<TAB>text'")
            label, text = line.split("\t", 1)
            _add(texts, labels, text, label, f"{path} line {number}")
            places.append(f"{path} line {number}")
    if not texts:
        raise ValueError(f"{path} holds no labelled texts")
    return texts, labels, places


def _add(texts: list[str], labels: list[str], text: str, label: str, where: str) -> None:
    label = label.strip()
    if not label:
        raise ValueError(f"{where}: empty label")
    if not text.strip():
        raise ValueError(f"{where}: empty text")
    texts.append(text)
    labels.append(label)


def class_names(labels: Sequence[str]) -> list[str]:
    """The distinct labels, sorted: a label's id is its index here (``["ham", "spam"]``)."""
    if len(labels) == 0:
        raise ValueError("no labels given")
    return sorted(set(labels))


def label_warnings(counts: Counter, balanced: bool) -> list[str]:
    """What is suspicious about the classes (``counts``: texts per label), in words: labels that differ only in
    case or spacing, and a class of fewer than ``SMALL_CLASS`` texts (to which ``balanced`` cuts every class)."""
    warnings = []
    groups: dict[str, list[str]] = {}
    for name in sorted(counts):
        groups.setdefault("".join(name.split()).casefold(), []).append(name)
    for names in groups.values():
        if len(names) > 1:
            warnings.append(f"the labels {', '.join(map(repr, names))} differ only in case or spacing and are "
                            f"{len(names)} different classes ({', '.join(str(counts[n]) for n in names)} texts); "
                            "correct the data if they mean one class")
    fewest = min(counts.values())
    if fewest < SMALL_CLASS:
        smallest = sorted(name for name in counts if counts[name] == fewest)
        warnings.append(f"{len(smallest)} class(es) ({', '.join(map(repr, smallest[:3]))}"
                        f"{' ...' if len(smallest) > 3 else ''}) have only {fewest} text(s)"
                        + (f": balancing keeps {fewest} of each of the {len(counts)} classes" if balanced else ""))
    return warnings


def label_ids(labels: Sequence[str], names: Sequence[str]) -> np.ndarray:
    """int64 [N]: each label's index in ``names``; ``ValueError`` for a label not in ``names``."""
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise ValueError(f"label(s) {unknown} are not among the classes {list(names)}")
    return np.array([index[label] for label in labels], dtype=np.int64)


def balance(texts: Sequence[str], label_ids: np.ndarray, seed: int) -> tuple[list[str], np.ndarray]:
    """Undersample every class to the smallest class's count: (texts, label ids [M]), M = classes x that count.

    Each class's kept members are drawn without replacement by ``numpy.random.default_rng(seed)``, classes in
    increasing id; the kept texts keep their original relative order.
    """
    ids = np.asarray(label_ids, dtype=np.int64)
    if ids.ndim != 1 or len(ids) != len(texts):
        raise ValueError(f"{len(texts)} texts but label ids of shape {ids.shape}")
    keep = balanced_indices(ids, seed)
    return [texts[i] for i in keep], ids[keep]


def balanced_indices(ids: np.ndarray, seed: int) -> np.ndarray:
    """The indices :func:`balance` keeps, in increasing order."""
    if len(ids) == 0:
        raise ValueError("no texts to balance")
    rng = np.random.default_rng(seed)
    classes = np.unique(ids)
    smallest = min(int((ids == c).sum()) for c in classes)
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(ids == c), size=smallest, replace=False)
                                   for c in classes]))


def split(n: int, fractions: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 0) -> tuple[np.ndarray, ...]:
    """(train, val, test) index arrays: a ``default_rng(seed)`` permutation of ``range(n)`` cut into
    ``int(fractions[0] n)``, ``int(fractions[1] n)`` and the rest (``fractions[2]`` only checks the sum)."""
    if n < 1:
        raise ValueError(f"nothing to split: n = {n}")
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions must be three numbers >= 0 summing to 1, got {tuple(fractions)}")
    order = np.random.default_rng(seed).permutation(n)
    n_train, n_val = int(fractions[0] * n), int(fractions[1] * n)
    return order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]


def encode_batch(texts: Sequence[str], encoder, max_length: int | None = None, pad_id: int = PAD_ID,
                 places: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens int64 [N, L] right-padded with ``pad_id``, lengths int64 [N] of real tokens, n_truncated).

    L is the longest text's token count, or ``max_length`` when given: then every row is L long and a text
    of more tokens keeps its first ``max_length`` (``n_truncated`` counts them). A text of no tokens is refused,
    named by its entry in ``places`` (e.g. "FILE line N"; default "text i").
    """
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if len(texts) == 0:
        raise ValueError("no texts to encode")
    places = [f"text {i}" for i in range(len(texts))] if places is None else places
    rows = [encode_plain(encoder, text, f"{place} {text[:40]!r}") for place, text in zip(places, texts, strict=True)]
    for place, text, row in zip(places, texts, rows, strict=True):
        if not row:
            raise ValueError(f"{place} {text[:40]!r} is empty (no tokens); a classifier needs one token")
    width = max(map(len, rows)) if max_length is None else max_length
    tokens = np.full((len(rows), width), pad_id, dtype=np.int64)
    lengths = np.empty(len(rows), dtype=np.int64)
    n_truncated = 0
    for i, row in enumerate(rows):
        n_truncated += len(row) > width
        row = row[:width]
        tokens[i, : len(row)] = row
        lengths[i] = len(row)
    return tokens, lengths, n_truncated


def last_token_index(lengths: np.ndarray) -> np.ndarray:
    """int64 [N]: ``lengths - 1``, the position of each row's last real (non-padding) token.

    The classifier reads the hidden state there: under causal attention only the last real token has seen
    the whole message. The course reads position -1, which for a message shorter than the padded length is a
    pad token: its state has seen the message too, but followed by a varying run of ``<|endoftext|>`` tokens,
    so the class would depend on how much padding the batch happened to need.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and lengths.min() < 1:
        raise ValueError(f"every row needs at least one real token, got length {int(lengths.min())}")
    return lengths - 1


@dataclass(frozen=True)
class Split:
    """One part of the data: tokens int64 [N, L], lengths int64 [N] (real tokens per row), labels int64 [N]."""

    tokens: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class ClassificationData:
    """The three splits, padded to one length, with the class names (a label id indexes ``class_names``)."""

    train: Split
    val: Split
    test: Split
    class_names: list[str]
    n_truncated: dict[str, int] = field(default_factory=dict)  # per split name
    read_counts: dict[str, int] = field(default_factory=dict)  # messages per class in the file
    warnings: list[str] = field(default_factory=list)  # ``label_warnings``, for the user before training

    @property
    def length(self) -> int:
        """L, the padded length of every row."""
        return int(self.train.tokens.shape[1])

    def summary(self) -> str:
        """One line for the log: what was read per class, kept, split and truncated."""
        read = ", ".join(f"{name} {n}" for name, n in self.read_counts.items())
        kept = sum(map(len, (self.train, self.val, self.test)))
        per_class = f" ({kept // len(self.class_names)} per class)" if kept % len(self.class_names) == 0 else ""
        cut = sum(self.n_truncated.values())
        return (f"{len(self.class_names)} classes, {sum(self.read_counts.values())} texts ({read}) -> {kept} kept"
                f"{per_class} -> train {len(self.train)} / val {len(self.val)} / test {len(self.test)}, "
                f"{self.length} tokens per row, {cut} truncated")


def prepare_classification(path: str | Path, encoder, seed: int, max_length: int | None = None,
                           balance: bool = True) -> ClassificationData:
    """Read -> (balance) -> split 70/10/20 -> encode. Rows are padded to the longest training text, or to
    ``max_length``; validation and test rows are padded or truncated to that same length."""
    texts, labels, places = _read_labelled(path)
    names = class_names(labels)
    if len(names) < 2:
        raise ValueError(f"{path}: every text has the label {names[0]!r}; a classifier needs at least two classes")
    ids = label_ids(labels, names)
    counts = Counter(labels)
    if balance:
        keep = balanced_indices(ids, seed)
        texts, ids, places = [texts[i] for i in keep], ids[keep], [places[i] for i in keep]
    warnings = label_warnings(counts, balance)
    parts = split(len(texts), seed=seed)
    if len(parts[0]) == 0:
        raise ValueError(f"{path}: {len(texts)} text(s) leave no training example after the 70/10/20 split")
    splits: dict[str, Split] = {}
    n_truncated: dict[str, int] = {}
    width = max_length
    for name, index in zip(("train", "val", "test"), parts, strict=True):
        if len(index) == 0:
            splits[name] = Split(np.zeros((0, width), dtype=np.int64), np.zeros(0, dtype=np.int64), ids[index])
            n_truncated[name] = 0
            continue
        tokens, lengths, cut = encode_batch([texts[i] for i in index], encoder, width,
                                            places=[places[i] for i in index])
        width = tokens.shape[1]  # the training length, for val and test
        splits[name] = Split(tokens, lengths, ids[index])
        n_truncated[name] = cut
    return ClassificationData(splits["train"], splits["val"], splits["test"], names, n_truncated,
                              {name: counts[name] for name in names}, warnings)
