"""Every forward/backward pair of the spec against finite differences (float64), every forward against an
independent computation.

Each op is wrapped into a scalar L = sum(y * w) with a random upstream gradient w, so dL/dy = w; the
backward's gradients must match fourth-order central differences of L within ``mapper.parity.FINITE_DIFFERENCES``
(1e-6 of the tensor's gradient scale). Hypothesis draws the shapes; values come from a seeded generator so a
failing example shrinks to a small, replayable case.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mapper.parity import FINITE_DIFFERENCES, scaled_error
from numpy_gpt2 import fast, ops
from numpy_gpt2.gradcheck import numeric_gradient

batch = st.integers(1, 3)
time = st.integers(1, 7)
seeds = st.integers(0, 2**32 - 1)


def assert_grad_matches(f, x: np.ndarray, analytic: np.ndarray) -> None:
    numeric = numeric_gradient(f, x, np.arange(x.size)).reshape(x.shape)
    err = scaled_error(analytic, numeric, FINITE_DIFFERENCES.floor)
    assert FINITE_DIFFERENCES.allows(analytic, numeric), f"relative error {err:.3e} > {FINITE_DIFFERENCES.rtol}"


@given(B=batch, T=time, C=st.integers(1, 9), seed=seeds)
def test_layernorm(B, T, C, seed):
    rng = np.random.default_rng(seed)
    x, w, b = rng.standard_normal((B, T, C)), rng.standard_normal(C), rng.standard_normal(C)
    up = rng.standard_normal((B, T, C))

    def f():
        return float(np.sum(ops.layernorm_forward(x, w, b)[0] * up))

    y, cache = ops.layernorm_forward(x, w, b)
    # independent forward check: biased variance, eps 1e-5
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * w + b
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
    dx, (dw, db) = ops.layernorm_backward(up, cache)
    for arr, grad in ((x, dx), (w, dw), (b, db)):
        assert_grad_matches(f, arr, grad)


@given(B=batch, T=time, Cin=st.integers(1, 8), Cout=st.integers(1, 8), bias=st.booleans(), seed=seeds)
def test_linear(B, T, Cin, Cout, bias, seed):
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal((B, T, Cin)), rng.standard_normal((Cin, Cout))
    b = rng.standard_normal(Cout) if bias else None
    up = rng.standard_normal((B, T, Cout))

    def f():
        return float(np.sum(ops.linear_forward(x, w, b)[0] * up))

    y, cache = ops.linear_forward(x, w, b)
    np.testing.assert_allclose(y, np.einsum("btc,cd->btd", x, w) + (0 if b is None else b), rtol=1e-12, atol=1e-12)
    dx, (dw, db) = ops.linear_backward(up, cache)
    assert_grad_matches(f, x, dx)
    assert_grad_matches(f, w, dw)
    if bias:
        assert_grad_matches(f, b, db)
    else:
        assert db is None


@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=3), scale=st.floats(0.1, 4.0), seed=seeds)
def test_gelu(shape, scale, seed):
    rng = np.random.default_rng(seed)
    x = scale * rng.standard_normal(shape)
    up = rng.standard_normal(shape)

    def f():
        return float(np.sum(ops.gelu_forward(x)[0] * up))

    y, cache = ops.gelu_forward(x)
    # the tanh form, not erf: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    ref = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    np.testing.assert_allclose(y, ref, rtol=1e-13, atol=1e-14)
    dx, _ = ops.gelu_backward(up, cache)
    assert_grad_matches(f, x, dx)


@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=4), p=st.floats(0.0, 0.9), seed=seeds)
def test_dropout_with_a_fixed_mask(shape, p, seed):
    """With its keep-mask held fixed, dropout is a fixed linear map: finite differences are its exact derivative."""
    rng = np.random.default_rng(seed)
    x, up = rng.standard_normal(shape), rng.standard_normal(shape)
    keep = rng.random(shape) >= p

    def f():
        return float(np.sum(ops.dropout_forward(x, keep, p)[0] * up))

    y, cache = ops.dropout_forward(x, keep, p)
    np.testing.assert_allclose(y, np.where(keep, x / (1 - p), 0.0), rtol=1e-15, atol=0)  # inverted dropout, by hand
    dx, _ = ops.dropout_backward(up, cache)
    assert np.all(dx[~keep] == 0.0)
    assert_grad_matches(f, x, dx)


def test_dropout_keeps_the_expectation():
    """E[y] = x: over many draws of the mask (kept with probability 1 - p) the mean of y approaches x."""
    p, n = 0.3, 200_000
    rng = np.random.default_rng(0)
    x = np.full(n, 2.0)
    y, _ = ops.dropout_forward(x, rng.random(n) >= p, p)
    assert np.mean(y == 0.0) == pytest.approx(p, abs=5 * np.sqrt(p * (1 - p) / n))
    assert y.mean() == pytest.approx(2.0, abs=5 * 2.0 * np.sqrt(p / (1 - p) / n))


def reference_attention(qkv: np.ndarray, n_head: int, keep: np.ndarray | None = None, p: float = 0.0) -> np.ndarray:
    """Per-head loops: an independent, obviously-correct causal attention (its weights times keep / (1 - p))."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    y = np.zeros((B, T, C))
    for b in range(B):
        for h in range(n_head):
            q = qkv[b, :, h * hs : (h + 1) * hs]
            k = qkv[b, :, C + h * hs : C + (h + 1) * hs]
            v = qkv[b, :, 2 * C + h * hs : 2 * C + (h + 1) * hs]
            for t in range(T):
                s = q[t] @ k[: t + 1].T / np.sqrt(hs)
                w = np.exp(s - s.max())
                w = w / w.sum()
                if keep is not None:
                    w = w * keep[b, h, t, : t + 1] / (1 - p)
                y[b, t, h * hs : (h + 1) * hs] = w @ v[: t + 1]
    return y


