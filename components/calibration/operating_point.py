"""Operating point for the dangerous classes: a threshold on the calibrated probability that the
case belongs to *any* dangerous class (the sum of their probabilities), chosen on held-out data
to reach a target sensitivity.

On held-out cases with n₊ positives (true class dangerous), the threshold is the k-th largest
positive score with k = ⌈target · n₊⌉: the highest threshold at which at least k positives score
at or above it, so the held-out sensitivity is at least the target (more when scores tie at the
threshold) and no higher threshold reaches it. A case is flagged when its score is at or above
the threshold. Plain numpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from components.errors import DataError


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float  # flag "dangerous" when P(any dangerous class) >= threshold
    target_sensitivity: float
    sensitivity: float  # on the data it was fitted on
    specificity: float
    n_positive: int  # fitted-on cases whose true class is dangerous
    n_negative: int

    def flags(self, danger: np.ndarray | float) -> np.ndarray:
        return np.asarray(danger, dtype=np.float64) >= self.threshold

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OperatingPoint:
        return cls(
            threshold=float(data["threshold"]),
            target_sensitivity=float(data["target_sensitivity"]),
            sensitivity=float(data["sensitivity"]),
            specificity=float(data["specificity"]),
            n_positive=int(data["n_positive"]),
            n_negative=int(data["n_negative"]),
        )


def dangerous_indices(classes: Sequence[str], dangerous: Sequence[str]) -> list[int]:
    """Output indices of the dangerous classes (`DataError` naming any that is not a class)."""
    names = [str(c) for c in classes]
    unknown = [d for d in dangerous if d not in names]
    if unknown:
        raise DataError(f"dangerous classes {unknown} are not model classes {names}")
    return [names.index(d) for d in dangerous]


def danger_probability(probs: np.ndarray, indices: Sequence[int]) -> np.ndarray:
    """P(any dangerous class) per case: the sum of the dangerous classes' probabilities."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1:
        p = p[None]
    return np.clip(p[:, list(indices)].sum(axis=1), 0.0, 1.0)


def _rates(flagged: np.ndarray, positive: np.ndarray) -> dict[str, Any]:
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    tp, fp = int((flagged & positive).sum()), int((flagged & ~positive).sum())
    return {
        "sensitivity": tp / n_pos if n_pos else None,
        "specificity": (n_neg - fp) / n_neg if n_neg else None,
        "n_positive": n_pos,
        "n_negative": n_neg,
        "true_positive": tp,
        "false_negative": n_pos - tp,
        "true_negative": n_neg - fp,
        "false_positive": fp,
    }


def _positives(labels: np.ndarray, indices: Sequence[int], n: int) -> np.ndarray:
    y = np.asarray(labels, dtype=np.int64)
    if y.shape != (n,):
        raise DataError(f"an operating point needs one label per case ({n})")
    return np.isin(y, list(indices))


def fit_operating_point(
    probs: np.ndarray, labels: np.ndarray, indices: Sequence[int], target_sensitivity: float
) -> OperatingPoint:
    """The highest threshold on P(any dangerous class) whose sensitivity on these cases reaches
    `target_sensitivity`. `DataError` without dangerous classes, positives or negatives."""
    if not 0.0 < float(target_sensitivity) <= 1.0:
        raise DataError(f"target sensitivity must lie in (0, 1]; got {target_sensitivity}")
    if not indices:
        raise DataError("the dataset marks no class as dangerous: no operating point to choose")
    score = danger_probability(probs, indices)
    positive = _positives(labels, indices, len(score))
    n_pos = int(positive.sum())
    if n_pos == 0:
        raise DataError(
            "no case of a dangerous class in the data the operating point is fitted on: its "
            "sensitivity cannot be measured"
        )
    if n_pos == len(score):
        raise DataError(
            "every case in the data the operating point is fitted on is of a dangerous class: "
            "its specificity cannot be measured"
        )
    k = math.ceil(float(target_sensitivity) * n_pos - 1e-9)
    threshold = float(np.sort(score[positive])[::-1][k - 1])
    rates = _rates(score >= threshold, positive)
    return OperatingPoint(
        threshold=threshold,
        target_sensitivity=float(target_sensitivity),
        sensitivity=rates["sensitivity"],
        specificity=rates["specificity"],
        n_positive=n_pos,
        n_negative=rates["n_negative"],
    )


def evaluate_operating_point(
    point: OperatingPoint, probs: np.ndarray, labels: np.ndarray, indices: Sequence[int]
) -> dict[str, Any]:
    """Sensitivity, specificity and the confusion counts at `point` on other cases (JSON-safe;
    a rate is None when its denominator is 0)."""
    score = danger_probability(probs, indices)
    return {
        "threshold": point.threshold,
        **_rates(point.flags(score), _positives(labels, indices, len(score))),
    }


__all__ = [
    "OperatingPoint",
    "danger_probability",
    "dangerous_indices",
    "evaluate_operating_point",
    "fit_operating_point",
]
