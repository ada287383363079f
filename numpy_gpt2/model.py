"""The GPT-2 model in NumPy: forward top-down, backward in exact reverse order.

    x = wte[tokens] + wpe[positions]                      # embedding        [B,T,C]
    for each block i:
        x = x + c_proj(attention(c_attn(ln_1(x))))        # attention branch
        x = x + mlp.c_proj(gelu(mlp.c_fc(ln_2(x))))       # MLP branch
    logits = ln_f(x) @ wte.T                              # tied head        [B,T,V]
    (with an untied head: ln_f(x) @ lm_head.T)

Parameters: the canonical dict of ``mapper.schema`` (Conv1D [in, out] weights). Their dtype decides the
arithmetic (float32 or float64).
"""

from __future__ import annotations

import numpy as np

from mapper.config import GPT2Config
from mapper.schema import validate_params
from numpy_gpt2 import ops

# ------------------------------------------------------------------------------------------------------
# input checks: every bad input is a ValueError that names the numbers; nothing is clipped silently
# ------------------------------------------------------------------------------------------------------


def check_tokens(tokens: np.ndarray, config: GPT2Config, name: str = "tokens", pos0: int = 0) -> np.ndarray:
    """Return ``tokens`` as an int64 [B, T] array after checking dtype, shape, range and length."""
    arr = np.asarray(tokens)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be an integer array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape [B, T], got shape {arr.shape}")
    B, T = arr.shape
    if B == 0 or T == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    if pos0 + T > config.n_positions:
        raise ValueError(
            f"sequence of length {pos0 + T} exceeds the model's context of n_positions={config.n_positions}"
        )
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= config.vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} holds id {bad}, outside the vocabulary [0, {config.vocab_size})")
    return arr.astype(np.int64, copy=False)


def check_targets(targets: np.ndarray, tokens: np.ndarray, config: GPT2Config) -> np.ndarray:
    """Targets: integer [B, T] like ``tokens``; each id in [0, V) or -100 (ignored)."""
    arr = np.asarray(targets)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"targets must be an integer array, got dtype {arr.dtype}")
    if arr.shape != tokens.shape:
        raise ValueError(f"targets have shape {arr.shape}, tokens have shape {tokens.shape}; they must match")
    bad = (arr != ops.IGNORE_INDEX) & ((arr < 0) | (arr >= config.vocab_size))
    if bad.any():
        raise ValueError(
            f"targets hold id {int(arr[bad][0])}, outside the vocabulary [0, {config.vocab_size}) "
            f"and not the ignore index {ops.IGNORE_INDEX}"
        )
    return arr.astype(np.int64, copy=False)


# ------------------------------------------------------------------------------------------------------
# one transformer block
# ------------------------------------------------------------------------------------------------------


def block_forward(
    x: np.ndarray,
    params: dict[str, np.ndarray],
    i: int,
    config: GPT2Config,
    kv_cache: tuple[np.ndarray, np.ndarray] | None = None,
    pos0: int = 0,
) -> tuple[np.ndarray, tuple]:
    """x [B, T, C] -> x [B, T, C] through block ``i`` (pre-LN attention, then pre-LN MLP)."""
    p = f"h.{i}."
    eps = config.layer_norm_epsilon
    ln1, c_ln1 = ops.layernorm_forward(x, params[p + "ln_1.weight"], params[p + "ln_1.bias"], eps)
    qkv, c_qkv = ops.linear_forward(ln1, params[p + "attn.c_attn.weight"], params[p + "attn.c_attn.bias"])  # [B,T,3C]
    att, c_att = ops.attention_forward(qkv, config.n_head, kv_cache, pos0)  # [B,T,C]
    proj, c_proj = ops.linear_forward(att, params[p + "attn.c_proj.weight"], params[p + "attn.c_proj.bias"])
    x1, _ = ops.residual_forward(x, proj)
    ln2, c_ln2 = ops.layernorm_forward(x1, params[p + "ln_2.weight"], params[p + "ln_2.bias"], eps)
    fc, c_fc = ops.linear_forward(ln2, params[p + "mlp.c_fc.weight"], params[p + "mlp.c_fc.bias"])  # [B,T,4C]
    act, c_gelu = ops.gelu_forward(fc)
    mlp, c_mlp = ops.linear_forward(act, params[p + "mlp.c_proj.weight"], params[p + "mlp.c_proj.bias"])  # [B,T,C]
    x2, _ = ops.residual_forward(x1, mlp)
    return x2, (c_ln1, c_qkv, c_att, c_proj, c_ln2, c_fc, c_gelu, c_mlp)


