"""The training loop, written once for both backends: steps, schedule, evaluation, samples, logging, checkpoints,
resume, Ctrl-C. A backend (``numpy_gpt2.backend.NumpyBackend``, ``torch_gpt2.backend.TorchBackend``) only
implements :class:`Backend`: one optimizer step, a loss, a greedy sample, and its state in and out; a task's data
only implements :class:`Dataset`.

One step of the loop, in the order :func:`train` calls them:

1. :func:`step_batches`: the micro-batches of this step (epoch e's order is a permutation seeded by (seed, e));
2. :func:`take_step`: the schedule's learning rate, one optimizer step, the step's log record;
3. :func:`add_evaluation`: on evaluation steps, the losses (accuracies) and the greedy sample;
4. :func:`log_step`: the record appended to ``log.jsonl``, ``loss.png`` redrawn after an evaluation;
5. :func:`checkpoint_due`: a checkpoint at the end of each epoch (or every ``save_every`` steps) and at the end,
   written only from finite parameters (and a finite evaluation), else the run stops (``FloatingPointError``);
6. :func:`stop_if_asked`: after ``--stop-after``, or a SIGINT (Ctrl-C), SIGTERM (``docker stop``, ``timeout``,
   batch schedulers) or SIGHUP (a closed terminal), a checkpoint and :class:`Stop`. Under ``torchrun`` the
   processes agree every step (``Backend.max_over_ranks``), so all of them stop after the same step.

The run's folder (``tasks.run_folder``) holds the checkpoint ``resume`` continues from with the same arguments,
and is locked for the run's life (``RunLock``); since the data order depends only on (seed, epoch) and the
schedule only on the step, the resumed run computes exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from mapper.config import GPT2Config
from mapper.training import Batch, distributed_world
from tasks.plots import plot_losses
from tasks.run_folder import (
    CHECKPOINT,
    RunArgs,
    RunLock,
    check_out_dir,
    check_same_run,
    last_checkpoint_note,
    load_run,
    nonfinite_problem,
    run_write_error,
    write_checkpoint,
)
from tasks.runlog import append_record, read_log, truncate_log
from tasks.schedule import schedule_lr


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

    def greedy(self, prompt: list[int], max_new_tokens: int, eos_token_id: int | None) -> list[int]:
        """The greedy continuation of ``prompt``, cut before the first EOS (what fits in the context)."""
        ...

    def params(self) -> dict[str, np.ndarray]: ...

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """AdamW's state: ``m.<name>``, ``v.<name>`` (canonical names and layout) and ``t`` ([1] array)."""
        ...

    def load_optimizer_state(self, state: dict[str, np.ndarray]) -> None: ...

    def barrier(self) -> None: ...

    def max_over_ranks(self, value: int) -> int:
        """The largest ``value`` any process of the run holds (the value itself in one process): how the processes
        agree on a decision one of them made alone, such as a signal only it received."""
        ...


@dataclass
class Progress:
    step: int = 0
    tokens_seen: int = 0
    elapsed: float = 0.0
    log_lines: int = 0
    history: list[dict] = field(default_factory=list)

    def state(self) -> dict:
        """What a checkpoint's state.json records of the progress."""
        return {"step": self.step, "tokens_seen": self.tokens_seen, "elapsed": self.elapsed,
                "log_lines": self.log_lines}


