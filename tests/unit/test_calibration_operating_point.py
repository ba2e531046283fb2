"""The dangerous-class operating point: threshold choice on crafted numbers, ties, missing
positives, its test figures, and the referral it adds."""

from __future__ import annotations

import numpy as np
import pytest

from components.calibration import operating_point as op
from components.calibration import referral
from components.calibration.fit import calibration_report, fit_calibration
from components.calibration.record import Calibration
from components.errors import DataError

CLASSES = ["benign", "malignant", "normal"]
DANGEROUS = [1]


def _probs(danger: list[float]) -> np.ndarray:
    """Rows whose malignant probability is `danger`, the rest split between the others."""
    d = np.asarray(danger, dtype=np.float64)
    return np.stack([(1 - d) * 0.7, d, (1 - d) * 0.3], axis=1)


def test_threshold_is_the_highest_that_reaches_the_sensitivity():
    # ten positives scoring 0.95, 0.9, ..., 0.5; 80 % sensitivity needs 8 of them flagged
    pos = [0.95 - 0.05 * i for i in range(10)]
    neg = [0.1, 0.2, 0.55, 0.7]
    labels = np.array([1] * 10 + [0, 2, 0, 2])
    point = op.fit_operating_point(_probs(pos + neg), labels, DANGEROUS, 0.8)
    assert point.threshold == pytest.approx(0.6)  # the 8th largest positive score
    assert point.sensitivity == pytest.approx(0.8)  # exactly the target
    assert point.specificity == pytest.approx(0.75)  # 0.7 is flagged, 0.1/0.2/0.55 are not
    assert (point.n_positive, point.n_negative) == (10, 4)
    # any higher threshold misses the target
    above = op.evaluate_operating_point(
        op.OperatingPoint(0.6 + 1e-9, 0.8, 0, 0, 10, 4), _probs(pos + neg), labels, DANGEROUS
    )
    assert above["sensitivity"] < 0.8


def test_tied_scores_at_the_threshold_count_as_flagged():
    pos = [0.9, 0.5, 0.5, 0.5, 0.2]
    labels = np.array([1] * 5 + [0])
    point = op.fit_operating_point(_probs([*pos, 0.1]), labels, DANGEROUS, 0.4)
    assert point.threshold == pytest.approx(0.5)
    assert point.sensitivity == pytest.approx(0.8)  # three ties at 0.5 all flagged: above 0.4


def test_sensitivity_one_takes_the_lowest_positive():
    point = op.fit_operating_point(_probs([0.3, 0.8, 0.05]), np.array([1, 1, 0]), DANGEROUS, 1.0)
    assert point.threshold == pytest.approx(0.3) and point.sensitivity == 1.0


@pytest.mark.parametrize(
    ("labels", "indices", "says"),
    [
        (np.array([0, 2, 0]), DANGEROUS, "no case of a dangerous class"),
        (np.array([1, 1, 1]), DANGEROUS, "specificity cannot be measured"),
        (np.array([0, 1, 2]), [], "marks no class as dangerous"),
    ],
)
def test_no_operating_point_without_positives_negatives_or_dangerous_classes(labels, indices, says):
    with pytest.raises(DataError, match=says):
        op.fit_operating_point(_probs([0.2, 0.5, 0.9]), labels, indices, 0.9)


def test_danger_probability_sums_the_dangerous_classes():
    probs = np.array([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]])
    np.testing.assert_allclose(op.danger_probability(probs, [1, 2]), [0.8, 0.4])
    assert op.dangerous_indices(CLASSES, ["normal", "malignant"]) == [2, 1]
    with pytest.raises(DataError, match="not model classes"):
        op.dangerous_indices(CLASSES, ["cancer"])


def test_test_figures_count_positives_and_negatives():
    point = op.OperatingPoint(0.5, 0.9, 1.0, 1.0, 3, 3)
    at = op.evaluate_operating_point(
        point, _probs([0.6, 0.4, 0.9, 0.1, 0.7]), np.array([1, 1, 1, 0, 2]), DANGEROUS
    )
    assert at["sensitivity"] == pytest.approx(2 / 3) and at["specificity"] == pytest.approx(0.5)
    assert (at["n_positive"], at["n_negative"], at["false_negative"], at["false_positive"]) == (
        3,
        2,
        1,
        1,
    )
    none = op.evaluate_operating_point(point, _probs([0.6]), np.array([0]), DANGEROUS)
    assert none["sensitivity"] is None and none["n_positive"] == 0


def test_flag_refers_a_case_whose_top_class_is_not_dangerous():
    danger = referral.DangerCheck(probability=0.3, threshold=0.2, target_sensitivity=0.95)
    got = referral.decide(["benign"], ["malignant"], 0.9, danger)
    assert got.refer and got.danger_flagged and got.danger_probability == 0.3
    assert "most likely class is benign" in got.reason and "malignant is 30%" in got.reason
    assert "95% of dangerous cases" in got.reason and "refer" in got.reason
    # below the threshold: the set decides alone
    calm = referral.decide(["benign"], ["malignant"], 0.9, referral.DangerCheck(0.1, 0.2, 0.95))
    assert not calm.refer and calm.danger_flagged is False
    # a dangerous top class flagged is no referral by itself (the diagnosis already says it)
    top = referral.decide(["malignant"], ["malignant"], 0.9, referral.DangerCheck(0.9, 0.2, 0.95))
    assert not top.refer and top.danger_flagged


def test_fit_calibration_stores_the_operating_point_and_reads_old_blocks():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 600)
    logits = rng.normal(0, 1, (600, 3)) + 2.5 * np.eye(3)[y]
    cal = fit_calibration(logits, y, CLASSES, dangerous=["malignant"], target_sensitivity=0.9)
    assert cal.operating_point is not None and cal.operating_point.sensitivity >= 0.9
    assert "dangerous class" in cal.sources["operating_point"]
    again = Calibration.from_dict(cal.to_dict())
    assert again == cal
    row = cal.probabilities(logits[:1])[0]
    assert again.decide(row).danger_probability == pytest.approx(row[1])
    report = calibration_report(cal, logits, y)
    assert report["operating_point"]["test"]["n_positive"] == int((y == 1).sum())
    # a block written before operating points existed reads without one
    old = {k: v for k, v in cal.to_dict().items() if k not in ("operating_point", "sources")}
    legacy = Calibration.from_dict(old)
    assert legacy.operating_point is None and legacy.decide(row).danger_probability is None
    # no dangerous class: no operating point, the reason in the notes
    plain = fit_calibration(logits, y, CLASSES)
    assert plain.operating_point is None and "no operating point" in plain.notes[0]
