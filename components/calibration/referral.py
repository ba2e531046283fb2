"""The per-case referral rule, in one place for serving, evaluation and reports.

A case is referred for specialist review when its conformal prediction set
- holds more than one class (the model cannot separate them at the configured coverage), or
- holds a class marked dangerous for the dataset while another class is the top one (implied
  by the first rule, since the top class is always in the set; kept as its own reason because
  it is the one a clinician must hear: the dangerous class cannot be ruled out), or
- the operating point flags danger (P(any dangerous class) at or above the threshold chosen
  for the target sensitivity, `operating_point`) while the top class is not dangerous.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Referral:
    prediction_set: list[str]  # class names, most probable first
    refer: bool
    reason: str  # plain words, for the clinician
    danger_probability: float | None = None  # P(any dangerous class); None: no operating point
    danger_flagged: bool | None = None  # at or above the operating point's threshold


@dataclass(frozen=True)
class DangerCheck:
    """One case against the operating point: P(any dangerous class) and the threshold."""

    probability: float
    threshold: float
    target_sensitivity: float

    @property
    def flagged(self) -> bool:
        return self.probability >= self.threshold


def readable(name: str) -> str:
    return str(name).replace("_", " ")


def _join(names: Sequence[str]) -> str:
    words = [readable(n) for n in names]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _any_of(names: Sequence[str]) -> str:
    words = [readable(n) for n in names]
    return words[0] if len(words) == 1 else "any of " + ", ".join(words)


def decide(
    prediction_set: Sequence[str],
    dangerous: Sequence[str],
    coverage: float,
    danger: DangerCheck | None = None,
) -> Referral:
    """`refer` and its reason for one case's prediction set (most probable class first) and,
    when the model has an operating point, its danger check."""
    names = [str(n) for n in prediction_set]
    if not names:
        raise ValueError("a prediction set is never empty (it always holds the top class)")
    top = names[0]
    level = f"{coverage:.0%}"
    extra = {}
    if danger is not None:
        extra = {"danger_probability": float(danger.probability), "danger_flagged": danger.flagged}
    if danger is not None and danger.flagged and top not in set(dangerous):
        reason = (
            f"The most likely class is {readable(top)}, but the probability of "
            f"{_any_of(dangerous)} is {danger.probability:.0%}, at or above the "
            f"{danger.threshold:.0%} threshold chosen to catch {danger.target_sensitivity:.0%} "
            "of dangerous cases — refer for specialist review."
        )
        return Referral(names, True, reason, **extra)
    unsafe = [n for n in names[1:] if n in set(dangerous) and n != top]
    if unsafe:
        reason = (
            f"The model cannot rule out {_join(unsafe)} (its {level} prediction set is "
            f"{_join(names)}) — refer for specialist review."
        )
        return Referral(names, True, reason, **extra)
    if len(names) > 1:
        reason = f"The model cannot separate {_join(names)} — refer for specialist review."
        return Referral(names, True, reason, **extra)
    return Referral(
        names, False, f"The model's {level} prediction set holds {readable(top)} only.", **extra
    )


__all__ = ["DangerCheck", "Referral", "decide", "readable"]
