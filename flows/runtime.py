"""Process-level settings applied before Prefect, MLflow or BentoML are imported."""

from __future__ import annotations

import os

from components.workspace import Workspace

_QUIET = {
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


def prepare_environment(workspace: Workspace) -> None:
    """Telemetry off, and every tool's home inside the workspace (unless set by the caller)."""
    for key, value in _QUIET.items():
        os.environ.setdefault(key, value)
    workspace.ensure()
    os.environ.setdefault("BENTOML_HOME", str(workspace.bentoml_home))
    if not os.environ.get("PREFECT_API_URL"):
        # Ephemeral Prefect: a private home per workspace, no task result caching across runs.
        os.environ.setdefault("PREFECT_HOME", str(workspace.prefect_home))
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_TASKS_DISABLE_CACHING", "true")
    os.environ.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")


def prepare(overrides: list[str]) -> Workspace:
    """Compose the config only to find the workspace, then prepare the environment.

    Must run before prefect/mlflow/bentoml are imported: they read settings at import time.
    """
    from components.config import compose

    workspace = Workspace.from_env(compose(overrides).paths.workspace)
    prepare_environment(workspace)
    return workspace
