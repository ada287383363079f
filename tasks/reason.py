"""Reasoning data and GSM8K scoring: (question, thinking, answer) triples -> one training text -> tokens.

The data rules:

* **Template.** Every example is trained as the one text::

      {question}\\n<think>\\n{thinking}\\n</think>\\n<answer>\\n{answer}\\n</answer>

  followed by the end-of-text id 50256, which ``tasks.instruct.collate`` appends (the id, never the text
  ``<|endoftext|>``). The prompt is ``format_reason_prompt(question)`` = ``question + "\\n<think>\\n"``, the
  same text given to the model at inference; the model writes the rest, and ``extract_answer`` reads the
  text inside its last ``<answer>`` ... ``</answer>``.
* **AM-DeepSeek-R1-Distilled layout** (``read_am``): one JSON object per line, ``messages`` holding a ``user``
  message (the question) and, after it, an ``assistant`` message whose ``info.think_content`` and
  ``info.answer_content`` are the thinking and the answer; where those are null or empty they are parsed
  from the assistant's ``content``, ``<think>...</think>`` and ``<answer>...</answer>`` (no answer tags: the
  text after ``</think>``). Thinking may be empty; question and answer may not.
* **GSM8K** (``read_gsm8k``): ``{"question", "answer"}`` per line, the answer's reasoning followed by a line
  ``#### <final answer>``. The thinking is the text before the last ``####`` with the calculator annotations
  ``<<16-3-4=9>>`` removed (``= <<16-3-4=9>>9`` reads ``= 9``); the answer is the text after it. A record
  without ``####`` (or with nothing after it) is a ``ValueError`` naming the line; ``strict=False`` skips such
  records and lists their lines in ``skipped_lines``. A record's ``index`` is its 0-based line number in
  the file (line number - 1): the ``index`` a prediction names.
* **Strings** (question, thinking, answer) are stripped of surrounding whitespace when read.
* **Fitting a context** (``fit_to_context``): the prompt, the thinking and the closing part
  (``"\\n</think>\\n<answer>\\n" + answer + "\\n</answer>"``) are tokenized apart and joined, so the prompt's
  tokens are exactly those ``format_reason_prompt`` gives at inference and the thinking can be cut at a token.
  An example of more than ``context`` tokens keeps question and answer whole: tokens are dropped from the
  end of its thinking and the marker ``"…"`` (U+2026) takes their place, when that leaves at least
  ``min_thinking_tokens`` of the thinking; otherwise the example is dropped. ``context`` tokens fit
  exactly: ``collate`` appends the end-of-text after the last input, so it becomes the last target.
* **Numbers** (``parse_number``): the last number in the text, by value (``Fraction``): ``$``, thousands
  commas, decimals (``30.00`` = 30), a minus sign that does not follow a word character (so ``16-3`` is 16
  and 3), ``%`` ignored (``25%`` = 25). Fractions like ``3/4`` and exponents are not read.
* **Scoring** (``score_gsm8k``): a prediction is right when the number of its extracted answer equals the
  reference's (a reference that holds no number is compared as text, whitespace and case ignored); a
  response with no ``<answer>`` tag is wrong.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

from tasks.text import encode_plain, read_utf8

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
CUT_MARKER = "…"  # ends a thinking that fit_to_context shortened

_CALCULATOR = re.compile(r"<<[^<>]*>>")
_NUMBER = re.compile(r"(?<![\w.])([-\u2212]\s*)?\$?\s*(\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)")


class Example(NamedTuple):
    """One reasoning example; ``index`` is its 0-based line in the file it was read from (None if made)."""

    question: str
    thinking: str
    answer: str
    index: int | None = None


class Examples(list):
    """A list of ``Example`` that also says which lines (1-based) ``read_gsm8k(strict=False)`` skipped."""

    skipped_lines: list[int]

    def __init__(self, items: Iterable[Example] = (), skipped_lines: Sequence[int] = ()) -> None:
        super().__init__(items)
        self.skipped_lines = list(skipped_lines)


def format_reason_prompt(question: str) -> str:
    """``question + "\\n<think>\\n"``: what the model is given, in training and at inference."""
    return f"{question}\n{THINK_OPEN}\n"


def format_reason_tail(answer: str) -> str:
    """``"\\n</think>\\n<answer>\\n" + answer + "\\n</answer>"``: what follows the thinking."""
    return f"\n{THINK_CLOSE}\n{ANSWER_OPEN}\n{answer}\n{ANSWER_CLOSE}"


def format_reason_text(question: str, thinking: str, answer: str) -> str:
    """The whole training text (without the end-of-text id, which ``collate`` appends)."""
    return format_reason_prompt(question) + thinking + format_reason_tail(answer)


def strip_calculator(text: str) -> str:
    """``text`` without GSM8K's calculator annotations ``<<...>>``."""
    return _CALCULATOR.sub("", text)


