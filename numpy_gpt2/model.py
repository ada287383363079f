"""The GPT-2 model in NumPy: forward top-down, backward in exact reverse order.

    x = drop(wte[tokens] + wpe[positions])                  # embedding        [B,T,C]
    for each block i:
        x = x + drop(c_proj(attention(c_attn(ln_1(x)))))    # attention branch (dropout on its weights too)
        x = x + drop(mlp.c_proj(gelu(mlp.c_fc(ln_2(x)))))   # MLP branch
    h = ln_f(x)                                             # final norm       [B,T,C]
    logits = h @ wte.T                                      # tied head        [B,T,V]
    (with an untied head: h @ lm_head.T)
    classifier: class_logits = h[b, lengths[b] - 1] @ score.weight    # last real token [B,C] -> [B,n_classes]

Every linear of a block is ``x @ W + b``, plus ``scale * (x @ A) @ B`` when ``lora`` (a ``mapper.LoraConfig``)
adapts it; its parameters then hold the adapters ``h.{i}.<layer>.lora_A`` / ``lora_B`` (``mapper/lora.py``).
Gradients are returned for every parameter, adapters and base weights alike: freezing the base is the
optimizer's business (give it only the tensors to train). A head the loss does not use gets a zero gradient
(``score.weight`` under the LM loss, an untied ``lm_head.weight`` under the classification loss).

``drop`` is dropout, only when a training call passes ``dropout_masks`` (a ``mapper.dropout.DropoutMasks`` for this
batch; the probabilities are the config's): the spec never draws random numbers itself, so a given set of masks
gives one exact result, which finite differences can check and the torch engine can be compared with. Without
masks (evaluation, decoding, and every model whose probabilities are 0) nothing is dropped.

Two kinds of function. The public ones check their inputs and return results: ``forward`` (logits), ``loss``,
``loss_and_grads``, ``classify`` (class logits), ``classify_loss``, ``classify_loss_and_grads``. The pairs
``block_forward`` / ``block_backward``, ``body_*``, ``lm_*`` (the language model) and ``classifier_*`` take
already-checked inputs and return caches for the backward, like the ops they are made of.

Parameters: the canonical dict of ``mapper.schema`` (Conv1D [in, out] weights). Their dtype decides the
arithmetic (float32 or float64). Every public function takes ``fast``: False runs the spec ops of
``numpy_gpt2/ops.py``, True the measured speed-ups of ``numpy_gpt2/fast.py`` (same results up to rounding).
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from mapper.checkpoint import load_checkpoint
from mapper.config import GPT2Config
from mapper.dropout import DropoutMasks, check_dropout_masks
from mapper.lora import LoraConfig
from mapper.schema import block_param_names, validate_params
from mapper.tokens import check_labels, check_lengths, check_targets, check_tokens
from numpy_gpt2 import fast as fast_kernels
from numpy_gpt2 import ops as spec_kernels


def kernels(fast: bool) -> ModuleType:
    """The module whose ``*_forward`` / ``*_backward`` functions the model calls: the spec (``numpy_gpt2/ops.py``)
    or its measured speed-ups (``numpy_gpt2/fast.py``)."""
    return fast_kernels if fast else spec_kernels


# ------------------------------------------------------------------------------------------------------
# a linear layer with an optional LoRA adapter: y = x @ W + b (+ scale * (x @ A) @ B)
# ------------------------------------------------------------------------------------------------------


def adapted_linear_forward(
    ops: ModuleType, x: np.ndarray, p: dict[str, np.ndarray], layer: str, lora_scale: float
) -> tuple[np.ndarray, tuple]:
    """x [..., Cin] -> y [..., Cout] through ``layer`` of the block parameters ``p`` (its adapter if ``p`` has one)."""
    y, cache_linear = ops.linear_forward(x, p[f"{layer}.weight"], p.get(f"{layer}.bias"))  # x @ W + b (b may be absent)
    if f"{layer}.lora_A" not in p:
        return y, (cache_linear, None)
    delta, cache_lora = ops.lora_forward(x, p[f"{layer}.lora_A"], p[f"{layer}.lora_B"], lora_scale)  # scale (x A) B
    return y + delta, (cache_linear, cache_lora)


def adapted_linear_backward(
    ops: ModuleType, dy: np.ndarray, cache: tuple, layer: str, g: dict[str, np.ndarray]
) -> np.ndarray:
    """dy [..., Cout] -> dx [..., Cin]; the layer's parameter gradients are stored into ``g``."""
    cache_linear, cache_lora = cache
    # y = (x @ W + b) + lora(x): dy reaches both terms unchanged
    dx, (g[f"{layer}.weight"], dbias) = ops.linear_backward(dy, cache_linear)
    if dbias is not None:
        g[f"{layer}.bias"] = dbias
    if cache_lora is not None:
        dx_lora, (g[f"{layer}.lora_A"], g[f"{layer}.lora_B"]) = ops.lora_backward(dy, cache_lora)
        dx = dx + dx_lora  # x feeds both terms: the two gradients add
    return dx


