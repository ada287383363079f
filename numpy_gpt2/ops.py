"""GPT-2's operations as forward/backward pairs, written out by hand in NumPy: the spec.

Each operation is ``y, cache = op_forward(...)`` directly above ``dx, dparams = op_backward(dy, cache)``.
A backward receives dL/dy (the gradient of the loss with respect to the op's output) and returns dL/dx and
dL/d(each parameter), as fresh arrays. Each line is one equation; the comment over a group of backward lines
quotes the forward line it inverts.

Dimension legend (as in llm.c):
    B  batch size            T   sequence length (time)      C  channels (n_embd)
    V  vocabulary size       NH  number of heads             hs head size = C / NH
    P  past length (tokens already held in a KV cache; 0 when there is none)
    r  LoRA rank             N   rows = every leading index flattened (B*T, or B for a classifier)

All arithmetic runs in the dtype of the inputs (float32 for speed, float64 for gradient checks).
This file is for reading; ``numpy_gpt2/fast.py`` holds measured speed-ups of some ops, tested equal to these.
"""

from __future__ import annotations

import math

import numpy as np

from mapper.tokens import IGNORE_INDEX

# ------------------------------------------------------------------------------------------------------
# embedding: x[b, t] = wte[tokens[b, t]] + wpe[pos0 + t]
# ------------------------------------------------------------------------------------------------------


def embedding_forward(
    tokens: np.ndarray, wte: np.ndarray, wpe: np.ndarray, pos0: int = 0
) -> tuple[np.ndarray, tuple]:
    """tokens [B, T] int -> x [B, T, C] = token embedding + position embedding (positions pos0..pos0+T-1)."""
    T = tokens.shape[1]
    x = wte[tokens] + wpe[pos0 : pos0 + T]  # [B,T,C] + [T,C], broadcast over B
    return x, (tokens, wte.shape, wpe.shape, pos0)


def embedding_backward(dx: np.ndarray, cache: tuple) -> tuple[None, tuple[np.ndarray, np.ndarray]]:
    """dx [B, T, C] -> (None, (dwte [V, C], dwpe [n_positions, C])). Token ids have no gradient."""
    tokens, wte_shape, wpe_shape, pos0 = cache
    T = tokens.shape[1]
    # x = wte[tokens] + ...: every occurrence of an id adds its row of dx. np.add.at is unbuffered, so a
    # repeated id adds every time (dwte[tokens] += dx would keep only one occurrence of each id).
    dwte = np.zeros(wte_shape, dtype=dx.dtype)  # [V,C]
    np.add.at(dwte, tokens, dx)  # dwte[tokens[b, t]] += dx[b, t]
    # x = ... + wpe[pos0 + t]: each position is used once per sequence, so its gradient sums over the batch
    dwpe = np.zeros(wpe_shape, dtype=dx.dtype)  # [n_positions,C]
    dwpe[pos0 : pos0 + T] = dx.sum(axis=0)  # [T,C]
    return None, (dwte, dwpe)


# ------------------------------------------------------------------------------------------------------
# layernorm over the channels, biased variance: y = (x - mean) / sqrt(var + eps) * w + b
# ------------------------------------------------------------------------------------------------------


def layernorm_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float = 1e-5) -> tuple[np.ndarray, tuple]:
    """x [..., C], w [C], b [C] -> y [..., C]."""
    mean = x.mean(axis=-1, keepdims=True)  # [...,1]
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)  # [...,1] biased: divided by C, not C - 1
    rstd = 1.0 / np.sqrt(var + eps)  # [...,1]
    xhat = (x - mean) * rstd  # [...,C] normalised
    y = xhat * w + b  # [...,C]
    return y, (xhat, rstd, w)


def layernorm_backward(dy: np.ndarray, cache: tuple) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """dy [..., C] -> (dx [..., C], (dw [C], db [C]))."""
    xhat, rstd, w = cache
    C = dy.shape[-1]
    # y = xhat * w + b
    dw = (dy * xhat).reshape(-1, C).sum(axis=0)  # [C] summed over every row
    db = dy.reshape(-1, C).sum(axis=0)  # [C]
    dxhat = dy * w  # [...,C]
    # xhat = (x - mean) * rstd, and mean and rstd are functions of x too: dx has three terms
    # (derived step by step in docs/derivations.md#layernorm):
    #   term 1, x's own entry:      rstd * dxhat
    #   term 2, through the mean:   - rstd * mean_j(dxhat_j)
    #   term 3, through the rstd:   - rstd * xhat * mean_j(dxhat_j * xhat_j)
    dxhat_mean = dxhat.mean(axis=-1, keepdims=True)  # [...,1]
    dxhat_xhat_mean = (dxhat * xhat).mean(axis=-1, keepdims=True)  # [...,1]
    dx = rstd * (dxhat - dxhat_mean - xhat * dxhat_xhat_mean)  # [...,C] term 1 + term 2 + term 3
    return dx, (dw, db)


