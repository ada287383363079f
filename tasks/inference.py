"""Generation for the jobs' evaluations, through a backend's ``greedy`` (the loop's interface), so any backend
serves: the test responses of the instruction fine-tune and the answers ``gpt2 eval gsm8k`` scores."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from mapper.sampling import new_token_budget


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
