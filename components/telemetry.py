"""The one list of environment settings that keep every tool quiet and offline.

Prefect, MLflow, Great Expectations, Gradio, Flower and BentoML report usage by default, and
Hugging Face libraries look for hubs. The CLI (`flows.runtime`), the test suite and every
server a test or a supervisor starts apply this list; nothing else repeats it.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

TELEMETRY_OFF: dict[str, str] = {
    "DO_NOT_TRACK": "1",
    "MLFLOW_ENABLE_TELEMETRY": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "FLWR_TELEMETRY_ENABLED": "0",
    "BENTOML_DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


def quiet_environment(env: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Set every entry of `TELEMETRY_OFF` that `env` (default: this process) does not set."""
    env = os.environ if env is None else env
    for key, value in TELEMETRY_OFF.items():
        env.setdefault(key, value)
    return env


__all__ = ["TELEMETRY_OFF", "quiet_environment"]