class Stop(Exception):
    """The run stopped early on purpose (--stop-after, a signal) after writing a checkpoint. ``exit_code``: 0 after
    --stop-after, 128 + the signal's number after a signal (130 SIGINT, 143 SIGTERM, 129 SIGHUP), as shells do."""

    def __init__(self, message: str, signum: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = 0 if signum is None else 128 + signum


def steps_per_epoch(data: Dataset, args: RunArgs) -> int:
    return len(data.train_batches(args.batch_size, 0, args.seed)) // args.grad_accum


def planned_steps(data: Dataset, args: RunArgs) -> int:
    return args.max_steps if args.max_steps else (args.epochs or 1) * steps_per_epoch(data, args)


# ---------------------------------------------------------------------------------------------- the steps


class EpochOrders:
    """The batches of each step: epoch e's order (``Dataset.train_batches``), computed once per epoch."""

    def __init__(self, data: Dataset, args: RunArgs) -> None:
        self.data, self.args = data, args
        self.per_epoch = steps_per_epoch(data, args)
        self._epoch: int | None = None
        self._order: list[np.ndarray] = []

    def step_batches(self, step: int) -> tuple[int, list[np.ndarray]]:
        """(0-based epoch, the index batches of the ``grad_accum`` micro-batches) of 0-based ``step``."""
        epoch, index = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, self.data.train_batches(self.args.batch_size, epoch, self.args.seed)
        accum = self.args.grad_accum
        return epoch, self._order[index * accum : (index + 1) * accum]


def take_step(backend: Backend, data: Dataset, args: RunArgs, progress: Progress, epoch: int,
              batches: list[np.ndarray], total: int, out_dir: Path) -> dict:
    """One optimizer step at the schedule's learning rate; advances ``progress``; returns the step's log record."""
    lr = schedule_lr(args.schedule, progress.step, args.lr, args.warmup_steps, total, args.min_lr)
    start = time.perf_counter()
    try:
        micro = [data.train_batch(b) for b in batches]
        loss, grad_norm = backend.step(micro, lr, args.grad_clip or None)
    except FloatingPointError as e:
        raise FloatingPointError(f"{e} (step {progress.step + 1}); stopped, {last_checkpoint_note(out_dir)}") from None
    progress.elapsed += time.perf_counter() - start
    progress.step += 1
    progress.tokens_seen += sum(b.tokens.size for b in micro)
    return {"step": progress.step, "epoch": epoch + 1, "tokens_seen": progress.tokens_seen, "train_loss": loss,
            "lr": lr, "grad_norm": grad_norm, "elapsed": round(progress.elapsed, 3)}


def is_eval_step(args: RunArgs, step: int, total: int) -> bool:
    """Evaluations come after the first step, every ``eval_every`` steps, and after the last."""
    return step == 1 or step % args.eval_every == 0 or step == total


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


def add_evaluation(record: dict, backend: Backend, data: Dataset, args: RunArgs, prompt: list[int], encoder,
                   say: Callable[[str], None]) -> None:
    """The evaluation's losses (and accuracies) into ``record``, with the greedy sample on the main process."""
    record.update(evaluate(backend, data, args))
    if prompt and backend.is_main:
        record["sample"] = encoder.decode(backend.greedy(prompt, args.sample_tokens, backend.config.eos_token_id))
    if backend.is_main:
        say(_eval_line(record))


def log_step(record: dict, progress: Progress, args: RunArgs, out_dir: Path) -> None:
    """Append the record to log.jsonl (main process only) and redraw loss.png after an evaluation."""
    try:
        append_record(out_dir / "log.jsonl", record)
        progress.log_lines += 1
        progress.history.append(record)
        if "eval_train_loss" in record:
            plot_losses({args.backend: progress.history}, out_dir / "loss.png")
    except OSError as e:
        raise run_write_error(out_dir, f"the log of step {record['step']}", e) from None


def checkpoint_due(args: RunArgs, step: int, total: int, per_epoch: int) -> bool:
    """Checkpoints: at the last step; every ``save_every`` steps when set, else at the end of each epoch."""
    if step == total:
        return True
    if args.save_every:
        return step % args.save_every == 0
    return step % per_epoch == 0


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupts:
    """SIGINT, SIGTERM and SIGHUP during the loop: the first finishes the step, checkpoints and stops (``signum``
    records it); in a single process a second one aborts at once. Under torchrun the launcher passes its own
    signals on to every process, so one Ctrl-C arrives twice: repeats are not counted there (torchrun kills the
    processes itself if they outstay its timeout). Installed only in the main thread (where Python delivers
    signals), restored on exit."""

    def __init__(self, abort_on_repeat: bool = True) -> None:
        self.signum: int | None = None
        self.abort_on_repeat = abort_on_repeat
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
        elif self.abort_on_repeat:
            raise KeyboardInterrupt

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handler) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def stop_if_asked(out_dir: Path, backend: Backend, args: RunArgs, progress: Progress, record: dict, total: int,
                  stop_after: int | None, interrupts: Interrupts) -> None:
    """After ``--stop-after`` or a signal to any process (and before the last step): a checkpoint, then
    :class:`Stop`. Every process of a distributed run asks the others each step, so they stop together."""
    if stop_after is not None and stop_after <= progress.step < total:
        save(out_dir, backend, args, progress, record)
        raise Stop(f"stopped after step {progress.step} of {total} (--stop-after); checkpoint in "
                   f"{out_dir / CHECKPOINT}; continue with --resume")
    signum = backend.max_over_ranks(interrupts.signum or 0)
    if signum:
        save(out_dir, backend, args, progress, record)
        raise Stop(f"{signal.Signals(signum).name} at step {progress.step} of {total}: checkpoint in "
                   f"{out_dir / CHECKPOINT}; continue with --resume", signum)


