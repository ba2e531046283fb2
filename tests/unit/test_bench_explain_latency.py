"""bench/explain_latency.py: the region sums its SHAP accuracy report compares."""

from __future__ import annotations

import numpy as np
import pytest
from bench_modules import bench_module


@pytest.fixture(scope="module")
def bench():
    with bench_module("explain_latency") as module:
        yield module


def test_region_sums_add_each_block_and_leave_out_the_ragged_edge(bench):
    attribution = np.arange(25, dtype=np.float32).reshape(5, 5)
    sums = bench.region_sums(attribution, 2)
    assert sums.shape == (2, 2)
    assert sums[0, 0] == 0 + 1 + 5 + 6 and sums[1, 1] == 12 + 13 + 17 + 18
    assert bench.region_sums(attribution, 5)[0, 0] == attribution.sum()


def test_the_report_names_every_estimator_and_region(bench):
    row = {"rel_l2": 0.5, "r": 0.8, "r_4px": 0.85, "r_8px": 0.9}
    result = {
        "reference": "ref",
        "images": 2,
        "repeats": 1,
        "background": "4 images",
        "region_energy_share": {"4px": 0.04, "8px": 0.01},
        "estimators": {"one pass, 8 stratified": row},
    }
    text = bench.accuracy_report(result)
    assert "4px blocks 0.040" in text and "8px blocks 0.010" in text
    assert "one pass, 8 stratified" in text and "0.850" in text and "0.900" in text
