"""Instruction data (the course's chapter 7): Alpaca-style records -> prompt + response tokens -> padded batches.

The data rules:

* **Records.** A JSON list of objects with ``instruction`` and ``output`` (non-empty strings) and an optional
  ``input`` string (absent, ``null`` or ``""`` means no input). Anything else is a ``ValueError`` naming the
  record's index.
* **Template** (Alpaca's, as the course writes it), prompt then response::

      Below is an instruction that describes a task. Write a response that appropriately completes the request.

      ### Instruction:
      {instruction}

      ### Input:
      {input}

      ### Response:
      {output}

  The ``### Input:`` block (and the blank line before it) is there only when the input is non-empty; the
  prompt ends right after the instruction or the input, the response starts with the blank line before
  ``### Response:`` (``RESPONSE_HEADER``). At inference (the test responses, ``gpt2 chat``) the model is given
  ``inference_prompt``: the prompt and the header, the training text up to the response's first word, so it
  writes only the response (the course gives the prompt alone and strips the header the model writes; the text
  that counts is the same).
* **Split.** ``split_instructions`` cuts a seeded permutation into 85% train (``int(0.85 n)``), 10% test
  (``int(0.1 n)``) and the rest validation: 935 / 110 / 55 of the course's 1,100 records.
* **Tokens.** ``encode(prompt + response)``, the text ``<|endoftext|>`` inside a record refused; the prompt's
  length is ``len(encode(prompt))``. Should the joint encoding not start with the prompt's own tokens (BPE
  merging across the boundary, which never happens in the course's data), the two parts are encoded apart
  and joined, so the prompt tokens always equal what the model is given at inference.
* **Batches.** ``collate`` appends one ``<|endoftext|>`` to each example and pads to the batch's longest; its
  docstring gives the target rule with a worked example.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mapper.tokens import IGNORE_INDEX
from tasks.classify import PAD_ID
from tasks.text import encode_plain, read_utf8

PREAMBLE = ("Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.")


def check_entry(entry, index: int | None = None) -> None:
    """``ValueError`` naming the record unless ``entry`` is a valid instruction record."""
    where = "instruction record" if index is None else f"instruction record {index}"
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where} must be a JSON object, got {type(entry).__name__}")
    for key in ("instruction", "output"):
        if key not in entry:
            raise ValueError(f"{where} has no {key!r} key (keys: {sorted(entry)})")
        if not isinstance(entry[key], str):
            raise ValueError(f"{where}: {key!r} must be a string, got {type(entry[key]).__name__}")
        if not entry[key].strip():
            raise ValueError(f"{where}: {key!r} is empty")
    if entry.get("input") is not None and not isinstance(entry["input"], str):
        raise ValueError(f"{where}: 'input' must be a string, got {type(entry['input']).__name__}")


def format_prompt(entry: Mapping[str, str]) -> str:
    """The preamble, ``### Instruction:`` and, for a non-empty input, ``### Input:``; see the module docstring."""
    check_entry(entry)
    text = f"{PREAMBLE}\n\n### Instruction:\n{entry['instruction']}"
    if entry.get("input"):
        text += f"\n\n### Input:\n{entry['input']}"
    return text


RESPONSE_HEADER = "\n\n### Response:\n"


def format_response(entry: Mapping[str, str]) -> str:
    """``RESPONSE_HEADER + output`` = ``"\\n\\n### Response:\\n" + output``."""
    check_entry(entry)
    return RESPONSE_HEADER + entry["output"]


def inference_prompt(entry: Mapping[str, str]) -> str:
    """What the model is given to answer ``entry`` (its ``output``, if any, is not used): the prompt and the response
    header, i.e. the training text ``format_prompt + format_response`` up to the first character of the output."""
    return format_prompt({"output": "-", **entry}) + RESPONSE_HEADER


