"""Next-token selection: the one definition of greedy / temperature / top-k / top-p sampling.

Both backends hand the logits of the last position to :class:`TokenSelector` (as a float64 NumPy array),
so with the same weights, prompt and seed, the NumPy spec and the torch engine pick the same tokens.

Semantics, per row and per step:

1. ``temperature == 0`` (or None): greedy, ``argmax`` (the lowest id among equal maxima). No random draw.
2. Otherwise ``z = logits / temperature`` (in float64).
3. ``top_k``: keep every id whose ``z`` is >= the k-th largest ``z`` (ties at the threshold are kept).
4. ``top_p``: sort the kept probabilities ``softmax(z)`` in descending order (stable, so ties go by id);
   keep an id if the probability mass of the ids ranked before it is < ``top_p`` (the smallest
   prefix whose mass reaches ``top_p``; the most likely id is always kept).
5. Renormalise the kept probabilities ``p`` and invert the CDF in vocabulary order with one uniform
   draw ``u`` in [0, 1): the chosen id is the first ``i`` with ``cumsum(p)[i] > u * sum(p)``.

The uniform draws come from ``numpy.random.default_rng(seed)``: one ``rng.random(B)`` per step (for all
rows, finished or not), so the stream does not depend on which rows stopped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mapper.config import GPT2Config


def validate_sampling_args(
    temperature: float | None, top_k: int | None, top_p: float | None, names: dict[str, str] | None = None
) -> None:
    """Raise ``ValueError`` for a temperature < 0, top_k < 1 or top_p outside (0, 1].

    ``names`` renames the arguments in the message (a command line passes {"top_p": "--top-p", ...}).
    """
    names = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", **(names or {})}
    if temperature is not None and not (np.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"{names['temperature']} must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"{names['top_k']} must be an integer >= 1, got {top_k!r}")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise ValueError(f"{names['top_p']} must be in (0, 1], got {top_p!r}")


def filtered_probabilities(
    logits: np.ndarray, temperature: float, top_k: int | None = None, top_p: float | None = None
) -> np.ndarray:
    """Steps 2-4 above: [B, V] logits -> [B, V] float64 probabilities (zero outside the kept set), rows sum to 1."""
    z = np.asarray(logits, dtype=np.float64) / temperature  # [B, V]
    V = z.shape[-1]
    if top_k is not None and top_k < V:
        kth = np.partition(z, V - top_k, axis=-1)[:, V - top_k : V - top_k + 1]  # [B, 1] k-th largest
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max(axis=-1, keepdims=True))  # softmax, exp(-inf) = 0 drops filtered ids
    p /= p.sum(axis=-1, keepdims=True)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-p, axis=-1, kind="stable")  # [B, V] ids by decreasing probability
        sorted_p = np.take_along_axis(p, order, axis=-1)
        mass_before = np.cumsum(sorted_p, axis=-1) - sorted_p  # probability mass ranked strictly before
        keep_sorted = mass_before < top_p
        keep = np.empty_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(axis=-1, keepdims=True)
    return p


def sample_from_probabilities(p: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Step 5: inverse CDF in vocabulary order. p [B, V] (rows sum to 1), u [B] in [0, 1) -> ids [B]."""
    cdf = np.cumsum(p, axis=-1)  # [B, V]
    ids = np.empty(p.shape[0], dtype=np.int64)
    for row in range(p.shape[0]):  # B is small; searchsorted is per row
        i = int(np.searchsorted(cdf[row], u[row] * cdf[row, -1], side="right"))
        # u * total can round up to the total itself: fall back to the last id with non-zero mass.
        ids[row] = i if i < p.shape[1] else int(np.flatnonzero(p[row])[-1])
    return ids


class TokenSelector:
    """Chooses each step's next tokens for a batch and tracks which rows have emitted EOS.

    ``step(logits)`` takes the last position's logits [B, V] (any float dtype, any array that
    ``np.asarray`` accepts) and returns the next ids [B] (int64). A row that has emitted
    ``eos_token_id`` keeps receiving ``pad_token_id`` (default: the EOS id itself, as Hugging Face
    pads GPT-2). ``done`` is True once every row has finished.
    """

    def __init__(
        self,
        batch_size: int,
        temperature: float | None = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        seed: int | None = None,
        pad_token_id: int | None = None,
    ) -> None:
        validate_sampling_args(temperature, top_k, top_p)
        self.temperature = float(temperature or 0.0)
        self.top_k = None if top_k is None else int(top_k)
        self.top_p = top_p
        self.eos_token_id = eos_token_id
        self.pad_token_id = eos_token_id if pad_token_id is None else pad_token_id
        self.rng = np.random.default_rng(seed)
        self.finished = np.zeros(batch_size, dtype=bool)

    @property
    def done(self) -> bool:
        return bool(self.finished.all())

    def step(self, logits: np.ndarray) -> np.ndarray:
        logits = np.asarray(logits)
        if logits.ndim != 2 or logits.shape[0] != self.finished.shape[0]:
            raise ValueError(f"expected logits [B={self.finished.shape[0]}, V], got shape {logits.shape}")
        if not np.isfinite(logits).all():
            raise ValueError("the model produced non-finite logits (NaN or inf); cannot choose a next token")
        if self.temperature == 0.0:
            return self.take_greedy(np.argmax(logits, axis=-1))
        u = self.rng.random(logits.shape[0])
        return self._after_choice(
            sample_from_probabilities(filtered_probabilities(logits, self.temperature, self.top_k, self.top_p), u))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def take_greedy(self, ids: np.ndarray, finite: bool = True) -> np.ndarray:
        """The step's ids [B] when the argmax (the lowest id among equal maxima) was taken where the logits are,
        e.g. on a GPU, so that only ids cross to the host: the EOS rule is applied as in :meth:`step`.
        ``finite`` says whether those logits were all finite (refused as in :meth:`step` if not)."""
        if not self.greedy:
            raise ValueError("take_greedy is for greedy decoding (temperature 0); sampling needs the logits")
        if not finite:
            raise ValueError("the model produced non-finite logits (NaN or inf); cannot choose a next token")
        ids = np.asarray(ids).astype(np.int64)
        if ids.shape != self.finished.shape:
            raise ValueError(f"expected ids [B={self.finished.shape[0]}], got shape {ids.shape}")
        return self._after_choice(ids)

    def _after_choice(self, ids: np.ndarray) -> np.ndarray:
        if self.eos_token_id is not None:
            ids = np.where(self.finished, self.pad_token_id, ids)
            self.finished |= ids == self.eos_token_id
        return ids


def new_token_budget(prompt_length: int, max_new_tokens: int, config: GPT2Config) -> int:
    """How many of ``max_new_tokens`` fit after a prompt of ``prompt_length`` tokens in the context (>= 0)."""
    return max(0, min(max_new_tokens, config.n_positions - prompt_length))


def cut_at_eos(ids: Sequence[int], eos_token_id: int | None) -> list[int]:
    """The generated ``ids`` up to (without) the first ``eos_token_id``; all of them when there is none."""
    ids = [int(i) for i in ids]
    return ids[: ids.index(eos_token_id)] if eos_token_id is not None and eos_token_id in ids else ids
