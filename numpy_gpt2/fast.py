"""Measured speed-ups of some spec ops (kernels only), chosen with ``fast=True`` (``numpy_gpt2.forward``, ...).

Each function here has its spec twin in ``numpy_gpt2/ops.py`` with the same signature and the same result up to
rounding (``parity_tests/test_fast.py`` checks every one against the spec). The spec says *what* is computed;
this file only changes *how*. What each trick bought on the GPT-2 124M shape is written above it (2-core AMD
EPYC, float32, ``python -m benchmarks.fast_tricks``); a trick that bought under ~3% was dropped: GELU and the
cross-entropy backward in place bought 0.5-0.7% of a step each. The elementwise passes on every core (GELU,
LayerNorm, the attention softmax, the cross-entropy) await that measurement on a quiet machine.

Ops without a faster version here are the spec's own (re-exported below), so ``numpy_gpt2.model`` can take all
of its kernels from this module.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mapper.tokens import IGNORE_INDEX
from numpy_gpt2.ops import (
    GELU_CUBIC,
    GELU_SCALE,
    check_no_kv_cache,
    dropout_backward,
    dropout_forward,
    embedding_backward,
    embedding_forward,
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
# Elementwise passes on every core. A matmul runs on all cores inside BLAS; NumPy's elementwise ufuncs and
# reductions run on the calling thread only, and at the 124M shape they are a large share of a step (GELU's
# tanh over [B*T, 3072], the softmax over T x T per head, LayerNorm, the cross-entropy over 50257 columns).
# NumPy releases the GIL inside each ufunc on a large array, so threads that each take a block of rows run in
# parallel (as FastAdamW's chunks do). Each row is computed by the same operations in the same order as the
# spec, so results are bit-identical; a column sum over rows (LayerNorm's dw, db) adds per-block partial sums
# and differs from the spec's order by rounding only.
# ------------------------------------------------------------------------------------------------------

THREADS = max(1, min(os.cpu_count() or 1, 8))
MIN_BLOCK_ELEMENTS = 1 << 18  # smaller blocks: the hand-off to a thread (tens of µs) is no longer small
_pools: dict[int, ThreadPoolExecutor] = {}


def row_blocks(n_rows: int, row_size: int, threads: int | None) -> list[slice]:
    """Slices of 0..n_rows, one per thread: ``threads`` of them (at most one per row), or with None as many of
    ``THREADS`` as keep each block at ``MIN_BLOCK_ELEMENTS`` or more."""
    if threads is None:
        threads = min(THREADS, max(1, n_rows * row_size // MIN_BLOCK_ELEMENTS))
    n = max(1, min(threads, n_rows))
    bounds = [round(i * n_rows / n) for i in range(n + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def on_row_blocks(work: Callable[[slice], object], blocks: list[slice]) -> list:
    """``work(block)`` for every block, in parallel threads when there are several; their results in order. The
    caller's floating-point error handling (``np.errstate``, local to a thread) applies in the threads too."""
    if len(blocks) == 1:
        return [work(blocks[0])]
    pool = _pools.get(len(blocks))
    if pool is None:
        pool = _pools[len(blocks)] = ThreadPoolExecutor(len(blocks), thread_name_prefix="numpy_gpt2.fast")
    errors = np.geterr()

    def as_caller(block: slice) -> object:
        with np.errstate(**errors):
            return work(block)

    return [job.result() for job in [pool.submit(as_caller, block) for block in blocks]]


def gelu_forward(x: np.ndarray, threads: int | None = None) -> tuple[np.ndarray, tuple]:
    """As ``ops.gelu_forward``, on row blocks in parallel; ``threads`` as in :func:`row_blocks`."""
    x2 = x.reshape(-1, x.shape[-1])
    y, tanh_u = np.empty_like(x2), np.empty_like(x2)

    def work(rows: slice) -> None:
        xs, t = x2[rows], tanh_u[rows]
        np.multiply(xs, GELU_CUBIC, out=t)
        t *= xs
        t *= xs
        t += xs
        t *= GELU_SCALE  # u = sqrt(2/pi) (x + 0.044715 x^3), the spec's order of operations
        np.tanh(t, out=t)
        np.multiply(xs, 0.5, out=y[rows])
        y[rows] *= t + 1.0  # y = 0.5 x (1 + tanh(u))

    on_row_blocks(work, row_blocks(x2.shape[0], x2.shape[1], threads))
    return y.reshape(x.shape), (x, tanh_u.reshape(x.shape))


