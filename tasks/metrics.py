"""Metrics of the fine-tunes: accuracy and the confusion matrix of a classifier, ROUGE-L of generated text.

ROUGE-L is the maintained ``rouge_score`` package's (``RougeScorer(["rougeL"], use_stemmer=True)``): both texts
are lower-cased, split into alphanumeric words, words of more than 3 letters Porter-stemmed, and the F-measure
is 2 LCS / (words of the prediction + words of the reference), LCS the longest common word subsequence.
An empty text scores 0. Bad input (no items, mismatched lengths, a class id out of range) is a ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np


def _pair(pred, labels) -> tuple[np.ndarray, np.ndarray]:
    p, t = np.asarray(pred), np.asarray(labels)
    if p.shape != t.shape:
        raise ValueError(f"predictions have shape {p.shape}, labels {t.shape}; they must match")
    if p.size == 0:
        raise ValueError("no predictions to score")
    return p, t


def accuracy(pred, labels) -> float:
    """The fraction of predictions equal to their label, in [0, 1]; ``pred`` and ``labels`` of one shape."""
    p, t = _pair(pred, labels)
    return float((p == t).mean())


def confusion_matrix(pred, labels, n_classes: int) -> np.ndarray:
    """int64 [n_classes, n_classes]: entry [i, j] counts examples of true class i predicted as class j."""
    p, t = _pair(pred, labels)
    p, t = p.reshape(-1), t.reshape(-1)
    for name, arr in (("predictions", p), ("labels", t)):
        if not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() >= n_classes:
            values = sorted(set(arr.tolist()))[:5]
            raise ValueError(f"{name} must be class ids in [0, {n_classes}), got values {values}")
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (t, p), 1)
    return matrix


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure of ``predictions[i]`` against ``references[i]``, in [0, 1]."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if len(predictions) == 0:
        raise ValueError("no predictions to score")
    for i, (pred, ref) in enumerate(zip(predictions, references, strict=True)):
        if not isinstance(pred, str) or not isinstance(ref, str):
            raise ValueError(f"pair {i}: predictions and references must be strings, got {type(pred).__name__} "
                             f"and {type(ref).__name__}")
    scorer = _scorer()
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)]
    return float(np.mean(scores))
