"""bench/shap_variance.py: the variance figures on integrands whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
from bench_modules import bench_module


@pytest.fixture(scope="module")
def bench():
    with bench_module("shap_variance") as module:
        yield module


def test_independent_noise_has_no_neighbour_correlation_and_its_known_size(bench):
    rng = np.random.default_rng(0)
    mean = np.ones((8, 8))
    grid = mean + rng.normal(0, 2.0, (64, 16, 8, 8))  # per-sample variance 64 x 4 = 256
    row = bench.variance_profile(grid, own=rng.normal(size=(16, 8, 8)))
    assert row["noise_over_signal"] == pytest.approx(256 / 64, rel=0.05)
    assert abs(row["lag1_correlation"]) < 0.05
    assert row["control_variate_left"] == pytest.approx(1.0, abs=0.01)  # unrelated: no help


def test_an_integrand_set_by_its_reference_is_all_between_references_and_fully_controlled(bench):
    rng = np.random.default_rng(1)
    per_reference = rng.normal(size=(16, 8, 8))
    grid = np.broadcast_to(per_reference, (32, 16, 8, 8)).copy()
    row = bench.variance_profile(grid, own=3.0 * per_reference)
    assert row["between_references"] == pytest.approx(1.0)
    assert row["between_positions"] == pytest.approx(0.0, abs=1e-12)
    assert row["lag1_correlation"] == pytest.approx(1.0)
    assert row["control_variate_left"] == pytest.approx(0.0, abs=1e-12)
