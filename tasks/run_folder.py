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

A checkpoint is written into a fresh folder, each file fsynced, then renamed into place; the previous
checkpoint is removed only after that, so a crash leaves one complete checkpoint.
"""

from __future__ import annotations

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

STATE_FORMAT = 1
CHECKPOINT, PREVIOUS = "checkpoint", "checkpoint.previous"
LORA_FILE = "lora.safetensors"  # a LoRA run's adapters; its checkpoint's model is their frozen base


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


def write_checkpoint(out_dir: Path, backend, args: RunArgs, state: dict[str, Any]) -> None:
    """The backend's model (HF layout), its optimizer state and ``state`` (state.json, plus the run's arguments)
    into a new folder, then swapped into place; the model is also linked to the top of ``out_dir``."""
    staging = out_dir / f"{CHECKPOINT}.new"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    lora = getattr(backend, "lora", None)
    params = backend.params()
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
    current, previous = out_dir / CHECKPOINT, out_dir / PREVIOUS
    if current.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(current, previous)
    os.replace(staging, current)
    fsync_dir(out_dir)
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
    save_pipeline_files(backend.config, out_dir, keep_existing=True)
    fsync_dir(out_dir)


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
