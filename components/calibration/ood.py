"""Out-of-distribution (OOD) detection: is an input unlike the images the model was trained on?

Two scores, higher meaning more unusual:
- ``mahalanobis``: the smallest squared Mahalanobis distance of the input's penultimate-layer
  features to a class mean, with one covariance shared by the classes. Class means and the
  covariance come from the training split's features; the covariance is shrunk towards a
  scaled identity (Ledoit-Wolf) so it stays invertible with fewer images than feature
  dimensions. What the bundle keeps: the class means (K, D) and the precision matrix (D, D),
  aggregate statistics of training features, no single image's features.
- ``energy``: −logsumexp(logits), from the logits alone (nothing stored but the threshold).

The threshold is set on in-distribution held-out cases (the validation split, or with
`calibration.fit_on=held_out` the held-out calibration split of the deployment's own
distribution) at a configured false-alarm rate α: with n scores, the ⌈(n+1)(1−α)⌉-th
smallest, so an in-distribution input exchangeable with them is flagged with probability at
most α. An input is out of distribution when its score is above the threshold. Plain numpy
(and scikit-learn's Ledoit-Wolf estimate and AUROC).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from components.errors import DataError, ModelError

SCORES = ("mahalanobis", "energy")


def energy_scores(logits: np.ndarray) -> np.ndarray:
    """−logsumexp(logits) per row (N,): high when no class gets a large logit."""
    z = np.asarray(logits, dtype=np.float64)
    top = z.max(axis=1)
    return -(top + np.log(np.exp(z - top[:, None]).sum(axis=1)))


def fit_gaussian(features: np.ndarray, labels: np.ndarray, n_classes: int) -> dict[str, np.ndarray]:
    """Class means (K, D) and the shared, shrunk precision matrix (D, D) of training features."""
    from sklearn.covariance import ledoit_wolf

    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if f.ndim != 2 or len(f) != len(y) or len(f) < 2:
        raise DataError(f"OOD statistics need features (N >= 2, D) and N labels; got {f.shape}")
    if not np.all(np.isfinite(f)):
        raise DataError("training features must be finite")
    present = np.unique(y)
    means = np.zeros((n_classes, f.shape[1]))
    for k in present:
        means[k] = f[y == k].mean(axis=0)
    centred = f - means[y]
    covariance, _shrinkage = ledoit_wolf(centred, assume_centered=True)
    precision = np.linalg.pinv(covariance, hermitian=True)
    return {
        "means": means[present].astype(np.float32),
        "precision": precision.astype(np.float32),
    }


def mahalanobis_scores(
    features: np.ndarray, means: np.ndarray, precision: np.ndarray
) -> np.ndarray:
    """min over classes of (f − μ_k)ᵀ P (f − μ_k) per row (N,)."""
    f = np.asarray(features, dtype=np.float64)
    mu = np.asarray(means, dtype=np.float64)
    p = np.asarray(precision, dtype=np.float64)
    if f.ndim != 2 or f.shape[1] != mu.shape[1]:
        raise ModelError(f"features of shape {f.shape} do not match OOD means {mu.shape}")
    fp = f @ p
    distances = (
        np.einsum("nd,nd->n", fp, f)[:, None]
        - 2.0 * fp @ mu.T
        + np.einsum("kd,kd->k", mu @ p, mu)[None, :]
    )
    return np.maximum(distances.min(axis=1), 0.0)


def false_alarm_threshold(scores: np.ndarray, false_alarm: float) -> float:
    """The ⌈(n+1)(1−α)⌉-th smallest in-distribution score (the largest when that exceeds n)."""
    if not 0.0 < float(false_alarm) < 1.0:
        raise DataError(f"OOD false-alarm rate must lie in (0, 1); got {false_alarm}")
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if len(s) == 0:
        raise DataError("the OOD threshold needs at least one in-distribution held-out case")
    k = math.ceil((len(s) + 1) * (1.0 - float(false_alarm)))
    return float(s[min(k, len(s)) - 1])


@dataclass(frozen=True)
class OODDetector:
    """A fitted detector: `meta()` goes into the bundle's calibration block, `arrays()` (the
    Mahalanobis statistics; empty for energy) into the bundle's `ood.npz`."""

    score: str  # mahalanobis | energy
    threshold: float  # out of distribution when the score is above it
    false_alarm: float  # target share of in-distribution inputs flagged
    fitted_on: str  # in words: what the statistics and the threshold were fitted on
    n_statistics: int  # training cases behind the class means and covariance (0: energy)
    n_threshold: int  # in-distribution held-out cases behind the threshold
    stats: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise ModelError(f"unknown OOD score {self.score!r}; expected one of {SCORES}")
        if self.score == "mahalanobis" and not {"means", "precision"} <= set(self.stats):
            raise ModelError("a Mahalanobis OOD detector needs its class means and precision")

    @property
    def needs_features(self) -> bool:
        return self.score == "mahalanobis"

    def scores(self, logits: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        if self.score == "energy":
            return energy_scores(logits)
        if features is None:
            raise ModelError("the Mahalanobis OOD score needs the penultimate-layer features")
        return mahalanobis_scores(features, self.stats["means"], self.stats["precision"])

    def is_out(self, scores: np.ndarray | float) -> np.ndarray:
        return np.asarray(scores, dtype=np.float64) > self.threshold

    def meta(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "threshold": self.threshold,
            "false_alarm": self.false_alarm,
            "fitted_on": self.fitted_on,
            "n_statistics": self.n_statistics,
            "n_threshold": self.n_threshold,
        }

    def arrays(self) -> dict[str, np.ndarray]:
        return dict(self.stats)

    @classmethod
    def from_parts(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray] | None):
        try:
            return cls(
                score=str(meta["score"]),
                threshold=float(meta["threshold"]),
                false_alarm=float(meta["false_alarm"]),
                fitted_on=str(meta.get("fitted_on", "")),
                n_statistics=int(meta.get("n_statistics", 0)),
                n_threshold=int(meta.get("n_threshold", 0)),
                stats=dict(arrays or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"the bundle's OOD block is unreadable: {exc}") from exc


def fit_detector(
    score: str,
    *,
    val_logits: np.ndarray,
    val_features: np.ndarray | None,
    false_alarm: float,
    train_features: np.ndarray | None = None,
    train_labels: np.ndarray | None = None,
    n_classes: int = 0,
    threshold_on: str = "validation split",
) -> OODDetector:
    """Statistics from the training features (Mahalanobis), threshold on in-distribution
    held-out cases (`val_*`: the validation split, or the held-out calibration split, named by
    `threshold_on`)."""
    if score not in SCORES:
        raise DataError(f"unknown OOD score {score!r}; expected one of {SCORES}")
    stats: dict[str, np.ndarray] = {}
    n_stats = 0
    if score == "mahalanobis":
        if train_features is None or train_labels is None or val_features is None:
            raise DataError("the Mahalanobis OOD score needs training and validation features")
        stats = fit_gaussian(train_features, train_labels, n_classes)
        n_stats = len(train_labels)
        val = mahalanobis_scores(val_features, stats["means"], stats["precision"])
        fitted_on = (
            f"class means and shared covariance (Ledoit-Wolf shrinkage) of the training split's "
            f"penultimate-layer features ({n_stats} cases); threshold on the {threshold_on} "
            f"({len(val)} cases) at a {float(false_alarm):.0%} false-alarm rate"
        )
    else:
        val = energy_scores(val_logits)
        fitted_on = (
            f"threshold on the {threshold_on} ({len(val)} cases) at a "
            f"{float(false_alarm):.0%} false-alarm rate"
        )
    return OODDetector(
        score=score,
        threshold=false_alarm_threshold(val, false_alarm),
        false_alarm=float(false_alarm),
        fitted_on=fitted_on,
        n_statistics=n_stats,
        n_threshold=len(val),
        stats=stats,
    )


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """The detector's AUROC: P(an OOD score > an in-distribution score), ties counting half."""
    from sklearn.metrics import roc_auc_score

    a, b = np.asarray(in_scores, dtype=np.float64), np.asarray(out_scores, dtype=np.float64)
    if len(a) == 0 or len(b) == 0:
        raise DataError("AUROC needs in- and out-of-distribution scores")
    truth = np.concatenate([np.zeros(len(a)), np.ones(len(b))])
    return float(roc_auc_score(truth, np.concatenate([a, b])))


__all__ = [
    "SCORES",
    "OODDetector",
    "auroc",
    "energy_scores",
    "false_alarm_threshold",
    "fit_detector",
    "fit_gaussian",
    "mahalanobis_scores",
]
