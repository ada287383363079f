"""GPT-2's operations as forward/backward pairs, written out by hand in NumPy.

Each operation is ``y, cache = op_forward(...)`` directly above ``dx, dparams = op_backward(dy, cache)``.
A backward receives dL/d(output) and returns dL/d(input) and dL/d(each parameter); the comment over each
line of a backward names the forward line it inverts.

Dimension legend (as in llm.c):
    B  batch size            T   sequence length (time)      C  channels (n_embd)
    V  vocabulary size       NH  number of heads             hs head size = C / NH
    P  past length (tokens already held in a KV cache; 0 when there is none)

All arithmetic runs in the dtype of the inputs (float32 for speed, float64 for gradient checks).
Parameter gradients may be written into preallocated arrays via ``out=`` so a training loop allocates them
once; without ``out=`` fresh arrays are returned.
"""

from __future__ import annotations

import math

import numpy as np

# ------------------------------------------------------------------------------------------------------
# embedding: x[b, t] = wte[tokens[b, t]] + wpe[pos0 + t]
# ------------------------------------------------------------------------------------------------------


def embedding_forward(
    tokens: np.ndarray, wte: np.ndarray, wpe: np.ndarray, pos0: int = 0
) -> tuple[np.ndarray, tuple]:
    """tokens [B, T] int -> x [B, T, C] = token embedding + position embedding (positions pos0..pos0+T-1)."""
    T = tokens.shape[1]
    x = wte[tokens] + wpe[pos0 : pos0 + T]  # [B,T,C] + [T,C] broadcast over B
    return x, (tokens, wte.shape, wpe.shape, pos0)


def embedding_backward(
    dx: np.ndarray, cache: tuple, out: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[None, tuple[np.ndarray, np.ndarray]]:
    """dx [B, T, C] -> (None, (dwte [V, C], dwpe [P_max, C])). Tokens are not differentiable.

    ``out=(dwte, dwpe)`` ACCUMULATES into the given arrays (the tied wte already holds the LM head's part).
    """
    tokens, wte_shape, wpe_shape, pos0 = cache
    B, T, C = dx.shape
    if out is None:
        dwte, dwpe = np.zeros(wte_shape, dx.dtype), np.zeros(wpe_shape, dx.dtype)
    else:
        dwte, dwpe = out
    # x = wte[tokens] + ...: every occurrence of an id adds its row of dx. np.add.at is unbuffered, so
    # repeated ids all count (dwte[tokens] += dx would keep only the last occurrence of each id).
    np.add.at(dwte, tokens.reshape(-1), dx.reshape(B * T, C))
    # x = ... + wpe[pos0 + t]: position t is used once per sequence, so sum over the batch.
    dwpe[pos0 : pos0 + T] += dx.sum(axis=0)
    return None, (dwte, dwpe)


# ------------------------------------------------------------------------------------------------------
# layernorm: y = (x - mean) / sqrt(var + eps) * w + b, statistics over C, biased variance
# ------------------------------------------------------------------------------------------------------


def layernorm_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float = 1e-5) -> tuple[np.ndarray, tuple]:
    """x [..., C] -> y [..., C]."""
    mean = x.mean(axis=-1, keepdims=True)  # [...,1]
    xc = x - mean  # [...,C]
    var = np.mean(xc * xc, axis=-1, keepdims=True)  # biased: divide by C, not C-1
    rstd = 1.0 / np.sqrt(var + eps)  # [...,1]
    xhat = xc * rstd  # normalised, [...,C]
    y = xhat * w + b
    return y, (xhat, rstd, w)