# ------------------------------------------------------------------------------------------------------
# dropout where a keep-mask is given: y = x * keep / (1 - p); y = x where there is none
# ------------------------------------------------------------------------------------------------------


def optional_dropout_forward(ops: ModuleType, x: np.ndarray, keep: np.ndarray | None, p: float
                             ) -> tuple[np.ndarray, tuple | None]:
    """x [...] -> y [...]: ``ops.dropout_forward`` with ``keep``, or x itself (cache None) without a mask."""
    return (x, None) if keep is None else ops.dropout_forward(x, keep, p)


def optional_dropout_backward(ops: ModuleType, dy: np.ndarray, cache: tuple | None) -> np.ndarray:
    """dy [...] -> dx [...] through :func:`optional_dropout_forward`."""
    return dy if cache is None else ops.dropout_backward(dy, cache)[0]


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
    lora: LoraConfig | None = None,
    keep: tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None] | None = None,
) -> tuple[np.ndarray, tuple]:
    """x [B, T, C] -> x [B, T, C] through block ``i`` (pre-LN attention, then pre-LN MLP); ``keep``: the dropout
    masks of the attention weights, the attention branch and the MLP branch (``DropoutMasks.layer(i)``)."""
    ops = kernels(fast)
    keep_att, keep_proj, keep_mlp = (None, None, None) if keep is None else keep
    names = block_param_names(config)
    if lora is not None:
        names = (*names, *(f"{m}.lora_{ab}" for m in lora.layers for ab in "AB"))
    p = {name: params[f"h.{i}.{name}"] for name in names}
    s = 0.0 if lora is None else lora.scale
    eps = config.layer_norm_epsilon
    ln1, cache_ln1 = ops.layernorm_forward(x, p["ln_1.weight"], p["ln_1.bias"], eps)  # [B,T,C]
    qkv, cache_qkv = adapted_linear_forward(ops, ln1, p, "attn.c_attn", s)  # [B,T,3C]
    att, cache_att = ops.attention_forward(qkv, config.n_head, kv_cache, pos0, keep_att, config.attn_pdrop)  # [B,T,C]
    proj, cache_proj = adapted_linear_forward(ops, att, p, "attn.c_proj", s)  # [B,T,C]
    proj, cache_proj_drop = optional_dropout_forward(ops, proj, keep_proj, config.resid_pdrop)  # [B,T,C]
    x1, _ = ops.residual_forward(x, proj)  # [B,T,C]
    ln2, cache_ln2 = ops.layernorm_forward(x1, p["ln_2.weight"], p["ln_2.bias"], eps)  # [B,T,C]
    fc, cache_fc = adapted_linear_forward(ops, ln2, p, "mlp.c_fc", s)  # [B,T,4C]
    act, cache_gelu = ops.gelu_forward(fc)  # [B,T,4C]
    mlp, cache_mlp = adapted_linear_forward(ops, act, p, "mlp.c_proj", s)  # [B,T,C]
    mlp, cache_mlp_drop = optional_dropout_forward(ops, mlp, keep_mlp, config.resid_pdrop)  # [B,T,C]
    x2, _ = ops.residual_forward(x1, mlp)  # [B,T,C]
    return x2, (cache_ln1, cache_qkv, cache_att, cache_proj, cache_proj_drop, cache_ln2, cache_fc, cache_gelu,
                cache_mlp, cache_mlp_drop)


