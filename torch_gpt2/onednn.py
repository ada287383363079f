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

**Which of the two, decided by measurement.** On a 2-core Intel Xeon with AMX, MKL was the faster float32
path (376 against oneDNN's 362 GFLOP/s on the 768x3072 product): the vendor does not decide it. The first
float32 CPU product of a model left at ``onednn_linear=None`` (the default) runs :func:`measure_linear_kernels`,
about a second of GPT-2 124M-shaped products, forward and backward, by both kernels, and keeps the faster;
the result is cached per CPU model and torch version in ``cache_root()/linear-kernel.json`` (the project's
cache folder, ``$GPT2_CACHE``), so later
processes only read it. ``GPT2_ONEDNN_LINEAR=1`` (or 0) overrides the measurement, and ``onednn_linear=True``
(or False) on a model overrides both. ``gpt2 --version`` and the bench header print the choice and why.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from mapper.atomic import atomic_write
from mapper.download import cache_root
from mapper.host import cpu_identity
from mapper.parity import scaled_error

ENV = "GPT2_ONEDNN_LINEAR"  # 1 / 0: oneDNN or F.linear for models left at onednn_linear=None
CACHE_FILE = "linear-kernel.json"
CACHE_FORMAT = 1


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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, onednn: bool | None = None
           ) -> torch.Tensor:
    """y = x @ weight.T + bias: x [..., in], weight [out, in] (nn.Linear layout) -> [..., out].

    Where :func:`onednn_applies` and ``onednn`` is True (None: :func:`preferred_linear`'s measured choice):
    oneDNN's matmul, through :class:`OneDNNLinear` when autograd records; otherwise ``F.linear``.
    """
    if onednn_applies(x, weight) and (preferred_linear().onednn if onednn is None else onednn):
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return OneDNNLinear.apply(x, weight, bias)
        return _onednn(x.reshape(-1, x.shape[-1]).contiguous(), weight, bias).reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


# ------------------------------------------------------------------------------------------------------
# the measured choice between oneDNN and F.linear (MKL)
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearChoice:
    """Whether float32 CPU products go to oneDNN, who decided, and the measured seconds (when measured)."""

    onednn: bool
    decided_by: str
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def kernel(self) -> str:
        return "oneDNN" if self.onednn else "MKL (F.linear)"

    def describe(self) -> str:
        """One line: "oneDNN (measured: 41.0 ms against MKL's 63.2; cached in ...)"."""
        return f"{self.kernel} ({self.decided_by})"


def measure_linear_kernels(repeats: int = 5) -> dict[str, float]:
    """Median seconds of one set of GPT-2 124M-shaped float32 products by each kernel, the two alternating:
    forward + backward of 256 rows through the MLP's 768 -> 3072 and 3072 -> 768 layers (a train step's
    products), and forwards of 1024 rows and of one row through 768 -> 3072 (a prefill, a decoding step)."""
    def run(fn) -> None:
        for x, w, b, dy in cases:
            if dy is None:
                with torch.no_grad():
                    fn(x, w, b)
            else:
                fn(x, w, b).backward(dy)

    kernels = {"oneDNN": OneDNNLinear.apply, "MKL": F.linear}
    times: dict[str, list[float]] = {name: [] for name in kernels}
    # the first call may come from inside no_grad or inference_mode (decoding): the measurement needs autograd
    with torch.inference_mode(False), torch.enable_grad():
        gen = torch.Generator().manual_seed(0)
        cases = []
        for rows, n_in, n_out, backward in ((256, 768, 3072, True), (256, 3072, 768, True),
                                            (1024, 768, 3072, False), (1, 768, 3072, False)):
            x = torch.randn(rows, n_in, generator=gen).requires_grad_(backward)
            w = (0.02 * torch.randn(n_out, n_in, generator=gen)).requires_grad_(backward)
            b = torch.zeros(n_out).requires_grad_(backward)
            cases.append((x, w, b, torch.randn(rows, n_out, generator=gen) if backward else None))
        for fn in kernels.values():
            run(fn)  # warm-up: first-touch memory, oneDNN's primitive cache
        for _ in range(repeats):
            for name, fn in kernels.items():
                start = time.perf_counter()
                run(fn)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _cache_key() -> str:
    return f"{cpu_identity()} | torch {torch.__version__}"


def _read_cache(path: Path) -> dict:
    """The cache file's entries; {} when it is missing, unreadable or of another format (it is then rewritten)."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(document, dict) or document.get("format") != CACHE_FORMAT:
        return {}
    entries = document.get("entries")
    return entries if isinstance(entries, dict) else {}


def _env_choice() -> bool | None:
    value = os.environ.get(ENV)
    if value is None or value == "":
        return None
    if value.lower() in ("1", "true", "yes", "onednn"):
        return True
    if value.lower() in ("0", "false", "no", "mkl"):
        return False
    raise ValueError(f"{ENV}={value!r}: use 1 (oneDNN) or 0 (F.linear / MKL), or unset it to measure")


def machine_busy() -> str | None:
    """Why a measurement taken now would not speak for this machine: other work keeping its CPUs busy (the 1-minute
    load average at least the number of CPUs this process may use), else None. On a 2-core AMD EPYC (family 25,
    model 17) under a load average of 5-8, oneDNN took 142 ms against MKL's 97 on the products below; on the same
    CPU, quiet, 77 against 94: the busy answer would have cached the slower kernel for good."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return f"the machine is busy (load average {load:.1f} on {cpus} CPUs)" if load >= cpus else None


@functools.cache
def preferred_linear() -> LinearChoice:
    """This machine's kernel for float32 CPU products (once per process): ``GPT2_ONEDNN_LINEAR`` if set; MKL where
    oneDNN's linear is missing or failed its check; else the cached measurement for this CPU model and torch
    version, measured now (:func:`measure_linear_kernels`) and cached if there is none (not cached while
    :func:`machine_busy`: measured again by the next process). ``preferred_linear.
    cache_clear()`` forgets the process's answer (the file stays)."""
    forced = _env_choice()
    if forced is not None:
        return LinearChoice(forced, f"{ENV}={os.environ[ENV]}")
    if not onednn_linear_available():
        return LinearChoice(False, "oneDNN's linear is not available in this torch build, or failed its check")
    path = cache_root() / CACHE_FILE
    entries = _read_cache(path)
    key = _cache_key()
    entry = entries.get(key)
    if not (isinstance(entry, dict) and isinstance(entry.get("seconds"), dict)
            and {"oneDNN", "MKL"} <= set(entry["seconds"])):
        busy = machine_busy()
        entry = {"seconds": measure_linear_kernels(), "threads": torch.get_num_threads(),
                 "measured": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
        if busy:  # other work skews the two kernels unequally: use the answer now, measure again next time
            where = f"not cached: {busy}"
        else:
            entries[key] = entry
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                text = json.dumps({"format": CACHE_FORMAT, "entries": entries}, indent=2) + "\n"
                atomic_write(path, lambda f: f.write(text.encode()))
                where = f"cached in {path}"
            except OSError as e:
                where = f"not cached: {e}"
    else:
        where = f"read from {path}"
    seconds = {k: float(v) for k, v in entry["seconds"].items()}
    onednn = seconds["oneDNN"] <= seconds["MKL"]
    return LinearChoice(onednn, f"measured on {entry.get('threads')} threads: oneDNN {1e3 * seconds['oneDNN']:.1f} "
                                f"ms, MKL {1e3 * seconds['MKL']:.1f} ms; {where}", seconds)