@given(B=batch, T=time, n_head=st.integers(1, 3), hs=st.integers(1, 4), seed=seeds)
def test_attention(B, T, n_head, hs, seed):
    rng = np.random.default_rng(seed)
    C = n_head * hs
    qkv = rng.standard_normal((B, T, 3 * C))
    up = rng.standard_normal((B, T, C))

    def f():
        return float(np.sum(ops.attention_forward(qkv, n_head)[0] * up))

    y, cache = ops.attention_forward(qkv, n_head)
    np.testing.assert_allclose(y, reference_attention(qkv, n_head), rtol=1e-12, atol=1e-12)
    dqkv, _ = ops.attention_backward(up, cache)
    assert_grad_matches(f, qkv, dqkv)


@given(B=batch, T=time, n_head=st.integers(1, 3), hs=st.integers(1, 4), p=st.floats(0.05, 0.9), seed=seeds)
def test_attention_with_dropout_on_its_weights(B, T, n_head, hs, p, seed):
    rng = np.random.default_rng(seed)
    C = n_head * hs
    qkv = rng.standard_normal((B, T, 3 * C))
    up = rng.standard_normal((B, T, C))
    keep = rng.random((B, n_head, T, T)) >= p

    def f():
        return float(np.sum(ops.attention_forward(qkv, n_head, keep=keep, p=p)[0] * up))

    y, cache = ops.attention_forward(qkv, n_head, keep=keep, p=p)
    np.testing.assert_allclose(y, reference_attention(qkv, n_head, keep, p), rtol=1e-12, atol=1e-12)
    dqkv, _ = ops.attention_backward(up, cache)
    assert_grad_matches(f, qkv, dqkv)


@given(B=batch, T=time, n_head=st.integers(1, 3), hs=st.integers(1, 4), split=st.integers(0, 6), seed=seeds)
def test_attention_with_kv_cache_equals_full(B, T, n_head, hs, split, seed):
    """Feeding the sequence in two calls through a KV cache gives the full call's outputs."""
    rng = np.random.default_rng(seed)
    C = n_head * hs
    qkv = rng.standard_normal((B, T, 3 * C))
    full, _ = ops.attention_forward(qkv, n_head)
    split = min(split, T - 1)
    cache = (np.zeros((B, n_head, T, hs)), np.zeros((B, n_head, T, hs)))
    parts = []
    if split > 0:
        parts.append(ops.attention_forward(qkv[:, :split], n_head, cache, pos0=0)[0])
    parts.append(ops.attention_forward(qkv[:, split:], n_head, cache, pos0=split)[0])
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("kernels", ["spec", "fast"])
@pytest.mark.parametrize("pos0", [0, 2])
def test_attention_backward_refuses_a_forward_that_used_a_kv_cache(kernels, pos0):
    """Its gradient would miss the cached keys' share: refused, for a prefill (pos0 = 0) as for a continuation."""
    module = ops if kernels == "spec" else fast
    qkv = np.random.default_rng(0).standard_normal((1, 3, 6))
    cache = (np.zeros((1, 2, 5, 1)), np.zeros((1, 2, 5, 1)))
    _, att_cache = module.attention_forward(qkv, 2, cache, pos0=pos0)
    with pytest.raises(ValueError, match="the forward used a KV cache"):
        module.attention_backward(np.ones((1, 3, 2)), att_cache)