def block_backward(dx2: np.ndarray, cache: tuple, i: int, fast: bool = False) -> tuple[np.ndarray, dict]:
    """dx2 [B, T, C] -> (dx [B, T, C], the gradients of block ``i``'s parameters keyed by canonical name)."""
    ops = kernels(fast)
    (cache_ln1, cache_qkv, cache_att, cache_proj, cache_proj_drop, cache_ln2, cache_fc, cache_gelu, cache_mlp,
     cache_mlp_drop) = cache
    g: dict[str, np.ndarray] = {}
    # x2 = x1 + mlp
    (dx1, dmlp), _ = ops.residual_backward(dx2, ())
    dmlp = optional_dropout_backward(ops, dmlp, cache_mlp_drop)
    dact = adapted_linear_backward(ops, dmlp, cache_mlp, "mlp.c_proj", g)
    dfc, _ = ops.gelu_backward(dact, cache_gelu)
    dln2 = adapted_linear_backward(ops, dfc, cache_fc, "mlp.c_fc", g)
    dx1_ln2, (g["ln_2.weight"], g["ln_2.bias"]) = ops.layernorm_backward(dln2, cache_ln2)
    dx1 = dx1 + dx1_ln2  # x1 feeds both the residual and ln_2: the two gradients add
    # x1 = x + proj
    (dx, dproj), _ = ops.residual_backward(dx1, ())
    dproj = optional_dropout_backward(ops, dproj, cache_proj_drop)
    datt = adapted_linear_backward(ops, dproj, cache_proj, "attn.c_proj", g)
    dqkv, _ = ops.attention_backward(datt, cache_att)
    dln1 = adapted_linear_backward(ops, dqkv, cache_qkv, "attn.c_attn", g)
    dx_ln1, (g["ln_1.weight"], g["ln_1.bias"]) = ops.layernorm_backward(dln1, cache_ln1)
    dx = dx + dx_ln1  # x feeds both the residual and ln_1
    return dx, {f"h.{i}.{name}": grad for name, grad in g.items()}


# ------------------------------------------------------------------------------------------------------
# the body: embeddings, blocks, final LayerNorm (shared by the LM head and the classifier)
# ------------------------------------------------------------------------------------------------------


def body_forward(
    params: dict[str, np.ndarray],
    config: GPT2Config,
    tokens: np.ndarray,
    keep_caches: bool = False,
    kv_caches: list[tuple[np.ndarray, np.ndarray]] | None = None,
    pos0: int = 0,
    last_only: bool = False,
    fast: bool = False,
    lora: LoraConfig | None = None,
    dropout_masks: DropoutMasks | None = None,
) -> tuple[np.ndarray, tuple | None]:
    """tokens [B, T] -> h = ln_f(last block's output) [B, T, C] (or [B, 1, C] with ``last_only``), plus caches.
    ``dropout_masks``: this batch's keep-masks while training (none: nothing is dropped)."""
    ops = kernels(fast)
    x, cache_emb = ops.embedding_forward(tokens, params["wte.weight"], params["wpe.weight"], pos0)  # [B,T,C]
    keep_embd = None if dropout_masks is None else dropout_masks.embd
    x, cache_emb_drop = optional_dropout_forward(ops, x, keep_embd, config.embd_pdrop)  # [B,T,C]
    block_caches = []
    for i in range(config.n_layer):
        kv = None if kv_caches is None else kv_caches[i]
        keep = None if dropout_masks is None else dropout_masks.layer(i)
        x, cache_block = block_forward(x, params, i, config, kv, pos0, fast, lora, keep)
        if keep_caches:
            block_caches.append(cache_block)
    if last_only:
        x = x[:, -1:]  # decoding needs only the next-token prediction
    h, cache_lnf = ops.layernorm_forward(x, params["ln_f.weight"], params["ln_f.bias"], config.layer_norm_epsilon)
    return h, ((cache_emb, cache_emb_drop, block_caches, cache_lnf) if keep_caches else None)


