"""The training loop, written once for both backends: steps, schedule, evaluation, samples, logging, checkpoints,
resume, Ctrl-C. A backend (``numpy_gpt2.training.NumpyBackend``, ``torch_gpt2.training.TorchBackend``) only
implements :class:`Backend`: one optimizer step, a loss, a greedy sample, and its state in and out.

A run lives in one folder:

    DIR/config.json, DIR/model.safetensors   the model of the last checkpoint, Hugging Face layout: gpt2 generate,
                                             gpt2 convert and transformers load DIR directly
    DIR/checkpoint/                          the last complete checkpoint: that model, optimizer.safetensors
                                             (AdamW's moments in the canonical schema) and state.json (step,
                                             tokens seen, the run's arguments)
    DIR/log.jsonl                            one line per step: step, epoch, tokens_seen, train_loss, lr,
                                             grad_norm, elapsed; on evaluation steps also val_loss,
                                             eval_train_loss and the greedy sample
    DIR/loss.png                             train and validation loss against tokens seen, redrawn at each eval
    DIR/tokens-*.npy                         the tokenized text, reused by the next run on the same text

A checkpoint is written into a fresh folder, each file fsynced, then renamed into place; the previous
checkpoint is removed only after that, so a crash leaves one complete checkpoint. ``resume`` continues from it
with the same arguments: the data order of epoch e is a permutation seeded by (seed, e), the schedule depends
only on the step, so the resumed run computes exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from mapper.checkpoint import (
    CheckpointError,
    atomic_write,
    load_checkpoint,
    load_lora_adapters,
    load_tensors,
    save_checkpoint,
    save_lora_adapters,
    save_tensors,
)
from mapper.config import GPT2Config
from mapper.lora import merge_lora, split_lora
from tasks.batch import Batch
from tasks.schedule import schedule_lr

STATE_FORMAT = 1
CHECKPOINT, PREVIOUS = "checkpoint", "checkpoint.previous"
LORA_FILE = "lora.safetensors"  # a LoRA run's adapters; its checkpoint's model is their frozen base


class Dataset(Protocol):
    """What the loop needs from a task's data (``tasks.text.TextData``, ``tasks.finetune``'s data sets)."""

    def train_batches(self, batch_size: int, epoch: int, seed: int) -> list[np.ndarray]:
        """Epoch ``epoch``'s batches of training indices: seeded by (seed, epoch), the last incomplete dropped."""
        ...

    def train_batch(self, indices: np.ndarray) -> Batch: ...

    def val_batches(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]: ...

    def val_batch(self, indices: np.ndarray) -> Batch: ...

    @property
    def n_train(self) -> int: ...

    def save_cache(self) -> None: ...


class Backend(Protocol):
    """What the loop needs from an implementation. Arrays in and out are NumPy, parameters canonical."""

    name: str
    config: GPT2Config
    is_main: bool  # writes logs and checkpoints (rank 0 of a distributed run, or the only process)

    def step(self, micro_batches: list[Batch], lr: float, grad_clip: float | None) -> tuple[float, float]:
        """One optimizer step over the micro-batches (their gradients averaged); returns (mean loss, gradient norm
        before clipping). A non-finite loss raises ``FloatingPointError`` before any parameter changes."""
        ...

    def loss(self, batch: Batch) -> float: ...

    def class_logits(self, batch: Batch) -> np.ndarray:
        """Classification logits [B, n_classes] of a batch with ``lengths``."""
        ...

    def greedy(self, prompt: list[int], max_new_tokens: int, eos_token_id: int | None) -> list[int]: ...

    def params(self) -> dict[str, np.ndarray]: ...

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """AdamW's state: ``m.<name>``, ``v.<name>`` (canonical names and layout) and ``t`` ([1] array)."""
        ...

    def load_optimizer_state(self, state: dict[str, np.ndarray]) -> None: ...

    def barrier(self) -> None: ...


@dataclass
class RunArgs:
    """Everything that defines a run; a resumed run must have the same values (``HOW_FIELDS`` may differ)."""

    backend: str
    dtype: str
    config: dict
    init: str  # "seed N" (GPT-2's initialisation) or the checkpoint started from
    data: list[str]
    data_sha256: str
    context: int
    stride: int
    batch_size: int
    grad_accum: int
    lr: float
    schedule: str
    min_lr: float
    warmup_steps: int
    weight_decay: float
    decay: str
    grad_clip: float
    epochs: int | None
    max_steps: int | None
    eval_every: int
    eval_batches: int
    val_fraction: float
    seed: int
    sample_prompt: str
    sample_tokens: int
    save_every: int = 0
    device: str = "cpu"
    autocast: str | None = None
    compile: bool = False
    world_size: int = 1
    task: str = "pretrain"
    options: dict = field(default_factory=dict)  # the task's own settings (trainable, lora, mask_prompt, ...)