def _json_lines(path: str | Path) -> Iterable[tuple[int, object]]:
    """(1-based line number, parsed JSON) of each non-blank line; ``ValueError`` naming a line of bad JSON."""
    for number, line in enumerate(read_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {number} is not valid JSON ({e.msg}, column {e.colno})") from None


def _text_field(record, key: str, where: str) -> str:
    if not isinstance(record, Mapping):
        raise ValueError(f"{where} must be a JSON object, got {type(record).__name__}")
    if key not in record:
        raise ValueError(f"{where} has no {key!r} key (keys: {sorted(record)})")
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def read_gsm8k(path: str | Path, strict: bool = True) -> Examples:
    """GSM8K records as ``Example(question, thinking, final answer, index)``; see the module docstring."""
    examples, skipped = [], []
    for number, record in _json_lines(path):
        where = f"{path} line {number}"
        question = _text_field(record, "question", where).strip()
        solution = _text_field(record, "answer", where)
        if not question:
            raise ValueError(f"{where}: empty question")
        reasoning, mark, final = solution.rpartition("####")
        if not mark or not final.strip():
            if strict:
                raise ValueError(f"{where}: the answer has no final line '#### <answer>' (pass strict=False to "
                                 "skip such records)")
            skipped.append(number)
            continue
        examples.append(Example(question, strip_calculator(reasoning).strip(), final.strip(), number - 1))
    if not examples:
        raise ValueError(f"{path} holds no usable GSM8K records")
    return Examples(examples, skipped)


def read_reasoning(path: str | Path) -> Examples:
    """The samples of an AM-DeepSeek-R1-distilled file (first record has ``messages``) or a GSM8K file (records
    without a final ``#### N`` are skipped and listed in ``skipped_lines``)."""
    first = next((line for line in read_utf8(path).split("\n") if line.strip()), "")
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        record = None  # read_gsm8k names the line
    is_am = isinstance(record, Mapping) and "messages" in record
    return read_am(path) if is_am else read_gsm8k(path, strict=False)


def _between(text: str, open_tag: str, close_tag: str) -> str | None:
    """The text after the first ``open_tag`` up to ``close_tag`` (or the end); None without ``open_tag``."""
    start = text.find(open_tag)
    if start < 0:
        return None
    rest = text[start + len(open_tag) :]
    end = rest.find(close_tag)
    return rest if end < 0 else rest[:end]


def read_am(path: str | Path) -> Examples:
    """AM-DeepSeek-R1-Distilled records as ``Example(question, thinking, answer, index)``."""
    examples = []
    for number, record in _json_lines(path):
        where = f"{path} line {number}"
        if not isinstance(record, Mapping) or not isinstance(record.get("messages"), list):
            raise ValueError(f"{where}: expected an object with a 'messages' list")
        messages = record["messages"]
        roles = [m.get("role") if isinstance(m, Mapping) else None for m in messages]
        if "user" not in roles or "assistant" not in roles[roles.index("user") :]:
            raise ValueError(f"{where}: needs a 'user' message followed by an 'assistant' message, got roles {roles}")
        u = roles.index("user")
        a = roles.index("assistant", u)
        question = _text_field(messages[u], "content", f"{where} message {u}").strip()
        content = _text_field(messages[a], "content", f"{where} message {a}")
        info = messages[a].get("info") if isinstance(messages[a].get("info"), Mapping) else {}
        thinking = info.get("think_content")
        if not isinstance(thinking, str) or not thinking.strip():
            thinking = _between(content, THINK_OPEN, THINK_CLOSE) or ""
        answer = info.get("answer_content")
        if not isinstance(answer, str) or not answer.strip():
            after = content.split(THINK_CLOSE, 1)[1] if THINK_CLOSE in content else content
            answer = _between(after, ANSWER_OPEN, ANSWER_CLOSE)
            if answer is None:
                answer = after if THINK_CLOSE in content or THINK_OPEN not in content else ""
        if not question:
            raise ValueError(f"{where}: empty question")
        if not answer.strip():
            raise ValueError(f"{where}: the assistant message holds no answer")
        examples.append(Example(question, thinking.strip(), answer.strip(), number - 1))
    if not examples:
        raise ValueError(f"{path} holds no records")
    return Examples(examples)


def fit_to_context(examples: Sequence[Sequence[str]], encoder, context: int, marker: str = CUT_MARKER,
                   min_thinking_tokens: int = 1) -> tuple[list[tuple[list[int], int]], int, int]:
    """([(ids, prompt_length)], n_shortened, n_dropped): each (question, thinking, answer) as at most
    ``context`` tokens, its thinking shortened from the end (then ``marker``) if needed, or dropped when even
    ``min_thinking_tokens`` of thinking do not fit. ``ValueError`` names an example holding special-token text.
    """
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    if min_thinking_tokens < 0:
        raise ValueError(f"min_thinking_tokens must be >= 0, got {min_thinking_tokens}")
    marker_ids = encode_plain(encoder, marker, "the cut marker") if marker else []
    fitted: list[tuple[list[int], int]] = []
    n_shortened = n_dropped = 0
    for i, example in enumerate(examples):
        question, thinking, answer = example[0], example[1], example[2]
        where = f"reasoning example {i}"
        prompt = encode_plain(encoder, format_reason_prompt(question), where)
        think = encode_plain(encoder, thinking, where)
        tail = encode_plain(encoder, format_reason_tail(answer), where)
        if len(prompt) + len(think) + len(tail) <= context:
            fitted.append((prompt + think + tail, len(prompt)))
            continue
        keep = context - len(prompt) - len(tail) - len(marker_ids)
        if keep >= min_thinking_tokens and keep < len(think):
            fitted.append((prompt + think[:keep] + marker_ids + tail, len(prompt)))
            n_shortened += 1
        else:
            n_dropped += 1
    return fitted, n_shortened, n_dropped


def extract_answer(response: str) -> str | None:
    """The stripped text inside the last ``<answer>`` ... ``</answer>`` (no closing tag: to the end), or None
    when ``response`` holds no ``<answer>``."""
    start = response.rfind(ANSWER_OPEN)
    if start < 0:
        return None
    rest = response[start + len(ANSWER_OPEN) :]
    end = rest.find(ANSWER_CLOSE)
    return (rest if end < 0 else rest[:end]).strip()


def parse_number(text: str | None) -> Fraction | None:
    """The value of the last number in ``text`` ("The answer is $1,234.00." -> 1234), or None if it has none."""
    if not text:
        return None
    matches = list(_NUMBER.finditer(text))
    if not matches:
        return None
    sign, digits = matches[-1].groups()
    value = Fraction(digits.replace(",", ""))
    return -value if sign else value


def answers_match(predicted: str | None, reference: str) -> bool:
    """Whether an extracted answer equals the reference: by number, or as text when the reference has none."""
    if predicted is None:
        return False
    target = parse_number(reference)
    if target is None:
        return " ".join(predicted.split()).lower() == " ".join(reference.split()).lower()
    return parse_number(predicted) == target


def score_gsm8k(predictions: Iterable[Mapping], data: Sequence[Example]) -> dict:
    """{"accuracy": correct / n, "correct", "n" (predictions scored), "n_no_answer" (responses without an
    ``<answer>`` tag), "parse_rate" (the share of answers holding a number at all), "results": [{"index",
    "correct", "predicted", "reference"}] in the predictions' order}.

    A prediction is ``{"index": i, "response": text, ...}``, i a record's ``index`` (its 0-based line in the
    GSM8K file; for records without one, their position in ``data``). An index that names no record, or one
    named twice, is a ``ValueError``.
    """
    by_index: dict[int, Example] = {}
    for pos, record in enumerate(data):
        index = getattr(record, "index", None)  # a plain tuple's .index is a method: use the position
        key = index if isinstance(index, int) else pos
        if key in by_index:
            raise ValueError(f"the data holds two records with index {key}")
        by_index[key] = record
    seen: set[int] = set()
    results = []
    for k, prediction in enumerate(predictions):
        where = f"prediction {k}"
        if not isinstance(prediction, Mapping):
            raise ValueError(f"{where} must be a mapping with 'index' and 'response', got {type(prediction).__name__}")
        index = prediction.get("index")
        if isinstance(index, bool) or not isinstance(index, int):
            raise ValueError(f"{where}: 'index' must be an integer, got {index!r}")
        response = _text_field(prediction, "response", where)
        if index not in by_index:
            raise ValueError(f"{where}: index {index} names no record of the data ({len(by_index)} records)")
        if index in seen:
            raise ValueError(f"{where}: index {index} is predicted twice")
        seen.add(index)
        predicted = extract_answer(response)
        reference = by_index[index][2]
        results.append({"index": index, "correct": answers_match(predicted, reference), "predicted": predicted,
                        "reference": reference})
    if not results:
        raise ValueError("no predictions to score")
    correct = sum(r["correct"] for r in results)
    numeric = sum(parse_number(r["predicted"]) is not None for r in results)
    return {"accuracy": correct / len(results), "correct": correct, "n": len(results),
            "n_no_answer": sum(r["predicted"] is None for r in results), "parse_rate": numeric / len(results),
            "results": results}


def read_predictions(path: str | Path) -> list[dict]:
    """The JSON-lines predictions file: one object per line with an integer ``index`` and a string
    ``response`` (other keys kept); ``ValueError`` naming the line for anything else."""
    predictions = []
    for number, record in _json_lines(path):
        where = f"{path} line {number}"
        _text_field(record, "response", where)
        index = record.get("index")
        if isinstance(index, bool) or not isinstance(index, int):
            raise ValueError(f"{where}: 'index' must be an integer, got {index!r}")
        predictions.append(dict(record))
    return predictions


class ReasoningSections:
    """Splits a response streamed piece by piece into its thinking and its answer, for printing them apart.

    The model continues ``format_reason_prompt(question)``, so the stream is ``thinking</think>\\n<answer>\\n``
    ``answer\\n</answer>``. ``feed(piece)`` returns the ``(section, text)`` pairs that are now certain, section
    "thinking" or "answer", with the tags left out; a tag split across pieces is held back until it is whole.
    ``close()`` returns what is still held (a response cut off inside a tag).
    """

    _TAGS = {"thinking": THINK_CLOSE, "between": ANSWER_OPEN, "answer": ANSWER_CLOSE}
    _NEXT = {"thinking": "between", "between": "answer", "answer": "after"}

    def __init__(self) -> None:
        self.section = "thinking"
        self._held = ""

    def feed(self, piece: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        text = self._held + piece
        self._held = ""
        while text and self.section != "after":
            tag = self._TAGS[self.section]
            at = text.find(tag)
            if at >= 0:
                self._emit(out, text[:at])
                text = text[at + len(tag) :]
                self.section = self._NEXT[self.section]
                continue
            keep = next((k for k in range(min(len(tag) - 1, len(text)), 0, -1) if tag.startswith(text[-k:])), 0)
            self._emit(out, text[: len(text) - keep])
            self._held = text[len(text) - keep :]
            break
        return out

    def close(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        self._emit(out, self._held)
        self._held = ""
        return out

    def _emit(self, out: list[tuple[str, str]], text: str) -> None:
        if text and self.section in ("thinking", "answer"):
            out.append((self.section, text))
