"""A local Prefect stack for oncoflow's deployments (prefect.yaml), supervised from here.

`up` starts ``prefect server`` and a process worker in the background, with their state in
the workspace (``<workspace>/prefect/stack.json`` records pids and logs); `deploy_all`
creates the work pool and its ``training`` queue and runs ``prefect deploy --all``; `down`
stops what `up` started. The command line is ``oncoflow prefect up|deploy|status|down``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from components.config import PROJECT_ROOT
from components.workspace import Workspace

log = logging.getLogger(__name__)

PREFECT_FILE = PROJECT_ROOT / "prefect.yaml"
POOL = "oncoflow-process"
TRAINING_QUEUE = "training"
STACK_FILE = "stack.json"


def _prefect_cli() -> list[str]:
    exe = Path(sys.executable).with_name("prefect")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "prefect"]


def stack_env(workspace: Workspace, api_url: str | None = None) -> dict[str, str]:
    """Environment for the server, worker and CLI calls: homes in the workspace, quiet."""
    from components.telemetry import TELEMETRY_OFF

    env = {**os.environ, **TELEMETRY_OFF}
    env.update(
        {
            "ONCOFLOW_WORKSPACE": str(workspace.root),
            "ONCOFLOW_ROOT": env.get("ONCOFLOW_ROOT", str(PROJECT_ROOT)),
            "PREFECT_HOME": str(workspace.prefect_home),
            "BENTOML_HOME": str(workspace.bentoml_home),
            "PREFECT_TASKS_DISABLE_CACHING": "true",
            "PREFECT_CLI_PROMPT": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def _stack_path(workspace: Workspace) -> Path:
    return workspace.prefect_home / STACK_FILE


def read_stack(workspace: Workspace) -> dict[str, Any] | None:
    """What `up` started in this workspace (api_url, pids, logs), or None."""
    path = _stack_path(workspace)
    return json.loads(path.read_text()) if path.is_file() else None


def _spawn(command: list[str], env: dict[str, str], log_path: Path) -> int:
    """Start `command` detached in its own session (so `down` can stop its whole group)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        process = subprocess.Popen(
            command,
            env=env,
            cwd=PROJECT_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return process.pid


def wait_healthy(api_url: str, timeout_s: float = 180.0, pid: int | None = None) -> float:
    """Poll ``<api_url>/health`` until it answers; return the seconds waited."""
    import httpx

    from components.errors import OncoflowError

    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if pid is not None and not _alive(pid):
            raise OncoflowError(f"the Prefect server (pid {pid}) exited while starting")
        try:
            if httpx.get(f"{api_url}/health", timeout=3.0).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise OncoflowError(f"Prefect server at {api_url} not healthy after {timeout_s:.0f} s")


def up(
    port: int = 4200,
    workspace: str | os.PathLike | None = None,
    pool: str = POOL,
    worker: bool = True,
    timeout_s: float = 180.0,
) -> dict[str, Any]:
    """Start ``prefect server`` on 127.0.0.1:`port` and (optionally) a process worker.

    Both run in the background with PREFECT_HOME in the workspace; their pids and logs are
    recorded in ``<workspace>/prefect/stack.json`` for `down`. The work pool is created
    (idempotently) before the worker starts. Returns that record.
    """
    from components.errors import ConfigError

    ws = Workspace.from_env(workspace)
    ws.ensure()
    existing = read_stack(ws)
    if existing and any(_alive(p) for p in existing.get("pids", {}).values()):
        raise ConfigError(
            f"a Prefect stack already runs for {ws.root} ({existing['api_url']}); "
            "run `oncoflow prefect down` first"
        )
    api_url = f"http://127.0.0.1:{int(port)}/api"
    env = stack_env(ws, api_url)
    logs = ws.prefect_home / "logs"
    server_cmd = [*_prefect_cli(), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    pids = {"server": _spawn(server_cmd, env, logs / "server.log")}
    record = {
        "api_url": api_url,
        "ui_url": f"http://127.0.0.1:{int(port)}",
        "workspace": str(ws.root),
        "pool": pool,
        "pids": pids,
        "logs": {"server": str(logs / "server.log")},
    }
    _stack_path(ws).write_text(json.dumps(record, indent=2))
    try:
        waited = wait_healthy(api_url, timeout_s, pid=pids["server"])
        log.info("Prefect server healthy at %s after %.0f s", api_url, waited)
        ensure_work_pool(api_url, ws, pool)
        if worker:
            worker_cmd = [*_prefect_cli(), "worker", "start", "--pool", pool, "--type", "process"]
            pids["worker"] = _spawn(worker_cmd, env, logs / "worker.log")
            record["logs"]["worker"] = str(logs / "worker.log")
    except BaseException:
        down(ws.root)
        raise
    _stack_path(ws).write_text(json.dumps(record, indent=2))
    return record


def _run_cli(args: list[str], env: dict[str, str], timeout_s: float = 300) -> str:
    from components.errors import OncoflowError

    done = subprocess.run(
        [*_prefect_cli(), *args],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-20:])
        raise OncoflowError(f"`prefect {' '.join(args)}` failed (exit {done.returncode}):\n{tail}")
    return done.stdout


def ensure_work_pool(
    api_url: str,
    workspace: Workspace,
    pool: str = POOL,
    pool_type: str = "process",
    base_job_template: str | os.PathLike | None = None,
) -> None:
    """Create (or update) the work pool and its ``training`` queue (concurrency limit 1).

    `base_job_template`: a JSON file such as deployments/prefect/work-pools/kubernetes.json.
    """
    from components.errors import OncoflowError

    env = stack_env(workspace, api_url)
    create = ["work-pool", "create", pool, "--type", pool_type, "--overwrite"]
    if base_job_template is not None:
        create += ["--base-job-template", str(Path(base_job_template).resolve())]
    _run_cli(create, env)
    try:
        _run_cli(["work-queue", "inspect", TRAINING_QUEUE, "--pool", pool], env)
    except OncoflowError:  # no such queue yet
        _run_cli(["work-queue", "create", TRAINING_QUEUE, "--pool", pool, "--limit", "1"], env)
    else:
        _run_cli(["work-queue", "set-concurrency-limit", TRAINING_QUEUE, "1", "--pool", pool], env)


def coordinator_deployments(prefect_file: str | os.PathLike = PREFECT_FILE) -> list[str]:
    """The deployments of `prefect_file` that run on this (the coordinator's) server: all but
    those tagged ``site``, which each hospital deploys on its own work pool."""
    import yaml

    spec = yaml.safe_load(Path(prefect_file).read_text())
    return [d["name"] for d in spec["deployments"] if "site" not in (d.get("tags") or [])]


def deploy_all(
    api_url: str | None = None,
    workspace: str | os.PathLike | None = None,
    pool: str = POOL,
    prefect_file: str | os.PathLike = PREFECT_FILE,
    pool_type: str = "process",
    base_job_template: str | os.PathLike | None = None,
) -> list[str]:
    """Create the pool/queue and deploy this server's deployments; return their names.

    Every deployment of `prefect_file` but those tagged ``site``: a hospital deploys its own
    (``prefect deploy --name site-prepare`` on its pool, deployments/README.md section 6).

    `api_url` defaults to the stack started by `up` in this workspace, then $PREFECT_API_URL.
    A `pool` other than the default replaces prefect.yaml's pool for every deployment (e.g. a
    docker or kubernetes pool with `pool_type` and `base_job_template`).
    """
    from components.errors import ConfigError

    ws = Workspace.from_env(workspace)
    stack = read_stack(ws)
    api_url = api_url or (stack or {}).get("api_url") or os.environ.get("PREFECT_API_URL")
    if not api_url:
        raise ConfigError(
            "no Prefect API: start one with `oncoflow prefect up` or set PREFECT_API_URL"
        )
    ensure_work_pool(api_url, ws, pool, pool_type, base_job_template)
    env = stack_env(ws, api_url)
    names_args = [a for n in coordinator_deployments(prefect_file) for a in ("--name", n)]
    args = [
        "--no-prompt",
        "deploy",
        *names_args,
        "--prefect-file",
        str(Path(prefect_file).resolve()),
    ]
    if pool != POOL:
        args += ["--pool", pool]
    out = _run_cli(args, env, timeout_s=600)
    names = re.findall(r"Deployment '([^']+)' successfully created", out)
    log.info("deployed %s", ", ".join(names) or "(no names parsed)")
    return names


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_prefect_process(pid: int) -> bool:
    """Guard against pid reuse: only stop processes whose command line is Prefect's."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return _alive(pid)  # no /proc (macOS): trust the record
    return b"prefect" in cmdline


def down(workspace: str | os.PathLike | None = None, timeout_s: float = 30.0) -> list[int]:
    """Stop the server and worker `up` started for this workspace; return the pids stopped."""
    ws = Workspace.from_env(workspace)
    stack = read_stack(ws)
    if not stack:
        return []
    stopped = []
    for pid in reversed(list(stack.get("pids", {}).values())):  # worker first
        if not (_alive(pid) and _is_prefect_process(pid)):
            continue
        os.killpg(pid, signal.SIGTERM)  # its own session: `_spawn` used start_new_session
        deadline = time.monotonic() + timeout_s
        while _alive(pid) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.5)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
            _reap(pid)
        stopped.append(pid)
    _stack_path(ws).unlink(missing_ok=True)
    return stopped


def _reap(pid: int) -> None:
    """Collect the exit status when `pid` is our child (else it lingers as a zombie)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def status(workspace: str | os.PathLike | None = None) -> dict[str, Any]:
    """The stack `up` recorded for this workspace, with whether each process is alive."""
    stack = read_stack(Workspace.from_env(workspace)) or {}
    return stack | {"alive": {k: _alive(p) for k, p in stack.get("pids", {}).items()}}
