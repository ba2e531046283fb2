"""Percentile-bootstrap confidence intervals of a mean, resampling images or whole groups.

The explanation benches compare maps image by image (a map's score minus a reference's on the
same image); `mean_interval` gives such a paired difference's mean with its interval. With
`groups` (one label per value, e.g. a patient key), whole groups are drawn, since one
patient's images are not independent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from components.errors import InputError

DEFAULT_BOOTSTRAP = 2000
DEFAULT_LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean with its bootstrap confidence interval."""

    mean: float
    low: float
    high: float

    def as_dict(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high}


def group_resampler(labels: np.ndarray, boot: int, seed: int) -> Callable[[np.ndarray], np.ndarray]:
    """A function mapping per-value arrays to `boot` bootstrap means (whole groups drawn)."""
    if boot < 1:
        raise InputError(f"bootstrap needs at least one resample, got {boot}")
    _, index = np.unique(labels, return_inverse=True)
    n_groups = int(index.max()) + 1
    counts = np.bincount(index, minlength=n_groups).astype(np.float64)
    draws = np.random.default_rng(seed).integers(0, n_groups, size=(int(boot), n_groups))

    def means(values: np.ndarray) -> np.ndarray:
        sums = np.bincount(index, weights=values, minlength=n_groups)
        return sums[draws].sum(axis=1) / counts[draws].sum(axis=1)

    return means


def interval_of(values: np.ndarray, resample, level: float) -> Interval:
    """The mean of `values` with the `level` percentile interval of `resample(values)`."""
    if not 0 < level < 1:
        raise InputError(f"level must lie in (0, 1), got {level}")
    means = resample(values)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Interval(mean=float(values.mean()), low=float(low), high=float(high))


def mean_interval(
    values: Sequence[float],
    groups: Sequence | None = None,
    *,
    boot: int = DEFAULT_BOOTSTRAP,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> Interval:
    """The mean of `values` (finite, at least one) with its bootstrap interval."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0 or not np.all(np.isfinite(array)):
        raise InputError("an interval needs a non-empty 1-D array of finite values")
    labels = np.asarray([str(g) for g in groups] if groups is not None else range(len(array)))
    if len(labels) != len(array):
        raise InputError(f"{len(labels)} groups for {len(array)} values")
    return interval_of(array, group_resampler(labels, boot, seed), level)


__all__ = [
    "DEFAULT_BOOTSTRAP",
    "DEFAULT_LEVEL",
    "Interval",
    "group_resampler",
    "interval_of",
    "mean_interval",
]
