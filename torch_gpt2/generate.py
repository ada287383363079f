"""Autoregressive decoding for the torch engine: preallocated KV cache, ragged batches, shared sampling.

The prompt is run once (prefill) and fills the cache; each new token then costs one position.
Prompts of different lengths are left-padded to the longest one, ``T``. Row ``b`` with ``p_b`` pad slots
puts the token at slot ``s`` at position ``s - p_b``, and no real query ever attends to a pad slot
(a pad query attends only to itself, which keeps its values finite and unseen), so every row gets the
logits it would get decoded alone.

Next ids come from :class:`mapper.sampling.TokenSelector` applied to the last position's logits as float64
NumPy, the same code the NumPy spec uses, so both pick identical tokens for the same seed. Greedy decoding
that does not ask for the logits takes the argmax where the logits are (the lowest id among equal maxima, as
the selector's rule, exactly: every float type converts to float64 exactly) and copies only the ids and a
finiteness flag to the host, not B x V float64 logits per token. Under autocast the model decodes through
:meth:`GPT2.decoding_model`, whose matrices are cast once per call instead of once per token.
Call them with the model first: ``generate(model, prompts, max_new_tokens, ...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from mapper.config import GPT2Config
from mapper.sampling import TokenSelector
from mapper.tokens import check_generation, check_tokens
from torch_gpt2.model import GPT2, KVCache


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _as_rows(tokens: Any) -> tuple[list[list[int]], str, bool]:
    """Prompts in any accepted form -> (rows of ids, input kind "tensor" | "numpy" | "list", one_row)."""
    if isinstance(tokens, (torch.Tensor, np.ndarray)):
        kind = "tensor" if isinstance(tokens, torch.Tensor) else "numpy"
        is_int = (not tokens.dtype.is_floating_point and tokens.dtype != torch.bool) if kind == "tensor" else (
            np.issubdtype(tokens.dtype, np.integer))
        if not is_int or tokens.ndim not in (1, 2):
            raise ValueError(f"prompt tokens must be a 1-D or 2-D integer array, got {tokens.ndim}-D {tokens.dtype}")
        rows = tokens.tolist()
        return ([rows] if tokens.ndim == 1 else rows), kind, tokens.ndim == 1
    if isinstance(tokens, (list, tuple)):
        if len(tokens) > 0 and all(_is_int(t) for t in tokens):
            return [[int(t) for t in tokens]], "list", True
        rows = []
        for b, row in enumerate(tokens):
            row = row.tolist() if isinstance(row, (torch.Tensor, np.ndarray)) else row
            if not isinstance(row, (list, tuple)) or not all(_is_int(t) for t in row):
                raise ValueError(f"prompt {b} is not a sequence of integer token ids: {row!r}")
            rows.append([int(t) for t in row])
        return rows, "list", False
    raise ValueError(f"prompt tokens must be a tensor, an array, a list of ids or a list of lists, got "
                     f"{type(tokens).__name__}")


def _check_rows(rows: list[list[int]], config: GPT2Config, max_new_tokens: int, eos_token_id: int | None) -> None:
    """The shared checks (:mod:`mapper.tokens`): lengths against the context, then every id, on the host."""
    check_generation([len(row) for row in rows], max_new_tokens, config, eos_token_id)
    for b, row in enumerate(rows):
        check_tokens(np.array([row]), config, name=f"prompt {b}")


def padding_mask(real: torch.Tensor, start: int, n_queries: int) -> torch.Tensor:
    """Which keys each query may attend to: real [B, S] (False on left padding) -> bool [B, 1, Tq, start+Tq].

    The queries sit at slots start..start+Tq-1. A query sees keys at slots <= its own (causal) that are
    real, and always itself, so a pad query's softmax is never empty (no NaN to leak into real rows).
    """
    n_keys = start + n_queries
    q_slot = torch.arange(start, n_keys, device=real.device)[:, None]  # [Tq, 1]
    k_slot = torch.arange(n_keys, device=real.device)[None, :]  # [1, Tk]
    allowed = (k_slot <= q_slot) & (real[:, None, :n_keys] | (k_slot == q_slot))  # [B, Tq, Tk]
    return allowed[:, None]


@torch.inference_mode()
def _decode(
    model: GPT2, rows: list[list[int]], max_new_tokens: int, selector: TokenSelector, output_logits: bool
) -> Iterator[Any]:
    if max_new_tokens == 0:
        return
    model = model.decoding_model()
    device, B, T = model.device, len(rows), max(len(row) for row in rows)
    pad = [T - len(row) for row in rows]
    prompt = torch.tensor([[0] * p + row for p, row in zip(pad, rows, strict=True)], device=device)  # [B, T]
    total = T + max_new_tokens
    # keys/values come out of the projections in the autocast dtype when autocast is on
    cache = KVCache(model.config, B, total, model.autocast_dtype or model.dtype, device)
    real = positions = None
    if any(pad):
        pad_t = torch.tensor(pad, device=device)[:, None]  # [B, 1]
        slots = torch.arange(total, device=device)[None, :]  # [1, total]
        real = slots >= pad_t  # [B, total]
        positions = (slots - pad_t).clamp(min=0)  # [B, total] row-local positions (pads: 0, never seen)

    def last_logits(ids: torch.Tensor, start: int) -> torch.Tensor:
        """ids [B, Tq] at slots start..start+Tq-1 -> logits of the last one [B, V]."""
        n = ids.shape[1]
        pos = None if positions is None else positions[:, start : start + n]
        mask = None if real is None else padding_mask(real, start, n)
        with model.autocast_context():
            h = model.hidden_states(ids, pos, cache, start, mask)  # [B, Tq, C]
            return model.lm_logits(h[:, -1:])[:, -1]

    on_device = selector.greedy and not output_logits
    logits = last_logits(prompt, 0)
    for step in range(max_new_tokens):
        if on_device:
            # one small copy: [2, B] = the argmax ids and whether each row's logits are finite
            picked = torch.stack([logits.argmax(dim=-1), torch.isfinite(logits).all(dim=-1).long()]).cpu().numpy()
            next_ids = selector.take_greedy(picked[0], finite=bool(picked[1].all()))
            yield next_ids
        else:
            host_logits = logits.to(torch.float64).cpu().numpy()  # [B, V], what TokenSelector decides on
            next_ids = selector.step(host_logits)
            yield (next_ids, host_logits) if output_logits else next_ids
        if selector.done or step == max_new_tokens - 1:
            return
        logits = last_logits(torch.from_numpy(next_ids).to(device)[:, None], T + step)


def generate_stream(
    model: GPT2,
    tokens: torch.Tensor | np.ndarray | Sequence[int] | Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float | None = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    seed: int | None = None,
    output_logits: bool = False,
) -> Iterator[np.ndarray] | Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield each step's next ids [B] (int64 NumPy); with ``output_logits`` yield (ids, logits [B, V] float64).

    Arguments as in :func:`generate`. Inputs are checked here, before the first step. Stops after
    ``max_new_tokens`` steps or once every row has emitted ``eos_token_id``.
    """
    rows, _, _ = _as_rows(tokens)
    _check_rows(rows, model.config, max_new_tokens, eos_token_id)
    selector = TokenSelector(len(rows), temperature, top_k, top_p, eos_token_id, seed)
    return _decode(model, rows, max_new_tokens, selector, output_logits)