# ------------------------------------------------------------------------------------------------------
# linear (OpenAI's Conv1D, weight stored [in, out]): y = x @ w + b
# ------------------------------------------------------------------------------------------------------


def linear_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> tuple[np.ndarray, tuple]:
    """x [..., Cin], w [Cin, Cout], b [Cout] or None -> y [..., Cout]."""
    x2 = x.reshape(-1, x.shape[-1])  # [N,Cin], N = every leading index: one matrix product for all rows
    y2 = x2 @ w if b is None else x2 @ w + b  # [N,Cout]
    return y2.reshape(*x.shape[:-1], w.shape[1]), (x2, w, b is not None)


def linear_backward(dy: np.ndarray, cache: tuple) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray | None]]:
    """dy [..., Cout] -> (dx [..., Cin], (dw [Cin, Cout], db [Cout] or None))."""
    x2, w, has_bias = cache
    dy2 = dy.reshape(-1, dy.shape[-1])  # [N,Cout]
    # y = x @ w + b
    dx = dy2 @ w.T  # [N,Cout] @ [Cout,Cin] -> [N,Cin]
    dw = x2.T @ dy2  # [Cin,N] @ [N,Cout] -> [Cin,Cout]
    db = dy2.sum(axis=0) if has_bias else None  # [Cout]
    return dx.reshape(*dy.shape[:-1], w.shape[0]), (dw, db)


# ------------------------------------------------------------------------------------------------------
# LoRA, the low-rank update an adapted linear adds to its output (mapper/lora.py):
#   y = x @ W + b + lora(x),   lora(x) = scale * (x @ a) @ b,   a [Cin, r], b [r, Cout], scale = alpha / r
# This op is the second term alone; the model adds it to linear_forward's output.
# ------------------------------------------------------------------------------------------------------


def lora_forward(x: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float) -> tuple[np.ndarray, tuple]:
    """x [..., Cin], a [Cin, r], b [r, Cout] -> y [..., Cout] = scale * (x @ a) @ b."""
    x2 = x.reshape(-1, x.shape[-1])  # [N,Cin]
    u = x2 @ a  # [N,Cin] @ [Cin,r] -> [N,r] the input, down to rank r
    y2 = scale * (u @ b)  # [N,r] @ [r,Cout] -> [N,Cout] back up, scaled by alpha / r
    return y2.reshape(*x.shape[:-1], b.shape[1]), (x2, a, b, u, scale)


def lora_backward(dy: np.ndarray, cache: tuple) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """dy [..., Cout] -> (dx [..., Cin], (da [Cin, r], db [r, Cout]))."""
    x2, a, b, u, scale = cache
    dy2 = dy.reshape(-1, dy.shape[-1])  # [N,Cout]
    # y = scale * (u @ b)
    du = scale * (dy2 @ b.T)  # [N,Cout] @ [Cout,r] -> [N,r]
    db = scale * (u.T @ dy2)  # [r,N] @ [N,Cout] -> [r,Cout]
    # u = x @ a
    dx = du @ a.T  # [N,r] @ [r,Cin] -> [N,Cin]
    da = x2.T @ du  # [Cin,N] @ [N,r] -> [Cin,r]
    return dx.reshape(*dy.shape[:-1], a.shape[0]), (da, db)


# ------------------------------------------------------------------------------------------------------
# pooling for a classifier: each row's hidden state at one position, pooled[b] = h[b, index[b]]
# (index = lengths - 1, the last real token of a right-padded row)
# ------------------------------------------------------------------------------------------------------


def pool_forward(h: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, tuple]:
    """h [B, T, C], index int [B] (each in 0 .. T-1) -> pooled [B, C]."""
    rows = np.arange(h.shape[0])  # [B]
    pooled = h[rows, index]  # [B,C] row b read at its own position index[b] (a copy)
    return pooled, (rows, index, h.shape)


