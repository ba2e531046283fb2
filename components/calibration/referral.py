"""The per-case referral rule, in one place for serving, evaluation and reports.

A case is referred for specialist review when its conformal prediction set
- holds more than one class (the model cannot separate them at the configured coverage), or
- holds a class marked dangerous for the dataset while another class is the top one (implied
  by the first rule, since the top class is always in the set; kept as its own reason because
  it is the one a clinician must hear: the dangerous class cannot be ruled out).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Referral:
    prediction_set: list[str]  # class names, most probable first
    refer: bool
    reason: str  # plain words, for the clinician


def readable(name: str) -> str:
    return str(name).replace("_", " ")


def _join(names: Sequence[str]) -> str:
    words = [readable(n) for n in names]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def decide(prediction_set: Sequence[str], dangerous: Sequence[str], coverage: float) -> Referral:
    """`refer` and its reason for one case's prediction set (most probable class first)."""
    names = [str(n) for n in prediction_set]
    if not names:
        raise ValueError("a prediction set is never empty (it always holds the top class)")
    top = names[0]
    level = f"{coverage:.0%}"
    unsafe = [n for n in names[1:] if n in set(dangerous) and n != top]
    if unsafe:
        reason = (
            f"The model cannot rule out {_join(unsafe)} (its {level} prediction set is "
            f"{_join(names)}) — refer for specialist review."
        )
        return Referral(names, True, reason)
    if len(names) > 1:
        reason = f"The model cannot separate {_join(names)} — refer for specialist review."
        return Referral(names, True, reason)
    return Referral(names, False, f"The model's {level} prediction set holds {readable(top)} only.")


__all__ = ["Referral", "decide", "readable"]
