"""bench/dp_overhead.py: structure of the report and ratios (no timing assertions)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from bench_modules import bench_module

DP_VARIANTS = ("dp_hooks", "dp_functorch", "dp_ghost")


@pytest.fixture(scope="module")
def bench():
    with bench_module("dp_overhead") as module:
        yield module


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(8, 3, 8, 8), dtype=np.uint8)
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1], dtype=np.int64)
    return x, y


def _settings(bench, **kw):
    return bench.Settings(batch_size=4, steps=2, warmup=1, width=4, **kw)


def _positive_finite(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def _check_ok(result: dict, settings) -> None:
    assert result["status"] == "ok", result
    assert result["steps_timed"] == settings.steps
    # warm-up + timed + the profiled step, each a real optimiser step
    assert result["optimizer_steps"] == settings.warmup + settings.steps + 1
    assert 0 < result["step_seconds_min"] <= result["step_seconds_median"]
    assert result["step_seconds_median"] <= result["step_seconds_p90"]
    assert math.isfinite(result["last_loss"])
    assert result["tensor_peak_mib"] > 0
    assert result["rss_peak_growth_mib"] >= 0


def test_every_variant_in_process_and_ratios(bench, tiny):
    x, y = tiny
    settings = _settings(bench)
    results = {v: bench.measure_variant(v, x, y, 3, settings) for v in bench.VARIANTS}
    for result in results.values():
        _check_ok(result, settings)
    # DPSGD drives the DP optimiser: one ledger entry per optimiser step
    assert results["dp_hooks"]["dp_steps_recorded"] == results["dp_hooks"]["optimizer_steps"]
    assert results["dp_hooks"]["expected_batch_size"] == settings.batch_size
    ghost = results["dp_ghost"]
    assert ghost["ghost_norm_layers"] >= 1  # the Linear head
    assert ghost["fast_gradient_clipping_layers"] >= 1  # the convolutions

    ratios = bench.ratios(results)
    assert set(ratios) == set(DP_VARIANTS)
    for fields in ratios.values():
        assert _positive_finite(fields["step_time_median"])
        assert _positive_finite(fields["step_time_p90"])
        assert _positive_finite(fields["cpu_time_median"])
        assert _positive_finite(fields["tensor_peak"])
        # per-sample gradients need memory the non-private step does not
        assert fields["tensor_peak"] > 1.0
        for key in ("rss_peak_growth", "rss_step_peak"):
            assert fields[key] is None or (math.isfinite(fields[key]) and fields[key] >= 0)


@pytest.mark.slow  # two fresh Python processes importing torch + opacus: ~30 s on 2 shared cores
def test_run_benchmark_isolates_variants(bench, tiny):
    """The real driver: each variant in its own process, ratios and machine facts reported."""
    x, y = tiny
    settings = _settings(bench, profile_memory=True)
    report = bench.run_benchmark(x, y, 3, settings, variants=("dp_hooks",))
    assert report["benchmark"] == "dp_overhead"
    assert list(report["results"]) == ["non_private", "dp_hooks"]
    for result in report["results"].values():
        _check_ok(result, settings)
    # separate processes: each has its own baseline and the DP one starts from a fresh heap
    assert report["results"]["dp_hooks"]["rss_baseline_mib"] > 0
    fields = report["ratios"]["dp_hooks"]
    assert _positive_finite(fields["step_time_median"])
    assert _positive_finite(fields["tensor_peak"])
    machine = report["machine"]
    assert machine["cpu_count"] >= 1 and len(machine["load_average"]) == 3
    assert machine["torch_threads"] == 1 and machine["torch_version"]
    assert report["settings"]["size"] == 8 and report["settings"]["images"] == 8
    table = bench.render(report)
    assert "non_private" in table and "dp_hooks" in table and "load avg" in table


def test_ratios_need_a_baseline_and_positive_denominators(bench):
    base = {
        "status": "ok",
        "step_seconds_median": 0.5,
        "step_seconds_p90": 1.0,
        "cpu_seconds_median": 0.25,
        "rss_peak_growth_mib": 0.0,
        "rss_step_peak_mib": None,
        "tensor_peak_mib": 2.0,
    }
    dp = {**base, "step_seconds_median": 1.5, "rss_peak_growth_mib": 3.0, "tensor_peak_mib": 5.0}
    na = {"status": "n/a", "reason": "unsupported"}
    got = bench.ratios({"non_private": base, "dp_hooks": dp, "dp_ghost": na})
    assert got == {
        "dp_hooks": {
            "step_time_median": 3.0,
            "step_time_p90": 1.0,
            "cpu_time_median": 1.0,
            "rss_peak_growth": None,  # nothing to divide by
            "rss_step_peak": None,
            "tensor_peak": 2.5,
        }
    }
    assert bench.ratios({"non_private": na, "dp_hooks": dp}) == {}
