"""The oneDNN fast path for the engine's linear layers on the CPU (one flag: ``GPT2(..., onednn_linear=True)``).

On the AMD CPUs measured here torch's default CPU matmul, MKL ``sgemm``, runs at ~200-220 GFLOP/s (it takes its
AVX2 code path on non-Intel CPUs) while oneDNN's matmul reaches ~470-490; MKL also ran decoding's one-row
products on one core (the LM head ``x @ wte.T``: 11 ms per token against oneDNN's 5). oneDNN's linear is
reachable only through a private operator, ``torch.ops.mkldnn._linear_pointwise``, so it is used only where it
exists and, once per process, gave the same output and gradients as ``F.linear`` on a random product;
otherwise everything runs on ``F.linear``.

The private operator has no autograd formula, so training goes through :class:`OneDNNLinear`, whose backward
is two more oneDNN products on transposed views (no copies):

    y  = x @ W.T + b          forward           _linear_pointwise(x, W, b)
    dx = dy @ W               = linear(dy, W.T)  _linear_pointwise(dy, W.T)
    dW = dy.T @ x             = linear(dy.T, x.T) _linear_pointwise(dy.T, x.T)
    db = sum over rows of dy

Measured forward + backward, B*T = 256 rows, float32, 2 threads: the 768x3072 layers 199 -> 387 GFLOP/s, the
3072x768 layers 186 -> 347, the LM head 768x50257 164 -> 250. float32 on the CPU only; float64, autocast and
``torch.compile`` take ``F.linear``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from mapper.parity import scaled_error


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, in] @ weight[out, in].T + bias with oneDNN (no autograd)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class OneDNNLinear(torch.autograd.Function):
    """``F.linear`` with oneDNN's matmul in the forward and in both products of the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # [N, in]
        ctx.save_for_backward(x2, weight)
        ctx.has_bias = bias is not None
        return _onednn(x2, weight, bias).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()  # [N, out]
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _onednn(dy2, weight.t()).reshape(*dy.shape[:-1], weight.shape[1])  # dy @ W
        if ctx.needs_input_grad[1]:
            dw = _onednn(dy2.t(), x2.t())  # dy.T @ x, [out, in]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(dim=0)
        return dx, dw, db


@functools.cache
def onednn_linear_available() -> bool:
    """True when oneDNN's linear exists in this torch build and matches ``F.linear`` forward and backward
    (checked once per process)."""
    if not torch.backends.mkldnn.is_available():
        return False
    with torch.inference_mode(False):
        gen = torch.Generator().manual_seed(0)
        x0, w0, b0, dy = (torch.randn(*shape, generator=gen) for shape in ((7, 48), (24, 48), (24,), (7, 24)))
    try:
        outputs = []
        # the first call may come from inside no_grad or inference_mode (decoding): the check needs autograd
        with torch.inference_mode(False), torch.enable_grad():
            for fn in (OneDNNLinear.apply, F.linear):
                x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
                y = fn(x, w, b)
                y.backward(dy)
                outputs.append([y.detach(), x.grad, w.grad, b.grad])
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return all(got.shape == want.shape and scaled_error(got.numpy(), want.numpy()) <= 1e-5
               for got, want in zip(*outputs, strict=True))


def onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether this product can take the oneDNN path: float32 on the CPU, eager mode, no autocast."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and torch.backends.mkldnn.enabled
        and not torch.compiler.is_compiling()
        and onednn_linear_available()
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, onednn: bool = True
           ) -> torch.Tensor:
    """y = x @ weight.T + bias: x [..., in], weight [out, in] (nn.Linear layout) -> [..., out].

    With ``onednn`` (and where :func:`onednn_applies`): oneDNN's matmul, through :class:`OneDNNLinear` when
    autograd records; otherwise ``F.linear``.
    """
    if onednn and onednn_applies(x, weight):
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return OneDNNLinear.apply(x, weight, bias)
        return _onednn(x.reshape(-1, x.shape[-1]).contiguous(), weight, bias).reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)
