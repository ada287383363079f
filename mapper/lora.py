"""LoRA (low-rank adapters) for GPT-2's linear layers: the settings, the canonical adapter names, init and merge.

An adapted linear layer computes, with its Conv1D weight ``W`` [in, out] and bias ``b`` [out]::

    y = x W + b + (alpha / r) (x A) B          A [in, r], B [r, out]

``targets`` picks which linears of every block are adapted: ``"attn"`` = ``attn.c_attn`` and ``attn.c_proj``,
``"mlp"`` = ``mlp.c_fc`` and ``mlp.c_proj``. The adapters live in the same flat dict as the model's parameters,
named after the layer they adapt, in the canonical ``[in, out]`` orientation of that layer::

    h.{i}.attn.c_attn.lora_A [C, r]    h.{i}.attn.c_attn.lora_B [r, 3C]
    h.{i}.attn.c_proj.lora_A [C, r]    h.{i}.attn.c_proj.lora_B [r, C]
    h.{i}.mlp.c_fc.lora_A    [C, r]    h.{i}.mlp.c_fc.lora_B    [r, 4C]
    h.{i}.mlp.c_proj.lora_A  [4C, r]   h.{i}.mlp.c_proj.lora_B  [r, C]

Initialisation (:func:`init_lora_params`): ``A`` uniform in ``[-1/sqrt(in), 1/sqrt(in)]`` (Kaiming-uniform with
a = sqrt(5), nn.Linear's and PEFT's default for ``A``: bound = sqrt(6 / ((1 + a^2) fan_in)) = 1 / sqrt(fan_in)),
``B`` zeros, so a freshly adapted model computes exactly the base model and the first step moves ``B`` only.

Both backends compute the gradient of every parameter, adapters and base weights alike: which tensors train
(usually the adapters alone, plus perhaps a classification head) is the optimizer's choice, by the set of
tensors it is given. :func:`merge_lora` folds trained adapters into the weights, giving a plain GPT-2 that
every loader and transformers reads.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from mapper.config import GPT2Config
from mapper.errors import describe_key_mismatch

# What each target name adapts inside every block, and each layer's (in, out) as multiples of n_embd.
LORA_TARGETS: dict[str, tuple[str, ...]] = {"attn": ("attn.c_attn", "attn.c_proj"), "mlp": ("mlp.c_fc", "mlp.c_proj")}
_LAYER_IN_OUT = {"attn.c_attn": (1, 3), "attn.c_proj": (1, 1), "mlp.c_fc": (1, 4), "mlp.c_proj": (4, 1)}
_LORA_KEY = re.compile(r"h\.(\d+)\.((?:attn|mlp)\.c_\w+)\.lora_([AB])")


@dataclass(frozen=True)
class LoraConfig:
    """``rank`` r >= 1, ``alpha`` > 0 (the update is scaled by alpha / r), ``targets`` a non-empty subset of
    {"attn", "mlp"} (stored sorted, as a tuple)."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("attn",)

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)) or self.rank < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
        if (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, (int, float, np.integer, np.floating))
            or not math.isfinite(self.alpha)
            or self.alpha <= 0
        ):
            raise ValueError(f"LoRA alpha must be a finite number > 0, got {self.alpha!r}")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        unknown = [t for t in targets if t not in LORA_TARGETS]
        if not targets or unknown:
            raise ValueError(f"LoRA targets must be a non-empty subset of {sorted(LORA_TARGETS)}, got {self.targets!r}")
        object.__setattr__(self, "rank", int(self.rank))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "targets", tuple(sorted(set(targets))))

    @property
    def scale(self) -> float:
        """alpha / r, the factor on (x A) B."""
        return self.alpha / self.rank

    @property
    def layers(self) -> tuple[str, ...]:
        """The adapted linears inside each block, e.g. ("attn.c_attn", "attn.c_proj")."""
        return tuple(layer for t in self.targets for layer in LORA_TARGETS[t])

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoraConfig:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown LoRA settings {sorted(unknown)}; expected rank, alpha, targets")
        return cls(**d)


def is_lora_key(name: str) -> bool:
    """Whether ``name`` is an adapter's canonical name (``h.{i}.<layer>.lora_A`` / ``lora_B``)."""
    return _LORA_KEY.fullmatch(name) is not None


