"""Suite-wide settings: telemetry off, offline model hubs, a throwaway Prefect home; the
`tiny_cfg` fixture (the real config tree composed with tiny overrides, see tiny_config.py)."""

from __future__ import annotations

import os
import tempfile

import pytest

for _key, _value in {
    "DO_NOT_TRACK": "1",
    "MLFLOW_ENABLE_TELEMETRY": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "FLWR_TELEMETRY_ENABLED": "0",
    "BENTOML_DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_TASKS_DISABLE_CACHING": "true",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}.items():
    os.environ.setdefault(_key, _value)
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="oncoflow-prefect-"))


@pytest.fixture
def tiny_cfg():
    """`tiny_cfg(*overrides, **sections)` -> the composed run config as a dict."""
    from tiny_config import tiny_cfg as compose_tiny

    return compose_tiny