@given(B=batch, T=time, V=st.integers(1, 6), C=st.integers(1, 5), pos0=st.integers(0, 3), seed=seeds)
def test_embedding_repeated_ids(B, T, V, C, pos0, seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, (B, T))  # small V: ids repeat, which dwte[ids] += g would get wrong
    wte, wpe = rng.standard_normal((V, C)), rng.standard_normal((pos0 + T + 2, C))
    up = rng.standard_normal((B, T, C))

    def f():
        return float(np.sum(ops.embedding_forward(tokens, wte, wpe, pos0)[0] * up))

    x, cache = ops.embedding_forward(tokens, wte, wpe, pos0)
    np.testing.assert_array_equal(x, wte[tokens] + wpe[pos0 : pos0 + T])
    _, (dwte, dwpe) = ops.embedding_backward(up, cache)
    assert_grad_matches(f, wte, dwte)
    assert_grad_matches(f, wpe, dwpe)


@given(B=batch, T=time, C=st.integers(1, 6), V=st.integers(1, 9), seed=seeds)
def test_lm_head(B, T, C, V, seed):
    rng = np.random.default_rng(seed)
    h, w = rng.standard_normal((B, T, C)), rng.standard_normal((V, C))
    up = rng.standard_normal((B, T, V))

    def f():
        return float(np.sum(ops.lm_head_forward(h, w)[0] * up))

    logits, cache = ops.lm_head_forward(h, w)
    np.testing.assert_allclose(logits, np.einsum("btc,vc->btv", h, w), rtol=1e-12, atol=1e-12)
    dh, (dw,) = ops.lm_head_backward(up, cache)
    assert dw.shape == (V, C) and dw.flags.c_contiguous
    assert_grad_matches(f, h, dh)
    assert_grad_matches(f, w, dw)


@given(B=batch, T=time, V=st.integers(1, 9), n_ignored=st.integers(0, 5), scale=st.floats(0.1, 30.0), seed=seeds)
def test_softmax_cross_entropy(B, T, V, n_ignored, scale, seed):
    rng = np.random.default_rng(seed)
    logits = scale * rng.standard_normal((B, T, V))
    targets = rng.integers(0, V, (B, T))
    flat = targets.reshape(-1)
    flat[rng.permutation(flat.size)[: min(n_ignored, flat.size - 1)]] = ops.IGNORE_INDEX

    def f():
        return ops.softmax_cross_entropy_forward(logits, targets)[0]

    loss, cache = ops.softmax_cross_entropy_forward(logits, targets)
    keep = flat != ops.IGNORE_INDEX
    z = logits.reshape(-1, V)[keep]
    logp = z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
    assert loss == pytest.approx(-logp[np.arange(len(z)), flat[keep]].mean(), rel=1e-13, abs=1e-13)
    dlogits, _ = ops.softmax_cross_entropy_backward(1.0, cache)
    assert np.all(dlogits.reshape(-1, V)[~keep] == 0.0)
    assert_grad_matches(f, logits, dlogits)


def test_softmax_cross_entropy_all_ignored_is_an_error():
    with pytest.raises(ValueError, match=r"every target is the ignore index \(-100\)"):
        ops.softmax_cross_entropy_forward(np.zeros((1, 2, 3)), np.full((1, 2), -100))


def test_residual_passes_gradient_to_both_terms():
    rng = np.random.default_rng(0)
    x, fx, up = rng.standard_normal((3, 2, 4, 5))
    y, cache = ops.residual_forward(x, fx)
    np.testing.assert_array_equal(y, x + fx)
    (dx, dfx), _ = ops.residual_backward(up, cache)
    np.testing.assert_array_equal(dx, up)
    np.testing.assert_array_equal(dfx, up)
    # both are the same array: an in-place update of one would silently change the other, so it is refused
    with pytest.raises(ValueError, match="read-only"):
        dx += 1.0
    np.testing.assert_array_equal(dfx, up)


def test_float32_stays_float32():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    w, b = np.ones(8, np.float32), np.zeros(8, np.float32)
    assert ops.layernorm_forward(x, w, b)[0].dtype == np.float32
    assert ops.gelu_forward(x)[0].dtype == np.float32
    assert ops.attention_forward(np.concatenate([x, x, x], -1), 2)[0].dtype == np.float32
