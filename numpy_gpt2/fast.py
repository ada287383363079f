"""Measured speed-ups of some spec ops (kernels only), chosen with ``fast=True`` (``numpy_gpt2.forward``, ...).

Each function here has its spec twin in ``numpy_gpt2/ops.py`` with the same signature and the same result up to
rounding (``parity_tests/test_fast.py`` checks every one against the spec). The spec says *what* is computed;
this file only changes *how*. What each trick bought on the GPT-2 124M shape is written above it (2-core AMD
EPYC, float32, ``python -m benchmarks.fast_tricks``); a trick that bought under ~3% was dropped:
- GELU and the cross-entropy backward in place: 0.5-0.7% of a step each (AMD EPYC Zen 5);
- GELU, LayerNorm, the attention softmax and the cross-entropy on row blocks in threads (NumPy releases the GIL
  inside a large ufunc): 0.6%, 0.3% and -0.6% of the forward B=1 T=1024, 0.2%, 0.1%, 0.0% and 1.1% of the train
  step B=4 T=64 (AMD EPYC Zen 4, family 25 model 17, 2 cores, quiet, 2026-12-02). On two cores these passes are
  bound by memory traffic, which a second thread hardly adds to; the chunked AdamW (``numpy_gpt2.optim``), which
  does earn its place (19% of the train step), is the one threaded pass.

Ops without a faster version here are the spec's own (re-exported below), so ``numpy_gpt2.model`` can take all
of its kernels from this module.
"""

from __future__ import annotations

import math

import numpy as np

from numpy_gpt2.ops import (
    check_no_kv_cache,
    dropout_backward,
    dropout_forward,
    embedding_backward,
    embedding_forward,
    gelu_backward,
    gelu_forward,
    layernorm_backward,
    layernorm_forward,
    linear_backward,
    linear_forward,
    lm_head_backward,
    lm_head_forward,
    lora_backward,
    lora_forward,
    pool_backward,
    pool_forward,
    residual_backward,
    residual_forward,
    softmax_cross_entropy_backward,
    softmax_cross_entropy_forward,
    split_heads,
)

__all__ = [
    "attention_backward",
    "attention_forward",
    "dropout_backward",
    "dropout_forward",
    "embedding_backward",
    "embedding_forward",
    "gelu_backward",
    "gelu_forward",
    "layernorm_backward",
    "layernorm_forward",
    "linear_backward",
    "linear_forward",
    "lm_head_backward",
    "lm_head_forward",
    "lora_backward",
    "lora_forward",
    "pool_backward",
    "pool_forward",
    "residual_backward",
    "residual_forward",
    "softmax_cross_entropy_backward",
    "softmax_cross_entropy_forward",
]

# ------------------------------------------------------------------------------------------------------
# Attention in query blocks, softmax in place: queries s..e-1 see only keys 0..P+e-1, so the keys after a block
# (the upper triangle of the causal mask) are never multiplied or exponentiated; at T = 1024 with blocks of 256
# that skips ~3/8 of the attention work. Each block is still batched over B and NH. Measured: forward B=1 T=1024
# 590 -> 307 ms over 12 layers, 20% of the whole forward; no gain at T = 64 (one block).
# ------------------------------------------------------------------------------------------------------

ATTENTION_BLOCK = 256


def attention_forward(
    qkv: np.ndarray,
    n_head: int,
    kv_cache: tuple[np.ndarray, np.ndarray] | None = None,
    pos0: int = 0,
    keep: np.ndarray | None = None,
    p: float = 0.0,
    block: int = ATTENTION_BLOCK,
) -> tuple[np.ndarray, tuple]:
    """As ``ops.attention_forward``; ``block`` = queries per block. With ``keep`` a block keeps both its softmax
    (for the backward) and its dropped weights (an extra [B, NH, block, keys] array)."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    q = split_heads(qkv[..., :C], n_head)  # [B,NH,T,hs]
    k = split_heads(qkv[..., C : 2 * C], n_head)
    v = split_heads(qkv[..., 2 * C :], n_head)
    if kv_cache is not None:
        k_cache, v_cache = kv_cache
        k_cache[:, :, pos0 : pos0 + T] = k
        v_cache[:, :, pos0 : pos0 + T] = v
        k, v = k_cache[:, :, : pos0 + T], v_cache[:, :, : pos0 + T]  # [B,NH,P+T,hs]
    q_scaled = q * (1.0 / math.sqrt(hs))  # (q / sqrt(hs)) k^T: T*hs multiplies instead of T*(P+T)
    y = np.empty((B, T, n_head, hs), dtype=qkv.dtype)  # heads side by side: concatenating them is a reshape
    y_heads = y.transpose(0, 2, 1, 3)  # [B,NH,T,hs] view
    blocks = []
    for s in range(0, T, block):
        e = min(s + block, T)
        n_keys = pos0 + e
        att = np.matmul(q_scaled[:, :, s:e], k[:, :, :n_keys].swapaxes(-1, -2))  # [B,NH,e-s,n_keys]
        future = np.arange(n_keys)[None, :] > (pos0 + np.arange(s, e))[:, None]
        np.copyto(att, -np.inf, where=future)
        att -= att.max(axis=-1, keepdims=True)
        np.exp(att, out=att)
        att *= 1.0 / att.sum(axis=-1, keepdims=True)  # softmax in place
        att_kept, cache_drop = (att, None) if keep is None else dropout_forward(att, keep[:, :, s:e, :n_keys], p)
        np.matmul(att_kept, v[:, :, :n_keys], out=y_heads[:, :, s:e])
        blocks.append((s, e, att, att_kept, cache_drop))
    return y.reshape(B, T, C), (q_scaled, k, v, blocks, kv_cache is not None)


def attention_backward(dy: np.ndarray, cache: tuple) -> tuple[np.ndarray, tuple]:
    """As ``ops.attention_backward`` (only after a forward without a KV cache)."""
    q_scaled, k, v, blocks, used_kv_cache = cache
    check_no_kv_cache(used_kv_cache)
    B, NH, T, hs = q_scaled.shape
    dqkv = np.empty((B, T, 3, NH, hs), dtype=dy.dtype)
    dq, dk, dv = (dqkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # [B,NH,T,hs] views
    dy_heads = dy.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)
    # The last block sees every key, so it writes dk and dv; earlier blocks see a prefix and add into it.
    for s, e, att, att_kept, cache_drop in reversed(blocks):
        dy_block = dy_heads[:, :, s:e]
        datt = np.matmul(dy_block, v[:, :, :e].swapaxes(-1, -2))  # [B,NH,e-s,e]
        dv_block = np.matmul(att_kept.swapaxes(-1, -2), dy_block)
        if cache_drop is not None:
            datt = dropout_backward(datt, cache_drop)[0]  # through the dropout of the weights (a fresh array)
        datt -= np.einsum("bhts,bhts->bht", datt, att)[..., None]
        datt *= att  # dscores
        np.matmul(datt, k[:, :, :e], out=dq[:, :, s:e])
        dq[:, :, s:e] *= 1.0 / math.sqrt(hs)
        dk_block = np.matmul(datt.swapaxes(-1, -2), q_scaled[:, :, s:e])
        if e == T:
            dv[...] = dv_block
            dk[...] = dk_block
        else:
            dv[:, :, :e] += dv_block
            dk[:, :, :e] += dk_block
    return dqkv.reshape(B, T, 3 * NH * hs), ()
