"""bench/tta.py: the views each test-time augmentation scheme names, and its interval."""

from __future__ import annotations

import numpy as np
import pytest
from bench_modules import bench_module


@pytest.fixture(scope="module")
def bench():
    with bench_module("tta") as module:
        yield module


def test_each_scheme_is_a_dataset_tta_list_without_mirrors_where_laterality_counts(bench):
    assert bench.scheme_views("none", hflip=True) == ()
    assert bench.scheme_views("hflip", hflip=True) == ("hflip",)
    assert bench.scheme_views("crops", hflip=True) == ("crop", "hflip")
    assert bench.scheme_views("crops", hflip=False) == ("crop",)


def test_the_gain_interval_holds_zero_for_identical_predictions(bench):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    p = rng.dirichlet(np.ones(3), 60)
    low, high = bench.macro_f1_gain_ci(y, p, p, ["a", "b", "c"], rounds=50)
    assert low == high == 0.0
    better = np.eye(3)[y] * 0.9 + 0.05
    low, high = bench.macro_f1_gain_ci(y, p, better, ["a", "b", "c"], rounds=50)
    assert low > 0.3