def body_backward(dh: np.ndarray, caches: tuple, config: GPT2Config, fast: bool = False) -> dict[str, np.ndarray]:
    """dh [B, T, C] -> the gradients of the body's parameters; ``wte.weight`` gets the embedding's part only."""
    ops = kernels(fast)
    cache_emb, cache_emb_drop, block_caches, cache_lnf = caches
    grads: dict[str, np.ndarray] = {}
    dx, (grads["ln_f.weight"], grads["ln_f.bias"]) = ops.layernorm_backward(dh, cache_lnf)
    for i in reversed(range(config.n_layer)):
        dx, block_grads = block_backward(dx, block_caches[i], i, fast)
        grads.update(block_grads)
    dx = optional_dropout_backward(ops, dx, cache_emb_drop)
    # x = wte[tokens] + wpe[positions]
    _, (grads["wte.weight"], grads["wpe.weight"]) = ops.embedding_backward(dx, cache_emb)
    return grads


# ------------------------------------------------------------------------------------------------------
# the language model
# ------------------------------------------------------------------------------------------------------


def lm_forward(
    params: dict[str, np.ndarray],
    config: GPT2Config,
    tokens: np.ndarray,
    keep_caches: bool = False,
    kv_caches: list[tuple[np.ndarray, np.ndarray]] | None = None,
    pos0: int = 0,
    last_only: bool = False,
    fast: bool = False,
    lora: LoraConfig | None = None,
    dropout_masks: DropoutMasks | None = None,
) -> tuple[np.ndarray, tuple | None]:
    """tokens [B, T] (checked) -> logits [B, T, V] (or [B, 1, V] with ``last_only``), plus caches for backward.

    ``kv_caches``: one (K, V) pair of [B, NH, T_max, hs] arrays per layer for incremental decoding,
    with this call's tokens at positions pos0 .. pos0+T-1. ``dropout_masks``: keep-masks while training.
    """
    ops = kernels(fast)
    h, cache_body = body_forward(params, config, tokens, keep_caches, kv_caches, pos0, last_only, fast, lora,
                                 dropout_masks)
    head = params.get("lm_head.weight", params["wte.weight"])  # [V,C]: wte when tied
    logits, cache_head = ops.lm_head_forward(h, head)  # logits = h @ head.T   [B,T,C] -> [B,T,V]
    return logits, ((cache_body, cache_head) if keep_caches else None)


def lm_backward(
    dlogits: np.ndarray, caches: tuple, params: dict[str, np.ndarray], config: GPT2Config, fast: bool = False
) -> dict[str, np.ndarray]:
    """dlogits [B, T, V] -> the gradient of every parameter, keyed and ordered like ``params``."""
    ops = kernels(fast)
    cache_body, cache_head = caches
    dh, (dhead,) = ops.lm_head_backward(dlogits, cache_head)  # dhead [V,C]
    grads = body_backward(dh, cache_body, config, fast)
    if "lm_head.weight" in params:
        grads["lm_head.weight"] = dhead
    else:
        grads["wte.weight"] = grads["wte.weight"] + dhead  # the tied matrix is used twice: both gradients add
    if "score.weight" in params:
        grads["score.weight"] = np.zeros_like(params["score.weight"])  # the classifier takes no part in this loss
    return {name: grads[name] for name in params}


def forward(
    params: dict[str, np.ndarray],
    config: GPT2Config,
    tokens: np.ndarray,
    fast: bool = False,
    lora: LoraConfig | None = None,
    dropout_masks: DropoutMasks | None = None,
) -> np.ndarray:
    """Logits [B, T, V] for int tokens [B, T] (dtype of the parameters); ``dropout_masks``: keep-masks (training)."""
    validate_params(params, config, lora)
    tokens = _check_dropout(dropout_masks, config, check_tokens(tokens, config))
    logits, _ = lm_forward(params, config, tokens, fast=fast, lora=lora, dropout_masks=dropout_masks)
    return logits


def _check_dropout(dropout_masks: DropoutMasks | None, config: GPT2Config, tokens: np.ndarray) -> np.ndarray:
    """The checked ``tokens``, once ``dropout_masks`` (if any) are checked to fit them."""
    if dropout_masks is not None:
        check_dropout_masks(dropout_masks, config, *tokens.shape)
    return tokens