def block_backward(dx2: np.ndarray, cache: tuple, grads: dict[str, np.ndarray], i: int) -> np.ndarray:
    """dx2 [B, T, C] -> dx [B, T, C]; writes block ``i``'s parameter gradients into ``grads``."""
    c_ln1, c_qkv, c_att, c_proj, c_ln2, c_fc, c_gelu, c_mlp = cache
    p = f"h.{i}."

    def g(*names: str) -> tuple[np.ndarray, ...]:
        return tuple(grads[p + n] for n in names)

    # x2 = x1 + mlp
    (dx1, dmlp), _ = ops.residual_backward(dx2, None)
    dact, _ = ops.linear_backward(dmlp, c_mlp, out=g("mlp.c_proj.weight", "mlp.c_proj.bias"))
    dfc, _ = ops.gelu_backward(dact, c_gelu)
    dln2, _ = ops.linear_backward(dfc, c_fc, out=g("mlp.c_fc.weight", "mlp.c_fc.bias"))
    dx1_ln, _ = ops.layernorm_backward(dln2, c_ln2, out=g("ln_2.weight", "ln_2.bias"))
    dx1 = dx1 + dx1_ln  # x1 feeds both the residual and ln_2: the two gradients add
    # x1 = x + proj
    (dx, dproj), _ = ops.residual_backward(dx1, None)
    datt, _ = ops.linear_backward(dproj, c_proj, out=g("attn.c_proj.weight", "attn.c_proj.bias"))
    dqkv, _ = ops.attention_backward(datt, c_att)
    dln1, _ = ops.linear_backward(dqkv, c_qkv, out=g("attn.c_attn.weight", "attn.c_attn.bias"))
    dx_ln, _ = ops.layernorm_backward(dln1, c_ln1, out=g("ln_1.weight", "ln_1.bias"))
    dx += dx_ln  # x feeds both the residual and ln_1 (dx is dx1's buffer, no longer needed)
    return dx


# ------------------------------------------------------------------------------------------------------
# the whole model
# ------------------------------------------------------------------------------------------------------


def head_weight(params: dict[str, np.ndarray]) -> np.ndarray:
    """The LM head as an [in, out] = [C, V] matrix: wte.T when tied, lm_head.T when untied (views)."""
    return params.get("lm_head.weight", params["wte.weight"]).T


def model_forward(
    params: dict[str, np.ndarray],
    config: GPT2Config,
    tokens: np.ndarray,
    keep_caches: bool = False,
    kv_caches: list[tuple[np.ndarray, np.ndarray]] | None = None,
    pos0: int = 0,
    last_only: bool = False,
) -> tuple[np.ndarray, tuple | None]:
    """tokens [B, T] (checked) -> logits [B, T, V] (or [B, 1, V] with ``last_only``), plus caches for backward.

    ``kv_caches``: one (K, V) pair of [B, NH, T_max, hs] arrays per layer for incremental decoding,
    with this call's tokens at positions pos0.. pos0+T-1.
    """
    x, c_emb = ops.embedding_forward(tokens, params["wte.weight"], params["wpe.weight"], pos0)  # [B,T,C]
    block_caches = []
    for i in range(config.n_layer):
        x, c_block = block_forward(x, params, i, config, None if kv_caches is None else kv_caches[i], pos0)
        if keep_caches:
            block_caches.append(c_block)
    if last_only:
        x = x[:, -1:]  # only the next-token prediction is needed when decoding
    h, c_lnf = ops.layernorm_forward(x, params["ln_f.weight"], params["ln_f.bias"], config.layer_norm_epsilon)
    # logits = h @ wte.T: a linear layer whose [in, out] weight is wte.T, no bias   [B,T,C] -> [B,T,V]
    logits, c_head = ops.linear_forward(h, head_weight(params), None)
    caches = (c_emb, block_caches, c_lnf, c_head) if keep_caches else None
    return logits, caches


