"""The GPT-2 model in NumPy: forward top-down, backward in exact reverse order.

    x = wte[tokens] + wpe[positions]                      # embedding        [B,T,C]
    for each block i:
        x = x + c_proj(attention(c_attn(ln_1(x))))        # attention branch
        x = x + mlp.c_proj(gelu(mlp.c_fc(ln_2(x))))       # MLP branch
    logits = ln_f(x) @ wte.T                              # tied head        [B,T,V]
    (with an untied head: ln_f(x) @ lm_head.T)

Parameters: the canonical dict of ``mapper.schema`` (Conv1D [in, out] weights). Their dtype decides the
arithmetic (float32 or float64). Every public function takes ``fast``: False runs the spec ops of
``numpy_gpt2/ops.py``, True the measured speed-ups of ``numpy_gpt2/fast.py`` (same results up to rounding).
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from mapper.config import GPT2Config
from mapper.schema import BLOCK_PARAMS, validate_params
from mapper.tokens import check_targets, check_tokens
from numpy_gpt2 import ops


def kernels(fast: bool) -> ModuleType:
    """The module whose ``*_forward`` / ``*_backward`` functions the model calls: the spec or the fast path."""
    if not fast:
        return ops
    from numpy_gpt2 import fast as fast_ops

    return fast_ops


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
    fast: bool = False,
) -> tuple[np.ndarray, tuple]:
    """x [B, T, C] -> x [B, T, C] through block ``i`` (pre-LN attention, then pre-LN MLP)."""
    k = kernels(fast)
    p = {name: params[f"h.{i}.{name}"] for name in BLOCK_PARAMS}
    eps = config.layer_norm_epsilon
    ln1, cache_ln1 = k.layernorm_forward(x, p["ln_1.weight"], p["ln_1.bias"], eps)  # [B,T,C]
    qkv, cache_qkv = k.linear_forward(ln1, p["attn.c_attn.weight"], p["attn.c_attn.bias"])  # [B,T,3C]
    att, cache_att = k.attention_forward(qkv, config.n_head, kv_cache, pos0)  # [B,T,C]
    proj, cache_proj = k.linear_forward(att, p["attn.c_proj.weight"], p["attn.c_proj.bias"])  # [B,T,C]
    x1, _ = k.residual_forward(x, proj)  # [B,T,C]
    ln2, cache_ln2 = k.layernorm_forward(x1, p["ln_2.weight"], p["ln_2.bias"], eps)  # [B,T,C]
    fc, cache_fc = k.linear_forward(ln2, p["mlp.c_fc.weight"], p["mlp.c_fc.bias"])  # [B,T,4C]
    act, cache_gelu = k.gelu_forward(fc)  # [B,T,4C]
    mlp, cache_mlp = k.linear_forward(act, p["mlp.c_proj.weight"], p["mlp.c_proj.bias"])  # [B,T,C]
    x2, _ = k.residual_forward(x1, mlp)  # [B,T,C]
    return x2, (cache_ln1, cache_qkv, cache_att, cache_proj, cache_ln2, cache_fc, cache_gelu, cache_mlp)


def block_backward(dx2: np.ndarray, cache: tuple, i: int, fast: bool = False) -> tuple[np.ndarray, dict]:
    """dx2 [B, T, C] -> (dx [B, T, C], the gradients of block ``i``'s parameters keyed by canonical name)."""
    k = kernels(fast)
    cache_ln1, cache_qkv, cache_att, cache_proj, cache_ln2, cache_fc, cache_gelu, cache_mlp = cache
    g: dict[str, np.ndarray] = {}
    # x2 = x1 + mlp
    (dx1, dmlp), _ = k.residual_backward(dx2, ())
    dact, (g["mlp.c_proj.weight"], g["mlp.c_proj.bias"]) = k.linear_backward(dmlp, cache_mlp)
    dfc, _ = k.gelu_backward(dact, cache_gelu)
    dln2, (g["mlp.c_fc.weight"], g["mlp.c_fc.bias"]) = k.linear_backward(dfc, cache_fc)
    dx1_ln2, (g["ln_2.weight"], g["ln_2.bias"]) = k.layernorm_backward(dln2, cache_ln2)
    dx1 = dx1 + dx1_ln2  # x1 feeds both the residual and ln_2: the two gradients add
    # x1 = x + proj
    (dx, dproj), _ = k.residual_backward(dx1, ())
    datt, (g["attn.c_proj.weight"], g["attn.c_proj.bias"]) = k.linear_backward(dproj, cache_proj)
    dqkv, _ = k.attention_backward(datt, cache_att)
    dln1, (g["attn.c_attn.weight"], g["attn.c_attn.bias"]) = k.linear_backward(dqkv, cache_qkv)
    dx_ln1, (g["ln_1.weight"], g["ln_1.bias"]) = k.layernorm_backward(dln1, cache_ln1)
    dx = dx + dx_ln1  # x feeds both the residual and ln_1
    return dx, {f"h.{i}.{name}": grad for name, grad in g.items()}


# ------------------------------------------------------------------------------------------------------
# the whole model
# ------------------------------------------------------------------------------------------------------


def model_forward(
    params: dict[str, np.ndarray],
    config: GPT2Config,
    tokens: np.ndarray,
    keep_caches: bool = False,
    kv_caches: list[tuple[np.ndarray, np.ndarray]] | None = None,
    pos0: int = 0,
    last_only: bool = False,
    fast: bool = False,
) -> tuple[np.ndarray, tuple | None]:
    """tokens [B, T] (checked) -> logits [B, T, V] (or [B, 1, V] with ``last_only``), plus caches for backward.

    ``kv_caches``: one (K, V) pair of [B, NH, T_max, hs] arrays per layer for incremental decoding,
    with this call's tokens at positions pos0 .. pos0+T-1.
    """
    k = kernels(fast)
    x, cache_emb = k.embedding_forward(tokens, params["wte.weight"], params["wpe.weight"], pos0)  # [B,T,C]
    block_caches = []
    for i in range(config.n_layer):
        x, cache_block = block_forward(x, params, i, config, None if kv_caches is None else kv_caches[i], pos0, fast)
        if keep_caches:
            block_caches.append(cache_block)
    if last_only:
        x = x[:, -1:]  # decoding needs only the next-token prediction
    h, cache_lnf = k.layernorm_forward(x, params["ln_f.weight"], params["ln_f.bias"], config.layer_norm_epsilon)
    head = params.get("lm_head.weight", params["wte.weight"])  # [V,C]: wte when tied
    logits, cache_head = k.lm_head_forward(h, head)  # logits = h @ head.T   [B,T,C] -> [B,T,V]
    caches = (cache_emb, block_caches, cache_lnf, cache_head) if keep_caches else None
    return logits, caches


def model_backward(
    dlogits: np.ndarray, caches: tuple, params: dict[str, np.ndarray], config: GPT2Config, fast: bool = False
) -> dict[str, np.ndarray]:
    """dlogits [B, T, V] -> the gradient of every parameter, keyed and ordered like ``params``."""
    k = kernels(fast)
    cache_emb, block_caches, cache_lnf, cache_head = caches
    grads: dict[str, np.ndarray] = {}
    dh, (dhead,) = k.lm_head_backward(dlogits, cache_head)  # dhead [V,C]
    dx, (grads["ln_f.weight"], grads["ln_f.bias"]) = k.layernorm_backward(dh, cache_lnf)
    for i in reversed(range(config.n_layer)):
        dx, block_grads = block_backward(dx, block_caches[i], i, fast)
        grads.update(block_grads)
    # x = wte[tokens] + wpe[positions]
    _, (dwte, grads["wpe.weight"]) = k.embedding_backward(dx, cache_emb)
    if "lm_head.weight" in params:
        grads["wte.weight"], grads["lm_head.weight"] = dwte, dhead
    else:
        grads["wte.weight"] = dwte + dhead  # the tied matrix is used twice: both gradients add
    return {name: grads[name] for name in params}


def forward(params: dict[str, np.ndarray], config: GPT2Config, tokens: np.ndarray, fast: bool = False) -> np.ndarray:
    """Logits [B, T, V] for int tokens [B, T] (dtype of the parameters)."""
    validate_params(params, config)
    tokens = check_tokens(tokens, config)
    logits, _ = model_forward(params, config, tokens, fast=fast)
    return logits


def loss(
    params: dict[str, np.ndarray], config: GPT2Config, tokens: np.ndarray, targets: np.ndarray, fast: bool = False
) -> float:
    """Mean cross-entropy of ``targets`` [B, T] (already shifted; -100 ignored), forward only."""
    validate_params(params, config)
    tokens = check_tokens(tokens, config)
    targets = check_targets(targets, tokens.shape, config)
    logits, _ = model_forward(params, config, tokens, fast=fast)
    return kernels(fast).softmax_cross_entropy_forward(logits, targets)[0]


def loss_and_grads(
    params: dict[str, np.ndarray], config: GPT2Config, tokens: np.ndarray, targets: np.ndarray, fast: bool = False
) -> tuple[float, dict[str, np.ndarray]]:
    """Mean cross-entropy of ``targets`` [B, T] (already shifted; -100 ignored) and its gradient.

    Returns ``(loss, grads)`` with a gradient for every parameter, keyed like ``params`` (the tied ``wte``
    gets the LM head's and the embedding's contributions).
    """
    validate_params(params, config)
    tokens = check_tokens(tokens, config)
    targets = check_targets(targets, tokens.shape, config)
    k = kernels(fast)
    logits, caches = model_forward(params, config, tokens, keep_caches=True, fast=fast)
    mean_loss, cache_loss = k.softmax_cross_entropy_forward(logits, targets)
    del logits  # the loss cache keeps what the backward needs
    dlogits = k.softmax_cross_entropy_backward(cache_loss)
    return mean_loss, model_backward(dlogits, caches, params, config, fast)
