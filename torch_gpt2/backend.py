"""The torch engine as a backend of the training loop (``tasks.loop``) and of inference, on one process or under
``torchrun`` with DistributedDataParallel (gloo on the CPU, nccl on CUDA).

Distributed: every rank holds the whole model; each takes its share of every micro-batch (rows
``rank * B / world`` .. ``(rank + 1) * B / world``), DDP averages the gradients, and the losses are averaged
over ranks, so a step equals the single-process step on the whole batch up to float32 rounding. Rank 0 logs,
samples and writes checkpoints; the others wait at a barrier. Evaluation runs the same batches on every rank.
Decisions one rank makes alone (a signal it received, non-finite parameters) are agreed every step with an
all-reduce (``max_over_ranks``), so no rank waits in a barrier while another is in an all-reduce.
Each rank's device and the process group's backend come from :func:`distributed_device`: on CUDA, rank r of a
machine takes GPU ``LOCAL_RANK`` (``torch.cuda.set_device`` before the group is made, ``device_id`` passed to
it) and nccl; on the CPU, gloo. With ``compile``, the DDP module itself is compiled, so dynamo splits the graph
at DDP's gradient buckets and each bucket's all-reduce overlaps the rest of the backward (a compiled forward
inside DDP would hand DDP every gradient at the end of one fused backward, leaving nothing to overlap).

Switches: ``tf32`` lets CUDA float32 matmuls use TF32 tensor cores (faster, ~1e-3 relative; off by default so
float32 runs match the parity tests); ``deterministic`` makes torch pick deterministic kernels (and cuBLAS a
fixed workspace), which a bit-exact ``--resume`` on a GPU needs: float atomics in some backward kernels
(embedding, index_add, some attention backwards) otherwise sum in an order that changes from run to run.

Dropout: the module is in training mode for a step and in eval mode for every loss, logit and sample. A step
with dropout seeds torch's generators from (seed, step, rank) (``mapper.dropout.dropout_seed``) inside
``torch.random.fork_rng``, so the masks depend on nothing else: a resumed run draws the masks of the
uninterrupted run, and the caller's own random state is left as it was.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import numpy as np
import torch

from mapper.config import GPT2Config
from mapper.dropout import dropout_seed
from mapper.layouts import from_module_state, to_module_state
from mapper.lora import LoraConfig
from mapper.sampling import cut_at_eos, new_token_budget
from mapper.schema import param_shapes
from mapper.training import Batch, distributed_world, local_rank
from torch_gpt2.generate import generate
from torch_gpt2.model import GPT2, allow_recompiles, resolve_device
from torch_gpt2.optim import configure_adamw, train_step

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def distributed_device(device: str | None, local_rank: int, cuda_available: bool) -> tuple[str, str]:
    """(this rank's device, the process group's backend) for a run of several processes.

    ``device`` None picks cuda when there is a GPU, else cpu; cuda (without an index) becomes ``cuda:LOCAL_RANK``
    with nccl, so each process of a machine drives its own GPU; cpu runs on gloo. A device with an index would
    put every rank on that one GPU and is refused (``ValueError``), as is any other device type.
    """
    if device is None:
        device = "cuda" if cuda_available else "cpu"
    kind, _, index = device.partition(":")
    if kind == "cuda":
        if index:
            raise ValueError(f"--device {device} names one GPU for every process; under torchrun pass --device cuda "
                             "(each process takes GPU LOCAL_RANK)")
        return f"cuda:{local_rank}", "nccl"
    if kind == "cpu":
        return "cpu", "gloo"
    raise ValueError(f"--device {device}: several processes train on cuda (nccl) or cpu (gloo)")


def use_deterministic_algorithms() -> None:
    """Deterministic kernels from here on (process-wide): torch raises for an operation that has none. cuBLAS
    needs its workspace fixed before it starts, so call this before the first CUDA matrix product."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


