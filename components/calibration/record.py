"""`Calibration`: what a model bundle carries so serving gives calibrated probabilities,
conformal prediction sets, the dangerous-class operating point and referrals, and the
out-of-distribution check's settings (the bundle's `calibration` block; the Mahalanobis
statistics themselves are arrays in the bundle's `ood.npz`). Bundles written before the
operating point or the OOD check existed read with both absent."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from components.calibration import conformal, referral, temperature
from components.calibration.operating_point import (
    OperatingPoint,
    danger_probability,
    dangerous_indices,
)
from components.errors import ModelError

SCORE = "aps"  # conformal score: adaptive prediction sets, not randomised


@dataclass(frozen=True)
class Calibration:
    method: str  # temperature | none (T = 1)
    temperature: float  # probabilities = softmax(logits / temperature)
    coverage: float  # target share of cases whose prediction set holds the true class
    qhat: float  # conformal threshold on the APS score (1.0: every class in every set)
    fitted_on: str  # the data T and qhat were fitted on, in words
    n_fit: int  # cases they were fitted on
    classes: list[str]
    dangerous: list[str] = field(default_factory=list)
    score: str = SCORE
    # threshold on P(any dangerous class) for the target sensitivity, fitted on the same data
    # as T and qhat; None: no dangerous class, or none could be fitted (see `notes`)
    operating_point: OperatingPoint | None = None
    # the OOD check's settings (`OODDetector.meta()`); None: no check
    ood: dict[str, Any] | None = None
    # what each part was fitted on, in words: temperature, conformal, operating_point, ood
    sources: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # why a part is missing, in words

    def __post_init__(self) -> None:
        if isinstance(self.operating_point, dict):  # built from `to_dict()` output
            object.__setattr__(
                self, "operating_point", OperatingPoint.from_dict(self.operating_point)
            )
        if not (self.temperature > 0 and np.isfinite(self.temperature)):
            raise ModelError(f"calibration temperature must be positive; got {self.temperature}")
        if not 0.0 < self.coverage < 1.0:
            raise ModelError(f"calibration coverage must lie in (0, 1); got {self.coverage}")
        unknown = set(self.dangerous) - set(self.classes)
        if unknown:
            raise ModelError(f"dangerous classes {sorted(unknown)} are not model classes")

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (N, K) from logits."""
        return temperature.softmax(logits, self.temperature)

    def recalibrate(self, probs: np.ndarray) -> np.ndarray:
        """Calibrated probabilities from uncalibrated softmax probabilities."""
        return temperature.temper(probs, self.temperature)

    def danger(self, calibrated_row: Sequence[float]) -> referral.DangerCheck | None:
        """P(any dangerous class) against the operating point (None without one)."""
        point = self.operating_point
        if point is None:
            return None
        indices = dangerous_indices(self.classes, self.dangerous)
        probability = float(danger_probability(np.asarray(calibrated_row), indices)[0])
        return referral.DangerCheck(probability, point.threshold, point.target_sensitivity)

    def decide(self, calibrated_row: Sequence[float]) -> referral.Referral:
        """One case's prediction set, danger check, `refer` and its reason from calibrated
        probabilities."""
        indices = conformal.set_indices(np.asarray(calibrated_row), self.qhat)
        names = [self.classes[k] for k in indices]
        danger = self.danger(calibrated_row)
        return referral.decide(names, self.dangerous, self.coverage, danger)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Calibration | None:
        if not data:
            return None
        try:
            return cls(
                method=str(data["method"]),
                temperature=float(data["temperature"]),
                coverage=float(data["coverage"]),
                qhat=float(data["qhat"]),
                fitted_on=str(data.get("fitted_on", "")),
                n_fit=int(data.get("n_fit", 0)),
                classes=[str(c) for c in data["classes"]],
                dangerous=[str(c) for c in data.get("dangerous") or []],
                score=str(data.get("score", SCORE)),
                operating_point=(
                    OperatingPoint.from_dict(data["operating_point"])
                    if data.get("operating_point")
                    else None
                ),
                ood=dict(data["ood"]) if data.get("ood") else None,
                sources={str(k): str(v) for k, v in (data.get("sources") or {}).items()},
                notes=[str(n) for n in data.get("notes") or []],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"the bundle's calibration block is unreadable: {exc}") from exc


__all__ = ["SCORE", "Calibration"]