def generate(
    model: GPT2,
    tokens: torch.Tensor | np.ndarray | Sequence[int] | Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float | None = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    seed: int | None = None,
    on_token: Callable[[np.ndarray], None] | None = None,
) -> torch.Tensor | np.ndarray | list[int] | list[list[int]]:
    """Prompt + up to ``max_new_tokens`` new ids, per row.

    ``tokens``: LongTensor / integer array [B, T] or [T] -> the same type [B, T + n] / [T + n];
    a list of ids -> a list; a list of lists (lengths may differ) -> a list of lists, each row its own
    prompt + n new ids (no padding). ``temperature`` 0 is greedy; otherwise sampling after ``top_k`` /
    ``top_p`` filtering, reproducible for a ``seed`` (rules: :mod:`mapper.sampling`). Rows that emitted
    ``eos_token_id`` are padded with it; decoding stops when all rows have. ``on_token(ids [B])`` is
    called after every step (for streaming output). Raises ``ValueError`` for an empty prompt, ids outside
    [0, V), or longest prompt + max_new_tokens > n_positions.
    """
    rows, kind, one_row = _as_rows(tokens)
    steps = []
    for ids in generate_stream(model, rows, max_new_tokens, temperature, top_k, top_p, eos_token_id, seed):
        steps.append(ids)
        if on_token is not None:
            on_token(ids)
    out = [row + [int(s[b]) for s in steps] for b, row in enumerate(rows)]
    if kind == "list":
        return out[0] if one_row else out
    array = np.array(out, dtype=np.int64)
    array = array[0] if one_row else array
    return torch.from_numpy(array).to(tokens.device) if kind == "tensor" else array