def layernorm_backward(
    dy: np.ndarray, cache: tuple, out: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """dy [..., C] -> (dx [..., C], (dw [C], db [C]))."""
    xhat, rstd, w = cache
    C = dy.shape[-1]
    dy2, xhat2 = dy.reshape(-1, C), xhat.reshape(-1, C)
    dw, db = out if out is not None else (np.empty(C, dy.dtype), np.empty(C, dy.dtype))
    # y = xhat * w + b  ->  dw = sum over rows of dy * xhat, db = sum over rows of dy, dxhat = dy * w
    np.einsum("nc,nc->c", dy2, xhat2, out=dw)
    np.sum(dy2, axis=0, out=db)
    dxhat = dy * w
    # xhat = (x - mean) * rstd, with mean and rstd functions of x. Differentiating through both gives
    # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    dx = dxhat - dxhat.mean(axis=-1, keepdims=True)
    dx -= xhat * np.mean(dxhat * xhat, axis=-1, keepdims=True)
    dx *= rstd
    return dx, (dw, db)


# ------------------------------------------------------------------------------------------------------
# linear (OpenAI's Conv1D, weight stored [in, out]): y = x @ w + b
# ------------------------------------------------------------------------------------------------------


def linear_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> tuple[np.ndarray, tuple]:
    """x [..., Cin], w [Cin, Cout], b [Cout] or None -> y [..., Cout]."""
    lead = x.shape[:-1]
    y = x.reshape(-1, x.shape[-1]) @ w  # one BLAS GEMM over all B*T rows: [N,Cin] @ [Cin,Cout]
    if b is not None:
        y += b
    return y.reshape(*lead, w.shape[1]), (x, w, b is not None)


def linear_backward(
    dy: np.ndarray, cache: tuple, out: tuple[np.ndarray, np.ndarray | None] | None = None
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray | None]]:
    """dy [..., Cout] -> (dx [..., Cin], (dw [Cin, Cout], db [Cout] or None))."""
    x, w, has_bias = cache
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])  # [N,Cin], [N,Cout]
    if out is None:
        out = (np.empty(w.shape, dy.dtype), np.empty(w.shape[1], dy.dtype) if has_bias else None)
    dw, db = out
    # y = x @ w + b  ->  dx = dy @ w.T,  dw = x.T @ dy,  db = sum over rows of dy
    dx = (dy2 @ w.T).reshape(x.shape)
    np.matmul(x2.T, dy2, out=dw)
    if has_bias:
        np.sum(dy2, axis=0, out=db)
    return dx, (dw, db if has_bias else None)


# ------------------------------------------------------------------------------------------------------
# GELU, tanh approximation (OpenAI's gelu, HF's gelu_new):
#   y = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)
# ------------------------------------------------------------------------------------------------------

GELU_SCALE = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715


def gelu_forward(x: np.ndarray) -> tuple[np.ndarray, tuple]:
    """x [...] -> y [...] (elementwise)."""
    th = x * x  # x^2
    th *= GELU_CUBIC
    th += 1.0
    th *= x
    th *= GELU_SCALE  # u = sqrt(2/pi) * x * (1 + 0.044715 x^2)
    np.tanh(th, out=th)  # tanh(u)
    y = th + 1.0
    y *= x
    y *= 0.5  # 0.5 x (1 + tanh(u))
    return y, (x, th)


def gelu_backward(dy: np.ndarray, cache: tuple) -> tuple[np.ndarray, tuple]:
    """dy [...] -> (dx [...], ()).

    dy/dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) du/dx,  du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2)
    """
    x, th = cache
    dudx = x * x
    dudx *= 3.0 * GELU_CUBIC
    dudx += 1.0
    dudx *= GELU_SCALE  # du/dx
    sech2 = th * th
    np.subtract(1.0, sech2, out=sech2)  # 1 - tanh^2 u
    sech2 *= x
    sech2 *= dudx  # x (1 - tanh^2 u) du/dx
    sech2 += th
    sech2 += 1.0
    sech2 *= 0.5  # the full derivative dy/dx
    sech2 *= dy
    return sech2, ()


# ------------------------------------------------------------------------------------------------------
# causal multi-head self-attention on the fused qkv (softmax inside)
#   q, k, v = split(qkv) into NH heads of size hs
#   att = softmax(q k^T / sqrt(hs) + causal mask)     # [B,NH,T,P+T]
#   y = att v, heads concatenated back to [B,T,C]
# ------------------------------------------------------------------------------------------------------


