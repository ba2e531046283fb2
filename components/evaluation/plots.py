"""Evaluation figures as PNG files (matplotlib, headless Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from components.errors import DataError


def _figure(width: float, height: float):
    """A pyplot-free Figure (no global state, safe in servers and threads); saves via Agg."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def confusion_matrix_png(
    cm: Sequence[Sequence[int]] | np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
    normalise: bool = True,
) -> Path:
    """Heat map of the confusion matrix (rows = true class), each cell annotated with its count
    (and the row share when `normalise`, which also sets the colour scale)."""
    counts = np.asarray(cm, dtype=np.int64)
    k = len(class_names)
    if counts.shape != (k, k):
        raise DataError(f"confusion matrix must be {k}×{k} for {k} classes; got {counts.shape}")
    row_sums = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, row_sums, out=np.zeros(counts.shape), where=row_sums > 0)
    values = shares if normalise else counts
    side = max(4.0, 0.9 * k + 2.0)
    fig, ax = _figure(side, side * 0.85)
    image = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalise else None)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(k), labels=list(class_names), rotation=45, ha="right")
    ax.set_yticks(range(k), labels=list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = values.max() / 2 if values.max() > 0 else 0.5
    for i in range(k):
        for j in range(k):
            text = f"{counts[i, j]}\n{shares[i, j]:.0%}" if normalise else f"{counts[i, j]}"
            colour = "white" if values[i, j] > threshold else "black"
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=9)
    ax.set_title("confusion matrix" + (" (row-normalised)" if normalise else ""))
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def reliability_png(
    y_true: np.ndarray, probs: np.ndarray, path: str | Path, n_bins: int = 15
) -> Path:
    """Reliability diagram: accuracy vs mean confidence per confidence bin, with the ECE."""
    from components.evaluation.metrics import expected_calibration_error

    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or len(y) != len(p) or len(y) == 0:
        raise DataError("reliability plot needs probs (N, K) and N labels, N > 0")
    ece, bins = expected_calibration_error(y, p, n_bins)
    fig, ax = _figure(4.5, 4.5)
    width = 1.0 / n_bins
    filled = [b for b in bins if b["n"]]
    ax.bar(
        [b["lower"] for b in filled],
        [b["accuracy"] for b in filled],
        width=width,
        align="edge",
        edgecolor="black",
        label="accuracy",
    )
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability (ECE = {ece:.3f})")
    ax.legend(loc="upper left")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def reliability_comparison_png(
    y_true: np.ndarray,
    curves: dict[str, np.ndarray],
    path: str | Path,
    n_bins: int = 15,
) -> Path:
    """Reliability diagram of several sets of probabilities for the same labels (e.g. before
    and after calibration): accuracy vs mean confidence per bin, ECE in each legend entry."""
    from components.evaluation.metrics import expected_calibration_error

    y = np.asarray(y_true)
    if not curves or len(y) == 0:
        raise DataError("a reliability comparison needs labels and at least one set of probs")
    fig, ax = _figure(4.8, 4.8)
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    for name, probs in curves.items():
        p = np.asarray(probs, dtype=np.float64)
        if p.ndim != 2 or len(p) != len(y):
            raise DataError(f"{name}: probs must be (N, K) with N = {len(y)}")
        ece, bins = expected_calibration_error(y, p, n_bins)
        filled = [b for b in bins if b["n"]]
        ax.plot(
            [b["confidence"] for b in filled],
            [b["accuracy"] for b in filled],
            "o-",
            label=f"{name} (ECE {ece:.3f})",
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean confidence in bin (max probability)")
    ax.set_ylabel("accuracy in bin")
    ax.set_title(f"reliability on the test split (n = {len(y)})")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out