def save(out_dir: Path, backend: Backend, args: RunArgs, progress: Progress, record: dict) -> None:
    """A checkpoint from the main process, only from finite parameters and a finite evaluation (else
    ``FloatingPointError``, on every process alike); every process waits for it."""
    params = backend.params() if backend.is_main else {}
    problem = nonfinite_problem(params, record) if backend.is_main else None
    if backend.max_over_ranks(int(problem is not None)):
        raise FloatingPointError(f"{problem or 'the main process found a value that is not finite'}; stopped before "
                                 f"writing a checkpoint from it; {last_checkpoint_note(out_dir)}")
    if backend.is_main:
        write_checkpoint(out_dir, backend, args, progress.state(), params)
    backend.barrier()


def _eval_line(record: dict) -> str:
    """One terminal line per evaluation: the losses, accuracies and the start of the sample."""
    parts = [f"{label} {record[key]:.3f}" for key, label in (("eval_train_loss", "train"), ("val_loss", "val"),
             ("eval_train_accuracy", "train acc"), ("val_accuracy", "val acc")) if key in record]
    sample = f" | {_shorten(record['sample'])!r}" if "sample" in record else ""
    return f"step {record['step']}: " + ", ".join(parts) + sample


def _shorten(text: str, width: int = 70) -> str:
    """The start of a sample for the terminal (the log keeps all of it)."""
    return text if len(text) <= width else text[: width - 3] + "..."


# ---------------------------------------------------------------------------------------------- the loop


def train(backend: Backend, data: Dataset, args: RunArgs, out_dir: Path, encoder, progress: Progress,
          stop_after: int | None = None, show_progress: bool = True) -> Progress:
    """Run (or continue) the loop until the planned step; ``Stop`` after a checkpoint on --stop-after / Ctrl-C."""
    from tqdm import tqdm

    total = planned_steps(data, args)
    orders = EpochOrders(data, args)
    main = backend.is_main
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        truncate_log(out_dir / "log.jsonl", progress.log_lines)
    prompt = encoder.encode(args.sample_prompt, allowed_special="all") if args.sample_prompt else []
    bar = tqdm(total=total, initial=progress.step, desc=f"train ({args.backend})", unit="step",
               disable=not (show_progress and main), dynamic_ncols=True)
    try:
        with Interrupts(abort_on_repeat=distributed_world()[1] == 1) as interrupts:
            while progress.step < total:
                epoch, batches = orders.step_batches(progress.step)
                record = take_step(backend, data, args, progress, epoch, batches, total, out_dir)
                if is_eval_step(args, progress.step, total):
                    add_evaluation(record, backend, data, args, prompt, encoder, bar.write)
                if main:
                    log_step(record, progress, args, out_dir)
                bar.update(1)
                bar.set_postfix(loss=f"{record['train_loss']:.3f}",
                                tok_s=f"{progress.tokens_seen / max(progress.elapsed, 1e-9):,.0f}")
                if checkpoint_due(args, progress.step, total, orders.per_epoch):
                    save(out_dir, backend, args, progress, record)
                stop_if_asked(out_dir, backend, args, progress, record, total, stop_after, interrupts)
    finally:
        bar.close()
    return progress


def run(args: RunArgs, data: Dataset, out_dir: Path, encoder, config: GPT2Config | None,
        params: dict[str, np.ndarray] | None, make_backend: Callable[[GPT2Config, dict[str, np.ndarray]], Backend],
        resume: bool = False, stop_after: int | None = None, show_progress: bool = True,
        say: Callable[[str], None] = print, force: bool = False) -> Progress:
    """Start a run from (config, params), or resume the one in ``out_dir`` (then config and params come from its
    checkpoint and ``args`` must match its arguments). Every check happens before anything is written; then the
    folder is locked (``RunLock``) until the run ends. ``force``: start afresh in a folder whose run stopped
    before its first checkpoint."""
    check_out_dir(out_dir, resume, force)
    main = distributed_world()[0] == 0
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(out_dir, say) if main else contextlib.nullcontext():
        checkpoint = check_out_dir(out_dir, resume, force)  # again, locked: a run that just ended may have written
        if checkpoint is not None:
            config, params, optimizer, state = load_run(checkpoint)
            check_same_run(state["args"], args)
            if state["step"] >= planned_steps(data, args):
                raise ValueError(f"--resume: the run in {out_dir} already finished ({state['step']} steps)")
            backend = make_backend(config, params)
            backend.load_optimizer_state(optimizer)
            log = out_dir / "log.jsonl"
            history = read_log(log, say if main else None)[: state["log_lines"]] if log.exists() else []
            progress = Progress(state["step"], state["tokens_seen"], state["elapsed"], state["log_lines"], history)
            say(f"resuming {out_dir} at step {progress.step} of {planned_steps(data, args)}")
        else:
            backend = make_backend(config, params)
            progress = Progress()
        if backend.is_main:
            data.save_cache()
        return train(backend, data, args, out_dir, encoder, progress, stop_after, show_progress)