def gelu_backward(dy: np.ndarray, cache: tuple, threads: int | None = None) -> tuple[np.ndarray, tuple]:
    """As ``ops.gelu_backward``, on row blocks in parallel."""
    x, tanh_u = cache
    x2, t2, dy2 = (a.reshape(-1, a.shape[-1]) for a in (x, tanh_u, dy))
    dx = np.empty_like(dy2)

    def work(rows: slice) -> None:
        xs, ts = x2[rows], t2[rows]
        du_dx = np.square(xs)
        du_dx *= 3.0 * GELU_CUBIC
        du_dx += 1.0
        du_dx *= GELU_SCALE  # sqrt(2/pi) (1 + 3 * 0.044715 x^2)
        slope = np.square(ts)
        np.subtract(1.0, slope, out=slope)  # 1 - tanh(u)^2
        second = xs * 0.5
        second *= slope
        second *= du_dx  # 0.5 x (1 - tanh(u)^2) du/dx
        first = ts + 1.0
        first *= 0.5  # 0.5 (1 + tanh(u))
        first += second
        np.multiply(dy2[rows], first, out=dx[rows])

    on_row_blocks(work, row_blocks(x2.shape[0], x2.shape[1], threads))
    return dx.reshape(dy.shape), ()


def layernorm_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float = 1e-5, threads: int | None = None
                      ) -> tuple[np.ndarray, tuple]:
    """As ``ops.layernorm_forward``, on row blocks in parallel."""
    x2 = x.reshape(-1, x.shape[-1])
    y, xhat = np.empty_like(x2), np.empty_like(x2)
    rstd = np.empty((x2.shape[0], 1), dtype=x.dtype)

    def work(rows: slice) -> None:
        xs = x2[rows]
        centred = xs - xs.mean(axis=-1, keepdims=True)
        var = np.square(centred).mean(axis=-1, keepdims=True)  # biased
        np.divide(1.0, np.sqrt(var + eps), out=rstd[rows])
        np.multiply(centred, rstd[rows], out=xhat[rows])
        np.multiply(xhat[rows], w, out=y[rows])
        y[rows] += b

    on_row_blocks(work, row_blocks(x2.shape[0], x2.shape[1], threads))
    shape = x.shape
    return y.reshape(shape), (xhat.reshape(shape), rstd.reshape(*shape[:-1], 1), w)