HOW_FIELDS = {"data", "save_every", "device", "compile"}  # how it runs, not what it computes


@dataclass
class Progress:
    step: int = 0
    tokens_seen: int = 0
    elapsed: float = 0.0
    log_lines: int = 0
    history: list[dict] = field(default_factory=list)


class Stop(Exception):
    """The run stopped early on purpose (--stop-after, Ctrl-C) after writing a checkpoint."""


def steps_per_epoch(data: Dataset, args: RunArgs) -> int:
    return len(data.train_batches(args.batch_size, 0, args.seed)) // args.grad_accum


def planned_steps(data: Dataset, args: RunArgs) -> int:
    return args.max_steps if args.max_steps else (args.epochs or 1) * steps_per_epoch(data, args)


# ---------------------------------------------------------------------------------------------- the folder


def existing_run(out_dir: Path) -> Path | None:
    """The checkpoint folder of a run in ``out_dir`` (the previous one if a crash interrupted a swap), or None."""
    for name in (CHECKPOINT, PREVIOUS):
        if (out_dir / name / "state.json").is_file():
            return out_dir / name
    return None


def check_out_dir(out_dir: Path, resume: bool) -> Path | None:
    """Before anything is written: refuse to overwrite another run, or to resume what is not there."""
    checkpoint = existing_run(out_dir)
    if resume:
        if checkpoint is None:
            raise ValueError(f"--resume: {out_dir} holds no checkpoint of a run to continue")
        return checkpoint
    if checkpoint is not None or (out_dir / "log.jsonl").exists():
        raise ValueError(f"{out_dir} already holds a training run; pass --resume to continue it or choose another "
                         "--out")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} exists and is not a folder")
    return None


