"""A training run's folder: what defines a run, its checkpoint written and read back, and the checks made before
anything is written.

    DIR/config.json, DIR/model.safetensors   the model of the last checkpoint, Hugging Face layout: gpt2 generate,
                                             gpt2 convert and transformers load DIR directly
    DIR/generation_config.json, vocab.json,  what transformers.pipeline("text-generation", model=DIR) needs beside
    merges.txt, tokenizer_config.json        it (``mapper.save_pipeline_files``), written with the first checkpoint
    DIR/checkpoint/                          the last complete checkpoint: that model, optimizer.safetensors
                                             (AdamW's moments in the canonical schema) and state.json (step,
                                             tokens seen, the run's arguments)
    DIR/log.jsonl                            one line per step (``tasks.runlog``)
    DIR/loss.png                             train and validation loss against tokens seen (``tasks.plots``)
    DIR/tokens-*.npy                         the tokenized text, reused by the next run on the same text
    DIR/.lock                                held (``flock``) by the run using DIR, with its process id

A checkpoint is written into a fresh folder, each file fsynced, then renamed into place; the previous
checkpoint is removed only after that, so a crash leaves one complete checkpoint, and a write that fails (a
full disk) removes what it had begun. A checkpoint is written only from finite parameters. One run at a time
uses a folder: :class:`RunLock` takes an exclusive lock that the system releases however the process ends.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from mapper.atomic import atomic_write, fsync_dir
from mapper.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_lora_adapters,
    load_tensors,
    save_checkpoint,
    save_lora_adapters,
    save_pipeline_files,
    save_tensors,
)
from mapper.config import GPT2Config
from mapper.lora import merge_lora, split_lora
from mapper.save import CHECKPOINT_FILES
from mapper.training import distributed_world

STATE_FORMAT = 1
CHECKPOINT, PREVIOUS, STAGING = "checkpoint", "checkpoint.previous", "checkpoint.new"
LORA_FILE = "lora.safetensors"  # a LoRA run's adapters; its checkpoint's model is their frozen base
LOCK_FILE = ".lock"
RUN_FILES = (*CHECKPOINT_FILES, "loss.png")  # what a run writes at the top of DIR


@dataclass
class RunArgs:
    """Everything that defines a run; a resumed run must have the same values (``HOW_FIELDS`` may differ)."""

    backend: str
    dtype: str
    config: dict
    init: str  # "seed N" (drawn as config["init"] says: GPT-2's or the course's) or the checkpoint started from
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
    tf32: bool = False
    deterministic: bool = False
    world_size: int = 1
    task: str = "pretrain"
    options: dict = field(default_factory=dict)  # the task's own settings (trainable, lora, mask_prompt, ...)


HOW_FIELDS = {"data", "save_every", "device", "compile"}  # how it runs, not what it computes


def existing_run(out_dir: Path) -> Path | None:
    """The checkpoint folder of a run in ``out_dir`` (the previous one if a crash interrupted a swap), or None."""
    for name in (CHECKPOINT, PREVIOUS):
        if (out_dir / name / "state.json").is_file():
            return out_dir / name
    return None


def check_out_dir(out_dir: Path, resume: bool, force: bool = False) -> Path | None:
    """Before anything is written: refuse to overwrite another run, or to resume what is not there. ``force``
    starts afresh in a folder whose run stopped before its first checkpoint (its log is replaced); a run with
    a checkpoint is never replaced."""
    check_not_in_use(out_dir)
    checkpoint = existing_run(out_dir)
    stuck = checkpoint is None and (out_dir / "log.jsonl").exists()
    if resume:
        if checkpoint is None:
            raise ValueError(f"--resume: {out_dir} holds no checkpoint of a run to continue" + (
                "; its run stopped before its first checkpoint: start it afresh with --force instead of --resume"
                if stuck else ""))
        return checkpoint
    if checkpoint is not None:
        raise ValueError(f"{out_dir} already holds a training run (step {read_state(checkpoint).get('step')}); pass "
                         "--resume to continue it or choose another --out")
    if stuck and not force:
        raise ValueError(f"{out_dir} holds the log of a run that stopped before its first checkpoint; pass --force to "
                         "start afresh there (its log is replaced) or choose another --out")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} exists and is not a folder")
    return None


def saved_args(out_dir: Path) -> dict[str, Any]:
    """The arguments of the run in ``out_dir`` (its checkpoint's state.json), for ``--resume`` with no others."""
    return read_state(check_out_dir(out_dir, resume=True))["args"]


def check_not_in_use(out_dir: Path) -> None:
    """``ValueError`` when another live run holds ``out_dir``'s lock (checked by taking it and letting go). The
    other processes of a torchrun run share their rank 0's folder: rank 0 alone checks and locks it."""
    path = out_dir / LOCK_FILE
    if distributed_world()[0] != 0 or not path.is_file() or path.resolve() in RunLock.held:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(out_dir, fd) from None
    finally:
        os.close(fd)


def _in_use(out_dir: Path, fd: int) -> ValueError:
    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
    return ValueError(f"{out_dir} is in use by another gpt2 run (process {holder}); wait for it to end or choose "
                      "another --out")


class RunLock:
    """An exclusive lock on a run's folder for as long as the run lasts (``with RunLock(out_dir, say):``).

    ``DIR/.lock`` is locked with ``flock``, which the system releases when the process ends in any way (even
    ``kill -9``); the file keeps the holder's process id. A second run is refused in one line naming that id;
    a lock file left by a process that is gone is simply locked again (``say`` reports the takeover).
    """

    held: set[Path] = set()  # the lock files this process holds

    def __init__(self, out_dir: Path, say=None) -> None:
        self.path = out_dir / LOCK_FILE
        self.say = say
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            error = _in_use(self.path.parent, fd)
            os.close(fd)
            raise error from None
        previous = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if previous and self.say is not None:
            self.say(f"note: {self.path} was left by process {previous}, which has ended; the lock is taken over")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        RunLock.held.add(self.path.resolve())
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            RunLock.held.discard(self.path.resolve())
            os.ftruncate(self._fd, 0)  # an empty lock file: its holder ended normally
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None


def read_state(checkpoint: Path) -> dict[str, Any]:
    """The ``state.json`` of a checkpoint folder (``CheckpointError`` if unreadable or of another format)."""
    try:
        state = json.loads((checkpoint / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{checkpoint / 'state.json'} is not readable: {e}") from None
    if state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{checkpoint} was written by another version of gpt2 train (format "
                              f"{state.get('format')}, expected {STATE_FORMAT})")
    return state


def check_same_run(saved: dict, args: RunArgs) -> None:
    """``ValueError`` naming every argument that differs from the run being resumed. An argument the saved run
    predates (a field added since, such as ``tf32``) counts as its default, which is what that run computed with."""
    current = asdict(args)
    defaults = {f.name: f.default for f in fields(RunArgs) if f.default is not MISSING}
    before = {k: saved.get(k, defaults.get(k)) for k in current}
    diffs = [f"{k} {before[k]!r} -> {current[k]!r}" for k in current if k not in HOW_FIELDS and before[k] != current[k]]
    if diffs:
        raise ValueError("--resume continues a run with its own arguments, and these differ from it: "
                         + "; ".join(diffs))


def nonfinite_problem(params: dict[str, np.ndarray], record: dict) -> str | None:
    """Why a checkpoint must not be written from ``params`` after the step whose log ``record`` is given (its
    evaluation's losses and accuracies included, when made), or None: every value finite."""
    bad = [name for name, a in params.items() if not np.isfinite(a).all()]
    if bad:
        return (f"the parameters after step {record['step']} are not finite (NaN or inf in {', '.join(bad[:3])}"
                f"{' and more' if len(bad) > 3 else ''})")
    evaluation = [k for k in record if k.startswith(("val_", "eval_")) and isinstance(record[k], float)
                  and not np.isfinite(record[k])]
    if evaluation:
        return f"the evaluation after step {record['step']} gave {', '.join(f'{k} {record[k]}' for k in evaluation)}"
    return None


def write_checkpoint(out_dir: Path, backend, args: RunArgs, state: dict[str, Any],
                     params: dict[str, np.ndarray]) -> None:
    """The backend's model ``params`` (HF layout), its optimizer state and ``state`` (state.json, plus the run's
    arguments) into a new folder, then swapped into place; the model is also linked to the top of ``out_dir``.
    A failed write (``OSError``: a full disk) removes the new folder and keeps the previous checkpoint."""
    staging = out_dir / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    lora = getattr(backend, "lora", None)
    try:
        staging.mkdir(parents=True)
        if lora is None:
            save_checkpoint(params, backend.config, staging)
        else:  # the adapters apart from their (frozen) base, to resume; the merged plain GPT-2 for every loader
            base, _ = split_lora(params)
            save_checkpoint(base, backend.config, staging)
            save_lora_adapters(params, lora, staging / LORA_FILE)
            (staging / "merged").mkdir()
            save_checkpoint(merge_lora(params, lora), backend.config, staging / "merged")
        save_tensors(staging / "optimizer.safetensors", backend.optimizer_state(), {"step": str(state["step"])})
        document = {"format": STATE_FORMAT, **state, "args": asdict(args)}
        atomic_write(staging / "state.json", lambda f: f.write((json.dumps(document, indent=2) + "\n").encode()))
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise run_write_error(out_dir, f"the checkpoint of step {state['step']}", e) from None
    current, previous = out_dir / CHECKPOINT, out_dir / PREVIOUS
    if current.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(current, previous)
    os.replace(staging, current)
    fsync_dir(out_dir)
    shutil.rmtree(previous, ignore_errors=True)
    exported = current if lora is None else current / "merged"
    for name in CHECKPOINT_FILES:  # the latest model at the top of DIR, as a hard link
        link = out_dir / f".{name}.link"
        link.unlink(missing_ok=True)
        try:
            try:
                os.link(exported / name, link)
            except OSError:
                shutil.copyfile(exported / name, link)
            os.replace(link, out_dir / name)
        except OSError as e:
            link.unlink(missing_ok=True)
            raise run_write_error(out_dir, f"the model of step {state['step']} at the top of the folder", e) from None
    try:
        save_pipeline_files(backend.config, out_dir, keep_existing=True)
    except OSError as e:
        raise run_write_error(out_dir, "the tokenizer and generation files", e) from None
    fsync_dir(out_dir)


def run_write_error(out_dir: Path, what: str, e: OSError) -> OSError:
    """A failed write in a run's folder, in one line naming the folder's flag, the file and what the system said
    (the last complete checkpoint stays: it is only ever replaced by a complete one)."""
    return OSError(e.errno, f"--out {out_dir}: {what} could not be written ({e.strerror}: {e.filename}); the last "
                            f"complete checkpoint is kept")


def load_run(checkpoint: Path) -> tuple[GPT2Config, dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    """(config, params, optimizer state, state.json) of a checkpoint folder."""
    state = read_state(checkpoint)
    config, params = load_checkpoint(checkpoint)
    if (checkpoint / LORA_FILE).is_file():
        _, adapters = load_lora_adapters(checkpoint / LORA_FILE)
        params = {**params, **adapters}
    optimizer, _ = load_tensors(checkpoint / "optimizer.safetensors")
    return config, params, optimizer, state


def last_checkpoint_note(out_dir: Path) -> str:
    """What a run that stopped on an error leaves behind, in words."""
    checkpoint = existing_run(out_dir)
    if checkpoint is None:
        return "no checkpoint was written yet"
    return f"the last good checkpoint (step {read_state(checkpoint)['step']}) is kept in {checkpoint}"