def layernorm_backward(dy: np.ndarray, cache: tuple, threads: int | None = None
                       ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """As ``ops.layernorm_backward``, on row blocks in parallel (dw and db summed per block, then over blocks)."""
    xhat, rstd, w = cache
    C = dy.shape[-1]
    dy2, xhat2, rstd2 = dy.reshape(-1, C), xhat.reshape(-1, C), rstd.reshape(-1, 1)
    dx = np.empty_like(dy2)

    def work(rows: slice) -> tuple[np.ndarray, np.ndarray]:
        d, xh = dy2[rows], xhat2[rows]
        dy_xhat = d * xh
        dw, db = dy_xhat.sum(axis=0), d.sum(axis=0)
        dxhat = d * w
        dxhat_mean = dxhat.mean(axis=-1, keepdims=True)
        np.multiply(dxhat, xh, out=dy_xhat)
        dxhat_xhat_mean = dy_xhat.mean(axis=-1, keepdims=True)
        dxhat -= dxhat_mean
        np.multiply(xh, dxhat_xhat_mean, out=dy_xhat)
        dxhat -= dy_xhat
        np.multiply(rstd2[rows], dxhat, out=dx[rows])  # rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat))
        return dw, db

    parts = on_row_blocks(work, row_blocks(dy2.shape[0], C, threads))
    return dx.reshape(dy.shape), (sum(p[0] for p in parts[1:]) + parts[0][0], sum(p[1] for p in parts[1:])
                                  + parts[0][1])


def softmax_cross_entropy_forward(logits: np.ndarray, targets: np.ndarray, threads: int | None = None
                                  ) -> tuple[float, tuple]:
    """As ``ops.softmax_cross_entropy_forward``, the softmax over the vocabulary on row blocks in parallel."""
    V = logits.shape[-1]
    z = logits.reshape(-1, V)
    t = targets.reshape(-1)
    kept = np.flatnonzero(t != IGNORE_INDEX)
    if kept.size == 0:
        raise ValueError(f"every target is the ignore index ({IGNORE_INDEX}): there is nothing to compute a loss over")
    probs = np.empty_like(z)
    log_sum_exp = np.empty((z.shape[0], 1), dtype=z.dtype)

    def work(rows: slice) -> None:
        zs, p = z[rows], probs[rows]
        z_max = zs.max(axis=-1, keepdims=True)
        np.subtract(zs, z_max, out=p)
        np.exp(p, out=p)
        np.add(z_max, np.log(p.sum(axis=-1, keepdims=True)), out=log_sum_exp[rows])
        np.subtract(zs, log_sum_exp[rows], out=p)
        np.exp(p, out=p)  # softmax(z)

    on_row_blocks(work, row_blocks(z.shape[0], V, threads))
    nll = log_sum_exp[kept, 0] - z[kept, t[kept]]
    return float(nll.sum() / kept.size), (probs, t, kept, logits.shape)


def softmax_cross_entropy_backward(dloss: float, cache: tuple, threads: int | None = None
                                   ) -> tuple[np.ndarray, tuple]:
    """As ``ops.softmax_cross_entropy_backward``, on row blocks in parallel."""
    probs, t, kept, shape = cache
    scale = dloss / kept.size
    ignored = t == IGNORE_INDEX
    dz = np.empty_like(probs)

    def work(rows: slice) -> None:
        d = dz[rows]
        np.copyto(d, probs[rows])
        d[ignored[rows]] = 0.0
        mine = np.flatnonzero(~ignored[rows])
        d[mine, t[rows][mine]] -= 1.0  # softmax(z) - onehot(t)
        d *= scale

    on_row_blocks(work, row_blocks(probs.shape[0], probs.shape[1], threads))
    return dz.reshape(shape), ()


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
    threads: int | None = None,
) -> tuple[np.ndarray, tuple]:
    """As ``ops.attention_forward``; ``block`` = queries per block; the softmax of each block runs on blocks of
    heads in parallel (``threads`` as in :func:`row_blocks`). With ``keep`` a block keeps both its softmax (for the
    backward) and its dropped weights (an extra [B, NH, block, keys] array)."""
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
        heads = att.reshape(B * n_head, e - s, n_keys)

        def softmax(rows: slice, heads: np.ndarray = heads, future: np.ndarray = future) -> None:
            a = heads[rows]
            np.copyto(a, -np.inf, where=future)
            a -= a.max(axis=-1, keepdims=True)
            np.exp(a, out=a)
            a *= 1.0 / a.sum(axis=-1, keepdims=True)  # softmax in place

        on_row_blocks(softmax, row_blocks(B * n_head, (e - s) * n_keys, threads))
        att_kept, cache_drop = (att, None) if keep is None else dropout_forward(att, keep[:, :, s:e, :n_keys], p)
        np.matmul(att_kept, v[:, :, :n_keys], out=y_heads[:, :, s:e])
        blocks.append((s, e, att, att_kept, cache_drop))
    return y.reshape(B, T, C), (q_scaled, k, v, blocks, kv_cache is not None, threads)


def attention_backward(dy: np.ndarray, cache: tuple) -> tuple[np.ndarray, tuple]:
    """As ``ops.attention_backward`` (only after a forward without a KV cache); the softmax's backward runs on blocks
    of heads in parallel, as the forward's softmax did."""
    q_scaled, k, v, blocks, used_kv_cache, threads = cache
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
        d_heads, a_heads = datt.reshape(B * NH, e - s, e), att.reshape(B * NH, e - s, e)

        def softmax_backward(rows: slice, d_heads: np.ndarray = d_heads, a_heads: np.ndarray = a_heads) -> None:
            d, a = d_heads[rows], a_heads[rows]
            d -= np.einsum("hts,hts->ht", d, a)[..., None]
            d *= a  # dscores

        on_row_blocks(softmax_backward, row_blocks(B * NH, (e - s) * e, threads))
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