def split_lora(params: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(the base parameters, the adapters), both in the order of ``params`` (no copies)."""
    base = {k: v for k, v in params.items() if not is_lora_key(k)}
    adapters = {k: v for k, v in params.items() if is_lora_key(k)}
    return base, adapters


def lora_param_shapes(config: GPT2Config, lora: LoraConfig) -> dict[str, tuple[int, int]]:
    """Every adapter's canonical name and shape: per block and adapted layer, lora_A [in, r] and lora_B [r, out]."""
    C, r = config.n_embd, lora.rank
    shapes: dict[str, tuple[int, int]] = {}
    for i in range(config.n_layer):
        for layer in lora.layers:
            n_in, n_out = _LAYER_IN_OUT[layer]
            shapes[f"h.{i}.{layer}.lora_A"] = (n_in * C, r)
            shapes[f"h.{i}.{layer}.lora_B"] = (r, n_out * C)
    return shapes


def init_lora_params(
    config: GPT2Config, lora: LoraConfig, seed: int = 0, dtype: np.dtype | str = np.float32
) -> dict[str, np.ndarray]:
    """Fresh adapters (only them: add them to a model's parameters with ``{**params, **adapters}``).

    ``A`` ~ U(-1/sqrt(in), 1/sqrt(in)), ``B`` = 0 (module docstring). Drawn in float64 from ``seed``, then cast,
    so float32 and float64 adapters from one seed hold the same numbers up to rounding.
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"parameters must be float32 or float64, got {dtype}")
    rng = np.random.default_rng(seed)
    adapters: dict[str, np.ndarray] = {}
    for name, shape in lora_param_shapes(config, lora).items():
        if name.endswith("lora_A"):
            bound = 1.0 / math.sqrt(shape[0])
            adapters[name] = rng.uniform(-bound, bound, shape).astype(dtype, copy=False)
        else:
            adapters[name] = np.zeros(shape, dtype=dtype)
    return adapters


def check_lora_params(params: dict[str, np.ndarray], lora: LoraConfig | None) -> None:
    """Raise ``ValueError`` unless the adapters in ``params`` are exactly those ``lora`` describes.

    The number of blocks is read from the base keys (``h.{i}.ln_1.weight``); shapes against the layer they adapt.
    With ``lora=None`` the check is that ``params`` holds no adapter at all.
    """
    adapters = [k for k in params if is_lora_key(k)]
    if lora is None:
        if adapters:
            raise ValueError(
                f"the parameters hold {len(adapters)} LoRA adapter tensor(s) ({adapters[0]}, ...) but no LoraConfig "
                "was given: pass lora=LoraConfig(rank, alpha, targets), or merge them with mapper.merge_lora"
            )
        return
    n_layer = 1 + max((int(m.group(1)) for k in params if (m := re.match(r"h\.(\d+)\.ln_1\.weight$", k))), default=-1)
    expected = [f"h.{i}.{layer}.lora_{ab}" for i in range(n_layer) for layer in lora.layers for ab in "AB"]
    missing = [k for k in expected if k not in params]
    unexpected = [k for k in adapters if k not in set(expected)]
    if missing or unexpected:
        raise ValueError(f"the LoRA adapters do not match {lora}: " + describe_key_mismatch(missing, unexpected))
    for i in range(n_layer):
        for layer in lora.layers:
            w = params.get(f"h.{i}.{layer}.weight")
            if w is None or w.ndim != 2:
                raise ValueError(f"LoRA adapters for h.{i}.{layer} but no matrix h.{i}.{layer}.weight to adapt")
            a, b = params[f"h.{i}.{layer}.lora_A"], params[f"h.{i}.{layer}.lora_B"]
            want_a, want_b = (w.shape[0], lora.rank), (lora.rank, w.shape[1])
            if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
                raise ValueError(
                    f"LoRA adapters of h.{i}.{layer} have shapes {tuple(a.shape)} and {tuple(b.shape)}; its weight "
                    f"{tuple(w.shape)} and rank {lora.rank} need lora_A {want_a} and lora_B {want_b}"
                )


def merge_lora(params: dict[str, np.ndarray], lora: LoraConfig) -> dict[str, np.ndarray]:
    """Plain parameters: every adapted ``W`` replaced by ``W + (alpha / r) A B``, the adapters removed.

    A new dict of fresh arrays (the input is not changed, and nothing in the result aliases it); the arithmetic
    runs in the parameters' dtype.
    """
    check_lora_params(params, lora)
    merged: dict[str, np.ndarray] = {}
    for name, value in params.items():
        if is_lora_key(name):
            continue
        layer = name.removesuffix(".weight")
        if name.endswith(".weight") and f"{layer}.lora_A" in params:
            a, b = params[f"{layer}.lora_A"], params[f"{layer}.lora_B"]
            merged[name] = value + lora.scale * (a @ b)  # [in, r] @ [r, out] -> [in, out], W's own orientation
        else:
            merged[name] = np.array(value, copy=True)
    return merged