def read_instructions(path: str | Path) -> list[dict]:
    """The records of a JSON list file, each checked (``ValueError`` naming the file and the record index)."""
    text = read_utf8(path)
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(entries, list):
        raise ValueError(f"{path} must hold a JSON list of records, got a {type(entries).__name__}")
    if not entries:
        raise ValueError(f"{path} holds an empty list")
    for i, entry in enumerate(entries):
        try:
            check_entry(entry, i)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    return entries


def split_instructions(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) index arrays: a ``default_rng(seed)`` permutation of ``range(n)`` whose first
    ``int(0.85 n)`` are train, next ``int(0.1 n)`` test, the rest validation."""
    if n < 1:
        raise ValueError(f"nothing to split: n = {n}")
    order = np.random.default_rng(seed).permutation(n)
    n_train, n_test = int(0.85 * n), int(0.1 * n)
    return order[:n_train], order[n_train + n_test :], order[n_train : n_train + n_test]


def encode_examples(entries: Sequence[Mapping[str, str]], encoder) -> list[tuple[list[int], int]]:
    """[(ids of prompt + response, prompt_length)] per record; ``ValueError`` naming a bad record's index."""
    examples = []
    for i, entry in enumerate(entries):
        check_entry(entry, i)
        prompt, response = format_prompt(entry), format_response(entry)
        where = f"instruction record {i}"
        prompt_ids = encode_plain(encoder, prompt, where)
        ids = encode_plain(encoder, prompt + response, where)
        if ids[: len(prompt_ids)] != prompt_ids:
            ids = prompt_ids + encode_plain(encoder, response, where)
        examples.append((ids, len(prompt_ids)))
    return examples


def collate(examples: Sequence[tuple[Sequence[int], int]], pad_id: int = PAD_ID, mask_prompt: bool = False,
            max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(inputs int64 [B, L], targets int64 [B, L]) of (ids, prompt_length) examples, the course's custom collate.

    Each example of n tokens gets one ``pad_id`` (``<|endoftext|>``) appended and is padded with ``pad_id`` to
    the batch's longest length + 1; inputs drop the last position, targets the first (L = longest n). In the
    targets, position n - 1 (the appended end-of-text, which the model must learn to emit) stays; every later
    position (padding) is ``IGNORE_INDEX``. With ``mask_prompt``, targets ``[: prompt_length - 1]`` (those
    predicting the prompt's 2nd..last token) are ``IGNORE_INDEX`` too: the loss covers only the response and
    the end-of-text. With ``max_length``, inputs and targets keep their first ``max_length`` positions.

    Worked example, E = pad_id, I = IGNORE_INDEX, ``mask_prompt=True``::

        ([1, 2, 3, 4], prompt_length 2) -> padded [1, 2, 3, 4, E]
            inputs [1, 2, 3, 4]   targets [I, 3, 4, E]
        ([5, 6],       prompt_length 1) -> padded [5, 6, E, E, E]
            inputs [5, 6, E, E]   targets [6, E, I, I]
    """
    if len(examples) == 0:
        raise ValueError("no examples to collate")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    for b, (ids, prompt_length) in enumerate(examples):
        if len(ids) == 0:
            raise ValueError(f"example {b} has no tokens")
        if not 0 <= prompt_length <= len(ids):
            raise ValueError(f"example {b}: prompt_length {prompt_length} is outside [0, {len(ids)}]")
    width = max(len(ids) for ids, _ in examples)
    padded = np.full((len(examples), width + 1), pad_id, dtype=np.int64)
    for b, (ids, _) in enumerate(examples):
        padded[b, : len(ids)] = ids
    inputs, targets = padded[:, :-1].copy(), padded[:, 1:].copy()
    positions = np.arange(width)
    for b, (ids, prompt_length) in enumerate(examples):
        targets[b, positions >= len(ids)] = IGNORE_INDEX  # after the one end-of-text target at len(ids) - 1
        if mask_prompt:
            targets[b, : max(prompt_length - 1, 0)] = IGNORE_INDEX
    if max_length is not None:
        inputs, targets = inputs[:, :max_length], targets[:, :max_length]
    return inputs, targets
