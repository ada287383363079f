"""The canonical parameter schema and GPT-2's initialisation.

Parameters are a flat ``dict[str, np.ndarray]`` keyed by Hugging Face GPT-2 names without the
``transformer.`` prefix, every matrix in Conv1D ``[in, out]`` orientation so the spec computes
``x @ W + b`` with no transposes::

    wte.weight [V, C]   wpe.weight [n_positions, C]   ln_f.weight / ln_f.bias [C]
    h.{i}.ln_1.weight / .bias [C]          h.{i}.ln_2.weight / .bias [C]
    h.{i}.attn.c_attn.weight [C, 3C]  .bias [3C]     (columns: q | k | v, heads contiguous inside each)
    h.{i}.attn.c_proj.weight [C, C]   .bias [C]
    h.{i}.mlp.c_fc.weight    [C, 4C]  .bias [4C]
    h.{i}.mlp.c_proj.weight  [4C, C]  .bias [C]
    lm_head.weight [V, C]                    only when the head is untied
    score.weight [C, n_classes]              only with a classification head (no bias, like Hugging Face's
                                             GPT2ForSequenceClassification: logits = h @ score.weight)

LoRA adapters (``h.{i}.<layer>.lora_A`` / ``lora_B``) join these keys when a ``mapper.lora.LoraConfig`` is given;
their names and shapes are ``mapper.lora.lora_param_shapes``.
"""

from __future__ import annotations

import math

import numpy as np

from mapper.config import GPT2Config
from mapper.errors import describe_key_mismatch
from mapper.lora import LoraConfig, lora_param_shapes

BLOCK_PARAMS = (
    "ln_1.weight", "ln_1.bias",
    "attn.c_attn.weight", "attn.c_attn.bias",
    "attn.c_proj.weight", "attn.c_proj.bias",
    "ln_2.weight", "ln_2.bias",
    "mlp.c_fc.weight", "mlp.c_fc.bias",
    "mlp.c_proj.weight", "mlp.c_proj.bias",
)  # fmt: skip


def block_param_names(config: GPT2Config) -> tuple[str, ...]:
    """The parameter names inside every block (``BLOCK_PARAMS`` less ``attn.c_attn.bias`` without a q/k/v bias)."""
    return BLOCK_PARAMS if config.qkv_bias else tuple(n for n in BLOCK_PARAMS if n != "attn.c_attn.bias")


def param_shapes(config: GPT2Config, lora: LoraConfig | None = None) -> dict[str, tuple[int, ...]]:
    """Every canonical parameter name and its shape, in a fixed order (embeddings, blocks, ln_f, heads), then the
    adapters of ``lora`` when given (``mapper.lora.lora_param_shapes``)."""
    V, C, P = config.vocab_size, config.n_embd, config.n_positions
    block_shapes = {
        "ln_1.weight": (C,), "ln_1.bias": (C,),
        "attn.c_attn.weight": (C, 3 * C), "attn.c_attn.bias": (3 * C,),
        "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,),
        "ln_2.weight": (C,), "ln_2.bias": (C,),
        "mlp.c_fc.weight": (C, 4 * C), "mlp.c_fc.bias": (4 * C,),
        "mlp.c_proj.weight": (4 * C, C), "mlp.c_proj.bias": (C,),
    }  # fmt: skip
    shapes: dict[str, tuple[int, ...]] = {"wte.weight": (V, C), "wpe.weight": (P, C)}
    for i in range(config.n_layer):
        for name in block_param_names(config):
            shapes[f"h.{i}.{name}"] = block_shapes[name]
    shapes["ln_f.weight"] = (C,)
    shapes["ln_f.bias"] = (C,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, C)
    if config.n_classes is not None:
        shapes["score.weight"] = (C, config.n_classes)
    if lora is not None:
        shapes.update(lora_param_shapes(config, lora))
    return shapes


def count_params(config: GPT2Config) -> int:
    """Number of parameters (a tied head counted once): ``param_shapes`` of a one- and a two-block copy of the
    config, the difference (one block) scaled to ``n_layer``, so a million-layer config is counted at once (and
    refused by its size, ``mapper.memory``) without listing its names."""
    one, two = (sum(math.prod(s) for s in param_shapes(config.replace(n_layer=n)).values()) for n in (1, 2))
    return one + (config.n_layer - 1) * (two - one)


