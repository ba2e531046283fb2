"""Fit a `Calibration` on held-out cases and measure what it does on others.

`fit_calibration` fits T (temperature scaling, unless method=none) and then the conformal
threshold on the calibrated probabilities of the same held-out cases; `calibration_report`
measures, on different cases (the test split), ECE and NLL before and after, the empirical
coverage of the prediction sets, their mean size and the share of cases referred.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from components.calibration import conformal, temperature
from components.calibration.record import Calibration
from components.errors import ConfigError

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
) -> Calibration:
    """T and the conformal q̂ from held-out logits (N, K) and labels (N,)."""
    if method not in METHODS:
        raise ConfigError(f"calibration.method={method!r} is not one of {list(METHODS)}")
    z, y = temperature.check_logits(logits, labels)
    if z.shape[1] != len(classes):
        raise ConfigError(f"{z.shape[1]} logits per case for {len(classes)} classes")
    t = temperature.fit_temperature(z, y) if method == "temperature" else 1.0
    qhat = conformal.fit_threshold(temperature.softmax(z, t), y, coverage)
    return Calibration(
        method=method,
        temperature=t,
        coverage=float(coverage),
        qhat=qhat,
        fitted_on=fitted_on,
        n_fit=len(y),
        classes=[str(c) for c in classes],
        dangerous=[str(c) for c in dangerous],
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
    }


__all__ = ["METHODS", "calibration_report", "fit_calibration"]
