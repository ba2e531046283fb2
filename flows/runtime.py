"""Process-level settings applied before Prefect, MLflow or BentoML are imported."""

from __future__ import annotations

import os

from components.telemetry import quiet_environment
from components.workspace import Workspace


def prepare_environment(workspace: Workspace) -> None:
    """Telemetry off, and every tool's home inside the workspace (unless set by the caller)."""
    quiet_environment()
    workspace.ensure()
    os.environ.setdefault("BENTOML_HOME", str(workspace.bentoml_home))
    if not os.environ.get("PREFECT_API_URL"):
        # Ephemeral Prefect: a private home per workspace, no task result caching across runs.
        os.environ.setdefault("PREFECT_HOME", str(workspace.prefect_home))
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_TASKS_DISABLE_CACHING", "true")
    os.environ.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    # Training progress (numbers only, no paths) also goes to the task's log in Prefect's API/UI;
    # the terminal gets it through the root logger either way.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "components.training")


def prepare(overrides: list[str]) -> Workspace:
    """Compose the config only to find the workspace, then prepare the environment.

    Must run before prefect/mlflow/bentoml are imported: they read settings at import time.
    """
    from components.config import compose

    workspace = Workspace.from_env(compose(overrides).paths.workspace)
    prepare_environment(workspace)
    return workspace
