"""Suite-wide settings: telemetry off, offline model hubs, a throwaway Prefect home; the
`tiny_cfg` fixture (the real config tree composed with tiny overrides, see tiny_config.py)."""

from __future__ import annotations

import os
import tempfile

import pytest

from components.telemetry import quiet_environment

quiet_environment()
os.environ.setdefault("PREFECT_TASKS_DISABLE_CACHING", "true")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="oncoflow-prefect-"))


@pytest.fixture
def tiny_cfg():
    """`tiny_cfg(*overrides, **sections)` -> the composed run config as a dict."""
    from tiny_config import tiny_cfg as compose_tiny

    return compose_tiny
