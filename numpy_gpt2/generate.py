"""Autoregressive decoding with a KV cache: the prompt is run once, then each new token costs O(T)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from mapper.config import GPT2Config
from mapper.sampling import TokenSelector
from mapper.schema import validate_params
from mapper.tokens import check_generation, check_tokens
from numpy_gpt2.model import lm_forward


def generate_stream(
    params: dict[str, np.ndarray],
    config: GPT2Config,
    tokens: np.ndarray,
    max_new_tokens: int,
    temperature: float | None = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    seed: int | None = None,
    fast: bool = False,
) -> Iterator[np.ndarray]:
    """Yield the next ids [B] step by step for prompts [B, T]; stops early once every row emitted EOS.

    The arguments are checked here, before the first step. Rows that already emitted ``eos_token_id`` receive
    it again as padding. The sampling rules are ``mapper.sampling``'s (shared with the torch engine). ``fast``
    picks the kernels (``numpy_gpt2.model``).
    """
    validate_params(params, config)
    arr = np.asarray(tokens)
    if arr.ndim == 2:
        check_generation([arr.shape[1]] * arr.shape[0], max_new_tokens, config, eos_token_id)
    tokens = check_tokens(arr, config)
    selector = TokenSelector(tokens.shape[0], temperature, top_k, top_p, eos_token_id, seed)
    return _decode(params, config, tokens, max_new_tokens, selector, fast)


def _decode(
    params: dict[str, np.ndarray],
    config: GPT2Config,
    tokens: np.ndarray,
    max_new_tokens: int,
    selector: TokenSelector,
    fast: bool,
) -> Iterator[np.ndarray]:
    if max_new_tokens == 0:
        return
    B, T = tokens.shape
    total = T + max_new_tokens
    dtype = params["wte.weight"].dtype
    NH, hs = config.n_head, config.head_dim
    # preallocated cache: [L, 2 (k and v), B, NH, total, hs]
    cache = np.empty((config.n_layer, 2, B, NH, total, hs), dtype=dtype)
    kv = [(cache[i, 0], cache[i, 1]) for i in range(config.n_layer)]
    logits, _ = lm_forward(params, config, tokens, kv_caches=kv, last_only=True, fast=fast)  # prefill
    for step in range(max_new_tokens):
        next_ids = selector.step(logits[:, -1])
        yield next_ids
        if selector.done or step == max_new_tokens - 1:
            return
        logits, _ = lm_forward(params, config, next_ids[:, None], kv_caches=kv, pos0=T + step, last_only=True,
                               fast=fast)


def generate(
    params: dict[str, np.ndarray],
    config: GPT2Config,
    tokens: np.ndarray,
    max_new_tokens: int,
    temperature: float | None = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    seed: int | None = None,
    fast: bool = False,
) -> np.ndarray:
    """Prompt + generated ids: [B, T] -> [B, T + n] (or [T] -> [T + n]), n <= max_new_tokens.

    ``temperature`` 0 is greedy; otherwise sample after ``top_k`` / ``top_p`` filtering, reproducibly
    for a given ``seed``. Generation stops early when every row has produced ``eos_token_id``.
    """
    arr = np.asarray(tokens)
    one_row = arr.ndim == 1
    prompts = arr[None, :] if one_row else arr
    steps = list(
        generate_stream(params, config, prompts, max_new_tokens, temperature, top_k, top_p, eos_token_id, seed, fast)
    )
    out = np.concatenate([prompts.astype(np.int64)] + [s[:, None] for s in steps], axis=1)
    return out[0] if one_row else out
