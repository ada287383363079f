"""The torch engine's optimizer utilities: AdamW with the project's weight-decay rule, and one optimizer step
(gradient accumulation, the non-finite loss check, clipping, fp16 loss scaling)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from mapper.training import check_finite_loss, decays

__all__ = ["configure_adamw", "gradient_norm", "micro_batch_loss", "train_step"]


def configure_adamw(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    decay: str = "matrices",
) -> torch.optim.AdamW:
    """AdamW whose weight decay follows the rule ``decay`` (``mapper.training.decays``), as ``numpy_gpt2.AdamW``'s.

    ``decay="matrices"``: decay on matrices and embeddings (dim >= 2) only, never on biases or LayerNorm gains
    (GPT-2 / nanoGPT); ``"all"``: every tensor, what ``torch.optim.AdamW(model.parameters())`` does.
    torch's fused AdamW kernel (CPU and CUDA): one pass over each tensor, no temporaries. On the CPU it took
    10 ms per step for GPT-2's wte where the single-tensor implementation took 139 ms (that one allocates
    ``sqrt(v) / c`` and more per tensor), and it agrees with the NumPy spec's AdamW to 1 ulp in float64.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decayed = [p for p in params if decays(p.dim(), decay)]
    kept = [p for p in params if not decays(p.dim(), decay)]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") for p in params)
    groups = [{"params": decayed, "weight_decay": weight_decay}, {"params": kept, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=None if fused else False, fused=fused)


def micro_batch_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor] | dict[str, torch.Tensor]
                     ) -> torch.Tensor:
    """The mean loss of one micro-batch: ``(tokens, targets)`` or ``{"tokens", "targets"}`` for language modelling,
    ``{"tokens", "lengths", "labels"}`` for classification (cross-entropy of ``model.classify``'s logits; not
    through a DistributedDataParallel wrapper, whose gradient hooks only see ``forward``)."""
    if isinstance(batch, dict) and "labels" in batch:
        if isinstance(getattr(model, "_orig_mod", model), nn.parallel.DistributedDataParallel):  # compiled or not
            raise ValueError("classification fine-tuning runs in one process (DistributedDataParallel only wraps "
                             "the language-model forward)")
        logits = model.classify(batch["tokens"], batch["lengths"])
        return nn.functional.cross_entropy(logits.float(), batch["labels"])
    tokens, targets = (batch["tokens"], batch["targets"]) if isinstance(batch, dict) else batch
    return model(tokens, targets)[1]


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    lr: float | None = None,
    grad_clip: float | None = 1.0,
    scaler: torch.amp.GradScaler | None = None,
    reduce_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """One optimizer step over gradient-accumulated micro-batches of (tokens [B, T], targets [B, T]).

    Each micro-batch's mean loss is divided by their number before ``backward``, so the gradient is that
    of the mean of micro-batch losses (the full batch's mean when the micro-batches count the same number
    of targets). A non-finite loss raises ``FloatingPointError`` before the optimizer touches anything (one
    host sync per step). Then the global gradient norm is clipped to ``grad_clip`` (None: not clipped) and the
    optimizer steps with ``lr`` (None: keep the groups' lr). ``scaler`` is needed for fp16 autocast.
    ``reduce_loss`` maps the summed loss before it is checked and reported (a distributed run averages it over
    ranks there, so every rank makes the same decision). Under DistributedDataParallel the gradients are
    synchronised once, on the last micro-batch.
    Returns {"loss": mean micro-batch loss, "grad_norm": norm before clipping, "lr": lr used}.
    """
    if not micro_batches:
        raise ValueError("train_step needs at least one micro-batch")
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    total_loss = torch.zeros((), device=device, dtype=torch.float32 if device.type == "mps" else torch.float64)
    no_sync = getattr(model, "no_sync", contextlib.nullcontext)  # DDP: all-reduce only on the last micro-batch
    for i, batch in enumerate(micro_batches):
        with no_sync() if i < len(micro_batches) - 1 else contextlib.nullcontext():
            loss = micro_batch_loss(model, batch)
            scaled = loss / len(micro_batches)
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total_loss += loss.detach().to(total_loss.dtype)
    if reduce_loss is not None:
        total_loss = reduce_loss(total_loss)
    mean_loss = float(total_loss) / len(micro_batches)
    try:
        check_finite_loss(mean_loss)
    except FloatingPointError:
        optimizer.zero_grad(set_to_none=True)
        raise
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    if grad_clip is None:
        grad_norm = gradient_norm(model.parameters())
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return {"loss": mean_loss, "grad_norm": float(grad_norm), "lr": float(optimizer.param_groups[0]["lr"])}


def gradient_norm(parameters) -> torch.Tensor:
    """The global L2 norm of the parameters' gradients (what ``clip_grad_norm_`` returns), without clipping."""
    norms = [torch.linalg.vector_norm(p.grad) for p in parameters if p.grad is not None]
    if not norms:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(norms))
