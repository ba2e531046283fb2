"""bench/tta.py: the views each test-time augmentation scheme averages over."""

from __future__ import annotations

import numpy as np
import pytest
from bench_modules import bench_module


@pytest.fixture(scope="module")
def bench():
    with bench_module("tta") as module:
        yield module


def test_views_are_the_image_its_mirror_and_a_centre_crop(bench):
    x = np.zeros((2, 3, 8, 8), dtype=np.uint8)
    x[..., :, :4] = 200  # left half bright
    (same,) = bench.views(x, "none", 0.75, hflip=True)
    assert same is x
    _, mirror = bench.views(x, "hflip", 0.75, hflip=True)
    assert (mirror[..., :, 4:] == 200).all() and (mirror[..., :, :4] == 0).all()
    crops = bench.views(x, "crops", 0.5, hflip=True)
    assert len(crops) == 4 and all(v.shape == x.shape and v.dtype == np.uint8 for v in crops)
    # the centre half (columns 2..5) stretched: its left half bright, its right half dark
    assert crops[1][0, 0, 0, 0] == 200 and crops[1][0, 0, 0, -1] == 0
    assert len(bench.views(x, "crops", 0.5, hflip=False)) == 2  # no mirror where laterality counts


def test_the_gain_interval_holds_zero_for_identical_predictions(bench):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    p = rng.dirichlet(np.ones(3), 60)
    low, high = bench.macro_f1_gain_ci(y, p, p, ["a", "b", "c"], rounds=50)
    assert low == high == 0.0
    better = np.eye(3)[y] * 0.9 + 0.05
    low, high = bench.macro_f1_gain_ci(y, p, better, ["a", "b", "c"], rounds=50)
    assert low > 0.3