def read_state(checkpoint: Path) -> dict:
    try:
        state = json.loads((checkpoint / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{checkpoint / 'state.json'} is not readable: {e}") from None
    if state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{checkpoint} was written by another version of gpt2 train (format "
                              f"{state.get('format')}, expected {STATE_FORMAT})")
    return state


def check_same_run(saved: dict, args: RunArgs) -> None:
    """``ValueError`` naming every argument that differs from the run being resumed."""
    current = asdict(args)
    diffs = [f"{k} {saved.get(k)!r} -> {current[k]!r}" for k in current if k not in HOW_FIELDS and saved.get(k) !=
             current[k]]
    if diffs:
        raise ValueError("--resume continues a run with its own arguments, and these differ from it: "
                         + "; ".join(diffs))


def write_checkpoint(out_dir: Path, backend: Backend, args: RunArgs, progress: Progress) -> None:
    """The model (HF layout), the optimizer state and state.json into a new folder, then swapped into place."""
    staging = out_dir / f"{CHECKPOINT}.new"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    lora = getattr(backend, "lora", None)
    params = backend.params()
    if lora is None:
        save_checkpoint(params, backend.config, staging)
        export = staging
    else:  # the adapters apart from their (frozen) base, to resume; the merged plain GPT-2 for every loader
        base, _ = split_lora(params)
        save_checkpoint(base, backend.config, staging)
        save_lora_adapters(params, lora, staging / LORA_FILE)
        export = staging / "merged"
        export.mkdir()
        save_checkpoint(merge_lora(params, lora), backend.config, export)
    save_tensors(staging / "optimizer.safetensors", backend.optimizer_state(), {"step": str(progress.step)})
    state = {"format": STATE_FORMAT, "step": progress.step, "tokens_seen": progress.tokens_seen,
             "elapsed": progress.elapsed, "log_lines": progress.log_lines, "args": asdict(args)}
    atomic_write(staging / "state.json", lambda f: f.write((json.dumps(state, indent=2) + "\n").encode()))
    current, previous = out_dir / CHECKPOINT, out_dir / PREVIOUS
    if current.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(current, previous)
    os.replace(staging, current)
    _fsync_dir(out_dir)
    shutil.rmtree(previous, ignore_errors=True)
    exported = current if lora is None else current / "merged"
    for name in ("model.safetensors", "config.json"):  # the latest model at the top of DIR, as a hard link
        link = out_dir / f".{name}.link"
        link.unlink(missing_ok=True)
        try:
            os.link(exported / name, link)
        except OSError:
            shutil.copyfile(exported / name, link)
        os.replace(link, out_dir / name)
    _fsync_dir(out_dir)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_run(checkpoint: Path) -> tuple[GPT2Config, dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    """(config, params, optimizer state, state.json) of a checkpoint folder."""
    state = read_state(checkpoint)
    config, params = load_checkpoint(checkpoint)
    if (checkpoint / LORA_FILE).is_file():
        _, adapters = load_lora_adapters(checkpoint / LORA_FILE)
        params = {**params, **adapters}
    optimizer, _ = load_tensors(checkpoint / "optimizer.safetensors")
    return config, params, optimizer, state


# ---------------------------------------------------------------------------------------------- the loop


def evaluate(backend: Backend, data: Dataset, args: RunArgs) -> dict[str, float]:
    """Mean loss over ``eval_batches`` batches of the validation set (in order) and of the training set (its
    first batches in file order, not shuffled, so every evaluation reads the same ones); for classification also
    the accuracy on those batches."""
    out: dict[str, float] = {}
    val = [data.val_batch(idx) for idx in data.val_batches(args.batch_size, args.eval_batches)]
    n_train = min(args.eval_batches, data.n_train // args.batch_size)
    train = [data.train_batch(np.arange(i * args.batch_size, (i + 1) * args.batch_size)) for i in range(n_train)]
    for name, batches in (("val", val), ("eval_train", train)):
        if batches:
            out[f"{name}_loss"] = float(np.mean([backend.loss(b) for b in batches]))
            if batches[0].is_classification:
                correct = sum(int((backend.class_logits(b).argmax(-1) == b.labels).sum()) for b in batches)
                out[f"{name}_accuracy"] = correct / sum(len(b.labels) for b in batches)
    return out


def train(backend: Backend, data: Dataset, args: RunArgs, out_dir: Path, encoder, progress: Progress,
          stop_after: int | None = None, show_progress: bool = True, say: Callable[[str], None] = print) -> Progress:
    """Run (or continue) the loop until the planned step; ``Stop`` after a checkpoint on --stop-after / Ctrl-C."""
    from tqdm import tqdm

    total = planned_steps(data, args)
    per_epoch = steps_per_epoch(data, args)
    main = backend.is_main
    log_path = out_dir / "log.jsonl"
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _truncate_log(log_path, progress.log_lines)
    prompt = encoder.encode(args.sample_prompt, allowed_special="all") if args.sample_prompt else []
    eos = 50256 if backend.config.vocab_size == 50257 else None
    interrupted = {"count": 0}

    def on_sigint(signum, frame) -> None:  # first Ctrl-C: finish the step, checkpoint, stop; second: abort
        interrupted["count"] += 1
        if interrupted["count"] > 1:
            raise KeyboardInterrupt

    previous_handler = signal.signal(signal.SIGINT, on_sigint) if _main_thread() else None
    bar = tqdm(total=total, initial=progress.step, desc=f"train ({args.backend})", unit="step", disable=not (
        show_progress and main), dynamic_ncols=True)
    orders: dict[int, list[np.ndarray]] = {}
    try:
        while progress.step < total:
            epoch, index = divmod(progress.step, per_epoch)
            if epoch not in orders:
                orders = {epoch: data.train_batches(args.batch_size, epoch, args.seed)}
            batches = orders[epoch][index * args.grad_accum : (index + 1) * args.grad_accum]
            lr = schedule_lr(args.schedule, progress.step, args.lr, args.warmup_steps, total, args.min_lr)
            start = time.perf_counter()
            try:
                micro = [data.train_batch(b) for b in batches]
                loss, grad_norm = backend.step(micro, lr, args.grad_clip or None)
            except FloatingPointError as e:
                raise FloatingPointError(f"{e} (step {progress.step + 1}); stopped, {_kept(out_dir)}") from None
            progress.elapsed += time.perf_counter() - start
            progress.step += 1
            progress.tokens_seen += sum(b.tokens.size for b in micro)
            record = {"step": progress.step, "epoch": epoch + 1, "tokens_seen": progress.tokens_seen,
                      "train_loss": loss, "lr": lr, "grad_norm": grad_norm, "elapsed": round(progress.elapsed, 3)}
            if progress.step == 1 or progress.step % args.eval_every == 0 or progress.step == total:
                record.update(evaluate(backend, data, args))
                if prompt and main:
                    record["sample"] = encoder.decode(backend.greedy(prompt, args.sample_tokens, eos))
                if main:
                    bar.write(_eval_line(record))
            if main:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                progress.log_lines += 1
                progress.history.append(record)
                if "eval_train_loss" in record:
                    plot_losses({args.backend: progress.history}, out_dir / "loss.png")
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{progress.tokens_seen / max(progress.elapsed, 1e-9):,.0f}")
            end_of_epoch = progress.step % per_epoch == 0
            if progress.step == total or (args.save_every and progress.step % args.save_every == 0) or (
                    end_of_epoch and not args.save_every):
                _save(out_dir, backend, args, progress)
            if stop_after is not None and progress.step >= stop_after and progress.step < total:
                _save(out_dir, backend, args, progress)
                raise Stop(f"stopped after step {progress.step} of {total} (--stop-after); checkpoint in "
                           f"{out_dir / CHECKPOINT}; continue with --resume")
            if interrupted["count"]:
                _save(out_dir, backend, args, progress)
                raise Stop(f"interrupted at step {progress.step} of {total}; checkpoint in {out_dir / CHECKPOINT}; "
                           "continue with --resume")
    finally:
        bar.close()
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
    return progress


def _eval_line(record: dict) -> str:
    """One terminal line per evaluation: the losses, accuracies and the start of the sample."""
    parts = [f"{label} {record[key]:.3f}" for key, label in (("eval_train_loss", "train"), ("val_loss", "val"),
             ("eval_train_accuracy", "train acc"), ("val_accuracy", "val acc")) if key in record]
    sample = f" | {_shorten(record['sample'])!r}" if "sample" in record else ""
    return f"step {record['step']}: " + ", ".join(parts) + sample


def _shorten(text: str, width: int = 70) -> str:
    """The start of a sample for the terminal (the log keeps all of it)."""
    return text if len(text) <= width else text[: width - 3] + "..."


def _save(out_dir: Path, backend: Backend, args: RunArgs, progress: Progress) -> None:
    if backend.is_main:
        write_checkpoint(out_dir, backend, args, progress)
    backend.barrier()


def _kept(out_dir: Path) -> str:
    checkpoint = existing_run(out_dir)
    if checkpoint is None:
        return "no checkpoint was written yet"
    return f"the last good checkpoint (step {read_state(checkpoint)['step']}) is kept in {checkpoint}"


def _truncate_log(path: Path, lines: int) -> None:
    """Keep the first ``lines`` lines (those the checkpoint had written); later ones are recomputed on resume."""
    if not path.exists():
        return
    kept = path.read_text().splitlines(keepends=True)[:lines]
    atomic_write(path, lambda f: f.write("".join(kept).encode()))


def read_log(path: Path) -> list[dict]:
    """The records of a log.jsonl file, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def read_run_log(run_dir: Path) -> list[dict]:
    """The log of a ``gpt2 train`` folder; ``ValueError`` when there is none or it is empty."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise ValueError(f"{run_dir} is not a gpt2 train folder (no log.jsonl)")
    try:
        records = read_log(path)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON lines: {e}") from None
    if not records:
        raise ValueError(f"{path} is empty")
    return records


def seconds_per_step(records: list[dict]) -> float:
    """Median time of one optimizer step (``elapsed`` counts steps only, not evaluation or checkpoints)."""
    elapsed = [0.0] + [r["elapsed"] for r in records]
    return float(np.median(np.diff(elapsed)))


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ---------------------------------------------------------------------------------------------- the picture


def plot_losses(runs: dict[str, list[dict]], out: Path, title: str | None = None) -> None:
    """Train and validation loss against tokens seen, like the course's figure; several runs on one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (label, records) in enumerate(runs.items()):
        evals = [r for r in records if "eval_train_loss" in r]
        color = f"C{i}"
        ax.plot([r["tokens_seen"] for r in records], [r["train_loss"] for r in records], color=color, alpha=0.25,
                lw=1, label=f"{label}: train batch")
        ax.plot([r["tokens_seen"] for r in evals], [r["eval_train_loss"] for r in evals], color=color, marker=".",
                label=f"{label}: train")
        val = [r for r in evals if "val_loss" in r]
        ax.plot([r["tokens_seen"] for r in val], [r["val_loss"] for r in val], color=color, ls="--", marker=".",
                label=f"{label}: validation")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(title or "training and validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)


def run(args: RunArgs, data: Dataset, out_dir: Path, encoder, config: GPT2Config | None,
        params: dict[str, np.ndarray] | None, make_backend: Callable[[GPT2Config, dict[str, np.ndarray]], Backend],
        resume: bool = False, stop_after: int | None = None, show_progress: bool = True,
        say: Callable[[str], None] = print) -> Progress:
    """Start a run from (config, params), or resume the one in ``out_dir`` (then config and params come from its
    checkpoint and ``args`` must match its arguments). Every check happens before anything is written."""
    checkpoint = check_out_dir(out_dir, resume)
    if checkpoint is not None:
        config, params, optimizer, state = load_run(checkpoint)
        check_same_run(state["args"], args)
        if state["step"] >= planned_steps(data, args):
            raise ValueError(f"--resume: the run in {out_dir} already finished ({state['step']} steps)")
        backend = make_backend(config, params)
        backend.load_optimizer_state(optimizer)
        history = read_log(out_dir / "log.jsonl")[: state["log_lines"]] if (out_dir / "log.jsonl").exists() else []
        progress = Progress(state["step"], state["tokens_seen"], state["elapsed"], state["log_lines"], history)
        say(f"resuming {out_dir} at step {progress.step} of {planned_steps(data, args)}")
    else:
        backend = make_backend(config, params)
        progress = Progress()
    if backend.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        data.save_cache()
    return train(backend, data, args, out_dir, encoder, progress, stop_after, show_progress, say)
