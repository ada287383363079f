"""A training run's ``log.jsonl``: one JSON object per optimizer step, appended as the run goes.

Each record holds step, epoch, tokens_seen, train_loss, lr, grad_norm and elapsed (seconds spent in optimizer
steps, not in evaluation or checkpoints); an evaluation step adds val_loss, eval_train_loss (accuracies for a
classifier) and the greedy sample. A resumed run first cuts the log back to the lines its checkpoint had written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mapper.atomic import atomic_write


def append_record(path: Path, record: dict) -> None:
    """Add one record as the log's last line."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(path: Path, lines: int) -> None:
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


def read_reference(path: Path) -> tuple[str, list[dict]]:
    """Published evaluation points to draw beside runs (``gpt2 plot --reference``): a JSON object with ``label`` and
    ``points``, each point holding ``tokens_seen`` and ``train_loss`` and/or ``val_loss``. ``ValueError`` naming the
    file and what is wrong."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"reference {path} is not a readable JSON file: {e}") from None
    points = data.get("points") if isinstance(data, dict) else None
    if not isinstance(data, dict) or not isinstance(data.get("label"), str) or not isinstance(points, list):
        raise ValueError(f"reference {path} must be a JSON object with a 'label' string and a 'points' list")
    for i, point in enumerate(points):
        if not (isinstance(point, dict) and isinstance(point.get("tokens_seen"), int)
                and ({"train_loss", "val_loss"} & set(point))):
            raise ValueError(f"reference {path}: point {i} needs an integer tokens_seen and a train_loss or val_loss")
    return data["label"], points


def seconds_per_step(records: list[dict]) -> float:
    """Median time of one optimizer step (``elapsed`` counts steps only, not evaluation or checkpoints)."""
    elapsed = [0.0] + [r["elapsed"] for r in records]
    return float(np.median(np.diff(elapsed)))
