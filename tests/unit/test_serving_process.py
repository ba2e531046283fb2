"""Process-wide settings the service applies at start-up (serving.process.configure_process),
read from the composed `serving` config and its environment overrides (serving.settings)."""

from __future__ import annotations

import sys

import pytest

from components.errors import ConfigError


@pytest.fixture
def configure(monkeypatch):
    from threadpoolctl import threadpool_limits

    from serving.process import configure_process
    from serving.settings import load_settings

    before = sys.getswitchinterval()
    monkeypatch.delenv("ONCOFLOW_TORCH_THREADS", raising=False)
    with threadpool_limits(limits=None):  # the BLAS limits as they were, afterwards
        yield lambda: configure_process(load_settings())
    sys.setswitchinterval(before)


def test_numpy_blas_runs_on_one_thread_in_a_server_process(configure):
    import numpy as np
    from threadpoolctl import threadpool_info

    blas = [pool for pool in threadpool_info() if pool["user_api"] == "blas"]
    assert blas, "numpy's BLAS is not visible to threadpoolctl"
    configure()
    np.ones((64, 64)) @ np.ones((64, 64))
    assert [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"] == [
        1
    ] * len(blas)


def test_the_thread_switch_interval_defaults_to_half_a_millisecond(configure, monkeypatch):
    monkeypatch.delenv("ONCOFLOW_GIL_SWITCH_US", raising=False)
    configure()
    assert sys.getswitchinterval() == pytest.approx(0.0005)
    monkeypatch.setenv("ONCOFLOW_GIL_SWITCH_US", "200")
    configure()
    assert sys.getswitchinterval() == pytest.approx(0.0002)


@pytest.mark.parametrize("value", ["0", "fast", "-5"])
def test_a_bad_switch_interval_is_refused_by_name(configure, monkeypatch, value):
    monkeypatch.setenv("ONCOFLOW_GIL_SWITCH_US", value)
    before = sys.getswitchinterval()
    with pytest.raises(ConfigError, match="ONCOFLOW_GIL_SWITCH_US"):
        configure()
    assert sys.getswitchinterval() == before
