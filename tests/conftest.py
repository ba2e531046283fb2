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


def pytest_collection_modifyitems(config, items):
    """Browser tests last: their session-wide Playwright keeps an event loop running in the
    main thread, where any later `asyncio.run()` (Prefect states, the batcher tests) fails."""
    items.sort(key=lambda item: "/tests/e2e/" in str(item.path))
