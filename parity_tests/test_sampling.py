"""The shared sampling rules (mapper.sampling) against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mapper.sampling import TokenSelector, filtered_probabilities

logit_rows = st.integers(0, 2**32 - 1).map(lambda s: np.random.default_rng(s).standard_normal((2, 12)) * 3)


@given(logit_rows, st.integers(1, 12))
def test_top_k_keeps_the_k_largest(logits, k):
    p = filtered_probabilities(logits, 1.0, top_k=k)
    for row, probs in zip(logits, p, strict=True):
        kept = set(np.flatnonzero(probs))
        assert kept == set(np.argsort(-row)[:k])  # continuous draws: no ties
        expected = np.exp(row[list(kept)] - row.max())
        np.testing.assert_allclose(probs[list(kept)], expected / expected.sum(), rtol=1e-12)


@given(logit_rows, st.floats(0.01, 1.0))
def test_top_p_keeps_the_smallest_prefix_reaching_p(logits, top_p):
    full = filtered_probabilities(logits, 1.0)
    p = filtered_probabilities(logits, 1.0, top_p=top_p)
    for f, probs in zip(full, p, strict=True):
        order = np.argsort(-f)
        n_keep = int(np.searchsorted(np.cumsum(f[order]), top_p) + 1)  # first prefix whose mass >= p
        n_keep = min(n_keep, len(f))
        assert set(np.flatnonzero(probs)) == set(order[:n_keep])
        assert probs.sum() == pytest.approx(1.0, abs=1e-12)


def test_greedy_is_argmax_and_draws_nothing():
    logits = np.array([[0.1, 3.0, 3.0, -1.0], [5.0, 0.0, 0.0, 0.0]])
    sel = TokenSelector(2, temperature=0.0, seed=1)
    state = sel.rng.bit_generator.state
    np.testing.assert_array_equal(sel.step(logits), [1, 0])  # ties go to the lowest id
    assert sel.rng.bit_generator.state == state


def test_sampling_frequencies_match_the_distribution():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    sel = TokenSelector(1, temperature=1.0, seed=0)
    counts = np.bincount([int(sel.step(logits)[0]) for _ in range(20000)], minlength=4)
    # 20000 draws: the standard error of each frequency is < 0.004
    np.testing.assert_allclose(counts / 20000, [0.5, 0.3, 0.15, 0.05], atol=0.015)
    sel = TokenSelector(1, temperature=0.5, seed=0)  # T = 0.5 squares the probabilities
    counts = np.bincount([int(sel.step(logits)[0]) for _ in range(20000)], minlength=4)
    sq = np.array([0.5, 0.3, 0.15, 0.05]) ** 2
    np.testing.assert_allclose(counts / 20000, sq / sq.sum(), atol=0.015)


def test_inverse_cdf_uses_one_uniform_per_row_in_vocabulary_order():
    logits = np.log(np.array([[0.25, 0.25, 0.5], [0.25, 0.25, 0.5]]))
    sel = TokenSelector(2, temperature=1.0, seed=3)
    u = np.random.default_rng(3).random(2)
    expected = [int(np.searchsorted(np.array([0.25, 0.5, 1.0]), x, side="right")) for x in u]
    np.testing.assert_array_equal(sel.step(logits), expected)


def test_rows_finish_independently_at_eos():
    sel = TokenSelector(2, temperature=0.0, eos_token_id=2)
    np.testing.assert_array_equal(sel.step(np.array([[0, 0, 9.0], [9.0, 0, 0]])), [2, 0])
    assert not sel.done
    np.testing.assert_array_equal(sel.step(np.array([[9.0, 0, 0], [0, 0, 9.0]])), [2, 2])  # row 0 padded
    assert sel.done


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=1.0, top_k=0), "top_k"),
        (dict(temperature=1.0, top_p=0.0), "top_p"),
    ],
)
def test_bad_sampling_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TokenSelector(1, **kwargs)


def test_non_finite_logits_are_refused():
    with pytest.raises(ValueError, match="non-finite"):
        TokenSelector(1).step(np.array([[0.0, np.nan]]))