class TorchBackend:
    """A ``GPT2`` module, AdamW (``configure_adamw``), and DDP when ``torchrun`` started several processes.
    A backend made by :meth:`for_inference` has no optimizer and refuses ``step``."""

    name = "torch"

    def __init__(self, config: GPT2Config, params: dict[str, np.ndarray], weight_decay: float | None, decay: str,
                 device: str | None = None, dtype: str = "float32", autocast: str | None = None,
                 compile: bool = False, attention: str = "fused", betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, trainable: set[str] | None = None, lora: LoraConfig | None = None,
                 tf32: bool = False, deterministic: bool = False, seed: int = 0) -> None:
        self.config = config
        self.lora = lora
        self.seed = seed
        self.steps = 0  # optimizer steps taken (restored from the optimizer state), which seed the dropout masks
        self.rank, self.world = distributed_world()
        self.is_main = self.rank == 0
        if deterministic:
            use_deterministic_algorithms()
        if tf32:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        if self.world > 1:
            device, group_backend = distributed_device(device, local_rank(), torch.cuda.is_available())
            if group_backend == "nccl":
                resolve_device(device)  # a LOCAL_RANK beyond the GPUs fails here, in one line
                torch.cuda.set_device(device)
            if not torch.distributed.is_initialized():
                torch.distributed.init_process_group(
                    group_backend, device_id=torch.device(device) if group_backend == "nccl" else None)
        np_params = {k: v.astype(dtype, copy=False) for k, v in params.items()}
        self.model = GPT2.from_params(np_params, config, attention, device=device,
                                      autocast_dtype=AUTOCAST[autocast] if autocast else None,
                                      compile=compile and self.world == 1, lora=lora)
        self.trainable = None if trainable is None else set(trainable)  # canonical names; None: all
        if trainable is not None:  # the fused layout's module names are the canonical names
            named = dict(self.model.named_parameters())
            missing = sorted(set(trainable) - set(named))
            if missing:
                raise ValueError(f"no such parameters to train: {missing[:5]}")
            for name, p in named.items():
                p.requires_grad_(name in trainable)
        self.optimizer = None if weight_decay is None else configure_adamw(
            self.model, lr=0.0, weight_decay=weight_decay, betas=betas, eps=eps, decay=decay)
        self.scaler = torch.amp.GradScaler(self.model.device.type) if autocast == "fp16" else None
        self.trained = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.model.device.index] if self.model.device.type == "cuda" else None
            self.trained = DistributedDataParallel(self.model, device_ids=ids)
            if compile:
                allow_recompiles()
                self.trained = torch.compile(self.trained, dynamic=False)

    @classmethod
    def for_inference(cls, config: GPT2Config, params: dict[str, np.ndarray], device: str | None = None,
                      dtype: str = "float32", lora: LoraConfig | None = None) -> TorchBackend:
        """A backend for losses, class logits and greedy decoding only (``gpt2 classify``, ``gpt2 eval``)."""
        return cls(config, params, None, "matrices", device=device, dtype=dtype, lora=lora)

    def _trainer(self) -> torch.optim.Optimizer:
        if self.optimizer is None:
            raise ValueError("this backend was made for inference (TorchBackend.for_inference): it cannot train")
        return self.optimizer

    # ------------------------------------------------------------------ the loop's interface

    def _share(self, array: np.ndarray) -> np.ndarray:
        """This rank's rows of a batch (the whole batch on one process)."""
        if self.world == 1:
            return array
        if len(array) % self.world:
            raise ValueError(f"a batch of {len(array)} rows does not split over {self.world} processes; choose a "
                             f"--batch-size divisible by {self.world}")
        n = len(array) // self.world
        return array[self.rank * n : (self.rank + 1) * n]

    def _all_ranks_mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(value)
            value /= self.world
        return value

    def _device_batch(self, batch: Batch) -> dict[str, torch.Tensor]:
        """This rank's share of a batch on the model's device (token ids checked on the host first)."""
        out = {"tokens": self.model.to_device(self._share(batch.tokens))}
        if batch.is_classification:
            out["lengths"] = self._share(batch.lengths)  # host: checked there and copied once by model.classify
            out["labels"] = torch.from_numpy(self._share(batch.labels)).to(self.model.device)
        else:
            out["targets"] = self.model.to_device(self._share(batch.targets), "targets")
        return out

    def step(self, micro_batches: list[Batch], lr: float, grad_clip: float | None) -> tuple[float, float]:
        batches = [self._device_batch(b) for b in micro_batches]
        self.trained.train()
        with self._step_rng(), self.model.autocast_context() if self.scaler is None else contextlib.nullcontext():
            stats = train_step(self.trained, self._trainer(), batches, lr=lr, grad_clip=grad_clip, scaler=self.scaler,
                               reduce_loss=self._all_ranks_mean)
        self.steps += 1
        return stats["loss"], stats["grad_norm"]

    @contextlib.contextmanager
    def _step_rng(self) -> Iterator[None]:
        """With dropout: torch's generators seeded for this step alone (module docstring), restored afterwards."""
        if not self.config.has_dropout:
            yield
            return
        device = self.model.device
        devices = [torch.cuda.current_device() if device.index is None else device.index] if (
            device.type == "cuda") else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(dropout_seed(self.seed, self.steps, self.rank))
            yield

    @torch.no_grad()
    def loss(self, batch: Batch) -> float:
        self.model.eval()
        if batch.is_classification:
            logits = torch.from_numpy(self.class_logits(batch))
            return float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(batch.labels)))
        _, value = self.model(self.model.to_device(batch.tokens), self.model.to_device(batch.targets, "targets"))
        return float(value)

    @torch.no_grad()
    def class_logits(self, batch: Batch) -> np.ndarray:
        self.model.eval()
        logits = self.model.classify(self.model.to_device(batch.tokens), batch.lengths)
        return logits.double().cpu().numpy()

    def greedy(self, prompt: list[int], max_new_tokens: int, eos_token_id: int | None) -> list[int]:
        n = new_token_budget(len(prompt), max_new_tokens, self.config)
        self.model.eval()
        return cut_at_eos(generate(self.model, prompt, n, eos_token_id=eos_token_id)[len(prompt):], eos_token_id)

    def params(self) -> dict[str, np.ndarray]:
        return self.model.to_params()

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """AdamW's moments of the trained parameters, mapped to the canonical schema like the weights (the
        layout change is linear; frozen parameters are filled with zeros for the mapping and then left out)."""
        names = {id(p): name for name, p in self.model.named_parameters()}
        m = {name: np.zeros(p.shape, dtype=self._np_dtype) for name, p in self.model.named_parameters()}
        v = {name: np.zeros(p.shape, dtype=self._np_dtype) for name, p in self.model.named_parameters()}
        steps = set()
        for group in self._trainer().param_groups:
            for p in group["params"]:
                state = self._trainer().state.get(p)
                if not state:  # no step taken yet
                    steps.add(0)
                    continue
                m[names[id(p)]] = state["exp_avg"].detach().cpu().numpy()
                v[names[id(p)]] = state["exp_avg_sq"].detach().cpu().numpy()
                steps.add(int(state["step"]))
        if len(steps) != 1:
            raise RuntimeError(f"AdamW's parameters disagree on the step count: {sorted(steps)}")
        out = {"t": np.array([steps.pop()], dtype=np.float64)}
        for prefix, state in (("m.", m), ("v.", v)):
            canonical = from_module_state(state, self.config, self.model.attention, self.lora)
            out.update({prefix + k: a for k, a in canonical.items() if self.trainable is None or k in self.trainable})
        return out

    def load_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        t = int(state["t"][0])
        self.steps = t
        moments = {}
        shapes = param_shapes(self.config, self.lora)
        for prefix in ("m.", "v."):
            canonical = {k: np.zeros(shape, dtype=self._np_dtype) for k, shape in shapes.items()}
            canonical.update({k[len(prefix):]: a for k, a in state.items() if k.startswith(prefix)})
            moments[prefix] = to_module_state(canonical, self.config, self.model.attention, self.lora)
        for name, p in self.model.named_parameters():
            if not p.requires_grad:  # frozen: AdamW holds no state for it
                continue
            self._trainer().state[p] = {
                "step": torch.tensor(float(t), dtype=torch.float32, device=p.device if self._fused else "cpu"),
                "exp_avg": torch.from_numpy(moments["m."][name]).to(device=p.device, dtype=p.dtype),
                "exp_avg_sq": torch.from_numpy(moments["v."][name]).to(device=p.device, dtype=p.dtype),
            }

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def max_over_ranks(self, value: int) -> int:
        """The largest ``value`` of any rank (an all-reduce with MAX); ``value`` itself in one process."""
        if self.world == 1:
            return value
        agreed = torch.tensor([value], dtype=torch.int64, device=self.model.device)
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
        return int(agreed.item())

    @property
    def _np_dtype(self) -> np.dtype:
        return np.float64 if self.model.dtype == torch.float64 else np.float32

    @property
    def _fused(self) -> bool:
        return bool(self._trainer().defaults.get("fused"))


def finish() -> None:
    """Leave the process group (after a distributed run)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


