"""Running the `oncoflow` CLI as a user would, for end-to-end tests: its own workspace, its
summary read from the JSON it prints last."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ONCOFLOW = [sys.executable, "-m", "flows.cli"]


def workspace_env(workspace: Path) -> dict[str, str]:
    """The environment of a run whose workspace, Bento store and Prefect home are `workspace`."""
    return {
        **os.environ,
        "ONCOFLOW_WORKSPACE": str(workspace),
        "BENTOML_HOME": str(workspace / "bentoml"),
        "PREFECT_HOME": str(workspace / "prefect"),
        "PYTHONUNBUFFERED": "1",
    }


def run_oncoflow(args: list[str], env: dict[str, str]) -> dict:
    """`oncoflow ARGS` from the repository root; its printed JSON summary (fails the test with
    the output's tail on a non-zero exit)."""
    proc = subprocess.run(
        [*ONCOFLOW, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    start = proc.stdout.rfind("\n{\n") + 1
    return json.loads(proc.stdout[start:])
