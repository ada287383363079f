"""The pictures of training runs (``gpt2 plot``, and ``loss.png`` redrawn by the loop at each evaluation)."""

from __future__ import annotations

import os
from pathlib import Path


def plot_losses(runs: dict[str, list[dict]], out: Path, title: str | None = None) -> None:
    """Train and validation loss against tokens seen, like the course's figure; several runs on one figure.

    ``runs`` maps a label to a run's log records (``tasks.runlog``). The PNG is written to a temporary name and
    renamed over ``out``, so a reader never sees half a picture."""
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


def plot_classification(records: list[dict], steps_per_epoch: int, out: Path, title: str | None = None) -> None:
    """A classifier's run on two panels: loss (the step's batch, and train / validation at each evaluation) and
    accuracy (train / validation at each evaluation), both against optimizer steps, with epochs on the top axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in records if "val_accuracy" in r or "eval_train_accuracy" in r]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    loss_ax.plot([r["step"] for r in records], [r["train_loss"] for r in records], color="C0", alpha=0.25, lw=1,
                 label="train batch")
    for key, label, style in (("eval_train", "train", "-"), ("val", "validation", "--")):
        points = [r for r in evals if f"{key}_loss" in r]
        loss_ax.plot([r["step"] for r in points], [r[f"{key}_loss"] for r in points], ls=style, marker=".",
                     color="C0" if key == "eval_train" else "C1", label=label)
        points = [r for r in evals if f"{key}_accuracy" in r]
        acc_ax.plot([r["step"] for r in points], [r[f"{key}_accuracy"] for r in points], ls=style, marker=".",
                    color="C0" if key == "eval_train" else "C1", label=label)
    loss_ax.set_ylabel("cross-entropy loss")
    loss_ax.set_yscale("log")
    acc_ax.set_ylabel("accuracy (evaluation batches)")
    for ax in (loss_ax, acc_ax):
        ax.set_xlabel("optimizer step")
        top = ax.secondary_xaxis("top", functions=(lambda s: s / steps_per_epoch, lambda e: e * steps_per_epoch))
        top.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or "classification fine-tune")
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