def pool_backward(dpooled: np.ndarray, cache: tuple) -> tuple[np.ndarray, tuple]:
    """dpooled [B, C] -> (dh [B, T, C], ()): zero everywhere but the position each row was read at."""
    rows, index, h_shape = cache
    # pooled = h[rows, index]: one position per row, so a plain assignment scatters (no index repeats)
    dh = np.zeros(h_shape, dtype=dpooled.dtype)  # [B,T,C] positions that were not read get no gradient
    dh[rows, index] = dpooled  # [B,C] into the read positions
    return dh, ()


# ------------------------------------------------------------------------------------------------------
# LM head, weight stored [V, C] like the token embedding it is tied to: logits = h @ w.T
# ------------------------------------------------------------------------------------------------------


def lm_head_forward(h: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, tuple]:
    """h [B, T, C], w [V, C] (wte, or lm_head when untied) -> logits [B, T, V]."""
    h2 = h.reshape(-1, h.shape[-1])  # [N,C]
    logits = h2 @ w.T  # [N,C] @ [C,V] -> [N,V]
    return logits.reshape(*h.shape[:-1], w.shape[0]), (h2, w)


def lm_head_backward(dlogits: np.ndarray, cache: tuple) -> tuple[np.ndarray, tuple[np.ndarray]]:
    """dlogits [B, T, V] -> (dh [B, T, C], (dw [V, C],))."""
    h2, w = cache
    dlogits2 = dlogits.reshape(-1, w.shape[0])  # [N,V]
    # logits = h @ w.T
    dh = dlogits2 @ w  # [N,V] @ [V,C] -> [N,C]
    dw = dlogits2.T @ h2  # [V,N] @ [N,C] -> [V,C], the orientation of w (no transposed copy to add later)
    return dh.reshape(*dlogits.shape[:-1], w.shape[1]), (dw,)


# ------------------------------------------------------------------------------------------------------
# GELU, tanh approximation (OpenAI's gelu, Hugging Face's gelu_new):
#   y = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)
# ------------------------------------------------------------------------------------------------------

GELU_SCALE = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715


def gelu_forward(x: np.ndarray) -> tuple[np.ndarray, tuple]:
    """x [...] -> y [...] (elementwise)."""
    u = GELU_SCALE * (x + GELU_CUBIC * x * x * x)  # (x * x * x: NumPy runs x**3 through a slow pow)
    tanh_u = np.tanh(u)
    y = 0.5 * x * (1.0 + tanh_u)
    return y, (x, tanh_u)


def gelu_backward(dy: np.ndarray, cache: tuple) -> tuple[np.ndarray, tuple]:
    """dy [...] -> (dx [...], ())."""
    x, tanh_u = cache
    # y = 0.5 x (1 + tanh(u)), d tanh(u)/du = 1 - tanh(u)^2
    du_dx = GELU_SCALE * (1.0 + 3.0 * GELU_CUBIC * x**2)
    dy_dx = 0.5 * (1.0 + tanh_u) + 0.5 * x * (1.0 - tanh_u**2) * du_dx
    dx = dy * dy_dx
    return dx, ()


# ------------------------------------------------------------------------------------------------------
# dropout with a given keep-mask (drawn by mapper.dropout, kept with probability 1 - p):
#   y = x * keep / (1 - p)       so E[y] = x; only while training, never in evaluation or decoding
# ------------------------------------------------------------------------------------------------------


def dropout_forward(x: np.ndarray, keep: np.ndarray, p: float) -> tuple[np.ndarray, tuple]:
    """x [...], keep bool [...] (True = kept), p in [0, 1) -> y [...]: dropped entries 0, kept ones scaled up."""
    scale = 1.0 / (1.0 - p)
    y = x * keep * scale  # [...] (a bool mask multiplies as 0 / 1)
    return y, (keep, scale)


def dropout_backward(dy: np.ndarray, cache: tuple) -> tuple[np.ndarray, tuple]:
    """dy [...] -> (dx [...], ()): the gradient flows through the kept entries, scaled the same way."""
    keep, scale = cache
    # y = x * keep * scale
    dx = dy * keep * scale
    return dx, ()


# ------------------------------------------------------------------------------------------------------
# causal multi-head self-attention on the fused qkv (softmax inside)
#   q, k, v = split(qkv) into NH heads of size hs
#   scores = q k^T / sqrt(hs), with the future (key after query) masked to -inf
#   att = softmax(scores) over the keys
#   att = dropout(att) while training with a keep-mask (attn_pdrop), else att itself
#   y = att v, the heads concatenated back to [B, T, C]
# ------------------------------------------------------------------------------------------------------