def model_backward(
    dlogits: np.ndarray, caches: tuple, params: dict[str, np.ndarray], config: GPT2Config, grads: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """dlogits [B, T, V] -> gradients of every parameter, written into ``grads`` (same keys as params)."""
    c_emb, block_caches, c_lnf, c_head = caches
    tied = "lm_head.weight" not in params
    dwte = grads["wte.weight"]
    dhead = dwte if tied else grads["lm_head.weight"]
    # logits = h @ head.T  ->  dh = dlogits @ head,  dhead.T = h.T @ dlogits (the first write into dwte)
    dh, _ = ops.linear_backward(dlogits, c_head, out=(dhead.T, None))
    dx, _ = ops.layernorm_backward(dh, c_lnf, out=(grads["ln_f.weight"], grads["ln_f.bias"]))
    for i in reversed(range(config.n_layer)):
        dx = block_backward(dx, block_caches[i], grads, i)
    if not tied:
        dwte[...] = 0.0
    grads["wpe.weight"][...] = 0.0
    # x = wte[tokens] + wpe[...]: accumulates into dwte on top of the head's contribution (tied weights)
    ops.embedding_backward(dx, c_emb, out=(dwte, grads["wpe.weight"]))
    return grads


def forward(params: dict[str, np.ndarray], config: GPT2Config, tokens: np.ndarray) -> np.ndarray:
    """Logits [B, T, V] for int tokens [B, T] (dtype of the parameters)."""
    validate_params(params, config)
    tokens = check_tokens(tokens, config)
    logits, _ = model_forward(params, config, tokens)
    return logits


def loss(params: dict[str, np.ndarray], config: GPT2Config, tokens: np.ndarray, targets: np.ndarray) -> float:
    """Mean cross-entropy of ``targets`` [B, T] (already shifted; -100 ignored), forward only."""
    validate_params(params, config)
    tokens = check_tokens(tokens, config)
    targets = check_targets(targets, tokens, config)
    logits, _ = model_forward(params, config, tokens)
    return ops.softmax_cross_entropy_forward(logits, targets)[0]


def empty_grads(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Gradient buffers shaped like ``params``, to pass to ``loss_and_grads(grads=...)`` step after step."""
    return {k: np.empty_like(v) for k, v in params.items()}


def loss_and_grads(
    params: dict[str, np.ndarray],
    config: GPT2Config,
    tokens: np.ndarray,
    targets: np.ndarray,
    grads: dict[str, np.ndarray] | None = None,
) -> tuple[float, dict[str, np.ndarray]]:
    """Mean cross-entropy of ``targets`` [B, T] (already shifted; -100 ignored) and its gradient.

    Returns ``(loss, grads)`` with a gradient for every parameter (the tied ``wte`` gets the head's and
    the embedding's contributions). ``grads`` may be a dict from ``empty_grads`` to reuse (overwritten).
    """
    validate_params(params, config)
    tokens = check_tokens(tokens, config)
    targets = check_targets(targets, tokens, config)
    logits, caches = model_forward(params, config, tokens, keep_caches=True)
    mean_loss, c_loss = ops.softmax_cross_entropy_forward(logits, targets)
    del logits  # the loss cache holds the probabilities; the backward reuses that buffer
    dlogits = ops.softmax_cross_entropy_backward(c_loss)
    if grads is None:
        grads = empty_grads(params)
    model_backward(dlogits, caches, params, config, grads)
    return mean_loss, grads
