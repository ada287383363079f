"""The pictures of training runs (``gpt2 plot``, and ``loss.png`` redrawn by the loop at each evaluation)."""

from __future__ import annotations

from pathlib import Path

from mapper.atomic import atomic_write


def plot_losses(runs: dict[str, list[dict]], out: Path, title: str | None = None,
                references: dict[str, list[dict]] | None = None) -> None:
    """Train and validation loss against tokens seen, like the course's figure; several runs on one figure.

    ``runs`` maps a label to a run's log records (``tasks.runlog``; a loss the log holds as null, not being
    finite, is left out); ``references`` maps a label to published points (``tasks.runlog.read_reference``), drawn
    as unconnected markers. The PNG is written atomically, so a reader never sees half a picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (label, records) in enumerate(runs.items()):
        color = f"C{i}"
        for key, style in (("train_loss", dict(alpha=0.25, lw=1, label=f"{label}: train batch")),
                           ("eval_train_loss", dict(marker=".", label=f"{label}: train")),
                           ("val_loss", dict(ls="--", marker=".", label=f"{label}: validation"))):
            points = [r for r in records if r.get(key) is not None]
            ax.plot([r["tokens_seen"] for r in points], [r[key] for r in points], color=color, **style)
    for label, points in (references or {}).items():
        for key, marker, name in (("train_loss", "x", "train"), ("val_loss", "+", "validation")):
            shown = [p for p in points if key in p]
            ax.scatter([p["tokens_seen"] for p in shown], [p[key] for p in shown], color="black", marker=marker,
                       s=60, zorder=3, label=f"{label}: {name}")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(title or "training and validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        atomic_write(Path(out), lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        plt.close(fig)


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
        points = [r for r in evals if r.get(f"{key}_loss") is not None]
        loss_ax.plot([r["step"] for r in points], [r[f"{key}_loss"] for r in points], ls=style, marker=".",
                     color="C0" if key == "eval_train" else "C1", label=label)
        points = [r for r in evals if r.get(f"{key}_accuracy") is not None]
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
    try:
        atomic_write(Path(out), lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        plt.close(fig)
