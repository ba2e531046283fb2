"""The champion gate: a pure decision on whether a candidate model replaces the champion.

A candidate is promoted only when it was evaluated on the same test set as the champion and
beats it on the gate metric by more than `min_delta`. Everything else keeps the champion and
says why, so an operator can promote by hand when that is what they intend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from components.errors import ConfigError

Mode = Literal["max", "min"]


@dataclass(frozen=True)
class GateConfig:
    """Which test metric decides, in which direction, and by how much a candidate must win."""

    metric: str = "macro_f1"
    mode: Mode = "max"
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in ("max", "min"):
            raise ConfigError(f"gate mode must be 'max' or 'min', not {self.mode!r}")
        if not math.isfinite(self.min_delta) or self.min_delta < 0:
            raise ConfigError(f"gate min_delta must be a finite number >= 0, not {self.min_delta}")


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict; `register_candidate` fills in the registry fields."""

    promote: bool
    reason: str
    status: str = ""  # promoted | rejected | not_comparable
    version: str | None = None
    previous_champion: str | None = None
    alias: str | None = None


def _value(metrics: dict[str, Any], metric: str) -> float | None:
    value = metrics.get(metric)
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def decide(
    candidate: dict[str, Any],
    champion: dict[str, Any] | None,
    metric: str,
    mode: Mode = "max",
    min_delta: float = 0.0,
    same_test_set: bool = True,
    inputs: tuple[str | None, str | None] = (None, None),
) -> GateDecision:
    """Decide promotion of `candidate` over `champion` (both: flat test-metric dicts).

    `inputs` is (candidate's, champion's) kind of input ("image", "clinical",
    "image+clinical"; None when unrecorded): a champion is replaced only by a model reading the
    same inputs, since serving the candidate would otherwise change what every caller sends.

    Raises ConfigError when the candidate lacks the gate metric (a misconfigured gate must not
    silently promote or reject).
    """
    GateConfig(metric, mode, min_delta)  # validates mode and min_delta
    cand = _value(candidate, metric)
    if cand is None:
        available = sorted(k for k, v in candidate.items() if _value(candidate, k) is not None)
        raise ConfigError(
            f"gate metric {metric!r} is not among the candidate's test metrics {available}; "
            "set registry.gate_metric to one of them"
        )
    if not math.isfinite(cand):
        return GateDecision(
            False, f"candidate {metric} is {cand}; a non-finite score never wins", "rejected"
        )
    if champion is None:
        return GateDecision(
            True, f"no champion yet: first candidate ({metric}={cand:.6g})", "promoted"
        )
    if inputs[0] and inputs[1] and inputs[0] != inputs[1]:
        return GateDecision(
            False,
            f"not comparable: the candidate reads {inputs[0]}, the champion {inputs[1]}; "
            "serving the candidate would change what callers must send, so the champion was "
            "kept (compare them in the run's baseline comparison; promote by hand if intended)",
            "not_comparable",
        )
    if not same_test_set:
        return GateDecision(
            False,
            "not comparable: the candidate was evaluated on a different test set than the "
            "champion, so the champion was kept; promote by hand if the new test set should "
            "become the reference",
            "not_comparable",
        )
    champ = _value(champion, metric)
    if champ is None or not math.isfinite(champ):
        return GateDecision(
            False,
            f"not comparable: the champion has no finite {metric} recorded, so the champion "
            "was kept; promote by hand if intended",
            "not_comparable",
        )
    gain = cand - champ if mode == "max" else champ - cand
    direction = "higher" if mode == "max" else "lower"
    summary = f"{metric}: candidate {cand:.6g} vs champion {champ:.6g} ({direction} is better)"
    if gain > min_delta:
        return GateDecision(
            True, f"beats the champion by {gain:.6g} > {min_delta:g}; {summary}", "promoted"
        )
    return GateDecision(
        False, f"does not beat the champion by more than {min_delta:g}; {summary}", "rejected"
    )
