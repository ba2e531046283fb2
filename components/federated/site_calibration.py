"""Calibration of a federated model from the sites' held-out cases, without pooling them.

A central run fits temperature scaling and the conformal threshold on one validation split
(`components.calibration.fit`). In a federation every site keeps its validation cases; it sends
back only sums over them, in two exchanges after the last round:

1. **Temperature.** Each site returns its summed NLL at every T of a fixed grid (`T_GRID`,
   geometric, 161 points from `MIN_TEMPERATURE` to `MAX_TEMPERATURE`), its class counts and its
   number of correctly ranked cases. The NLL of the pooled cases is the sum of the sites' sums,
   so the coordinator minimises exactly the pooled NLL over the grid and refines the minimum with
   a parabola through its two neighbours (in log T, where the NLL is smooth).
2. **Conformal threshold.** With T fixed, each site returns the histogram of its cases' APS
   scores over `APS_BINS` equal bins of [0, 1]. The pooled histogram gives the rank of the
   ⌈(n+1)(1−α)⌉-th smallest score; q̂ is the upper edge of the bin holding it, never below the
   exact pooled q̂ and at most one bin width (1/`APS_BINS` = 0.001) above it, so the coverage
   guarantee of split-conformal prediction holds unchanged (sets can only be larger).

The final evaluation on the sites' test splits (`evaluation_sums` / `pooled_report`) returns,
per site, ECE bin sums before and after calibration, NLL sums, covered cases, summed set sizes
and referred cases: the pooled figures are exactly those of the pooled cases. Everything a site
sends is a sum over at least its whole split: no case, score or prediction leaves it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from components.calibration import conformal, temperature
from components.calibration import operating_point as op
from components.calibration.record import Calibration
from components.errors import DataError
from components.evaluation.metrics import ECE_BINS

T_GRID = np.geomspace(temperature.MIN_TEMPERATURE, temperature.MAX_TEMPERATURE, 161)
APS_BINS = 1000


@dataclass(frozen=True)
class CalibrationSpec:
    """What the coordinator fits after the rounds (the run config's `calibration` section and
    the dataset's dangerous classes); `method="none"` keeps T = 1 but still fits q̂."""

    method: str = "temperature"
    coverage: float = 0.9
    dangerous: tuple[str, ...] = ()
    target_sensitivity: float = 0.95  # operating point on P(any dangerous class)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"dangerous": list(self.dangerous)}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> CalibrationSpec:
        """From a composed run config (its `calibration` section and dataset.dangerous)."""
        conf = cfg["calibration"]
        return cls(
            method=str(conf["method"]),
            coverage=float(conf["coverage"]),
            dangerous=tuple(str(c) for c in cfg["dataset"]["dangerous"]),
            target_sensitivity=float(conf["target_sensitivity"]),
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> CalibrationSpec:
        data = dict(data or {})
        return cls(
            method=str(data.get("method", "temperature")),
            coverage=float(data.get("coverage", 0.9)),
            dangerous=tuple(str(c) for c in data.get("dangerous") or ()),
            target_sensitivity=float(data.get("target_sensitivity", 0.95)),
        )


# --- exchange 1: temperature -------------------------------------------------------------


def temperature_sums(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """A site's sums for the temperature: NLL summed over its cases at every T of `T_GRID`,
    its class counts and how many cases the model already ranks right."""
    z, y = temperature.check_logits(logits, labels)
    nll = [temperature.nll(z, y, float(t)) * len(y) for t in T_GRID]
    return {
        "n": len(y),
        "nll_sums": nll,
        "class_counts": np.bincount(y, minlength=num_classes).tolist(),
        "correct": int(np.sum(z.argmax(axis=1) == y)),
    }


def pooled_temperature(sums: Sequence[Mapping[str, Any]], method: str) -> float:
    """T minimising the pooled NLL (grid minimum, refined by a parabola in log T).

    Refuses (`DataError`) fewer than two classes among all sites' cases; keeps T = 1 when every
    pooled case is already ranked right and the NLL only asks for ever sharper probabilities
    (as `temperature.fit_temperature` does on one split)."""
    if method == "none":
        return 1.0
    counts = np.sum([np.asarray(s["class_counts"], dtype=np.int64) for s in sums], axis=0)
    if np.count_nonzero(counts) < 2:
        raise DataError(
            "temperature scaling needs held-out cases of at least two classes; the sites' "
            "validation splits hold only one (or set calibration.method=none)"
        )
    total = np.sum([np.asarray(s["nll_sums"], dtype=np.float64) for s in sums], axis=0)
    if total.shape != T_GRID.shape or not np.all(np.isfinite(total)):
        raise DataError("a site's NLL sums do not match the temperature grid")
    best = int(np.argmin(total))
    n, correct = int(counts.sum()), sum(int(s["correct"]) for s in sums)
    if best == 0 and correct == n:
        return 1.0  # perfectly separated held-out cases say nothing about the model's errors
    if 0 < best < len(T_GRID) - 1:
        x = np.log(T_GRID[best - 1 : best + 2])
        a, b, _ = np.polyfit(x, total[best - 1 : best + 2], 2)
        if a > 0:
            return float(np.clip(math.exp(-b / (2 * a)), T_GRID[best - 1], T_GRID[best + 1]))
    return float(T_GRID[best])


# --- exchange 2: conformal threshold ----------------------------------------------------------


def aps_histogram(probs: np.ndarray, labels: np.ndarray) -> list[int]:
    """A site's APS scores (of its calibrated probabilities) counted in `APS_BINS` bins."""
    scores = conformal.aps_scores(probs, labels)
    index = np.clip(np.ceil(scores * APS_BINS).astype(int) - 1, 0, APS_BINS - 1)  # (i/B, (i+1)/B]
    return np.bincount(index, minlength=APS_BINS).tolist()


def pooled_qhat(histograms: Sequence[Sequence[int]], coverage: float) -> float:
    """q̂ from the sites' score histograms: the upper edge of the bin holding the
    ⌈(n+1)·coverage⌉-th smallest pooled score (1.0 when n is too small)."""
    counts = np.sum([np.asarray(h, dtype=np.int64) for h in histograms], axis=0)
    if counts.shape != (APS_BINS,):
        raise DataError("a site's conformal histogram has the wrong number of bins")
    n = int(counts.sum())
    if n == 0:
        raise DataError("conformal calibration needs at least one held-out case at the sites")
    k = math.ceil((n + 1) * float(coverage))
    if k > n:
        return 1.0
    bin_index = int(np.searchsorted(np.cumsum(counts), k))
    return min(1.0, (bin_index + 1) / APS_BINS)


def danger_histograms(
    probs: np.ndarray, labels: np.ndarray, classes: Sequence[str], dangerous: Sequence[str]
) -> dict[str, list[int]]:
    """A site's P(any dangerous class) counted in `APS_BINS` bins [i/B, (i+1)/B), separately
    for its cases of a dangerous class (positives) and the others."""
    indices = op.dangerous_indices(classes, dangerous)
    score = op.danger_probability(probs, indices)
    index = np.clip(np.floor(score * APS_BINS).astype(int), 0, APS_BINS - 1)
    positive = np.isin(np.asarray(labels), indices)
    return {
        "positive": np.bincount(index[positive], minlength=APS_BINS).tolist(),
        "negative": np.bincount(index[~positive], minlength=APS_BINS).tolist(),
    }


def pooled_operating_point(
    histograms: Sequence[Mapping[str, Sequence[int]]], target_sensitivity: float
) -> op.OperatingPoint:
    """The operating point from the sites' danger histograms: the lower edge of the bin holding
    the ⌈target·n₊⌉-th largest pooled positive score, so the pooled sensitivity is at least the
    target (the threshold is at most one bin below the pooled-case one); sensitivity and
    specificity at it are exact counts."""
    pos = np.sum([np.asarray(h["positive"], dtype=np.int64) for h in histograms], axis=0)
    neg = np.sum([np.asarray(h["negative"], dtype=np.int64) for h in histograms], axis=0)
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if n_pos == 0 or n_neg == 0:
        which = "a dangerous class" if n_pos == 0 else "a non-dangerous class"
        raise DataError(f"no site validation case of {which}: no operating point to fit")
    k = math.ceil(float(target_sensitivity) * n_pos - 1e-9)
    at_or_above = np.cumsum(pos[::-1])[::-1]  # positives in bins >= i
    bin_index = int(np.flatnonzero(at_or_above >= k).max())
    return op.OperatingPoint(
        threshold=bin_index / APS_BINS,
        target_sensitivity=float(target_sensitivity),
        sensitivity=float(pos[bin_index:].sum() / n_pos),
        specificity=float(neg[:bin_index].sum() / n_neg),
        n_positive=n_pos,
        n_negative=n_neg,
    )


def build_calibration(
    spec: CalibrationSpec,
    t: float,
    qhat: float,
    classes: Sequence[str],
    n: int,
    sites: Sequence[str],
    point: op.OperatingPoint | None = None,
    notes: Sequence[str] = (),
) -> Calibration:
    """The bundle's calibration block, saying what each part was fitted on."""
    data = (
        f"validation splits of {len(sites)} sites ({n} cases; never trained on, also used for "
        "the sites' model selection)"
    )
    sources = {
        "temperature": f"{data}, as NLL sums on a grid of {len(T_GRID)} temperatures",
        "conformal": (
            f"{data}, as APS-score histograms of {APS_BINS} bins (q̂ at most {1 / APS_BINS:g} "
            "above the pooled-case value)"
        ),
    }
    if point is not None:
        sources["operating_point"] = (
            f"{data}, as histograms of P(any dangerous class) in {APS_BINS} bins: "
            f"{point.n_positive} cases of a dangerous class, {point.n_negative} others"
        )
    return Calibration(
        method=spec.method,
        temperature=float(t),
        coverage=spec.coverage,
        qhat=float(qhat),
        fitted_on=f"{data}, combined as sums only",
        n_fit=int(n),
        classes=[str(c) for c in classes],
        dangerous=list(spec.dangerous),
        operating_point=point,
        sources=sources,
        notes=list(notes),
    )


# --- final evaluation on the sites' test splits -----------------------------------------------


def _ece_bins(y: np.ndarray, probs: np.ndarray) -> dict[str, list[float]]:
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(np.float64)
    index = np.clip(np.ceil(confidence * ECE_BINS).astype(int) - 1, 0, ECE_BINS - 1)
    return {
        "count": np.bincount(index, minlength=ECE_BINS).astype(float).tolist(),
        "correct": np.bincount(index, weights=correct, minlength=ECE_BINS).tolist(),
        "confidence": np.bincount(index, weights=confidence, minlength=ECE_BINS).tolist(),
    }


def evaluation_sums(logits: np.ndarray, labels: np.ndarray, cal: Calibration) -> dict[str, Any]:
    """What `cal` does on a site's test split, as sums: ECE bins and NLL before and after,
    covered cases and summed set sizes (per class too) and referred cases."""
    z, y = temperature.check_logits(logits, labels)
    before, after = temperature.softmax(z, 1.0), cal.probabilities(z)
    masks = conformal.set_masks(after, cal.qhat)
    covered = masks[np.arange(len(y)), y]
    k = len(cal.classes)
    return {
        "n": len(y),
        "ece_before": _ece_bins(y, before),
        "ece_after": _ece_bins(y, after),
        "nll_before_sum": temperature.nll(z, y, 1.0) * len(y),
        "nll_after_sum": temperature.nll(z, y, cal.temperature) * len(y),
        "covered": int(covered.sum()),
        "covered_per_class": np.bincount(y, weights=covered, minlength=k).astype(int).tolist(),
        "class_counts": np.bincount(y, minlength=k).tolist(),
        "set_size_sum": int(masks.sum()),
        "referred": int(sum(cal.decide(row).refer for row in after)),
        "operating_point": _point_counts(cal, after, y),
    }


def _point_counts(cal: Calibration, probs: np.ndarray, y: np.ndarray) -> dict[str, int] | None:
    if cal.operating_point is None:
        return None
    indices = op.dangerous_indices(cal.classes, cal.dangerous)
    rates = op.evaluate_operating_point(cal.operating_point, probs, y, indices)
    keys = ("true_positive", "false_negative", "true_negative", "false_positive")
    return {k: int(rates[k]) for k in keys}


def _pooled_point(cal: Calibration, sums: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    point = cal.operating_point
    counts = [s["operating_point"] for s in sums if s.get("operating_point")]
    if point is None or not counts:
        return None
    tp, fn, tn, fp = (
        sum(int(c[k]) for c in counts)
        for k in ("true_positive", "false_negative", "true_negative", "false_positive")
    )
    test = {
        "threshold": point.threshold,
        "sensitivity": tp / (tp + fn) if tp + fn else None,
        "specificity": tn / (tn + fp) if tn + fp else None,
        "n_positive": tp + fn,
        "n_negative": tn + fp,
        "true_positive": tp,
        "false_negative": fn,
        "true_negative": tn,
        "false_positive": fp,
    }
    return {"target_sensitivity": point.target_sensitivity, "fitted": point.to_dict(), "test": test}


def _ece(bins: Sequence[Mapping[str, Sequence[float]]], n: int) -> float:
    correct = np.sum([np.asarray(b["correct"], dtype=np.float64) for b in bins], axis=0)
    confidence = np.sum([np.asarray(b["confidence"], dtype=np.float64) for b in bins], axis=0)
    return float(np.abs(correct - confidence).sum() / n)


def pooled_report(sums: Sequence[Mapping[str, Any]], cal: Calibration) -> dict[str, Any]:
    """The calibration report (as `fit.calibration_report`) of the pooled test cases."""
    usable = [s for s in sums if int(s["n"]) > 0]
    n = sum(int(s["n"]) for s in usable)
    if n == 0:
        raise DataError("no site returned test cases for the calibration report")
    counts = np.sum([np.asarray(s["class_counts"]) for s in usable], axis=0)
    covered = np.sum([np.asarray(s["covered_per_class"]) for s in usable], axis=0)
    return {
        "method": cal.method,
        "temperature": cal.temperature,
        "fitted_on": cal.fitted_on,
        "n_fit": cal.n_fit,
        "n": n,
        "ece_before": _ece([s["ece_before"] for s in usable], n),
        "ece_after": _ece([s["ece_after"] for s in usable], n),
        "nll_before": sum(float(s["nll_before_sum"]) for s in usable) / n,
        "nll_after": sum(float(s["nll_after_sum"]) for s in usable) / n,
        "conformal": {
            "score": cal.score,
            "target_coverage": cal.coverage,
            "qhat": cal.qhat,
            "coverage": sum(int(s["covered"]) for s in usable) / n,
            "coverage_per_class": {
                name: float(covered[c] / counts[c]) if counts[c] else None
                for c, name in enumerate(cal.classes)
            },
            "mean_set_size": sum(int(s["set_size_sum"]) for s in usable) / n,
            "referral_rate": sum(int(s["referred"]) for s in usable) / n,
        },
        "dangerous": list(cal.dangerous),
        "operating_point": _pooled_point(cal, usable),
        "sources": dict(cal.sources),
        "notes": list(cal.notes),
        "pooling": "exact sums from each site's test split",
    }


__all__ = [
    "APS_BINS",
    "T_GRID",
    "CalibrationSpec",
    "aps_histogram",
    "build_calibration",
    "danger_histograms",
    "evaluation_sums",
    "pooled_operating_point",
    "pooled_qhat",
    "pooled_report",
    "pooled_temperature",
    "temperature_sums",
]
