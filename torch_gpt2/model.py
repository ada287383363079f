"""GPT-2 as one PyTorch ``nn.Module``, with the attention projection chosen by layout.

Legend: ``B`` batch, ``T`` time, ``C`` n_embd, ``V`` vocab, ``NH`` heads, ``hs`` = C / NH head size,
``L`` layers, ``P`` n_positions.

    x = drop(wte[tokens] + wpe[positions])                    # [B, T, C]
    for each block:  x = x + drop(attn(ln_1(x)));  x = x + drop(mlp(ln_2(x)))   # attn also drops its weights
    logits = ln_f(x) @ wte.T                                  # tied head, [B, T, V]
    classifier: ln_f(x)[b, lengths[b] - 1] @ score.weight.T   # [B, n_classes], no bias (as Hugging Face)

The two attention layouts differ only in how q, k, v are projected (``fused``: one ``c_attn`` Linear
C -> 3C; ``custom``: ``q_proj``, ``k_proj``, ``v_proj``, each C -> C); the attention math is written once.
With a :class:`mapper.LoraConfig` every targeted :class:`Linear` adds ``scale * (x A) B`` (one implementation,
:class:`Linear`, whatever the layout); LoRA on attention needs the fused layout (``check_lora_layout``).
Conversion to and from the canonical NumPy parameters lives in :mod:`mapper.layouts`.

Dropout (``drop``, the config's ``embd_pdrop``, ``attn_pdrop``, ``resid_pdrop``) acts only in training mode
(``model.train()``; :meth:`GPT2.from_params` returns a module in eval mode, as transformers' ``from_pretrained``
does): torch's native dropout, SDPA's own on the attention weights. A forward given a
:class:`mapper.dropout.DropoutMasks` uses those keep-masks instead, in the NumPy spec's arithmetic
(``x * keep / (1 - p)``, attention written out), so that both backends can be run with the same masks.
"""

from __future__ import annotations

import contextlib
import math
import types
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mapper.checkpoint import load_checkpoint
from mapper.config import GPT2Config
from mapper.dropout import DropoutMasks, check_dropout_masks
from mapper.layouts import check_attention_layout, check_lora_layout, from_module_state, to_module_state
from mapper.lora import LoraConfig, init_lora_params
from mapper.schema import init_params, validate_params
from mapper.tokens import IGNORE_INDEX, check_labels, check_lengths, check_targets, check_token_shape, check_tokens
from torch_gpt2.onednn import linear

ATTN_IMPLS = ("sdpa", "math")
AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)
# Compiled graphs one model may hold (one per shape, dtype, autocast or TF32 setting): dynamo's default is 8
COMPILE_RECOMPILE_LIMIT = 64


