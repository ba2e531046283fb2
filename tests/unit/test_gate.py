"""The champion gate's decision table (pure function, no MLflow)."""

from __future__ import annotations

import math

import pytest

from components.errors import ConfigError
from components.registry.gate import GateConfig, decide


@pytest.mark.parametrize(
    ("candidate", "champion", "mode", "min_delta", "same", "promote", "status", "phrase"),
    [
        (0.80, 0.70, "max", 0.0, True, True, "promoted", "beats the champion"),
        (0.60, 0.70, "max", 0.0, True, False, "rejected", "does not beat"),
        (0.70, 0.70, "max", 0.0, True, False, "rejected", "does not beat"),
        (0.72, 0.70, "max", 0.05, True, False, "rejected", "more than 0.05"),
        (0.76, 0.70, "max", 0.05, True, True, "promoted", "> 0.05"),
        (0.20, 0.30, "min", 0.0, True, True, "promoted", "lower is better"),
        (0.40, 0.30, "min", 0.0, True, False, "rejected", "lower is better"),
        (0.99, None, "max", 0.0, True, True, "promoted", "no champion yet"),
        (0.99, None, "max", 0.0, False, True, "promoted", "no champion yet"),
        (0.99, 0.10, "max", 0.0, False, False, "not_comparable", "different test set"),
    ],
)
def test_decision_table(candidate, champion, mode, min_delta, same, promote, status, phrase):
    champ = None if champion is None else {"macro_f1": champion}
    decision = decide({"macro_f1": candidate}, champ, "macro_f1", mode, min_delta, same)
    assert decision.promote is promote
    assert decision.status == status
    assert phrase in decision.reason


def test_reason_names_both_scores():
    decision = decide({"auroc": 0.91}, {"auroc": 0.87}, "auroc", "max", 0.0, True)
    assert "0.91" in decision.reason and "0.87" in decision.reason


def test_missing_gate_metric_is_a_config_error_listing_the_available_ones():
    with pytest.raises(ConfigError, match=r"'macro_f2'.*accuracy"):
        decide({"accuracy": 0.9, "macro_f1": 0.8}, None, "macro_f2")


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_candidate_never_wins(bad):
    decision = decide({"macro_f1": bad}, None, "macro_f1")
    assert not decision.promote and decision.status == "rejected"


def test_champion_without_the_metric_is_not_comparable():
    decision = decide({"macro_f1": 0.9}, {"accuracy": 0.5}, "macro_f1")
    assert not decision.promote and decision.status == "not_comparable"


@pytest.mark.parametrize(("mode", "delta"), [("best", 0.0), ("max", -0.1), ("min", math.nan)])
def test_gate_config_rejects_nonsense(mode, delta):
    with pytest.raises(ConfigError):
        GateConfig("macro_f1", mode, delta)


def test_a_champion_is_replaced_only_by_a_model_reading_the_same_inputs():
    better = {"macro_f1": 0.9}
    changed = decide(better, {"macro_f1": 0.5}, "macro_f1", inputs=("image+clinical", "image"))
    assert not changed.promote and changed.status == "not_comparable"
    assert "reads image+clinical" in changed.reason and "champion image" in changed.reason
    same = decide(better, {"macro_f1": 0.5}, "macro_f1", inputs=("image", "image"))
    assert same.promote
    # a champion registered before inputs were recorded is still compared
    assert decide(better, {"macro_f1": 0.5}, "macro_f1", inputs=("image", None)).promote
