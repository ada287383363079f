"""GPT-2 as one PyTorch ``nn.Module``, with the attention projection chosen by layout.

Legend: ``B`` batch, ``T`` time, ``C`` n_embd, ``V`` vocab, ``NH`` heads, ``hs`` = C / NH head size,
``L`` layers, ``P`` n_positions.

    x = wte[tokens] + wpe[positions]                          # [B, T, C]
    for each block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))
    logits = ln_f(x) @ wte.T                                  # tied head, [B, T, V]

The two attention layouts differ only in how q, k, v are projected (``fused``: one ``c_attn`` Linear
C -> 3C; ``custom``: ``q_proj``, ``k_proj``, ``v_proj``, each C -> C); the attention math is written once.
Conversion to and from the canonical NumPy parameters lives in :mod:`mapper.layouts`.
There is no dropout: GPT-2 inference and the parity tests need none.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mapper.config import GPT2Config
from mapper.layouts import check_attention_layout, from_module_state, to_module_state
from mapper.schema import init_params, validate_params
from torch_gpt2.generate import KVCache, generate, generate_stream

ATTN_IMPLS = ("sdpa", "math")
AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)
IGNORE_INDEX = -100  # targets equal to this are left out of the loss (F.cross_entropy's default)


def resolve_device(device: str | torch.device | None, dtype: torch.dtype = torch.float32) -> torch.device:
    """``None`` picks cuda, then mps (not for float64, which MPS lacks), then cpu; anything else is used as is."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if dtype != torch.float64 and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight.T + bias: x [..., in], weight [out, in] (nn.Linear layout) -> [..., out].

    Without autograd, for float32 on the CPU, the product goes to oneDNN's matmul instead of MKL's sgemm:
    on the AMD CPUs measured here MKL runs skinny products (decoding: 1 row) on one core at about half
    the memory bandwidth, and ``x @ wte.T`` for the LM head took 11 ms against oneDNN's 5 ms.
    oneDNN has no autograd kernel, so training and float64 always take ``F.linear``.
    """
    if (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and not torch.compiler.is_compiling()
    ):
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state names) whose forward is :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, impl: str
) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs) + mask) v.

    q [B, NH, Tq, hs], k and v [B, NH, Tk, hs] -> [B, NH, Tq, hs]. ``mask`` is boolean, broadcastable to
    [B, NH, Tq, Tk], True where a query may attend to a key; ``is_causal`` (only with mask None and Tq == Tk)
    is the plain lower-triangular mask. ``impl`` "sdpa" is PyTorch's fused kernel, "math" the same
    equations written out (kept as a readable reference; both agree to ~1e-16 in float64).
    """
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # [B, NH, Tq, Tk]
    if mask is None and is_causal:
        Tq, Tk = att.shape[-2:]
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=att.device).tril()
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))  # exp(-inf) = 0: masked keys get no weight
    return att.softmax(dim=-1) @ v


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; ``attention`` ("fused" | "custom") picks only the q/k/v projection."""

    def __init__(self, config: GPT2Config, attention: str) -> None:
        super().__init__()
        check_attention_layout(attention)
        C = config.n_embd
        self.layout = attention
        self.n_head = config.n_head
        if attention == "fused":
            self.c_attn = Linear(C, 3 * C)  # rows q | k | v
        else:
            self.q_proj = Linear(C, C)
            self.k_proj = Linear(C, C)
            self.v_proj = Linear(C, C)
        self.c_proj = Linear(C, C)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, T, C] -> q, k, v, each [B, T, C]."""
        if self.layout == "fused":
            return self.c_attn(x).split(x.shape[-1], dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(
        self,
        x: torch.Tensor,
        impl: str,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        start: int = 0,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, T, C] at slots start..start+T-1 -> [B, T, C].

        With ``kv`` (this layer's cache, [B, NH, max_len, hs] each) the new keys/values are stored at
        those slots and the queries attend over slots 0..start+T-1. ``mask`` None means plain causal
        attention (then either start == 0 or T == 1).
        """
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.project_qkv(x))
        if kv is not None:
            k_cache, v_cache = kv
            k_cache[:, :, start : start + T] = k
            v_cache[:, :, start : start + T] = v
            k, v = k_cache[:, :, : start + T], v_cache[:, :, : start + T]  # [B, NH, start+T, hs]
        y = attention(q, k, v, mask, is_causal=T > 1, impl=impl)  # [B, NH, T, hs]
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """c_proj(gelu_tanh(c_fc(x))): [B, T, C] -> [B, T, 4C] -> [B, T, C]."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2's GELU: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, config: GPT2Config, attention: str) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)  # biased variance, like GPT-2
        self.attn = CausalSelfAttention(config, attention)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        impl: str,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        start: int = 0,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), impl, kv, start, mask)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    """GPT-2 with ``attention`` = "fused" (OpenAI's c_attn) or "custom" (separate W_q, W_k, W_v).

    ``attn_impl`` = "sdpa" (default) or "math". ``autocast_dtype`` (torch.bfloat16 / torch.float16, or None)
    runs forward and decoding under ``torch.autocast``. Build one with :meth:`from_params` or
    :meth:`from_config`; ``generate`` / ``generate_stream`` are :mod:`torch_gpt2.generate`'s functions.
    """

    def __init__(self, config: GPT2Config, attention: str = "fused", attn_impl: str = "sdpa") -> None:
        super().__init__()
        check_attention_layout(attention)
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        self.config = config
        self.attention = attention
        self.attn_impl = attn_impl
        self.autocast_dtype: torch.dtype | None = None
        self._compiled_forward: Any = None
        C = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, C)
        self.wpe = nn.Embedding(config.n_positions, C)
        self.h = nn.ModuleList(Block(config, attention) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(C, eps=config.layer_norm_epsilon)
        # The tied head has no module: logits = h @ wte.weight.T, so gradients reach wte from both uses.
        self.lm_head = None if config.tie_word_embeddings else Linear(C, config.vocab_size, bias=False)
        self.score = None if config.n_classes is None else Linear(C, config.n_classes)

    # ------------------------------------------------------------------ construction and export

    @classmethod
    def from_params(
        cls,
        params: dict[str, np.ndarray],
        config: GPT2Config,
        attention: str = "fused",
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        attn_impl: str = "sdpa",
        autocast_dtype: torch.dtype | None = None,
        compile: bool = False,
    ) -> GPT2:
        """A module holding copies of the canonical ``params`` (float64 -> float64 module, float32 -> float32).

        ``device`` None = auto (cuda > mps > cpu); ``dtype`` casts the weights; ``compile`` wraps the
        forward in ``torch.compile`` (see :meth:`enable_compile`).
        """
        np_dtype = validate_params(params, config)
        state = to_module_state(params, config, attention)
        param_dtype = dtype or (torch.float64 if np_dtype == np.float64 else torch.float32)
        # Built on the meta device so no time goes into an initialisation that is overwritten at once.
        with torch.device("meta"):
            model = cls(config, attention, attn_impl)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True, assign=True)
        model.to(device=resolve_device(device, param_dtype), dtype=param_dtype)
        model.set_autocast(autocast_dtype)
        if compile:
            model.enable_compile()
        return model

    @classmethod
    def from_config(
        cls, config: GPT2Config, seed: int = 0, attention: str = "fused", device: str | None = None, **kwargs: Any
    ) -> GPT2:
        """A freshly initialised model (GPT-2's initialisation, :func:`mapper.init_params`), e.g. for pretraining."""
        return cls.from_params(init_params(config, seed), config, attention, device, **kwargs)

    def to_params(self) -> dict[str, np.ndarray]:
        """The canonical NumPy parameters (float64 stays float64; float32, bf16 and fp16 become float32)."""
        return self._to_canonical(self.state_dict())

    def grads_to_params(self) -> dict[str, np.ndarray]:
        """The parameters' ``.grad`` in the canonical schema (names, [in, out] orientation, c_attn fused).

        The layout conversion is linear, so gradients map exactly like the weights they belong to.
        Raises ``ValueError`` if a parameter has no gradient (call ``backward`` first).
        """
        missing = [name for name, p in self.named_parameters() if p.grad is None]
        if missing:
            raise ValueError(f"no gradient for {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}; "
                             "run loss.backward() first")
        return self._to_canonical({name: p.grad for name, p in self.named_parameters()})

    def _to_canonical(self, tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        state = {}
        for name, tensor in tensors.items():
            t = tensor.detach().cpu()
            state[name] = (t if t.dtype in (torch.float32, torch.float64) else t.float()).numpy()
        return from_module_state(state, self.config, self.attention)

    def set_autocast(self, dtype: torch.dtype | None) -> None:
        """Run forward passes under ``torch.autocast(device, dtype)`` (bf16/fp16), or not (None)."""
        if dtype is not None and dtype not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast_dtype must be one of {AUTOCAST_DTYPES} or None, got {dtype!r}")
        self.autocast_dtype = dtype

    def enable_compile(self, **compile_kwargs: Any) -> GPT2:
        """Compile the full-sequence forward (training, scoring) with ``torch.compile``; decoding stays eager."""
        self._compiled_forward = torch.compile(self._logits_and_loss, **compile_kwargs)
        return self

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.wte.weight.dtype

    def autocast_context(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` with :attr:`autocast_dtype`, or a no-op context when it is None."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ------------------------------------------------------------------ forward

    def check_tokens(self, tokens: torch.Tensor) -> None:
        """Raise ``ValueError`` unless tokens is an integer [B, T] tensor, 1 <= T <= P, ids in [0, V)."""
        if not isinstance(tokens, torch.Tensor) or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise ValueError(f"tokens must be an integer tensor [B, T], got {type(tokens).__name__}"
                             f"{'' if not isinstance(tokens, torch.Tensor) else ' of ' + str(tokens.dtype)}")
        if tokens.dim() != 2 or tokens.numel() == 0:
            raise ValueError(f"tokens must be a non-empty [B, T] tensor, got shape {tuple(tokens.shape)}")
        T, P, V = tokens.shape[1], self.config.n_positions, self.config.vocab_size
        if T > P:
            raise ValueError(f"sequence length {T} exceeds the model's context n_positions={P}")
        lo, hi = (int(t) for t in torch.aminmax(tokens))
        if lo < 0 or hi >= V:
            raise ValueError(f"token ids must lie in [0, {V}) (vocab_size={V}); got min {lo}, max {hi}")

    def hidden_states(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start: int = 0,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ln_f of the last block: tokens [B, T] -> [B, T, C]. No input checks (callers do them).

        ``positions`` [B, T] (None: slots start..start+T-1 for every row); ``cache``/``start``/``mask`` as in
        :meth:`CausalSelfAttention.forward`.
        """
        T = tokens.shape[1]
        pos_emb = self.wpe.weight[start : start + T] if positions is None else self.wpe(positions)
        x = self.wte(tokens) + pos_emb  # [B, T, C]
        for i, block in enumerate(self.h):
            x = block(x, self.attn_impl, None if cache is None else cache.layer(i), start, mask)
        return self.ln_f(x)

    def lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        """[B, T, C] -> [B, T, V]: h @ wte.T (tied) or h @ lm_head.weight.T."""
        return linear(h, self.wte.weight) if self.lm_head is None else self.lm_head(h)

    def _logits_and_loss(
        self, tokens: torch.Tensor, targets: torch.Tensor | None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        logits = self.lm_logits(self.hidden_states(tokens))
        if targets is None:
            return logits
        V = logits.shape[-1]
        # mean over targets != -100 of -log softmax(logits)[target]; bf16/fp16 logits are upcast first
        flat = logits.reshape(-1, V)
        flat = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
        loss = F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE_INDEX)
        return logits, loss

    def forward(
        self, tokens: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, T] -> logits [B, T, V]; with targets [B, T] -> (logits, mean cross-entropy loss).

        Targets are already shifted by the caller (targets[:, t] is what position t predicts); entries
        equal to -100 are ignored.
        """
        self.check_tokens(tokens)
        if targets is not None and tuple(targets.shape) != tuple(tokens.shape):
            raise ValueError(f"targets shape {tuple(targets.shape)} differs from tokens shape {tuple(tokens.shape)}")
        with self.autocast_context():
            fn = self._compiled_forward or self._logits_and_loss
            return fn(tokens, targets)

    def classify(self, tokens: torch.Tensor) -> torch.Tensor:
        """Classification head on the last position: tokens [B, T] -> [B, n_classes]."""
        if self.score is None:
            raise ValueError("this model has no classification head (config.n_classes is None)")
        self.check_tokens(tokens)
        with self.autocast_context():
            return self.score(self.hidden_states(tokens)[:, -1])

    # decoding (KV cache, ragged batches, sampling) lives in torch_gpt2/generate.py
    generate = generate
    generate_stream = generate_stream