def loss(
    params: dict[str, np.ndarray],
    config: GPT2Config,
    tokens: np.ndarray,
    targets: np.ndarray,
    fast: bool = False,
    lora: LoraConfig | None = None,
    dropout_masks: DropoutMasks | None = None,
) -> float:
    """Mean cross-entropy of ``targets`` [B, T] (already shifted; -100 ignored), forward only."""
    validate_params(params, config, lora)
    tokens = _check_dropout(dropout_masks, config, check_tokens(tokens, config))
    targets = check_targets(targets, tokens.shape, config)
    logits, _ = lm_forward(params, config, tokens, fast=fast, lora=lora, dropout_masks=dropout_masks)
    return kernels(fast).softmax_cross_entropy_forward(logits, targets)[0]


def loss_and_grads(
    params: dict[str, np.ndarray],
    config: GPT2Config,
    tokens: np.ndarray,
    targets: np.ndarray,
    fast: bool = False,
    lora: LoraConfig | None = None,
    dropout_masks: DropoutMasks | None = None,
) -> tuple[float, dict[str, np.ndarray]]:
    """Mean cross-entropy of ``targets`` [B, T] (already shifted; -100 ignored) and its gradient.

    Returns ``(loss, grads)`` with a gradient for every parameter, keyed like ``params`` (the tied ``wte``
    gets the LM head's and the embedding's contributions; LoRA adapters and base weights both get theirs).
    ``dropout_masks``: this batch's keep-masks (``mapper.dropout.draw_dropout_masks``) to train with dropout.
    """
    validate_params(params, config, lora)
    tokens = _check_dropout(dropout_masks, config, check_tokens(tokens, config))
    targets = check_targets(targets, tokens.shape, config)
    ops = kernels(fast)
    logits, caches = lm_forward(params, config, tokens, keep_caches=True, fast=fast, lora=lora,
                                dropout_masks=dropout_masks)
    mean_loss, cache_loss = ops.softmax_cross_entropy_forward(logits, targets)
    del logits  # the loss cache keeps what the backward needs
    dlogits, _ = ops.softmax_cross_entropy_backward(1.0, cache_loss)
    return mean_loss, lm_backward(dlogits, caches, params, config, fast)


# ------------------------------------------------------------------------------------------------------
# the sequence classifier (Hugging Face's GPT2ForSequenceClassification): the last real token's h @ score
# ------------------------------------------------------------------------------------------------------


def classifier_forward(
    params: dict[str, np.ndarray],
    config: GPT2Config,
    tokens: np.ndarray,
    lengths: np.ndarray,
    keep_caches: bool = False,
    fast: bool = False,
    lora: LoraConfig | None = None,
    dropout_masks: DropoutMasks | None = None,
) -> tuple[np.ndarray, tuple | None]:
    """tokens [B, T], lengths [B] (checked) -> class logits [B, n_classes], plus caches for backward."""
    ops = kernels(fast)
    h, cache_body = body_forward(params, config, tokens, keep_caches, fast=fast, lora=lora, dropout_masks=dropout_masks)
    pooled, cache_pool = ops.pool_forward(h, lengths - 1)  # [B,C] each row at its last real token
    logits, cache_score = ops.linear_forward(pooled, params["score.weight"], None)  # [B,C] @ [C,n_classes], no bias
    return logits, ((cache_body, cache_pool, cache_score) if keep_caches else None)


def classifier_backward(
    dlogits: np.ndarray, caches: tuple, params: dict[str, np.ndarray], config: GPT2Config, fast: bool = False
) -> dict[str, np.ndarray]:
    """dlogits [B, n_classes] -> the gradient of every parameter, keyed and ordered like ``params``."""
    ops = kernels(fast)
    cache_body, cache_pool, cache_score = caches
    dpooled, (dscore, _) = ops.linear_backward(dlogits, cache_score)  # dscore [C,n_classes]
    dh, _ = ops.pool_backward(dpooled, cache_pool)  # [B,T,C]
    grads = body_backward(dh, cache_body, config, fast)
    grads["score.weight"] = dscore
    if "lm_head.weight" in params:
        grads["lm_head.weight"] = np.zeros_like(params["lm_head.weight"])  # the LM head takes no part here
    return {name: grads[name] for name in params}


