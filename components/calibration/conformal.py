"""Split-conformal prediction sets with adaptive prediction sets (APS), not randomised.

Score of a labelled case: the probability mass of the classes ranked strictly above its true
class (classes sorted by probability, highest first; ties by class index) — APS with its
uniform draw fixed at 0. On n held-out cases the threshold q̂ is the ⌈(n+1)(1−α)⌉-th smallest
score (the finite-sample quantile). A new case's set holds every class whose higher-ranked
mass is at most q̂: the classes in order until their mass first exceeds q̂. The top class has
nothing above it, so a set is never empty; the true class is in the set exactly when its
score is at most q̂, which gives (held-out and new cases exchangeable)
P(true class in set) ≥ 1 − α, and at most 1 − α + 1/(n+1) when scores do not tie.
(Ties — e.g. every correctly ranked case scores 0 — can only raise coverage.)
When n is too small for the quantile (⌈(n+1)(1−α)⌉ > n) q̂ is 1 and every set holds every
class.
"""

from __future__ import annotations

import math

import numpy as np

from components.errors import DataError


def _ranked(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class order per row (highest probability first, ties by index) and the mass of the
    classes ranked strictly above each position."""
    order = np.argsort(-probs, axis=1, kind="stable")
    sorted_p = np.take_along_axis(probs, order, axis=1)
    above = np.zeros_like(sorted_p)
    above[:, 1:] = np.cumsum(sorted_p[:, :-1], axis=1)
    return order, above


def check_probs(probs: np.ndarray) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2 or len(p) == 0:
        raise DataError(f"conformal sets need probabilities (N > 0, K >= 2); got {p.shape}")
    if not np.all(np.isfinite(p)) or p.min() < 0:
        raise DataError("probabilities must be finite and non-negative")
    return p


def aps_scores(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """APS conformity score of each case: mass of the classes ranked strictly above its label."""
    p = check_probs(probs)
    y = np.asarray(labels, dtype=np.int64)
    if y.shape != (len(p),) or y.min() < 0 or y.max() >= p.shape[1]:
        raise DataError(f"conformal calibration needs a class index in [0, {p.shape[1]}) per case")
    order, above = _ranked(p)
    position = np.argmax(order == y[:, None], axis=1)
    return above[np.arange(len(p)), position]


def conformal_quantile(scores: np.ndarray, coverage: float) -> float:
    """q̂: the ⌈(n+1)·coverage⌉-th smallest of n scores, 1.0 when that exceeds n."""
    if not 0.0 < float(coverage) < 1.0:
        raise DataError(f"conformal coverage must lie in (0, 1); got {coverage}")
    s = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(s)
    if n == 0:
        raise DataError("conformal calibration needs at least one held-out case")
    k = math.ceil((n + 1) * float(coverage))
    return 1.0 if k > n else float(min(s[k - 1], 1.0))


def fit_threshold(probs: np.ndarray, labels: np.ndarray, coverage: float) -> float:
    """q̂ for `coverage` from held-out probabilities and labels."""
    return conformal_quantile(aps_scores(probs, labels), coverage)


def set_masks(probs: np.ndarray, qhat: float) -> np.ndarray:
    """Boolean (N, K): class k is in case i's prediction set. Never an empty row."""
    p = check_probs(probs)
    order, above = _ranked(p)
    keep_sorted = above <= qhat if qhat < 1.0 else np.ones_like(above, dtype=bool)
    keep_sorted[:, 0] = True  # the top class is always in the set (nothing ranks above it)
    mask = np.zeros_like(keep_sorted)
    np.put_along_axis(mask, order, keep_sorted, axis=1)
    return mask


def set_indices(probs_row: np.ndarray, qhat: float) -> list[int]:
    """One case's prediction set, most probable class first."""
    row = np.asarray(probs_row, dtype=np.float64)[None]
    mask = set_masks(row, qhat)[0]
    return [int(k) for k in np.argsort(-row[0], kind="stable") if mask[k]]


__all__ = [
    "aps_scores",
    "check_probs",
    "conformal_quantile",
    "fit_threshold",
    "set_indices",
    "set_masks",
]