def allow_recompiles() -> None:
    """Raise dynamo's recompile limit to ``COMPILE_RECOMPILE_LIMIT`` (process-wide; never lowered) and make running
    out of it an error: by default dynamo then runs the function eagerly, silently, which would time an eager
    forward under a ``-compile`` label."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, COMPILE_RECOMPILE_LIMIT)
    config.fail_on_recompile_limit_hit = True


def resolve_device(device: str | torch.device | None, dtype: torch.dtype = torch.float32) -> torch.device:
    """``None`` picks cuda, then mps (not for float64, which MPS lacks), then cpu.

    A named device is checked before any work: ``ValueError`` with one line if it is not a torch device or
    this torch cannot use it (a CPU-only build asked for cuda, a GPU index that does not exist, ...).
    """
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if dtype != torch.float64 and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{device!r} is not a torch device (try cpu, cuda, cuda:1 or mps)") from None
    if dev.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise ValueError(f"device {device!r}: this torch ({torch.__version__}) is built without CUDA; "
                             "use --device cpu or install a CUDA build of torch")
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: torch finds no usable CUDA GPU on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {device!r}: MPS (Apple GPU) is not available here")
        if dtype == torch.float64:
            raise ValueError("MPS has no float64; use float32 or another device")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r}: this project runs on cpu, cuda or mps")
    return dev


class KVCache:
    """Preallocated keys and values of every layer: ``k``, ``v`` [L, B, NH, max_len, hs].

    Each step writes its keys/values in place at their slots and attention reads the filled prefix,
    so nothing is concatenated or reallocated while decoding.
    """

    def __init__(
        self, config: GPT2Config, batch_size: int, max_len: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of layer ``i``'s keys and values, each [B, NH, max_len, hs]."""
        return self.k[i], self.v[i]


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state names) whose forward may take the oneDNN fast path, with an
    optional LoRA adapter.

    With ``lora`` it also holds ``lora_A`` [r, in] and ``lora_B`` [out, r] (nn.Linear's orientation, like
    ``weight``) and computes ``y = x W^T + b + scale * (x A^T) B^T``, scale = alpha / r. Their values come from
    :meth:`GPT2.from_params` (canonical adapters, transposed by :mod:`mapper.layouts`); here they start at zero.
    ``onednn`` is set for the whole model by :meth:`GPT2.set_onednn_linear` (None: this machine's measured choice).
    """

    onednn: bool | None = None

    def __init__(self, in_features: int, out_features: int, bias: bool = True, lora: LoraConfig | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.lora_scale = 0.0 if lora is None else lora.scale
        if lora is None:
            self.register_parameter("lora_A", None)
            self.register_parameter("lora_B", None)
        else:
            self.lora_A = nn.Parameter(torch.zeros(lora.rank, in_features))
            self.lora_B = nn.Parameter(torch.zeros(out_features, lora.rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.bias, self.onednn)  # x W^T + b
        if self.lora_A is None:
            return y
        u = linear(x, self.lora_A, None, self.onednn)  # [..., r] = x A^T
        return y + self.lora_scale * linear(u, self.lora_B, None, self.onednn)  # + scale * u B^T


def causal_mask(n_queries: int, n_keys: int, device: torch.device) -> torch.Tensor:
    """bool [n_queries, n_keys], True where query i may see key j.

    The queries are the last ``n_queries`` of the ``n_keys`` positions (the first n_keys - n_queries are a
    KV cache's past), so query i sits at position n_keys - n_queries + i and sees keys 0 .. that position.
    """
    return torch.ones(n_queries, n_keys, dtype=torch.bool, device=device).tril(diagonal=n_keys - n_queries)


def dropout(x: torch.Tensor, p: float, training: bool, keep: torch.Tensor | None = None) -> torch.Tensor:
    """With a keep-mask, ``x * keep / (1 - p)`` (the NumPy spec's arithmetic); else torch's native dropout while
    training with p > 0; else x unchanged."""
    if keep is not None:
        return x * keep * (1.0 / (1.0 - p))
    return F.dropout(x, p, training=True) if training and p > 0.0 else x


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, impl: str,
              dropout_p: float = 0.0, keep: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs) + mask) v, the weights dropped with probability ``dropout_p`` (0: none).

    q [B, NH, Tq, hs], k and v [B, NH, Tk, hs] -> [B, NH, Tq, hs]. ``mask`` is boolean, broadcastable to
    [B, NH, Tq, Tk], True where a query may attend to a key; None means causal, with the Tq queries at the
    last Tq of the Tk positions (:func:`causal_mask`), which also covers a prefill continuing a KV cache.
    ``impl`` "sdpa" is PyTorch's fused kernel, "math" the same equations written out (kept as a readable
    reference; both agree to ~1e-16 in float64). ``keep`` (bool [B, NH, Tq, Tk]) drops the weights it marks
    False instead of a random draw, on the written-out path whatever ``impl`` says (SDPA cannot take a mask).
    """
    Tq, Tk = q.shape[-2], k.shape[-2]
    if keep is None and impl == "sdpa" and mask is None and Tq > 1 and Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)  # its top-left mask
    if mask is None and Tq > 1:
        mask = causal_mask(Tq, Tk, q.device)
    if keep is None and impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # [B, NH, Tq, Tk]
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))  # exp(-inf) = 0: masked keys get no weight
    return dropout(att.softmax(dim=-1), dropout_p, dropout_p > 0.0, keep) @ v


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; ``attention`` ("fused" | "custom") picks only the q/k/v projection."""

    def __init__(self, config: GPT2Config, attention: str, lora: LoraConfig | None = None) -> None:
        super().__init__()
        check_lora_layout(attention, lora)
        C = config.n_embd
        self.layout = attention
        self.n_head = config.n_head
        self.attn_pdrop = config.attn_pdrop
        adapter = lora if lora is not None and "attn" in lora.targets else None
        bias = config.qkv_bias  # False: the course's model, no q/k/v bias at all
        if attention == "fused":
            self.c_attn = Linear(C, 3 * C, bias=bias, lora=adapter)  # rows q | k | v
        else:
            self.q_proj = Linear(C, C, bias=bias)
            self.k_proj = Linear(C, C, bias=bias)
            self.v_proj = Linear(C, C, bias=bias)
        self.c_proj = Linear(C, C, lora=adapter)

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
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, T, C] at slots start..start+T-1 -> [B, T, C].

        With ``kv`` (this layer's cache, [B, NH, max_len, hs] each) the new keys/values are stored at
        those slots and the queries attend over slots 0..start+T-1. ``mask`` None means plain causal
        attention over those slots (any start and T). ``keep``: the attention weights' dropout mask.
        """
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.project_qkv(x))
        if kv is not None:
            k_cache, v_cache = kv
            k_cache[:, :, start : start + T] = k
            v_cache[:, :, start : start + T] = v
            k, v = k_cache[:, :, : start + T], v_cache[:, :, : start + T]  # [B, NH, start+T, hs]
        p = self.attn_pdrop if self.training or keep is not None else 0.0
        y = attention(q, k, v, mask, impl, p, keep)  # [B, NH, T, hs]
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """c_proj(gelu_tanh(c_fc(x))): [B, T, C] -> [B, T, 4C] -> [B, T, C]."""

    def __init__(self, config: GPT2Config, lora: LoraConfig | None = None) -> None:
        super().__init__()
        adapter = lora if lora is not None and "mlp" in lora.targets else None
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, lora=adapter)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, lora=adapter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2's GELU: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, config: GPT2Config, attention: str, lora: LoraConfig | None = None) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)  # biased variance, like GPT-2
        self.attn = CausalSelfAttention(config, attention, lora)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config, lora)
        self.resid_pdrop = config.resid_pdrop

    def forward(
        self,
        x: torch.Tensor,
        impl: str,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        start: int = 0,
        mask: torch.Tensor | None = None,
        keep: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """``keep``: the keep-masks of the attention weights, the attention branch and the MLP branch."""
        keep_att, keep_attn_out, keep_mlp_out = (None, None, None) if keep is None else keep
        p = self.resid_pdrop
        x = x + dropout(self.attn(self.ln_1(x), impl, kv, start, mask, keep_att), p, self.training, keep_attn_out)
        return x + dropout(self.mlp(self.ln_2(x)), p, self.training, keep_mlp_out)


class GPT2(nn.Module):
    """GPT-2 with ``attention`` = "fused" (OpenAI's c_attn) or "custom" (separate W_q, W_k, W_v).

    ``attn_impl`` = "sdpa" (default) or "math". ``autocast_dtype`` (torch.bfloat16 / torch.float16, or None)
    runs forward and decoding under ``torch.autocast``. ``onednn_linear`` sends float32 CPU matrix products to
    oneDNN (True), to ``F.linear``/MKL (False), or (None, the default) to whichever a short measurement found
    faster on this machine (:func:`torch_gpt2.onednn.preferred_linear`, cached per CPU model and torch version);
    oneDNN is used only where it exists and was checked.
    ``lora`` (a :class:`mapper.LoraConfig`, or None) gives the targeted linears LoRA adapters (:class:`Linear`).
    Dropout (the config's probabilities) acts in training mode only (module docstring).
    Build one with :meth:`from_params` or :meth:`from_config` (both in eval mode); decode with
    :func:`torch_gpt2.generate` / :func:`torch_gpt2.generate_stream` (``generate(model, prompts, max_new_tokens,
    ...)``).
    """

    def __init__(
        self,
        config: GPT2Config,
        attention: str = "fused",
        attn_impl: str = "sdpa",
        onednn_linear: bool | None = None,
        lora: LoraConfig | None = None,
    ) -> None:
        super().__init__()
        check_attention_layout(attention)
        check_lora_layout(attention, lora)
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        self.config = config
        self.attention = attention
        self.lora = lora
        self.attn_impl = attn_impl
        self.autocast_dtype: torch.dtype | None = None
        self._compiled_forward: Any = None
        C = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, C)
        self.wpe = nn.Embedding(config.n_positions, C)
        self.h = nn.ModuleList(Block(config, attention, lora) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(C, eps=config.layer_norm_epsilon)
        # The tied head has no module: logits = h @ wte.weight.T, so gradients reach wte from both uses.
        self.lm_head = None if config.tie_word_embeddings else Linear(C, config.vocab_size, bias=False)
        # Hugging Face's GPT2ForSequenceClassification head: no bias
        self.score = None if config.n_classes is None else Linear(C, config.n_classes, bias=False)
        self.set_onednn_linear(onednn_linear)

    def set_onednn_linear(self, enabled: bool | None) -> None:
        """Send every linear layer, the tied head included, to oneDNN (True), to ``F.linear`` (False), or to this
        machine's measured choice (None)."""
        self.onednn_linear = None if enabled is None else bool(enabled)
        for module in self.modules():
            if isinstance(module, Linear):
                module.onednn = self.onednn_linear

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
        onednn_linear: bool | None = None,
        lora: LoraConfig | None = None,
    ) -> GPT2:
        """A module holding copies of the canonical ``params`` (float64 -> float64 module, float32 -> float32).

        The module is in eval mode (no dropout; ``model.train()`` turns it on when the config has any).
        ``device`` None = auto (cuda > mps > cpu); ``dtype`` casts the weights; ``compile`` wraps the
        forward in ``torch.compile`` (see :meth:`enable_compile`); ``onednn_linear`` as in the class.
        ``lora``: the LoRA settings of the adapters ``params`` holds (``h.{i}.<layer>.lora_A`` / ``lora_B``);
        params with adapters and no ``lora`` are refused, as are adapters on attention with ``attention="custom"``.
        """
        check_lora_layout(attention, lora)
        np_dtype = validate_params(params, config, lora)
        param_dtype = dtype or (torch.float64 if np_dtype == np.float64 else torch.float32)
        target = resolve_device(device, param_dtype)  # a bad device fails here, before any copying
        state = to_module_state(params, config, attention, lora)
        # Built on the meta device so no time goes into an initialisation that is overwritten at once.
        with torch.device("meta"):
            model = cls(config, attention, attn_impl, onednn_linear, lora)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True, assign=True)
        model.to(device=target, dtype=param_dtype)
        model.eval()  # dropout off until model.train(), as transformers' from_pretrained
        model.set_autocast(autocast_dtype)
        if compile:
            model.enable_compile()
        return model

    @classmethod
    def from_pretrained(cls, name_or_path: str, attention: str = "fused", **kwargs: Any) -> GPT2:
        """A module holding a checkpoint: a local file or folder in any format ``mapper.load_checkpoint`` reads, or a
        model name (``gpt2`` ... ``gpt2-xl``, ``owner/name[@revision]`` on the Hub, ``openai:124M`` ...), downloaded
        once and then read from the cache. ``kwargs`` as :meth:`from_params` (``device``, ``dtype``, ...)."""
        config, params = load_checkpoint(name_or_path)
        return cls.from_params(params, config, attention, **kwargs)

    @classmethod
    def from_config(
        cls,
        config: GPT2Config,
        seed: int = 0,
        attention: str = "fused",
        device: str | None = None,
        lora: LoraConfig | None = None,
        **kwargs: Any,
    ) -> GPT2:
        """A freshly initialised model (``config.init``'s initialisation, :func:`mapper.init_params`), e.g. for
        pretraining (call ``model.train()`` for dropout);
        with ``lora``, fresh adapters too (:func:`mapper.init_lora_params`, same seed: B = 0, so the same outputs)."""
        params = init_params(config, seed)
        if lora is not None:
            params.update(init_lora_params(config, lora, seed))
        return cls.from_params(params, config, attention, device, lora=lora, **kwargs)

    def to_params(self) -> dict[str, np.ndarray]:
        """The canonical NumPy parameters, adapters included (float64 stays float64; float32, bf16 and fp16
        become float32). :func:`mapper.merge_lora` folds the adapters in."""
        return self._to_canonical(self.state_dict())

    def grads_to_params(self) -> dict[str, np.ndarray]:
        """The parameters' ``.grad`` in the canonical schema (names, [in, out] orientation, c_attn fused),
        adapters included.

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
        return from_module_state(state, self.config, self.attention, self.lora)

    def set_autocast(self, dtype: torch.dtype | None) -> None:
        """Run forward passes under ``torch.autocast(device, dtype)`` (bf16/fp16), or not (None)."""
        if dtype is not None and dtype not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast_dtype must be one of {AUTOCAST_DTYPES} or None, got {dtype!r}")
        self.autocast_dtype = dtype

    def enable_compile(self, **compile_kwargs: Any) -> GPT2:
        """Compile the full-sequence forward (training, scoring) with ``torch.compile``; decoding stays eager.

        Shapes are static (one graph per shape, the fastest kernels) unless ``dynamic=True`` is passed. Dynamo
        keys its cache, and the recompile budget, on the function's code object, so every model compiling the
        same method would share one budget; each model here compiles its own copy of the code, so one model's
        graphs never push another's out. The budget is raised and running out of it raises
        (:func:`allow_recompiles`) rather than silently running eager.
        """
        allow_recompiles()
        code = GPT2._logits_and_loss.__code__.replace()  # a fresh code object: this model's own dynamo cache
        own = types.MethodType(types.FunctionType(code, globals(), "_logits_and_loss"), self)
        self._compiled_forward = torch.compile(own, **{"dynamic": False, **compile_kwargs})
        return self

    def decoding_model(self) -> GPT2:
        """The model decoding runs: this one, or under autocast a copy whose linear layers (the tied head
        included) hold their weights already cast to the autocast dtype.

        Autocast casts a weight at each use outside its cache, and the cache lives for one autocast region;
        decoding enters one region per token, so each token would cast every weight again. The copy computes
        exactly what autocast computes (autocast casts a linear's input, weight and bias to its dtype; the
        weights are cast once here, the inputs still at each use) and shares every other tensor (embeddings,
        LayerNorms) with this model. It costs the cast matrices' memory (half of float32's for bf16) while it
        lives.
        """
        dtype = self.autocast_dtype
        if dtype is None:
            return self
        cast = {f"{prefix}.{name}" for prefix, module in self.named_modules() if isinstance(module, Linear)
                for name, _ in module.named_parameters(recurse=False)}
        state = {name: p.detach().to(dtype) if name in cast else p.detach() for name, p in self.named_parameters()}
        with torch.device("meta"):
            copy = GPT2(self.config, self.attention, self.attn_impl, self.onednn_linear, self.lora)
            if copy.lm_head is None:  # tied: the head gets its own cast of wte; the embedding reads wte as it is
                copy.lm_head = Linear(self.config.n_embd, self.config.vocab_size, bias=False)
                state["lm_head.weight"] = self.wte.weight.detach().to(dtype)
        copy.load_state_dict(state, strict=True, assign=True)
        copy.set_autocast(dtype)
        return copy.train(self.training)

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

    def check_tokens(self, tokens: torch.Tensor, name: str = "tokens") -> None:
        """Raise ``ValueError`` unless ``tokens`` is an integer [B, T] tensor with T <= n_positions, ids in [0, V).

        The checks are :mod:`mapper.tokens`' (shared with the NumPy spec). Ids are checked for tensors on the
        CPU only: on an accelerator that would cost a host sync per forward, so ids are checked on the host
        before they are moved (:func:`to_device`, the training data path, ``generate``).
        """
        if not isinstance(tokens, torch.Tensor):
            raise ValueError(f"{name} must be an integer tensor [B, T], got {type(tokens).__name__}")
        if tokens.device.type == "cpu":
            check_tokens(tokens.detach().numpy(), self.config, name)
            return
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got dtype {tokens.dtype}")
        check_token_shape(tuple(tokens.shape), self.config, name)

    def to_device(self, tokens: np.ndarray | torch.Tensor, name: str = "tokens") -> torch.Tensor:
        """Host tokens [B, T] -> a checked int64 tensor on the model's device (ids checked before the copy).
        ``name="targets"`` also accepts ``IGNORE_INDEX`` (positions without a loss)."""
        host = tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
        checked = (check_targets(host, host.shape, self.config) if name == "targets"
                   else check_tokens(host, self.config, name))
        return torch.tensor(checked).to(self.device, non_blocking=True)

    def hidden_states(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start: int = 0,
        mask: torch.Tensor | None = None,
        dropout_masks: DropoutMasks | None = None,
    ) -> torch.Tensor:
        """ln_f of the last block: tokens [B, T] -> [B, T, C]. No input checks (callers do them).

        ``positions`` [B, T] (None: slots start..start+T-1 for every row); ``cache``/``start``/``mask`` as in
        :meth:`CausalSelfAttention.forward`; ``dropout_masks``: keep-masks to drop with instead of random ones.
        """
        T = tokens.shape[1]
        pos_emb = self.wpe.weight[start : start + T] if positions is None else self.wpe(positions)
        keep = None if dropout_masks is None else self._keep_tensors(dropout_masks)
        x = dropout(self.wte(tokens) + pos_emb, self.config.embd_pdrop, self.training,
                    None if keep is None else keep[0])  # [B, T, C]
        for i, block in enumerate(self.h):
            block_keep = None if keep is None else keep[1][i]
            x = block(x, self.attn_impl, None if cache is None else cache.layer(i), start, mask, block_keep)
        return self.ln_f(x)

    def _keep_tensors(self, masks: DropoutMasks) -> tuple[torch.Tensor | None, list[tuple]]:
        """The NumPy keep-masks on this module's device: (embeddings, per layer (weights, attention, MLP))."""

        def tensor(mask: np.ndarray | None) -> torch.Tensor | None:
            return None if mask is None else torch.from_numpy(mask).to(self.device)

        layers = [tuple(tensor(m) for m in masks.layer(i)) for i in range(self.config.n_layer)]
        return tensor(masks.embd), layers

    def lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        """[B, T, C] -> [B, T, V]: h @ wte.T (tied) or h @ lm_head.weight.T."""
        return linear(h, self.wte.weight, onednn=self.onednn_linear) if self.lm_head is None else self.lm_head(h)

    def _logits_and_loss(
        self, tokens: torch.Tensor, targets: torch.Tensor | None, dropout_masks: DropoutMasks | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        logits = self.lm_logits(self.hidden_states(tokens, dropout_masks=dropout_masks))
        if targets is None:
            return logits
        V = logits.shape[-1]
        # mean over targets != -100 of -log softmax(logits)[target]; bf16/fp16 logits are upcast first
        flat = logits.reshape(-1, V)
        flat = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
        loss = F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE_INDEX)
        return logits, loss

    def forward(
        self, tokens: torch.Tensor, targets: torch.Tensor | None = None, dropout_masks: DropoutMasks | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, T] -> logits [B, T, V]; with targets [B, T] -> (logits, mean cross-entropy loss).

        Targets are already shifted by the caller (targets[:, t] is what position t predicts); entries
        equal to -100 are ignored. ``dropout_masks`` (:func:`mapper.dropout.draw_dropout_masks` for this batch)
        drops with those masks, in any mode; without them dropout is torch's own, in training mode only.
        """
        self.check_tokens(tokens)
        if dropout_masks is not None:
            check_dropout_masks(dropout_masks, self.config, *tokens.shape)
        if targets is not None:
            if not isinstance(targets, torch.Tensor):
                raise ValueError(f"targets must be an integer tensor [B, T], got {type(targets).__name__}")
            if targets.device.type == "cpu":
                check_targets(targets.numpy(), tuple(tokens.shape), self.config)
            elif tuple(targets.shape) != tuple(tokens.shape):
                raise ValueError(f"targets have shape {tuple(targets.shape)}, tokens have shape "
                                 f"{tuple(tokens.shape)}; they must match")
        with self.autocast_context():
            fn = self._compiled_forward or self._logits_and_loss
            return fn(tokens, targets, dropout_masks)

    def loss_and_grads(self, tokens: np.ndarray, targets: np.ndarray, dropout_masks: DropoutMasks | None = None
                       ) -> tuple[float, dict[str, np.ndarray]]:
        """NumPy in, NumPy out, the shape of ``numpy_gpt2.loss_and_grads``: (mean loss, the gradient of every
        parameter in the canonical schema). Gradients are those of this call alone (old ones are cleared); a
        classification head, which this loss does not use, gets zeros. ``dropout_masks`` as in :meth:`forward`."""
        self.zero_grad(set_to_none=True)
        _, loss = self(self.to_device(tokens), self.to_device(targets, "targets"), dropout_masks)  # ids checked on host
        loss.backward()
        self._zero_unused_grads()
        return float(loss.detach()), self.grads_to_params()

    def _zero_unused_grads(self) -> None:
        """Zeros as the gradient of every trainable parameter the last backward did not reach (a head that loss
        does not use), as the NumPy spec reports them; frozen parameters keep None."""
        for p in self.parameters():
            if p.grad is None and p.requires_grad:
                p.grad = torch.zeros_like(p)

    # ------------------------------------------------------------------ sequence classification

    def _lengths_tensor(self, lengths: np.ndarray | torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """lengths [B] -> int64 on the model's device. Host values (an array, a CPU tensor) are checked, then copied
        once; a tensor already on an accelerator is checked for shape and dtype only, since reading its values
        would cost a device -> host round trip per call (pass host lengths to have them checked)."""
        if isinstance(lengths, torch.Tensor) and lengths.device.type != "cpu":
            if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or tuple(lengths.shape) != shape[:1]:
                raise ValueError(f"lengths must be an integer tensor of shape ({shape[0]},), got {lengths.dtype} "
                                 f"{tuple(lengths.shape)}")
            return lengths.to(self.device)
        host = lengths.numpy() if isinstance(lengths, torch.Tensor) else np.asarray(lengths)
        return torch.from_numpy(check_lengths(host, shape)).to(self.device, non_blocking=True)

    def classify(self, tokens: torch.Tensor, lengths: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Hugging Face's GPT2ForSequenceClassification: right-padded tokens [B, T] whose row b has ``lengths[b]``
        real tokens -> class logits [B, n_classes] = ln_f output at position lengths[b] - 1 @ score.weight.T.

        The causal mask keeps the padding after a row's last real token out of its hidden state, so a padded
        row scores as it would alone. ``lengths`` (int [B], each in 1 .. T) is checked on the host (host arrays;
        see :meth:`_lengths_tensor`).
        """
        if self.score is None:
            raise ValueError("this model has no classification head (config.n_classes is None)")
        self.check_tokens(tokens)
        index = self._lengths_tensor(lengths, tuple(tokens.shape)) - 1
        with self.autocast_context():
            h = self.hidden_states(tokens)  # [B, T, C]
            pooled = h[torch.arange(h.shape[0], device=h.device), index]  # [B, C] each row at its last real token
            return self.score(pooled)

    def classify_loss(
        self, tokens: torch.Tensor, lengths: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(class logits [B, n_classes], mean cross-entropy of ``labels`` [B], each in [0, n_classes)); both
        differentiable. bf16/fp16 logits are upcast to float32 for the loss."""
        logits = self.classify(tokens, lengths)
        host = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        target = torch.from_numpy(check_labels(host, tokens.shape[0], self.config.n_classes)).to(self.device)
        flat = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
        return logits, F.cross_entropy(flat, target)

    def classify_loss_and_grads(
        self, tokens: np.ndarray, lengths: np.ndarray, labels: np.ndarray
    ) -> tuple[float, dict[str, np.ndarray]]:
        """NumPy in, NumPy out, the shape of ``numpy_gpt2.classify_loss_and_grads``: (mean loss, the gradient of
        every parameter in the canonical schema; an untied ``lm_head`` gets zeros)."""
        self.zero_grad(set_to_none=True)
        _, loss = self.classify_loss(self.to_device(tokens), lengths, labels)
        loss.backward()
        self._zero_unused_grads()
        return float(loss.detach()), self.grads_to_params()

