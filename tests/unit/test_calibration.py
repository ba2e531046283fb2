"""Temperature scaling, split-conformal sets (APS) and the referral rule on synthetic data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from components.calibration import conformal, referral, temperature
from components.calibration.fit import calibration_report, fit_calibration
from components.calibration.record import Calibration
from components.errors import DataError, ModelError

CLASSES = ["glioma", "meningioma", "no_tumour", "pituitary"]


def _cases(n: int, k: int = 4, sharpen: float = 1.0, seed: int = 0):
    """True logits, labels drawn from softmax(true logits), and a model's logits that are the
    true ones times `sharpen` (> 1: an over-confident model with the right ranking)."""
    rng = np.random.default_rng(seed)
    true = rng.normal(0.0, 1.5, size=(n, k))
    p = temperature.softmax(true)
    labels = np.array([rng.choice(k, p=row) for row in p])
    return true * sharpen, labels


def test_temperature_scaling_undoes_over_confidence_and_lowers_nll():
    fit_logits, fit_y = _cases(3000, sharpen=4.0, seed=1)
    test_logits, test_y = _cases(3000, sharpen=4.0, seed=2)
    t = temperature.fit_temperature(fit_logits, fit_y)
    assert 3.4 < t < 4.6  # the model is 4x over-confident
    before, after = temperature.nll(test_logits, test_y), temperature.nll(test_logits, test_y, t)
    assert after < before - 0.3
    # the predicted class never changes
    assert np.array_equal(temperature.softmax(test_logits, t).argmax(1), test_logits.argmax(axis=1))


def test_temperature_of_a_calibrated_model_is_about_one_and_is_the_nll_minimum():
    logits, y = _cases(4000, sharpen=1.0, seed=3)
    t = temperature.fit_temperature(logits, y)
    assert abs(t - 1.0) < 0.1
    best = temperature.nll(logits, y, t)
    for other in (t * 0.9, t * 1.1):
        assert temperature.nll(logits, y, other) > best


def test_temper_on_probabilities_equals_softmax_of_scaled_logits():
    logits, _ = _cases(50, seed=4)
    probs = temperature.softmax(logits)
    np.testing.assert_allclose(temperature.temper(probs, 2.5), temperature.softmax(logits, 2.5))


@pytest.mark.parametrize(
    ("logits", "labels", "says"),
    [
        (np.zeros((0, 3)), np.zeros(0, dtype=int), "empty"),
        (np.array([[0.0, np.nan]] * 4), np.array([0, 1, 0, 1]), "finite"),
        (np.ones((4, 2)), np.array([0, 1, 2, 0]), "class indices"),
        (np.random.default_rng(0).normal(size=(6, 3)), np.zeros(6, dtype=int), "two classes"),
        (np.ones((4, 1)), np.zeros(4, dtype=int), "K >= 2"),
    ],
)
def test_temperature_refuses_degenerate_inputs(logits, labels, says):
    with pytest.raises(DataError, match=says):
        temperature.fit_temperature(logits, labels)


def test_aps_score_is_the_mass_ranked_above_the_true_class():
    probs = np.array([[0.1, 0.5, 0.3, 0.1], [0.7, 0.2, 0.05, 0.05]])
    np.testing.assert_allclose(conformal.aps_scores(probs, np.array([2, 0])), [0.5, 0.0])
    np.testing.assert_allclose(conformal.aps_scores(probs, np.array([3, 3])), [0.9, 0.95])


def test_conformal_quantile_is_the_finite_sample_one():
    scores = np.arange(1, 10) / 10.0  # n = 9 scores 0.1 .. 0.9
    # ⌈(9+1)·0.9⌉ = 9: the largest score
    assert conformal.conformal_quantile(scores, 0.9) == pytest.approx(0.9)
    # ⌈(9+1)·0.5⌉ = 5: the fifth smallest
    assert conformal.conformal_quantile(scores, 0.5) == pytest.approx(0.5)
    # n = 8: ⌈9·0.9⌉ = 9 > 8 -> every class in every set
    assert conformal.conformal_quantile(scores[:8], 0.9) == 1.0
    with pytest.raises(DataError):
        conformal.conformal_quantile(scores, 1.0)


@pytest.mark.parametrize("coverage", [0.8, 0.9, 0.95])
def test_conformal_sets_reach_their_coverage_within_sampling_error(coverage):
    """Model probabilities equal the true ones; q̂ from n_cal cases, coverage on n_test others.

    Bound: the test coverage given q̂ is a binomial share, and q̂ itself varies with the
    calibration draw (its coverage is Beta-distributed with variance ≈ α(1−α)/(n_cal+2)), so
    σ = sqrt(α(1−α)·(1/(n_cal+2) + 1/n_test)); the guarantee is coverage ≥ 1−α, checked to
    within 3σ; the upper side allows 3σ plus the quantile's rounding 1/(n_cal+1).
    """
    n_cal, n_test, alpha = 2000, 4000, 1.0 - coverage
    cal_logits, cal_y = _cases(n_cal, seed=10)
    test_logits, test_y = _cases(n_test, seed=11)
    qhat = conformal.fit_threshold(temperature.softmax(cal_logits), cal_y, coverage)
    masks = conformal.set_masks(temperature.softmax(test_logits), qhat)
    empirical = masks[np.arange(n_test), test_y].mean()
    sigma = math.sqrt(alpha * (1 - alpha) * (1 / (n_cal + 2) + 1 / n_test))
    assert empirical >= coverage - 3 * sigma
    assert empirical <= coverage + 3 * sigma + 1 / (n_cal + 1)
    assert masks.sum(axis=1).min() >= 1  # never empty


def test_sets_are_never_empty_and_always_hold_the_top_class():
    rng = np.random.default_rng(5)
    probs = temperature.softmax(rng.normal(0, 6, size=(500, 5)))  # very confident cases
    for qhat in (0.0, 1e-9, 0.3, 0.99, 1.0):
        masks = conformal.set_masks(probs, qhat)
        assert masks.sum(axis=1).min() >= 1
        assert masks[np.arange(500), probs.argmax(axis=1)].all()
    assert conformal.set_masks(probs, 1.0).all()  # q̂ = 1: every class


def test_set_indices_are_ordered_by_probability():
    row = np.array([0.1, 0.5, 0.3, 0.1])
    assert conformal.set_indices(row, 0.0) == [1]  # only the top class has nothing above
    assert conformal.set_indices(row, 0.49) == [1]  # mass above class 2 is 0.5 > 0.49
    assert conformal.set_indices(row, 0.5) == [1, 2]
    assert conformal.set_indices(row, 0.8) == [1, 2, 0]  # ties: class 0 before class 3
    assert conformal.set_indices(row, 0.85) == [1, 2, 0]
    assert conformal.set_indices(row, 0.9) == [1, 2, 0, 3]


@pytest.mark.parametrize(
    ("prediction_set", "refer", "words"),
    [
        (["no_tumour"], False, "holds no tumour only"),
        (["glioma"], False, "holds glioma only"),  # dangerous and top, alone: no referral
        (["no_tumour", "glioma"], True, "cannot rule out glioma"),
        (["glioma", "meningioma"], True, "cannot rule out meningioma"),
        (["meningioma", "glioma", "no_tumour"], True, "cannot rule out glioma"),
    ],
)
def test_refer_rule_per_case(prediction_set, refer, words):
    out = referral.decide(prediction_set, dangerous=["glioma", "meningioma"], coverage=0.9)
    assert out.refer is refer
    assert words in out.reason
    assert out.prediction_set == prediction_set


def test_refer_without_dangerous_classes_names_the_classes_it_cannot_separate():
    out = referral.decide(["benign", "normal"], dangerous=[], coverage=0.9)
    assert out.refer
    assert (
        out.reason == "The model cannot separate benign and normal — refer for specialist review."
    )


def test_calibration_record_round_trips_and_decides():
    logits, y = _cases(800, sharpen=3.0, seed=6)
    cal = fit_calibration(logits, y, CLASSES, coverage=0.9, dangerous=["glioma"])
    again = Calibration.from_dict(cal.to_dict())
    assert again == cal
    probs = cal.probabilities(logits[:1])[0]
    decision = cal.decide(probs)
    assert decision.prediction_set[0] == CLASSES[int(np.argmax(probs))]
    assert Calibration.from_dict(None) is None
    with pytest.raises(ModelError):
        Calibration.from_dict({"method": "temperature"})
    with pytest.raises(ModelError, match="not model classes"):
        Calibration(**(cal.to_dict() | {"dangerous": ["cancer"]}))


def test_calibration_report_on_an_over_confident_model():
    fit_logits, fit_y = _cases(2000, sharpen=4.0, seed=7)
    test_logits, test_y = _cases(2000, sharpen=4.0, seed=8)
    cal = fit_calibration(fit_logits, fit_y, CLASSES, coverage=0.9, dangerous=["glioma"])
    report = calibration_report(cal, test_logits, test_y)
    assert report["ece_after"] < report["ece_before"] / 2
    assert report["nll_after"] < report["nll_before"]
    sets = report["conformal"]
    assert sets["coverage"] >= 0.9 - 3 * math.sqrt(0.09 * (1 / 2002 + 1 / 2000))
    assert 1.0 <= sets["mean_set_size"] <= 4.0
    assert 0.0 <= sets["referral_rate"] <= 1.0
    # referred: every multi-class set (the dangerous-set rule is implied), and the cases the
    # operating point flags while a non-dangerous class is top
    probs = cal.probabilities(test_logits)
    masks = conformal.set_masks(probs, cal.qhat)
    flagged = (probs[:, 0] >= cal.operating_point.threshold) & (probs.argmax(axis=1) != 0)
    expected = ((masks.sum(axis=1) > 1) | flagged).mean()
    assert sets["referral_rate"] == pytest.approx(expected)
    assert expected > (masks.sum(axis=1) > 1).mean()  # the operating point adds referrals
    point = report["operating_point"]
    assert point["fitted"]["sensitivity"] >= 0.95
    assert point["test"]["n_positive"] == int((test_y == 0).sum())
    assert point["test"]["sensitivity"] >= 0.95 - 3 * math.sqrt(0.05 * 0.95 / 400)


def test_method_none_keeps_the_model_probabilities():
    logits, y = _cases(300, sharpen=3.0, seed=9)
    cal = fit_calibration(logits, y, CLASSES, method="none")
    assert cal.temperature == 1.0
    np.testing.assert_allclose(cal.probabilities(logits), temperature.softmax(logits))


def test_model_card_lists_calibration_and_what_it_was_fitted_on():
    from flows.promote import calibration_lines

    fit_logits, fit_y = _cases(500, sharpen=3.0, seed=12)
    test_logits, test_y = _cases(500, sharpen=3.0, seed=13)
    cal = fit_calibration(
        fit_logits, fit_y, CLASSES, dangerous=["glioma"], fitted_on="validation split (500)"
    )
    text = "\n".join(calibration_lines(cal.to_dict(), calibration_report(cal, test_logits, test_y)))
    assert f"T = {cal.temperature:.3f}" in text and "validation split (500)" in text
    for words in ("ECE before / after", "empirical coverage", "mean set size", "referred"):
        assert words in text
    assert "glioma" in text
    uncalibrated = "\n".join(calibration_lines(None, {"fitted": False, "reason": "one class"}))
    assert "Not calibrated: one class" in uncalibrated


def test_a_perfectly_separated_split_does_not_sharpen_the_model():
    """All held-out cases right: the NLL keeps falling as T shrinks; T stays 1 instead of
    running to its lower bound (which makes every later mistake near-certain)."""
    import numpy as np

    from components.calibration.temperature import fit_temperature

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    z = rng.normal(0, 0.5, (60, 3))
    z[np.arange(60), y] += 2.0
    assert fit_temperature(z, y) == 1.0
