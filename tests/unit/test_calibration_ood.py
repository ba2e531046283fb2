"""The out-of-distribution check: Mahalanobis and energy scores, the false-alarm threshold,
the bundle round trip, and what the engine answers for an input unlike the training data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from components.calibration import ood
from components.errors import DataError, ModelError


def _clusters(n: int, seed: int, shift: float = 0.0, d: int = 20):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    centres = np.eye(3, d) * 6.0
    return rng.normal(0, 1, (n, d)) + centres[y] + shift, y


def test_mahalanobis_distance_matches_the_formula():
    means = np.array([[0.0, 0.0], [4.0, 0.0]])
    precision = np.array([[1.0, 0.0], [0.0, 4.0]])
    got = ood.mahalanobis_scores(np.array([[1.0, 1.0], [4.0, 0.5]]), means, precision)
    np.testing.assert_allclose(got, [min(1 + 4, 9 + 4), min(16 + 1, 0 + 1)])


def test_gaussian_fit_recovers_class_means_and_stays_invertible_with_few_cases():
    f, y = _clusters(2000, 0)
    stats = ood.fit_gaussian(f, y, 3)
    np.testing.assert_allclose(stats["means"], np.eye(3, 20) * 6.0, atol=0.15)
    few, few_y = _clusters(12, 1, d=50)  # fewer cases than dimensions: shrinkage keeps it finite
    small = ood.fit_gaussian(few, few_y, 3)
    assert np.all(np.isfinite(small["precision"]))


def test_threshold_keeps_the_false_alarm_rate_and_flags_shifted_inputs():
    train, train_y = _clusters(1500, 2)
    val, _ = _clusters(1000, 3)
    test, _ = _clusters(4000, 4)
    far, _ = _clusters(500, 5, shift=4.0)
    detector = ood.fit_detector(
        "mahalanobis",
        val_logits=np.zeros((len(val), 3)),
        val_features=val,
        false_alarm=0.05,
        train_features=train,
        train_labels=train_y,
        n_classes=3,
    )
    rate = detector.is_out(detector.scores(None, test)).mean()
    # exchangeable in-distribution inputs: at most 5 % flagged in expectation; 3 sigma of 4000
    assert rate <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 4000)
    assert detector.is_out(detector.scores(None, far)).mean() > 0.95
    assert ood.auroc(detector.scores(None, test), detector.scores(None, far)) > 0.99
    assert "training split" in detector.fitted_on and detector.n_statistics == 1500


def test_false_alarm_threshold_is_the_finite_sample_quantile():
    scores = np.arange(1.0, 20.0)  # 19 scores; (19+1) * 0.9 = 18 -> the 18th smallest
    assert ood.false_alarm_threshold(scores, 0.1) == 18.0
    assert ood.false_alarm_threshold(scores[:3], 0.1) == 3.0  # too few: the largest
    with pytest.raises(DataError, match="false-alarm"):
        ood.false_alarm_threshold(scores, 0.0)


def test_energy_score_is_high_when_no_class_stands_out():
    logits = np.array([[10.0, 0.0, 0.0], [0.1, 0.0, 0.0]])
    e = ood.energy_scores(logits)
    assert e[1] > e[0]
    assert e[0] == pytest.approx(-np.log(np.exp(10.0) + 2.0))
    detector = ood.fit_detector("energy", val_logits=logits, val_features=None, false_alarm=0.5)
    assert detector.arrays() == {} and not detector.needs_features


def test_auroc_counts_ties_half():
    assert ood.auroc([1.0, 2.0], [3.0, 4.0]) == 1.0
    assert ood.auroc([1.0, 2.0], [1.0, 2.0]) == 0.5


def test_detector_parts_round_trip_and_refuse_missing_statistics():
    f, y = _clusters(300, 6)
    det = ood.fit_detector(
        "mahalanobis",
        val_logits=np.zeros((300, 3)),
        val_features=f,
        false_alarm=0.05,
        train_features=f,
        train_labels=y,
        n_classes=3,
    )
    again = ood.OODDetector.from_parts(det.meta(), det.arrays())
    np.testing.assert_allclose(again.scores(None, f), det.scores(None, f))
    with pytest.raises(ModelError, match="means and precision"):
        ood.OODDetector.from_parts(det.meta(), None)
    with pytest.raises(ModelError, match="features"):
        det.scores(np.zeros((1, 3)), None)