def _check_classifier_input(
    params: dict[str, np.ndarray], config: GPT2Config, tokens: np.ndarray, lengths: np.ndarray,
    lora: LoraConfig | None, dropout_masks: DropoutMasks | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    if config.n_classes is None:
        raise ValueError("this model has no classification head (config.n_classes is None)")
    validate_params(params, config, lora)
    tokens = _check_dropout(dropout_masks, config, check_tokens(tokens, config))
    return tokens, check_lengths(lengths, tokens.shape)


def classify(
    params: dict[str, np.ndarray],
    config: GPT2Config,
    tokens: np.ndarray,
    lengths: np.ndarray,
    fast: bool = False,
    lora: LoraConfig | None = None,
) -> np.ndarray:
    """Class logits [B, n_classes] for right-padded tokens [B, T] whose row b has ``lengths[b]`` real tokens.

    Row b is read at position lengths[b] - 1 (the causal mask keeps the padding after it out of its view).
    """
    tokens, lengths = _check_classifier_input(params, config, tokens, lengths, lora)
    logits, _ = classifier_forward(params, config, tokens, lengths, fast=fast, lora=lora)
    return logits


def classify_loss(
    params: dict[str, np.ndarray],
    config: GPT2Config,
    tokens: np.ndarray,
    lengths: np.ndarray,
    labels: np.ndarray,
    fast: bool = False,
    lora: LoraConfig | None = None,
    dropout_masks: DropoutMasks | None = None,
) -> float:
    """Mean cross-entropy of the class ``labels`` [B] (each in [0, n_classes)), forward only."""
    tokens, lengths = _check_classifier_input(params, config, tokens, lengths, lora, dropout_masks)
    labels = check_labels(labels, tokens.shape[0], config.n_classes)
    logits, _ = classifier_forward(params, config, tokens, lengths, fast=fast, lora=lora, dropout_masks=dropout_masks)
    return kernels(fast).softmax_cross_entropy_forward(logits, labels)[0]


def classify_loss_and_grads(
    params: dict[str, np.ndarray],
    config: GPT2Config,
    tokens: np.ndarray,
    lengths: np.ndarray,
    labels: np.ndarray,
    fast: bool = False,
    lora: LoraConfig | None = None,
    dropout_masks: DropoutMasks | None = None,
) -> tuple[float, dict[str, np.ndarray]]:
    """Mean cross-entropy of the class ``labels`` [B] and its gradient for every parameter, keyed like ``params``
    (``score.weight``, the body, the adapters; an untied ``lm_head.weight`` gets zeros); ``dropout_masks`` as in
    :func:`loss_and_grads`."""
    tokens, lengths = _check_classifier_input(params, config, tokens, lengths, lora, dropout_masks)
    labels = check_labels(labels, tokens.shape[0], config.n_classes)
    ops = kernels(fast)
    logits, caches = classifier_forward(params, config, tokens, lengths, keep_caches=True, fast=fast, lora=lora,
                                        dropout_masks=dropout_masks)
    mean_loss, cache_loss = ops.softmax_cross_entropy_forward(logits, labels)  # logits [B,n_classes], labels [B]
    dlogits, _ = ops.softmax_cross_entropy_backward(1.0, cache_loss)  # [B,n_classes]
    return mean_loss, classifier_backward(dlogits, caches, params, config, fast)


def from_pretrained(name_or_path: str, dtype: str | np.dtype | None = None
                    ) -> tuple[dict[str, np.ndarray], GPT2Config]:
    """``(params, config)`` of a checkpoint, ready for ``forward(params, config, tokens)``: a local file or folder in
    any format ``mapper.load_checkpoint`` reads, or a model name (``gpt2`` ... ``gpt2-xl``, ``owner/name[@revision]``
    on the Hub, ``openai:124M`` ...), downloaded once. ``dtype`` casts the weights (float64 for gradient checks)."""
    config, params = load_checkpoint(name_or_path)
    if dtype is not None:
        params = {k: v.astype(dtype, copy=False) for k, v in params.items()}
    return params, config
