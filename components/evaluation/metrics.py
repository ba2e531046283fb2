"""Classification metrics on a held-out split, as JSON-safe Python values.

Conventions (stated so reports can be read without the code):
- predictions are the arg-max of `probs`;
- balanced accuracy = mean sensitivity over classes present in `y_true`;
- macro-F1 = mean F1 over classes that occur in `y_true` or in the predictions (a class never
  seen and never predicted says nothing about the model and is left out);
- macro AUROC = mean one-vs-rest AUROC over classes present in `y_true` (a class whose AUROC is
  undefined — absent, or the only class present — is reported as None with a note);
- ECE = Σ_b (n_b / N) · |accuracy_b − mean confidence_b| over 15 equal-width bins of the
  max-probability confidence, bins (0, 1/15], (1/15, 2/15], ...;
- a per-class rate whose denominator is 0 is None, never a made-up 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from components.errors import DataError, ModelError

ECE_BINS = 15
_SUM_TOLERANCE = 1e-3


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


def _check_inputs(
    y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    k = len(class_names)
    if k < 2:
        raise ModelError("evaluation needs at least two class names")
    if p.ndim != 2 or p.shape[1] != k:
        raise ModelError(f"probs must have shape (N, {k}) for {k} classes; got {p.shape}")
    if y.ndim != 1 or len(y) != len(p):
        raise DataError(f"y_true must be 1-D with one label per row of probs ({len(p)})")
    if len(y) == 0:
        raise DataError("cannot evaluate on an empty set")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"y_true must hold integer class indices, got {y.dtype}")
    if y.min() < 0 or y.max() >= k:
        raise DataError(f"y_true labels must lie in [0, {k}); got {y.min()}..{y.max()}")
    if not np.all(np.isfinite(p)) or p.min() < 0:
        raise ModelError("probs must be finite and non-negative")
    if np.abs(p.sum(axis=1) - 1).max() > _SUM_TOLERANCE:
        raise ModelError("each row of probs must sum to 1 (pass softmax probabilities, not logits)")
    return y.astype(np.int64), p


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts with rows = true class, columns = predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def binary_auroc(positive: np.ndarray, scores: np.ndarray) -> float | None:
    """AUROC = P(score of a positive > score of a negative), ties counted half (Mann–Whitney).

    None when there are no positives or no negatives.
    """
    positive = positive.astype(bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # average ranks (1-based) over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for start, count in zip(first, counts, strict=True):
        ranks[order[start : start + count]] = start + (count + 1) / 2.0
    rank_sum = ranks[positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def expected_calibration_error(
    y_true: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS
) -> tuple[float, list[dict[str, Any]]]:
    """ECE over `n_bins` equal-width confidence bins, and the per-bin table (for plots)."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    ece = 0.0
    bins = []
    for b in range(n_bins):
        mask = index == b
        n = int(mask.sum())
        if n:
            acc, conf = float(correct[mask].mean()), float(confidence[mask].mean())
            ece += n / len(y_true) * abs(acc - conf)
        else:
            acc = conf = None
        bins.append(
            {
                "lower": float(edges[b]),
                "upper": float(edges[b + 1]),
                "n": n,
                "accuracy": acc,
                "confidence": conf,
            }
        )
    return float(ece), bins


def evaluate(
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    dangerous: Sequence[str] = (),
) -> dict[str, Any]:
    """All test-set metrics for `probs` (N, K) against integer labels `y_true` (N,).

    With `dangerous` classes (e.g. the cancers), also `dangerous_auroc`: the binary task
    "one of them vs the rest", scored by their summed probability."""
    y, p = _check_inputs(y_true, probs, class_names)
    names = [str(name) for name in class_names]
    k = len(names)
    pred = p.argmax(axis=1)
    cm = confusion_matrix(y, pred, k)
    n = len(y)
    notes: list[str] = []

    per_class: dict[str, dict[str, Any]] = {}
    recalls, f1s, aurocs = [], [], []
    for c, name in enumerate(names):
        tp = int(cm[c, c])
        fn = int(cm[c].sum() - tp)
        fp = int(cm[:, c].sum() - tp)
        tn = n - tp - fn - fp
        support = tp + fn
        sensitivity = _ratio(tp, tp + fn)
        f1 = _ratio(2 * tp, 2 * tp + fp + fn)
        auroc = binary_auroc(y == c, p[:, c])
        per_class[name] = {
            "sensitivity": sensitivity,
            "specificity": _ratio(tn, tn + fp),
            "precision": _ratio(tp, tp + fp),
            "f1": f1,
            "auroc": auroc,
            "support": support,
        }
        if support:
            recalls.append(sensitivity)
        if f1 is not None:
            f1s.append(f1)
        if auroc is not None:
            aurocs.append(auroc)
        elif support:
            notes.append(f"AUROC for {name!r} is undefined: it is the only class in y_true")
        else:
            notes.append(f"class {name!r} is absent from y_true: left out of macro AUROC")

    ece, _ = expected_calibration_error(y, p)
    binary: dict[str, Any] = {}
    if dangerous:
        unknown = sorted(set(map(str, dangerous)) - set(names))
        if unknown:
            raise ModelError(f"dangerous classes {unknown} are not among {names}")
        columns = [names.index(str(c)) for c in dangerous]
        positive = np.isin(y, columns)
        binary["dangerous_auroc"] = binary_auroc(positive, p[:, columns].sum(axis=1))
        binary["dangerous_vs_rest"] = {
            "classes": [str(c) for c in dangerous],
            "n_positive": int(positive.sum()),
            "n_negative": int((~positive).sum()),
        }
    return {
        **binary,
        "n": n,
        "accuracy": float((pred == y).mean()),
        "balanced_accuracy": float(np.mean(recalls)),
        "macro_f1": float(np.mean(f1s)),
        "macro_auroc": float(np.mean(aurocs)) if aurocs else None,
        "ece": ece,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "class_names": names,
        "notes": notes,
    }


__all__ = ["ECE_BINS", "binary_auroc", "confusion_matrix", "evaluate", "expected_calibration_error"]
