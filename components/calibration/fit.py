"""Fit a `Calibration` on held-out cases and measure what it does on others.

`fit_calibration` fits T (temperature scaling, unless method=none), then the conformal
threshold and the dangerous-class operating point on the calibrated probabilities of the same
held-out cases; `calibration_report` measures, on different cases (the test split), ECE and
NLL before and after, the empirical coverage of the prediction sets, their mean size, the
share of cases referred and the sensitivity/specificity at the operating point.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from components.calibration import conformal, temperature
from components.calibration import operating_point as op
from components.calibration.record import Calibration
from components.errors import ConfigError, DataError

METHODS = ("temperature", "none")


def fit_calibration(
    logits: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    *,
    method: str = "temperature",
    coverage: float = 0.9,
    dangerous: Sequence[str] = (),
    fitted_on: str = "validation split",
    target_sensitivity: float = 0.95,
) -> Calibration:
    """T, the conformal q̂ and the operating point from held-out logits (N, K) and labels (N,).
    An operating point that cannot be fitted (no dangerous class, no positive or no negative
    case) is left out with the reason in `notes`."""
    if method not in METHODS:
        raise ConfigError(f"calibration.method={method!r} is not one of {list(METHODS)}")
    z, y = temperature.check_logits(logits, labels)
    if z.shape[1] != len(classes):
        raise ConfigError(f"{z.shape[1]} logits per case for {len(classes)} classes")
    t = temperature.fit_temperature(z, y) if method == "temperature" else 1.0
    calibrated = temperature.softmax(z, t)
    qhat = conformal.fit_threshold(calibrated, y, coverage)
    point, notes = None, []
    try:
        indices = op.dangerous_indices(classes, dangerous)
        point = op.fit_operating_point(calibrated, y, indices, target_sensitivity)
    except DataError as exc:
        notes.append(f"no operating point: {exc}")
    sources = {"temperature": fitted_on, "conformal": fitted_on}
    if point is not None:
        sources["operating_point"] = (
            f"{fitted_on}: {point.n_positive} cases of a dangerous class, {point.n_negative} others"
        )
    return Calibration(
        method=method,
        temperature=t,
        coverage=float(coverage),
        qhat=qhat,
        fitted_on=fitted_on,
        n_fit=len(y),
        classes=[str(c) for c in classes],
        dangerous=[str(c) for c in dangerous],
        operating_point=point,
        sources=sources,
        notes=notes,
    )


def calibration_report(cal: Calibration, logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """What `cal` does on held-out cases it was not fitted on (JSON-safe)."""
    from components.evaluation.metrics import expected_calibration_error

    z, y = temperature.check_logits(logits, labels)
    before, after = temperature.softmax(z, 1.0), cal.probabilities(z)
    masks = conformal.set_masks(after, cal.qhat)
    covered = masks[np.arange(len(y)), y]
    referred = [cal.decide(row).refer for row in after]
    per_class = {
        name: float(covered[y == k].mean()) if np.any(y == k) else None
        for k, name in enumerate(cal.classes)
    }
    return {
        "method": cal.method,
        "temperature": cal.temperature,
        "fitted_on": cal.fitted_on,
        "n_fit": cal.n_fit,
        "n": len(y),
        "ece_before": expected_calibration_error(y, before)[0],
        "ece_after": expected_calibration_error(y, after)[0],
        "nll_before": temperature.nll(z, y, 1.0),
        "nll_after": temperature.nll(z, y, cal.temperature),
        "conformal": {
            "score": cal.score,
            "target_coverage": cal.coverage,
            "qhat": cal.qhat,
            "coverage": float(covered.mean()),
            "coverage_per_class": per_class,
            "mean_set_size": float(masks.sum(axis=1).mean()),
            "referral_rate": float(np.mean(referred)),
        },
        "dangerous": list(cal.dangerous),
        "operating_point": _operating_point_report(cal, after, y),
        "sources": dict(cal.sources),
        "notes": list(cal.notes),
    }


def _operating_point_report(cal: Calibration, probs: np.ndarray, y: np.ndarray):
    """Test sensitivity/specificity at the operating point (None without one)."""
    point = cal.operating_point
    if point is None:
        return None
    indices = op.dangerous_indices(cal.classes, cal.dangerous)
    return {
        "target_sensitivity": point.target_sensitivity,
        "fitted": point.to_dict(),
        "test": op.evaluate_operating_point(point, probs, y, indices),
    }


__all__ = ["METHODS", "calibration_report", "fit_calibration"]