def init_params(config: GPT2Config, seed: int = 0, dtype: np.dtype | str = np.float32) -> dict[str, np.ndarray]:
    """A fresh model, reproducible from ``seed``, drawn as ``config.init`` says: "gpt2" (:func:`gpt2_init`) or
    "course" (:func:`course_init`).

    Values are drawn in float64 and then cast, so a float32 and a float64 model from the same seed hold the same
    numbers up to rounding. Every tensor is drawn in the order of :func:`param_shapes` from one generator.
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"parameters must be float32 or float64, got {dtype}")
    rng = np.random.default_rng(seed)
    draw = gpt2_init if config.init == "gpt2" else course_init
    return {name: draw(name, shape, config, rng).astype(dtype, copy=False)
            for name, shape in param_shapes(config).items()}


def gpt2_init(name: str, shape: tuple[int, ...], config: GPT2Config, rng: np.random.Generator) -> np.ndarray:
    """GPT-2's initialisation of the tensor ``name`` (float64).

    Weights ~ N(0, 0.02); the residual projections ``attn.c_proj.weight`` and ``mlp.c_proj.weight`` get
    N(0, 0.02 / sqrt(2 L)) (GPT-2 paper: scale by 1/sqrt(N) the layers that add into the residual stream,
    two per block); LayerNorm gains are 1; every bias is 0.
    """
    if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
        return np.ones(shape)
    if name.endswith(".bias"):
        return np.zeros(shape)
    std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith("c_proj.weight") else 0.02
    return rng.standard_normal(shape) * std


def course_init(name: str, shape: tuple[int, ...], config: GPT2Config, rng: np.random.Generator) -> np.ndarray:
    """The course's initialisation of the tensor ``name`` (float64): PyTorch's defaults, which the book's
    ``GPTModel`` keeps.

    ``wte`` and ``wpe`` ~ N(0, 1) (``nn.Embedding``); every linear layer's weight and bias ~ U(-1/sqrt(fan_in),
    1/sqrt(fan_in)) (``nn.Linear``: Kaiming-uniform with a = sqrt(5), whose bound is exactly that), with fan_in
    the layer's input width: C for c_attn (each of q, k, v is a C -> C layer), attn.c_proj, mlp.c_fc, the
    untied ``lm_head`` and the classifier's ``score``; 4C for mlp.c_proj; LayerNorm scale 1 and shift 0.
    """
    if name in ("wte.weight", "wpe.weight"):
        return rng.standard_normal(shape)
    if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
        return np.ones(shape)
    if name.endswith(("ln_1.bias", "ln_2.bias", "ln_f.bias")):
        return np.zeros(shape)
    fan_in = 4 * config.n_embd if ".mlp.c_proj." in name else config.n_embd  # every other layer reads C channels
    bound = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, shape)


def validate_params(params: dict[str, np.ndarray], config: GPT2Config, lora: LoraConfig | None = None) -> np.dtype:
    """Check ``params`` against the schema of ``config`` (plus the adapters of ``lora``, if given); return their
    common float dtype.

    Raises ``ValueError`` naming the missing/unexpected keys, a wrong shape (with both shapes) or a
    mixed/unsupported dtype. Adapters without a ``lora`` are refused with a message saying so.
    """
    expected = param_shapes(config, lora)
    missing = [k for k in expected if k not in params]
    unexpected = [k for k in params if k not in expected]
    if missing or unexpected:
        if lora is None and any(k.endswith((".lora_A", ".lora_B")) for k in unexpected):
            raise ValueError(
                "parameters do not match the config: they hold LoRA adapters but no LoraConfig was given (pass "
                "lora=LoraConfig(rank, alpha, targets), or fold them in with mapper.merge_lora); "
                + describe_key_mismatch(missing, unexpected)
            )
        raise ValueError("parameters do not match the config: " + describe_key_mismatch(missing, unexpected))
    dtypes = set()
    for name, shape in expected.items():
        arr = params[name]
        if tuple(arr.shape) != shape:
            raise ValueError(f"parameter {name!r} has shape {tuple(arr.shape)}, the config expects {shape}")
        dtypes.add(np.dtype(arr.dtype))
    if len(dtypes) != 1:
        raise ValueError(f"parameters mix dtypes {sorted(str(d) for d in dtypes)}; use one of float32/float64")
    dtype = dtypes.pop()
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"parameters must be float32 or float64, got {dtype}")
    return dtype