def split_heads(x: np.ndarray, n_head: int) -> np.ndarray:
    """[B, T, C] -> [B, NH, T, hs] (a view: head h is columns h*hs .. (h+1)*hs - 1)."""
    B, T, C = x.shape
    return x.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


def merge_heads(x: np.ndarray) -> np.ndarray:
    """[B, NH, T, hs] -> [B, T, C], the heads side by side (the inverse of split_heads)."""
    B, NH, T, hs = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, NH * hs)


def causal_mask(n_queries: int, n_keys: int) -> np.ndarray:
    """bool [n_queries, n_keys], True where query i may see key j.

    The queries are the last ``n_queries`` of the ``n_keys`` positions (the first n_keys - n_queries are a
    KV cache's past), so query i sits at position n_keys - n_queries + i and sees keys 0 .. that position.
    """
    past = n_keys - n_queries
    return np.arange(n_keys)[None, :] <= past + np.arange(n_queries)[:, None]


def attention_forward(
    qkv: np.ndarray,
    n_head: int,
    kv_cache: tuple[np.ndarray, np.ndarray] | None = None,
    pos0: int = 0,
    keep: np.ndarray | None = None,
    p: float = 0.0,
) -> tuple[np.ndarray, tuple]:
    """qkv [B, T, 3C] (columns q | k | v) -> y [B, T, C].

    Without a cache the queries attend to the T keys of this call. With ``kv_cache=(K, V)``, arrays
    [B, NH, T_max, hs], this call's keys and values are written at positions pos0 .. pos0+T-1 and the
    queries attend to all P + T = pos0 + T cached positions (one code path for prefill and decoding).
    ``keep`` (bool [B, NH, T, P+T]) drops attention weights with probability ``p`` (training only).
    """
    C = qkv.shape[-1] // 3
    hs = C // n_head
    q = split_heads(qkv[..., :C], n_head)  # [B,NH,T,hs]
    k = split_heads(qkv[..., C : 2 * C], n_head)  # [B,NH,T,hs]
    v = split_heads(qkv[..., 2 * C :], n_head)  # [B,NH,T,hs]
    if kv_cache is not None:
        k_cache, v_cache = kv_cache
        T = q.shape[2]
        k_cache[:, :, pos0 : pos0 + T] = k
        v_cache[:, :, pos0 : pos0 + T] = v
        k, v = k_cache[:, :, : pos0 + T], v_cache[:, :, : pos0 + T]  # [B,NH,P+T,hs]
    scores = q @ k.swapaxes(-1, -2) / math.sqrt(hs)  # [B,NH,T,hs] @ [B,NH,hs,P+T] -> [B,NH,T,P+T]
    scores = np.where(causal_mask(q.shape[2], k.shape[2]), scores, -np.inf)  # a query never sees later keys
    exp_scores = np.exp(scores - scores.max(axis=-1, keepdims=True))  # softmax, shifted for stability
    att = exp_scores / exp_scores.sum(axis=-1, keepdims=True)  # [B,NH,T,P+T] each row sums to 1
    att_kept, cache_drop = (att, None) if keep is None else dropout_forward(att, keep, p)  # [B,NH,T,P+T]
    y = att_kept @ v  # [B,NH,T,P+T] @ [B,NH,P+T,hs] -> [B,NH,T,hs]
    return merge_heads(y), (q, k, v, att, att_kept, cache_drop, kv_cache is not None)


def check_no_kv_cache(used_kv_cache: bool) -> None:
    """Refuse a backward through a forward that read a KV cache: its keys and values are partly the cache's,
    which this backward cannot differentiate (decoding has no backward; training runs without a cache)."""
    if used_kv_cache:
        raise ValueError("attention_backward: the forward used a KV cache, so the gradient of the cached keys and "
                         "values is not defined here; run the forward without kv_cache to train")


