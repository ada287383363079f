"""The oneDNN fast path for ``nn.Linear`` on the CPU (one flag: ``GPT2(..., onednn_linear=True)``).

On the AMD CPUs measured here torch's default CPU matmul (MKL ``sgemm``) runs skinny products on one core:
decoding's one-row products and the LM head ``x @ wte.T`` took 11 ms per token where oneDNN's matmul took 5.
oneDNN's linear is reachable only through a private operator, ``torch.ops.mkldnn._linear_pointwise``, so it
is used only where it exists and, once per process, gave the same numbers as ``F.linear`` on a random product;
otherwise everything runs on ``F.linear``. The private op has no autograd formula: it serves float32 CPU
inference (no grad, no autocast, not under ``torch.compile``); training takes ``F.linear``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.cache
def onednn_linear_available() -> bool:
    """True when oneDNN's linear exists in this torch build and matches ``F.linear`` (checked once)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        op = torch.ops.mkldnn._linear_pointwise
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*shape, generator=gen) for shape in ((7, 48), (24, 48), (24,)))
        with torch.no_grad():
            got, want = op(x, w, b, "none", [], ""), F.linear(x, w, b)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return got.shape == want.shape and bool(torch.allclose(got, want, rtol=1e-5, atol=1e-5))


def onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether this product can take the oneDNN path: float32 on the CPU, inference, eager mode."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and torch.backends.mkldnn.enabled
        and not torch.compiler.is_compiling()
        and onednn_linear_available()
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, onednn: bool = True
           ) -> torch.Tensor:
    """y = x @ weight.T + bias: x [..., in], weight [out, in] (nn.Linear layout) -> [..., out].

    With ``onednn`` (and where :func:`onednn_applies`), oneDNN's matmul; otherwise ``F.linear``.
    """
    if onednn and onednn_applies(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")
    return F.linear(x, weight, bias)
