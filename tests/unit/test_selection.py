"""Model selection: which epoch each rule keeps on a known history."""

from __future__ import annotations

import pytest

from components.errors import ConfigError
from components.training.selection import SelectionRule, select_epoch

# the chest X-ray pattern: F1 peaks first by a hair while the loss keeps falling
HISTORY = [
    {"epoch": 0, "val_macro_f1": 0.9724, "val_loss": 0.40, "val_auroc": 0.970},
    {"epoch": 1, "val_macro_f1": 0.9600, "val_loss": 0.30, "val_auroc": 0.980},
    {"epoch": 2, "val_macro_f1": 0.9720, "val_loss": 0.20, "val_auroc": 0.990},
    {"epoch": 3, "val_macro_f1": 0.9722, "val_loss": 0.25, "val_auroc": 0.985},
]


def rule(select="best", monitor="val_macro_f1", mode="auto", tolerance=0.0, tie="later"):
    return SelectionRule(select, monitor, mode, tolerance, tie)


@pytest.mark.parametrize(
    ("kwargs", "epoch"),
    [
        ({}, 0),  # best F1, no tolerance
        ({"tolerance": 0.001}, 3),  # 0, 2, 3 tie; later
        ({"tolerance": 0.001, "tie": "earlier"}, 0),
        ({"tolerance": 0.001, "tie": "lower_loss"}, 2),
        ({"monitor": "val_loss"}, 2),  # auto: min for the loss
        ({"monitor": "val_loss", "mode": "max"}, 0),  # an explicit mode wins
        ({"monitor": "val_auroc"}, 2),
        ({"select": "last"}, 3),
    ],
)
def test_rules_pick_the_expected_epoch(kwargs, epoch):
    assert select_epoch(HISTORY, rule(**kwargs)).epoch == epoch


def test_reason_names_the_ties_and_the_tie_break():
    chosen = select_epoch(HISTORY, rule(tolerance=0.001, tie="lower_loss"))
    assert chosen.tied == (0, 2, 3)
    assert chosen.score == pytest.approx(0.9720)
    assert "tie-break lower_loss" in chosen.reason and "epochs tied (within 0.001): 0, 2, 3" in (
        chosen.reason
    )
    assert chosen.to_dict()["tied"] == [0, 2, 3]


def test_exact_tie_prefers_the_later_epoch_by_default():
    flat = [{"epoch": e, "val_macro_f1": 0.5, "val_loss": 1.0} for e in range(3)]
    assert select_epoch(flat, SelectionRule.schema_default()).epoch == 2


def test_missing_monitor_falls_back_to_the_last_epoch():
    rows = [{"epoch": 0, "val_loss": 1.0}, {"epoch": 1, "val_loss": 0.5}]
    chosen = select_epoch(rows, rule(monitor="val_auroc"))
    assert chosen.epoch == 1 and "no epoch has val_auroc" in chosen.reason


def test_nan_scores_are_skipped():
    rows = [{"epoch": 0, "val_auroc": 0.9}, {"epoch": 1, "val_auroc": float("nan")}]
    assert select_epoch(rows, rule(monitor="val_auroc")).epoch == 0


def test_rule_from_config_and_bad_values(tiny_cfg):
    cfg = tiny_cfg(
        trainer={"monitor": "val_loss", "select_tolerance": 0.01, "tie_break": "earlier"}
    )
    built = SelectionRule.from_config(cfg["trainer"])
    assert (built.monitor, built.mode, built.tolerance, built.tie_break) == (
        "val_loss",
        "min",
        0.01,
        "earlier",
    )
    with pytest.raises(ConfigError, match="monitor"):
        rule(monitor="val_f2")
    with pytest.raises(ConfigError, match="tolerance"):
        rule(tolerance=-1)