def split_heads(qkv: np.ndarray, n_head: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """qkv [B, T, 3C] -> q, k, v, each a [B, NH, T, hs] view (no copy; columns are q | k | v, heads contiguous)."""
    B, T, C3 = qkv.shape
    hs = C3 // (3 * n_head)
    heads = qkv.reshape(B, T, 3, n_head, hs).transpose(2, 0, 3, 1, 4)  # [3,B,NH,T,hs]
    return heads[0], heads[1], heads[2]


# Queries are processed in blocks of this many positions. A block of queries s..e-1 can only see keys
# 0..e-1, so the keys after the block (the upper triangle of the causal mask) are never multiplied or
# exponentiated: for T = 1024 that skips ~3/8 of the attention work. Each block is batched over B and NH.
ATTENTION_BLOCK = 256


def attention_forward(
    qkv: np.ndarray, n_head: int, kv_cache: tuple[np.ndarray, np.ndarray] | None = None, pos0: int = 0
) -> tuple[np.ndarray, tuple]:
    """qkv [B, T, 3C] -> y [B, T, C].

    Without a cache the queries attend to the T keys of this call. With ``kv_cache=(K, V)``, arrays
    [B, NH, T_max, hs], this call's keys/values are written at positions pos0..pos0+T-1 and the queries
    attend to all P + T = pos0 + T cached positions (incremental decoding, one implementation for both).
    """
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    q, k, v = split_heads(qkv, n_head)  # [B,NH,T,hs] each
    if kv_cache is not None:
        kc, vc = kv_cache
        kc[:, :, pos0 : pos0 + T] = k
        vc[:, :, pos0 : pos0 + T] = v
        k, v = kc[:, :, : pos0 + T], vc[:, :, : pos0 + T]  # [B,NH,P+T,hs]
    # (q / sqrt(hs)) k^T = (q k^T) / sqrt(hs): scaling q costs T*hs multiplies instead of T*(P+T)
    qs = q * (1.0 / math.sqrt(hs))
    y = np.empty((B, T, n_head, hs), dtype=qkv.dtype)  # heads side by side, so concatenating is a reshape
    yh = y.transpose(0, 2, 1, 3)  # [B,NH,T,hs] view
    atts = []
    for s in range(0, T, ATTENTION_BLOCK):
        e = min(s + ATTENTION_BLOCK, T)
        n_keys = pos0 + e  # query at absolute position pos0 + t sees keys 0..pos0 + t
        # att = q k^T / sqrt(hs)                                 [B,NH,e-s,hs] @ [B,NH,hs,n_keys]
        att = np.matmul(qs[:, :, s:e], k[:, :, :n_keys].swapaxes(-1, -2))
        future = np.arange(n_keys)[None, :] > (pos0 + np.arange(s, e))[:, None]  # [e-s,n_keys] causal mask
        np.copyto(att, -np.inf, where=future)
        # softmax over keys: att = exp(att - max) / sum(exp(att - max))
        att -= att.max(axis=-1, keepdims=True)
        np.exp(att, out=att)
        att *= 1.0 / att.sum(axis=-1, keepdims=True)
        # y = att v                                              [B,NH,e-s,n_keys] @ [B,NH,n_keys,hs]
        np.matmul(att, v[:, :, :n_keys], out=yh[:, :, s:e])
        atts.append((s, e, att))
    return y.reshape(B, T, C), (qs, k, v, atts, n_head)


def attention_backward(dy: np.ndarray, cache: tuple) -> tuple[np.ndarray, tuple]:
    """dy [B, T, C] -> (dqkv [B, T, 3C], ()). Only for calls without a KV cache (P = 0)."""
    qs, k, v, atts, n_head = cache
    B, NH, T, hs = qs.shape
    scale = 1.0 / math.sqrt(hs)
    dqkv = np.empty((B, T, 3, NH, hs), dtype=dy.dtype)
    dq, dk, dv = (dqkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # [B,NH,T,hs] views
    dyh = dy.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)  # [B,NH,T,hs]
    # Walk the query blocks from the last: it sees every key, so it writes dk and dv; earlier blocks
    # see a prefix of the keys and add into it.
    for s, e, att in reversed(atts):
        first = e == T
        dyb = dyh[:, :, s:e]
        # y = att v  ->  datt = dy v^T,  dv = att^T dy
        datt = np.matmul(dyb, v[:, :, :e].swapaxes(-1, -2))  # [B,NH,e-s,e]
        dv_att = np.matmul(att.swapaxes(-1, -2), dyb)
        # att = softmax(a)  ->  da = att * (datt - sum_j(datt * att)); masked entries have att = 0, so da = 0
        datt -= np.einsum("bhts,bhts->bht", datt, att)[..., None]
        datt *= att
        # a = qs k^T with qs = q / sqrt(hs)  ->  dq = da k / sqrt(hs),  dk = da^T qs
        np.matmul(datt, k[:, :, :e], out=dq[:, :, s:e])
        dq[:, :, s:e] *= scale
        dk_att = np.matmul(datt.swapaxes(-1, -2), qs[:, :, s:e])
        if first:
            dv[...] = dv_att
            dk[...] = dk_att
        else:
            dv[:, :, :e] += dv_att
            dk[:, :, :e] += dk_att
    return dqkv.reshape(B, T, 3 * NH * hs), ()


# ------------------------------------------------------------------------------------------------------
# residual: y = x + f(x). The gradient of a sum flows unchanged into both terms.
# ------------------------------------------------------------------------------------------------------


def residual_forward(x: np.ndarray, fx: np.ndarray) -> tuple[np.ndarray, tuple]:
    """x, fx [B, T, C] -> y = x + fx."""
    return x + fx, ()


def residual_backward(dy: np.ndarray, cache: tuple) -> tuple[tuple[np.ndarray, np.ndarray], tuple]:
    """dy -> ((dx, dfx), ()) with dx = dfx = dy."""
    return (dy, dy), ()


# ------------------------------------------------------------------------------------------------------
# softmax cross-entropy, fused: loss = mean over kept targets of -log softmax(logits)[target]
# ------------------------------------------------------------------------------------------------------

IGNORE_INDEX = -100


def softmax_cross_entropy_forward(logits: np.ndarray, targets: np.ndarray) -> tuple[float, tuple]:
    """logits [B, T, V], targets [B, T] (IGNORE_INDEX = -100 skipped) -> mean loss over the N kept targets."""
    V = logits.shape[-1]
    z = logits.reshape(-1, V)  # [B*T,V]
    t = targets.reshape(-1)
    keep = t != IGNORE_INDEX
    n = int(keep.sum())
    if n == 0:
        raise ValueError("every target is ignore_index (-100): there is nothing to compute a loss over")
    # softmax with the max subtracted for stability; the probabilities are kept for the backward
    zmax = z.max(axis=-1, keepdims=True)  # [B*T,1]
    probs = z - zmax
    np.exp(probs, out=probs)
    sums = probs.sum(axis=-1, keepdims=True)  # [B*T,1]
    probs /= sums
    rows = np.flatnonzero(keep)
    # -log softmax(z)[t] = log(sum(exp(z - max))) - (z[t] - max); no log(0) even when p[t] underflows
    nll = np.log(sums[rows, 0]) - (z[rows, t[rows]] - zmax[rows, 0])
    loss = nll.sum() / n
    return float(loss), (probs, t, rows, n, logits.shape)


def softmax_cross_entropy_backward(cache: tuple, dloss: float = 1.0) -> np.ndarray:
    """-> dlogits [B, T, V] = (softmax - onehot(target)) / N on kept rows, 0 on ignored rows.

    Overwrites the cached probabilities (they are not needed again).
    """
    probs, t, rows, n, shape = cache
    dz = probs  # reuse the [B*T,V] buffer
    # loss = (1/N) sum_kept -log softmax(z)[t]  ->  dz = (softmax(z) - onehot(t)) / N, zero where ignored
    dz[rows, t[rows]] -= 1.0
    ignored = np.ones(dz.shape[0], dtype=bool)
    ignored[rows] = False
    dz[ignored] = 0.0
    dz *= dloss / n  # the 1/N of the mean (N = number of kept targets)
    return dz.reshape(shape)