def attention_backward(dy: np.ndarray, cache: tuple) -> tuple[np.ndarray, tuple]:
    """dy [B, T, C] -> (dqkv [B, T, 3C], ()). Only after a forward without a KV cache (refused otherwise)."""
    q, k, v, att, att_kept, cache_drop, used_kv_cache = cache
    check_no_kv_cache(used_kv_cache)
    hs = q.shape[-1]
    dy_heads = split_heads(dy, q.shape[1])  # [B,NH,T,hs]
    # y = att_kept @ v
    datt_kept = dy_heads @ v.swapaxes(-1, -2)  # [B,NH,T,hs] @ [B,NH,hs,T] -> [B,NH,T,T]
    dv = att_kept.swapaxes(-1, -2) @ dy_heads  # [B,NH,T,T] @ [B,NH,T,hs] -> [B,NH,T,hs]
    # att_kept = dropout(att), or att itself
    datt = datt_kept if cache_drop is None else dropout_backward(datt_kept, cache_drop)[0]  # [B,NH,T,T]
    # att = softmax(scores): dscores_ij = att_ij (datt_ij - sum_j' att_ij' datt_ij'); masked keys have att = 0
    dscores = att * (datt - (att * datt).sum(axis=-1, keepdims=True))  # [B,NH,T,T]
    # scores = q @ k^T / sqrt(hs)
    dq = dscores @ k / math.sqrt(hs)  # [B,NH,T,T] @ [B,NH,T,hs] -> [B,NH,T,hs]
    dk = dscores.swapaxes(-1, -2) @ q / math.sqrt(hs)  # [B,NH,T,T] @ [B,NH,T,hs] -> [B,NH,T,hs]
    # q, k, v = columns of qkv
    dqkv = np.concatenate([merge_heads(dq), merge_heads(dk), merge_heads(dv)], axis=-1)  # [B,T,3C]
    return dqkv, ()


# ------------------------------------------------------------------------------------------------------
# residual: y = x + f(x). The gradient of a sum flows unchanged into both terms.
# ------------------------------------------------------------------------------------------------------


def residual_forward(x: np.ndarray, fx: np.ndarray) -> tuple[np.ndarray, tuple]:
    """x, fx [B, T, C] -> y = x + fx."""
    return x + fx, ()


def residual_backward(dy: np.ndarray, cache: tuple) -> tuple[tuple[np.ndarray, np.ndarray], tuple]:
    """dy -> ((dx, dfx), ()) with dx = dfx = dy.

    Both are one read-only view of dy: a gradient that also arrives from elsewhere must be summed into a
    new array (``dx = dx + other``); an in-place ``dx += other`` raises instead of silently changing dfx too.
    """
    d = dy.view()
    d.flags.writeable = False
    return (d, d), ()


# ------------------------------------------------------------------------------------------------------
# softmax cross-entropy, fused: loss = mean over the N kept targets of -log softmax(logits)[target]
# ------------------------------------------------------------------------------------------------------


def softmax_cross_entropy_forward(logits: np.ndarray, targets: np.ndarray) -> tuple[float, tuple]:
    """logits [B, T, V], targets [B, T] (IGNORE_INDEX = -100 is skipped) -> mean loss over the kept targets.

    Any leading shape works the same way: a classifier passes logits [B, n_classes] and labels [B].
    """
    V = logits.shape[-1]
    z = logits.reshape(-1, V)  # [N_all,V]
    t = targets.reshape(-1)  # [N_all]
    kept = np.flatnonzero(t != IGNORE_INDEX)  # rows that count
    if kept.size == 0:
        raise ValueError(f"every target is the ignore index ({IGNORE_INDEX}): there is nothing to compute a loss over")
    z_max = z.max(axis=-1, keepdims=True)  # [N_all,1] subtracted so that exp cannot overflow
    log_sum_exp = z_max + np.log(np.exp(z - z_max).sum(axis=-1, keepdims=True))  # [N_all,1]
    probs = np.exp(z - log_sum_exp)  # [N_all,V] softmax(z)
    nll = log_sum_exp[kept, 0] - z[kept, t[kept]]  # -log softmax(z)[t]; no log(0) even when p[t] underflows
    loss = nll.sum() / kept.size
    return float(loss), (probs, t, kept, logits.shape)


def softmax_cross_entropy_backward(dloss: float, cache: tuple) -> tuple[np.ndarray, tuple]:
    """dloss (1.0 for the loss itself) -> (dlogits [B, T, V], ()):
    dlogits = dloss * (softmax - onehot(target)) / N on the kept rows, 0 on ignored rows."""
    probs, t, kept, shape = cache
    # loss = (1/N) sum over kept rows of -log softmax(z)[t]
    dz = np.zeros_like(probs)  # [N_all,V]; ignored rows stay 0
    dz[kept] = probs[kept]  # softmax(z)
    dz[kept, t[kept]] -= 1.0  # - onehot(t)
    dz *= dloss / kept.size  # the 1/N of the mean (N = number of kept targets)
    return dz.reshape(shape), ()
