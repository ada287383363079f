"""Generation for the jobs: greedy responses through a backend's ``greedy`` (the loop's interface), so any backend
serves (the test responses of the instruction fine-tune, the answers ``gpt2 eval gsm8k`` scores), and the text of
a streamed token sequence (``gpt2 generate``, ``gpt2 chat``)."""

from __future__ import annotations

import codecs
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from mapper.sampling import new_token_budget
from tasks.instruct import inference_prompt
from tasks.reason import format_reason_prompt

# The prompt template of each fine-tune, the one its training examples start with (``gpt2 chat --template``).
TEMPLATES = ("alpaca", "reason")
TASK_TEMPLATES = {"instruct": "alpaca", "reason": "reason"}


def template_prompt(template: str, text: str, input_text: str | None = None) -> str:
    """The prompt a fine-tuned model is given for ``text``: ``alpaca`` (instruction ``text``, optional input), the
    instruction fine-tune's ``inference_prompt``; ``reason`` (question ``text``), ``format_reason_prompt``."""
    if template == "alpaca":
        return inference_prompt({"instruction": text, "input": input_text or ""})
    if template == "reason":
        if input_text:
            raise ValueError("the reason template takes a question only (no --input)")
        return format_reason_prompt(text)
    raise ValueError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")


def greedy_all(backend, prompts: Sequence[list[int]], max_new_tokens: int, encoder, what: str,
               show_progress: bool = True, on_response: Callable[[int, str], None] | None = None) -> list[str]:
    """Each prompt's greedy continuation as text, stopping at the model's EOS, with a progress bar ``what``;
    ``on_response(i, text)`` is called as each one is made (so a caller can keep them if the run is cut short).

    A prompt that leaves no room in the context for one new token gets the empty response (the caller counts it).
    """
    from tqdm import tqdm

    out = []
    for i, prompt in enumerate(tqdm(prompts, desc=what, unit="response", file=sys.stderr,
                                    disable=not show_progress)):
        if new_token_budget(len(prompt), max_new_tokens, backend.config) == 0:
            out.append("")
        else:
            out.append(encoder.decode(backend.greedy(prompt, max_new_tokens, backend.config.eos_token_id)))
        if on_response is not None:
            on_response(i, out[-1])
    return out


def decode_stream(steps: Iterable[np.ndarray], encoder, eos_token_id: int | None) -> Iterator[str]:
    """The text of a one-row token stream (each step an id array [1]) piece by piece, until ``eos_token_id``.

    A character whose UTF-8 bytes span several tokens comes out whole, once its last byte has arrived."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for ids in steps:
        token = int(ids[0])
        if token == eos_token_id:
            break
        piece = decoder.decode(encoder.decode_single_token_bytes(token))
        if piece:
            yield piece
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail


def instruction_responses(backend, entries: Sequence[dict], encoder, max_new_tokens: int,
                          show_progress: bool = True) -> tuple[list[dict], float]:
    """Greedy responses to instruction records (given ``inference_prompt``, cut at EOS, stripped) and their mean
    ROUGE-L against the records' ``output``: (records with a ``model_response`` each, ROUGE-L)."""
    from tasks.metrics import rouge_l

    prompts = [encoder.encode(inference_prompt(e)) for e in entries]
    responses = greedy_all(backend, prompts, max_new_tokens, encoder, "test responses", show_progress)
    records = [{**e, "model_response": r.strip()} for e, r in zip(entries, responses, strict=True)]
    return records, rouge_l([r["model_response"] for r in records], [r["output"] for r in records])
