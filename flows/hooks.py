"""Flow hygiene shared by every flow: retry policy for I/O steps and a failure hook."""

from __future__ import annotations

import json
import logging
import os
import re
from datetime import UTC, datetime

from prefect.tasks import exponential_backoff

from components.workspace import Workspace

log = logging.getLogger(__name__)


def transient_failure(task, task_run, state) -> bool:
    """Prefect retry condition: retry I/O hiccups, not bad config or a missing version."""
    from components.errors import ConfigError, ModelError, NotFound

    try:
        state.result()
    except (ConfigError, NotFound, ModelError):
        return False
    except Exception:
        return True
    return True


# Registry and artifact-store calls: three retries, 4 s then 8 s then 16 s (± jitter).
IO_RETRIES = {
    "retries": 3,
    "retry_delay_seconds": exponential_backoff(4),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": transient_failure,
}


# ----------------------------------------------------------------------------- failure hook


def record_failure(flow, flow_run, state) -> None:
    """Prefect on_failure/on_crashed hook: keep why a run failed, in the workspace and the UI.

    Writes ``<workspace>/failures/<stamp>-<flow>-<run>.json`` (flow, run, parameters, final
    state and its message) and, where the API allows it, a markdown artifact on the run.
    """
    workspace = Workspace.from_env(os.environ.get("ONCOFLOW_WORKSPACE"))
    record = {
        "flow": flow.name,
        "flow_run_id": str(flow_run.id),
        "flow_run_name": flow_run.name,
        "deployment_id": str(flow_run.deployment_id) if flow_run.deployment_id else None,
        "parameters": flow_run.parameters,
        "state": state.name,
        "message": state.message or "",
        "failed_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    path = workspace.root / "failures" / f"{stamp}-{slug(flow.name)}-{slug(flow_run.name)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str))
    log.error(
        "%s run %s %s: %s (recorded in %s)",
        flow.name,
        flow_run.name,
        state.name,
        record["message"],
        path,
    )
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(
            key=f"failure-{slug(flow.name)}",
            markdown=f"# {flow.name} {state.name}\n\n```\n{record['message']}\n```\n\n"
            f"Parameters: `{json.dumps(flow_run.parameters, default=str)}`",
            description="Why this run failed",
        )
    except Exception as exc:  # the failure record on disk is what matters
        log.warning("could not attach a failure artifact: %s", exc)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")[:60] or "run"
