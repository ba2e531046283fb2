"""Federated calibration from site sums equals (or conservatively bounds) calibration on the
pooled cases, which never leave their sites."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from components.calibration import conformal, temperature
from components.calibration.fit import calibration_report, fit_calibration
from components.errors import DataError
from components.federated import site_calibration as sc

CLASSES = ["a", "b", "c"]


def overconfident(n: int, seed: int, scale: float = 6.0) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a model that is right ~70 % of the time but far too sure of itself."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    signal = np.eye(3)[y] + rng.normal(0, 0.6, (n, 3))
    return scale * signal, y


def split(z: np.ndarray, y: np.ndarray, parts: int = 3) -> list[tuple[np.ndarray, np.ndarray]]:
    edges = np.linspace(0, len(y), parts + 1).astype(int)
    return [(z[a:b], y[a:b]) for a, b in itertools.pairwise(edges)]


def test_pooled_temperature_matches_the_pooled_fit():
    z, y = overconfident(900, seed=1)
    sums = [sc.temperature_sums(zs, ys, 3) for zs, ys in split(z, y)]
    t_sites = sc.pooled_temperature(sums, "temperature")
    t_pooled = temperature.fit_temperature(z, y)
    assert t_pooled > 2.0  # the model is over-confident: T softens it
    assert t_sites == pytest.approx(t_pooled, rel=2e-3)
    assert temperature.nll(z, y, t_sites) < temperature.nll(z, y, 1.0)


def test_pooled_temperature_refuses_one_class_and_keeps_one_on_separable_cases():
    z, y = overconfident(60, seed=2)
    one = [sc.temperature_sums(z[y == 0], y[y == 0], 3)]
    with pytest.raises(DataError, match="two classes"):
        sc.pooled_temperature(one, "temperature")
    perfect = 5.0 * np.eye(3)[y]
    assert sc.pooled_temperature([sc.temperature_sums(perfect, y, 3)], "temperature") == 1.0
    assert sc.pooled_temperature([sc.temperature_sums(z, y, 3)], "none") == 1.0


def test_pooled_qhat_bounds_the_exact_quantile_from_above_by_at_most_one_bin():
    z, y = overconfident(700, seed=3)
    probs = temperature.softmax(z, 3.0)
    for coverage in (0.8, 0.9, 0.95):
        exact = conformal.fit_threshold(probs, y, coverage)
        hists = [sc.aps_histogram(p, ys) for p, ys in split(probs, y, parts=4)]
        qhat = sc.pooled_qhat(hists, coverage)
        assert exact <= qhat <= exact + 1.0 / sc.APS_BINS + 1e-12
    assert sc.pooled_qhat([sc.aps_histogram(probs[:5], y[:5])], 0.9) == 1.0  # n too small


def test_federated_sets_reach_their_coverage_on_new_cases():
    """Coverage of fresh cases: at least 0.9 minus 3 binomial standard errors (n = 3000)."""
    z_cal, y_cal = overconfident(1500, seed=4)
    sums = [sc.temperature_sums(zs, ys, 3) for zs, ys in split(z_cal, y_cal)]
    t = sc.pooled_temperature(sums, "temperature")
    hists = [sc.aps_histogram(temperature.softmax(zs, t), ys) for zs, ys in split(z_cal, y_cal)]
    cal = sc.build_calibration(
        sc.CalibrationSpec(coverage=0.9), t, sc.pooled_qhat(hists, 0.9), CLASSES, 1500, ["x"]
    )
    z, y = overconfident(3000, seed=5)
    masks = conformal.set_masks(cal.probabilities(z), cal.qhat)
    covered = masks[np.arange(len(y)), y].mean()
    assert covered >= 0.9 - 3 * np.sqrt(0.9 * 0.1 / len(y))
    assert masks.sum(axis=1).min() >= 1  # never an empty set


def test_pooled_report_equals_the_report_on_pooled_cases():
    z_cal, y_cal = overconfident(600, seed=6)
    cal = fit_calibration(z_cal, y_cal, CLASSES, coverage=0.9, dangerous=["c"])
    z, y = overconfident(500, seed=7)
    sums = [sc.evaluation_sums(zs, ys, cal) for zs, ys in split(z, y, parts=3)]
    pooled = sc.pooled_report(sums, cal)
    exact = calibration_report(cal, z, y)
    for key in ("ece_before", "ece_after", "nll_before", "nll_after", "n"):
        assert pooled[key] == pytest.approx(exact[key], abs=1e-9), key
    for key in ("coverage", "mean_set_size", "referral_rate"):
        assert pooled["conformal"][key] == pytest.approx(exact["conformal"][key], abs=1e-12)
    assert pooled["conformal"]["coverage_per_class"] == pytest.approx(
        exact["conformal"]["coverage_per_class"]
    )


def test_calibration_spec_round_trips_and_reads_the_run_config(tiny_cfg):
    cfg = tiny_cfg("calibration.coverage=0.8")
    spec = sc.CalibrationSpec.from_config(cfg)
    assert spec.coverage == 0.8
    assert tuple(cfg["dataset"]["dangerous"]) == spec.dangerous
    assert sc.CalibrationSpec.from_dict(spec.to_dict()) == spec


def test_pooled_operating_point_reaches_the_target_and_matches_the_pooled_fit():
    from components.calibration import operating_point as op

    z, y = overconfident(900, seed=8)
    probs = temperature.softmax(z, 3.0)
    dangerous = ["b", "c"]
    hists = [sc.danger_histograms(p, ys, CLASSES, dangerous) for p, ys in split(probs, y)]
    point = sc.pooled_operating_point(hists, 0.9)
    exact = op.fit_operating_point(probs, y, [1, 2], 0.9)
    assert exact.threshold - 1.0 / sc.APS_BINS <= point.threshold <= exact.threshold
    rates = op.evaluate_operating_point(point, probs, y, [1, 2])
    assert rates["sensitivity"] == pytest.approx(point.sensitivity) and point.sensitivity >= 0.9
    assert rates["specificity"] == pytest.approx(point.specificity)
    assert (point.n_positive, point.n_negative) == (rates["n_positive"], rates["n_negative"])
    only_negatives = [sc.danger_histograms(probs[y == 0], y[y == 0], CLASSES, dangerous)]
    with pytest.raises(DataError, match="dangerous class"):
        sc.pooled_operating_point(only_negatives, 0.9)


def test_pooled_operating_point_report_equals_the_pooled_cases_report():
    z_cal, y_cal = overconfident(600, seed=9)
    cal = fit_calibration(z_cal, y_cal, CLASSES, dangerous=["c"], target_sensitivity=0.9)
    z, y = overconfident(400, seed=10)
    pooled = sc.pooled_report([sc.evaluation_sums(a, b, cal) for a, b in split(z, y)], cal)
    exact = calibration_report(cal, z, y)
    assert pooled["operating_point"]["test"] == pytest.approx(exact["operating_point"]["test"])
