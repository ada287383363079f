"""A training run's ``log.jsonl``: one JSON object per optimizer step, appended as the run goes.

Each record holds step, epoch, tokens_seen, train_loss, lr, grad_norm and elapsed (seconds spent in optimizer
steps, not in evaluation or checkpoints); an evaluation step adds val_loss, eval_train_loss (accuracies for a
classifier) and the greedy sample. A number that is not finite (a diverging run's NaN validation loss, an
infinite gradient norm) is written as ``null`` and named in the record's ``"nonfinite"`` object
(``{"val_loss": "nan"}``): NaN is not JSON. A resumed run first cuts the log back to the lines its checkpoint
had written. A last line without its newline (a full disk, a power cut mid-write) is dropped with a warning.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mapper.atomic import atomic_write


def json_record(record: dict) -> str:
    """One log line: the record as strict JSON, non-finite numbers as null and named under ``"nonfinite"``."""
    bad = {k: str(v) for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        record = {**record, **dict.fromkeys(bad), "nonfinite": bad}
    return json.dumps(record, allow_nan=False)


def append_record(path: Path, record: dict) -> None:
    """Add one record as the log's last line."""
    line = json_record(record) + "\n"
    with open(path, "a") as f:
        f.write(line)


def truncate_log(path: Path, lines: int) -> None:
    """Keep the first ``lines`` lines (those the checkpoint had written); later ones are recomputed on resume."""
    if not path.exists():
        return
    kept = path.read_bytes().split(b"\n")[:-1][:lines]  # complete lines only: a cut-short last one goes
    atomic_write(path, lambda f: f.write(b"".join(line + b"\n" for line in kept)))


def read_log(path: Path, warn: Callable[[str], None] | None = None) -> list[dict]:
    """The records of a log.jsonl file, in order. A final line without its newline was cut short by a crash: it
    is dropped (``warn`` is told). Any other line that is not a UTF-8 JSON object is a ``ValueError`` naming the
    file and the line."""
    path = Path(path)
    lines = path.read_bytes().split(b"\n")
    if lines[-1].strip():
        if warn is not None:
            warn(f"{path}: its last line ({len(lines[-1])} bytes) has no line end, cut short when the run stopped; "
                 "dropped")
    records = []
    for number, raw in enumerate(lines[:-1], start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} line {number} is not UTF-8 text (byte {e.start}); not a gpt2 train log") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {number} is not JSON ({e.msg}); not a gpt2 train log") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path} line {number} is not a JSON object; not a gpt2 train log")
        records.append(record)
    return records


def read_run_log(run_dir: Path, warn: Callable[[str], None] | None = None) -> list[dict]:
    """The log of a ``gpt2 train`` folder; ``ValueError`` when there is none or it is empty."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise ValueError(f"{run_dir} is not a gpt2 train folder (no log.jsonl)")
    records = read_log(path, warn)
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
