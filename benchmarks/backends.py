"""The implementations a benchmark compares, behind one small interface.

Each backend holds one model built from the same canonical parameters and runs three workloads on host
inputs handed to it as NumPy arrays (moved to its device before timing starts):

* ``forward(tokens)``: logits for [B, T] tokens (prefill);
* ``train_step(tokens, targets)``: forward + backward + AdamW (its own optimizer state, lr 1e-5, wd 0.1);
* ``decode(prompt, n)``: ``n`` greedy tokens after a [B, T] prompt through the KV cache.

Backends: ``numpy`` (the spec on its fast path, float32), ``torch-cpu-fused`` / ``torch-cpu-custom`` (the
engine's two layouts, float32), ``torch-cpu-bf16`` (fused, bf16 autocast; where the CPU multiplies bf16
natively), ``torch-cuda-{fp32,tf32,bf16}`` with ``-compile`` variants, and Hugging Face ``GPT2LMHeadModel`` at
the same device and precision (``hf-cpu``, ``hf-cpu-bf16``, ``hf-cuda-fp32``, ``hf-cuda-tf32``,
``hf-cuda-bf16``) as the reference a user would pick instead. Each row is compared with the Hugging Face row of
its own device and precision (:attr:`BackendSpec.hf_reference`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from mapper.config import GPT2Config
from mapper.host import cpu_flags, low_precision_support

LR, WEIGHT_DECAY = 1e-5, 0.1  # small enough that repeated steps stay finite; the cost does not depend on it


@dataclass(frozen=True)
class BackendSpec:
    """What a backend is: its name, family (numpy | torch | hf), device, precision and torch.compile."""

    name: str
    family: str
    device: str = "cpu"
    precision: str = "fp32"  # fp32 | tf32 | bf16
    compile: bool = False
    attention: str = "fused"

    @property
    def decode_itemsize(self) -> int:
        """Bytes per weight and per cached key/value a decoding step of this precision reads: bf16 decoding runs on
        weights cast once to bf16 (``GPT2.decoding_model``) and keeps its KV cache in bf16."""
        return 2 if self.precision == "bf16" else 4

    @property
    def hf_reference(self) -> str:
        """The Hugging Face row this one is compared with: same device, same precision (TF32 against TF32)."""
        return "hf-cpu" if (self.device, self.precision) == ("cpu", "fp32") else f"hf-{self.device}-{self.precision}"


CPU_BACKENDS = (
    BackendSpec("numpy", "numpy"),
    BackendSpec("torch-cpu-fused", "torch"),
    BackendSpec("torch-cpu-custom", "torch", attention="custom"),
    BackendSpec("torch-cpu-bf16", "torch", precision="bf16"),
    BackendSpec("hf-cpu", "hf"),
    BackendSpec("hf-cpu-bf16", "hf", precision="bf16"),
)
CUDA_BACKENDS = (
    BackendSpec("torch-cuda-fp32", "torch", "cuda", "fp32"),
    BackendSpec("torch-cuda-tf32", "torch", "cuda", "tf32"),
    BackendSpec("torch-cuda-bf16", "torch", "cuda", "bf16"),
    BackendSpec("torch-cuda-fp32-compile", "torch", "cuda", "fp32", compile=True),
    BackendSpec("torch-cuda-tf32-compile", "torch", "cuda", "tf32", compile=True),
    BackendSpec("torch-cuda-bf16-compile", "torch", "cuda", "bf16", compile=True),
    BackendSpec("hf-cuda-fp32", "hf", "cuda", "fp32"),
    BackendSpec("hf-cuda-tf32", "hf", "cuda", "tf32"),
    BackendSpec("hf-cuda-bf16", "hf", "cuda", "bf16"),
)
ALL_BACKENDS = {spec.name: spec for spec in CPU_BACKENDS + CUDA_BACKENDS}
# --backends takes these groups (or single names)
GROUPS = {
    "numpy": ["numpy"],
    "torch-cpu": ["torch-cpu-fused", "torch-cpu-custom", "torch-cpu-bf16"],
    "torch-cuda": [s.name for s in CUDA_BACKENDS if s.family == "torch"],
    "hf": [s.name for s in CPU_BACKENDS + CUDA_BACKENDS if s.family == "hf"],
}


def unavailable_reason(spec: BackendSpec) -> str | None:
    """Why ``spec`` cannot run here (one line), or None."""
    if spec.family in ("torch", "hf") or spec.device == "cuda":
        try:
            import torch
        except ImportError:
            return "torch is not installed"
        if spec.device == "cuda" and not torch.cuda.is_available():
            return ("no CUDA GPU here (this torch is built without CUDA)" if torch.version.cuda is None
                    else "no CUDA GPU visible to torch")
    if spec.device == "cpu" and spec.precision != "fp32":
        reason = low_precision_support(cpu_flags())[spec.precision]
        if reason:
            return reason
    if spec.family == "hf":
        try:
            import transformers  # noqa: F401
        except ImportError:
            return "transformers is not installed (pip install -e '.[bench]')"
    return None


class BenchModel:
    """One model of one implementation (a ``BackendSpec``), with the three workloads."""

    def __init__(self, spec: BackendSpec, config: GPT2Config, params: dict[str, np.ndarray]) -> None:
        self.spec, self.config = spec, config
        self._train_state: object = None
        if spec.family == "numpy":
            self.params = params  # the spec reads them in place; training gets its own copy (below)
            return
        import torch

        self.torch = torch
        self.device = torch.device(spec.device)
        if spec.family == "torch":
            from torch_gpt2 import GPT2

            self.model = GPT2.from_params(params, config, spec.attention, device=spec.device,
                                          autocast_dtype=torch.bfloat16 if spec.precision == "bf16" else None)
            if spec.compile:
                self.model.enable_compile()
        else:
            self.model = build_hf_model(params, config).to(self.device)

    # ------------------------------------------------------------------ plumbing

    def sync(self) -> None:
        if self.spec.device == "cuda":
            self.torch.cuda.synchronize()

    @contextlib.contextmanager
    def numerics(self):
        """TF32 on or off for this backend's matmuls, and autocast for Hugging Face's bf16 (the engine's own
        autocast is the model's ``autocast_dtype``)."""
        if self.spec.family == "numpy":
            yield
            return
        torch = self.torch
        previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.spec.precision == "tf32"
        autocast = (torch.autocast(self.spec.device, dtype=torch.bfloat16) if self.spec.family == "hf"
                    and self.spec.precision == "bf16" else contextlib.nullcontext())
        try:
            with autocast:
                yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous

    def compiled_only(self) -> contextlib.AbstractContextManager:
        """For a ``-compile`` backend, a context in which a call that would compile again (a new shape, a guard
        that failed, or the recompile limit that would send it to eager) raises instead: a timed call inside it
        ran the compiled graph. A no-op for the others."""
        if not self.spec.compile:
            return contextlib.nullcontext()
        return self.torch.compiler.set_stance("fail_on_recompile")

    def inputs(self, *arrays: np.ndarray) -> tuple:
        """Host arrays -> what this backend's calls take (device tensors), prepared outside any timing."""
        if self.spec.family == "numpy":
            return arrays
        return tuple(self.torch.from_numpy(np.ascontiguousarray(a)).to(self.device) for a in arrays)

    # ------------------------------------------------------------------ workloads

    def forward_fn(self, tokens: np.ndarray) -> Callable[[], object]:
        (x,) = self.inputs(tokens)
        if self.spec.family == "numpy":
            import numpy_gpt2

            return lambda: numpy_gpt2.forward(self.params, self.config, x, fast=True)
        torch = self.torch

        def run() -> object:
            with torch.no_grad(), self.numerics():
                out = self.model(x) if self.spec.family == "torch" else self.model(input_ids=x).logits
            self.sync()
            return out

        return run

    def train_fn(self, tokens: np.ndarray, targets: np.ndarray) -> Callable[[], object]:
        x, y = self.inputs(tokens, targets)
        if self.spec.family == "numpy":
            from mapper.training import Batch
            from numpy_gpt2.backend import NumpyBackend

            if self._train_state is None:  # the path `gpt2 train --backend numpy` runs, on its own copy
                self._train_state = NumpyBackend(self.config, self.params, WEIGHT_DECAY, "matrices")
            batch = [Batch(x, y)]
            return lambda: self._train_state.step(batch, lr=LR, grad_clip=None)
        torch = self.torch
        if self.spec.family == "torch":
            from torch_gpt2 import configure_adamw, train_step

            if self._train_state is None:
                self._train_state = configure_adamw(self.model, lr=LR, weight_decay=WEIGHT_DECAY)

            def run() -> object:
                with self.numerics():
                    out = train_step(self.model, self._train_state, [(x, y)], grad_clip=None)
                self.sync()
                return out

            return run
        import torch.nn.functional as F

        if self._train_state is None:
            self._train_state = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        optimizer = self._train_state

        def run_hf() -> object:
            optimizer.zero_grad(set_to_none=True)
            with self.numerics():
                logits = self.model(input_ids=x).logits
                loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
            loss.backward()
            optimizer.step()
            self.sync()
            return loss

        return run_hf

    def decode_fn(self, prompt: np.ndarray) -> Callable[[int], float]:
        """A function of n returning the seconds per token of n greedy decoding steps after ``prompt``.

        The prefill and the first token it yields are not timed: the clock starts when the first new token
        arrives and stops when the (n + 1)-th does, so only the n cached one-token steps are measured. Each
        backend's own token stream is timed (NumPy's and the engine's ``generate_stream``, Hugging Face's
        ``generate`` through a streamer), and every step ends with the ids on the host, so GPU work is done.
        """
        (x,) = self.inputs(prompt)
        if self.spec.family == "numpy":
            import numpy_gpt2

            params, config = self.params, self.config
            return lambda n: _seconds_per_step(numpy_gpt2.generate_stream(params, config, x, n + 1, fast=True))
        if self.spec.family == "torch":
            from torch_gpt2 import generate_stream

            def run(n: int) -> float:
                with self.numerics():
                    return _seconds_per_step(generate_stream(self.model, x, n + 1))

            return run
        torch = self.torch
        mask = torch.ones_like(x)

        def run_hf(n: int) -> float:
            stamps = _Stamps()
            with torch.no_grad(), self.numerics():
                self.model.generate(x, attention_mask=mask, use_cache=True, do_sample=False, streamer=stamps,
                                    max_new_tokens=n + 1, min_new_tokens=n + 1, eos_token_id=None, pad_token_id=0)
            # HF's streamer is handed the prompt first, then each new token (already on the host in its loop)
            return _seconds_per_step(iter(stamps.times[1:]), stamped=True)

        return run_hf

    def release(self) -> None:
        """Drop the model and training state (before the next size is built)."""
        self._train_state = None
        self.model = self.params = None
        if self.spec.device == "cuda":
            self.torch.cuda.empty_cache()


def build_hf_model(params: dict[str, np.ndarray], config: GPT2Config):
    """``transformers.GPT2LMHeadModel`` holding ``params`` (its Conv1D weights are [in, out], as canonical)."""
    import torch
    import transformers

    hf_config = transformers.GPT2Config(**{k: v for k, v in config.to_hf_dict().items() if k != "architectures"})
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(hf_config)
    state = {f"transformer.{name}": torch.from_numpy(value.copy()) for name, value in params.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"Hugging Face state mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval()


class _Stamps:
    """A ``transformers`` streamer that only records when each ``put`` arrives (duck-typed: put and end)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: object) -> None:
        if hasattr(value, "cpu"):
            value.cpu()  # the token is needed on the host to go on: wait for it like the other backends
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _seconds_per_step(steps: Iterator, stamped: bool = False) -> float:
    """Seconds per step after the first: ``steps`` yields once per new token (or is already timestamps)."""
    if stamped:
        times = list(steps)
    else:
        times = []
        for _ in steps:
            times.append(time.perf_counter())
    if len(times) < 2:
        raise ValueError(f"a decode timing needs at least 2 new tokens, got {len(times)}")
    return (times[-1] - times[0]) / (len(times) - 1)
