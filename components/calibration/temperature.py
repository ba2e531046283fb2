"""Temperature scaling: probabilities softmax(logits / T) with one scalar T > 0 chosen to
minimise the negative log-likelihood (NLL) of held-out labels.

The NLL is convex in β = 1/T, so a golden-section search over log β in a fixed bracket finds
its minimum without gradients or randomness (T between `MIN_TEMPERATURE` and
`MAX_TEMPERATURE`). T > 1 softens an over-confident model, T < 1 sharpens an under-confident
one; the predicted class never changes.
"""

from __future__ import annotations

import math

import numpy as np

from components.errors import DataError

MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 20.0
_ITERATIONS = 80  # golden-section steps: bracket shrinks by 0.618**80 (far below float noise)


def check_logits(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 logits (N, K) and int64 labels (N,), or `DataError` saying what is wrong."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)
    if z.ndim != 2 or z.shape[1] < 2:
        raise DataError(f"calibration needs logits of shape (N, K >= 2); got {z.shape}")
    if len(z) == 0:
        raise DataError("calibration needs at least one held-out case; the split is empty")
    if y.ndim != 1 or len(y) != len(z):
        raise DataError(f"calibration needs one label per row of logits ({len(z)})")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= z.shape[1]:
        raise DataError(f"labels must be class indices in [0, {z.shape[1]})")
    if not np.all(np.isfinite(z)):
        raise DataError("logits must be finite (the model returned NaN or infinity)")
    return z, y.astype(np.int64)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax(logits / temperature), computed stably, as float64."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def temper(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(probs) / T): the same as softmax(logits / T) for probs = softmax(logits)
    (a constant shift of the logits cancels), for callers that only hold probabilities."""
    p = np.clip(np.asarray(probs, dtype=np.float64), np.finfo(np.float64).tiny, None)
    return softmax(np.log(p), temperature)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of `labels` under softmax(logits / T)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    top = z.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(z - top).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(z)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T in [MIN_TEMPERATURE, MAX_TEMPERATURE] minimising the NLL of `labels`.

    Refuses (`DataError`) empty or non-finite input and labels of a single class (the NLL then
    rewards ever sharper probabilities, whatever the model is worth)."""
    z, y = check_logits(logits, labels)
    if len(np.unique(y)) < 2:
        raise DataError(
            "temperature scaling needs held-out cases of at least two classes; this split has "
            "only one (add validation cases or set calibration.method=none)"
        )
    lo, hi = math.log(1.0 / MAX_TEMPERATURE), math.log(1.0 / MIN_TEMPERATURE)  # over log β

    def loss(log_beta: float) -> float:
        return nll(z, y, 1.0 / math.exp(log_beta))

    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(_ITERATIONS):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = loss(d)
    best = (a + b) / 2.0
    # the bracket's ends are candidates too (the optimum may lie on a bound)
    candidates = {best: loss(best), lo: loss(lo), hi: loss(hi)}
    log_beta = min(candidates, key=candidates.get)
    if log_beta >= hi - 1e-3 and _separable(z, y):
        # every held-out case is already right: the NLL only says "sharper", without limit, and
        # says nothing about the cases the model gets wrong; do not sharpen on such evidence
        return 1.0
    return float(1.0 / math.exp(log_beta))


def _separable(z: np.ndarray, y: np.ndarray) -> bool:
    """True when the top logit is the true class for every case."""
    return bool(np.all(z.argmax(axis=1) == y))


__all__ = [
    "MAX_TEMPERATURE",
    "MIN_TEMPERATURE",
    "check_logits",
    "fit_temperature",
    "nll",
    "softmax",
    "temper",
]
