"""numpy_gpt2/fast.py against the spec it speeds up: each fast op, FastAdamW and the whole model (float64)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import numpy_gpt2
from mapper import GPT2Config, init_params
from mapper.dropout import draw_dropout_masks
from numpy_gpt2 import fast, ops

seeds = st.integers(0, 2**32 - 1)


@given(B=st.integers(1, 3), T=st.integers(1, 9), n_head=st.integers(1, 3), hs=st.integers(1, 4),
       block=st.integers(1, 10), seed=seeds)
def test_attention_in_query_blocks_equals_the_spec(B, T, n_head, hs, block, seed):
    rng = np.random.default_rng(seed)
    C = n_head * hs
    qkv = rng.standard_normal((B, T, 3 * C))
    up = rng.standard_normal((B, T, C))
    y_spec, cache_spec = ops.attention_forward(qkv, n_head)
    y_fast, cache_fast = fast.attention_forward(qkv, n_head, block=block)
    np.testing.assert_allclose(y_fast, y_spec, rtol=0, atol=1e-13)
    np.testing.assert_allclose(fast.attention_backward(up, cache_fast)[0], ops.attention_backward(up, cache_spec)[0],
                               rtol=0, atol=1e-12)


@given(B=st.integers(1, 3), T=st.integers(1, 9), n_head=st.integers(1, 3), hs=st.integers(1, 4),
       block=st.integers(1, 10), p=st.floats(0.05, 0.9), seed=seeds)
def test_attention_blocks_with_dropout_equal_the_spec(B, T, n_head, hs, block, p, seed):
    """The same keep-mask on the weights: each query block takes its rows and keys of it."""
    rng = np.random.default_rng(seed)
    C = n_head * hs
    qkv = rng.standard_normal((B, T, 3 * C))
    up = rng.standard_normal((B, T, C))
    keep = rng.random((B, n_head, T, T)) >= p
    y_spec, cache_spec = ops.attention_forward(qkv, n_head, keep=keep, p=p)
    y_fast, cache_fast = fast.attention_forward(qkv, n_head, keep=keep, p=p, block=block)
    np.testing.assert_allclose(y_fast, y_spec, rtol=0, atol=1e-13)
    np.testing.assert_allclose(fast.attention_backward(up, cache_fast)[0], ops.attention_backward(up, cache_spec)[0],
                               rtol=0, atol=1e-12)


@given(B=st.integers(1, 2), T=st.integers(2, 9), n_head=st.integers(1, 3), hs=st.integers(1, 4),
       block=st.integers(1, 4), split=st.integers(1, 8), seed=seeds)
def test_attention_blocks_with_a_kv_cache_equal_the_spec(B, T, n_head, hs, block, split, seed):
    """A prefill of ``split`` positions, then the rest in one chunk (queries after a past)."""
    rng = np.random.default_rng(seed)
    C = n_head * hs
    qkv = rng.standard_normal((B, T, 3 * C))
    split = min(split, T - 1)
    outputs = []
    for module, kw in ((ops, {}), (fast, {"block": block})):
        cache = (np.zeros((B, n_head, T, hs)), np.zeros((B, n_head, T, hs)))
        first = module.attention_forward(qkv[:, :split], n_head, cache, 0, **kw)[0]
        rest = module.attention_forward(qkv[:, split:], n_head, cache, split, **kw)[0]
        outputs.append(np.concatenate([first, rest], axis=1))
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=0, atol=1e-13)


def test_ops_without_a_measured_trick_are_the_spec_s_own():
    """The elementwise passes on row blocks in threads bought under 3% of a step and were dropped: fast=True runs
    the spec's GELU, LayerNorm and cross-entropy themselves, not a copy."""
    for name in ("gelu_forward", "gelu_backward", "layernorm_forward", "layernorm_backward",
                 "softmax_cross_entropy_forward", "softmax_cross_entropy_backward", "linear_forward",
                 "dropout_forward"):
        assert getattr(fast, name) is getattr(ops, name)
    assert fast.attention_forward is not ops.attention_forward  # the one measured kernel trick of this file


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("decay", ["matrices", "all"])
def test_fast_adamw_is_bit_identical_to_the_spec(threads, decay):
    rng = np.random.default_rng(3)
    shapes = {"w": (40, 30), "b": (30,), "e": (7, 3)}
    spec_params = {k: rng.standard_normal(s) for k, s in shapes.items()}
    fast_params = {k: v.copy() for k, v in spec_params.items()}
    kw = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, decay=decay)
    spec_opt = numpy_gpt2.AdamW(spec_params, **kw)
    fast_opt = numpy_gpt2.FastAdamW(fast_params, chunk=64, threads=threads, **kw)  # chunks smaller than the tensors
    for step in range(5):
        grads = {k: rng.standard_normal(s) for k, s in shapes.items()}
        spec_opt.step(spec_params, grads, lr=3e-3 * (step + 1) / 5)
        fast_opt.step(fast_params, grads, lr=3e-3 * (step + 1) / 5)
    for k in shapes:
        np.testing.assert_array_equal(fast_params[k], spec_params[k], err_msg=k)
        np.testing.assert_array_equal(fast_opt.m[k], spec_opt.m[k])
        np.testing.assert_array_equal(fast_opt.v[k], spec_opt.v[k])


@st.composite
def models(draw):
    n_head = draw(st.integers(1, 3))
    config = GPT2Config(vocab_size=draw(st.integers(2, 30)), n_positions=draw(st.integers(2, 12)),
                        n_embd=n_head * draw(st.integers(1, 4)), n_layer=draw(st.integers(1, 2)), n_head=n_head,
                        tie_word_embeddings=draw(st.booleans()))
    return config, draw(st.integers(1, 3)), draw(st.integers(1, config.n_positions)), draw(seeds)


@given(models(), st.sampled_from([0.0, 0.2]))
def test_whole_model_fast_equals_spec(model, dropout):
    config, B, T, seed = model
    config = config.with_dropout(dropout)
    rng = np.random.default_rng(seed)
    params = {k: v + 0.3 * rng.standard_normal(v.shape) for k, v in init_params(config, seed, np.float64).items()}
    tokens = rng.integers(0, config.vocab_size, (B, T))
    targets = rng.integers(0, config.vocab_size, (B, T))
    masks = draw_dropout_masks(config, B, T, rng) if dropout else None
    loss_spec, grads_spec = numpy_gpt2.loss_and_grads(params, config, tokens, targets, dropout_masks=masks)
    loss_fast, grads_fast = numpy_gpt2.loss_and_grads(params, config, tokens, targets, fast=True, dropout_masks=masks)
    assert abs(loss_fast - loss_spec) <= 1e-13
    for name, g in grads_spec.items():
        np.testing.assert_allclose(grads_fast[name], g, rtol=0, atol=1e-12, err_msg=name)
    prompt = tokens[:, : max(1, T - 2)]
    n_new = config.n_positions - prompt.shape[1]
    np.testing.assert_array_equal(
        numpy_gpt2.generate(params, config, prompt, n_new, temperature=1.0, seed=seed % 1000, fast=True),
        numpy_gpt2.generate(params, config, prompt, n_new, temperature=1.0, seed=seed % 1000))
