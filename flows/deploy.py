"""Deploy oncoflow on Prefect: the promote+package flow and a local server/worker stack.

Two jobs, both about running the pipeline as scheduled deployments (prefect.yaml):

* `promote_and_package` — a flow that takes the champion (or a given version) from the MLflow
  registry, downloads its model bundle, imports it into the Bento model store and builds the
  Bento. prefect.yaml triggers it after every completed `train_pipeline` run, with the
  training run's own overrides, so it reads the same registry and writes the same workspace.
* `up` / `deploy_all` / `down` — start `prefect server` and a process worker in the
  background with their state in the workspace, create the work pool and queue, and run
  `prefect deploy --all`. Also a CLI: ``python -m flows.deploy up|deploy|down|status|...``.

Caching: registry aliases move, so nothing that resolves one is cached (``NO_CACHE``). A
downloaded bundle is kept under a directory named by the immutable registry version *and*
the MLflow run id it came from, so a reused download is always the bytes of that version.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from components.workspace import Workspace
from flows.hooks import IO_RETRIES as _IO_RETRIES
from flows.hooks import record_failure
from flows.hooks import slug as _slug
from flows.runtime import prepare_environment

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PREFECT_FILE = PROJECT_ROOT / "prefect.yaml"
POOL = "oncoflow-process"
TRAINING_QUEUE = "training"
BENTO_MODEL = "oncoflow-model"
STACK_FILE = "stack.json"
DATA_ARRIVED_EVENT = "oncoflow.data.arrived"


# ----------------------------------------------------------------------------- promote + package


@task(name="resolve-model-version", cache_policy=NO_CACHE, **_IO_RETRIES)
def resolve_version_task(
    tracking_uri: str | None, workspace: Workspace, model_name: str, ref: str, reason: str | None
) -> dict[str, Any]:
    """Resolve `ref` (alias or number) to a concrete version; promote it first if `reason`."""
    from components.registry import RegistryClient

    client = RegistryClient.for_workspace(workspace, tracking_uri)
    if reason:
        client.promote(model_name, ref, reason)
        get_run_logger().info("promoted %s v%s to champion: %s", model_name, ref, reason)
    return client.version_info(model_name, ref)


@task(name="download-bundle", cache_policy=NO_CACHE, **_IO_RETRIES)
def download_task(
    tracking_uri: str | None, workspace: Workspace, info: dict[str, Any]
) -> tuple[Path, bool]:
    """Download the version's bundle once; the directory name pins version and run id."""
    from components.registry import RegistryClient

    target = bundle_cache_dir(workspace, info)
    if (target / "bundle.json").is_file():
        return target, False
    if target.exists():  # an interrupted download: start again
        import shutil

        shutil.rmtree(target)
    client = RegistryClient.for_workspace(workspace, tracking_uri)
    client.download_bundle(info["name"], target, info["version"])
    return target, True


def bundle_cache_dir(workspace: Workspace, info: dict[str, Any]) -> Path:
    """``<workspace>/bundles/<model>/v<version>-<run id>``: immutable registry coordinates."""
    return workspace.bundles / _slug(info["name"]) / f"v{info['version']}-{info['run_id']}"


@task(name="import-into-bento-store", cache_policy=NO_CACHE, retries=1)
def import_task(bundle_dir: Path, info: dict[str, Any], bentoml_home: Path) -> tuple[str, bool]:
    """Make `bundle_dir` the latest ``oncoflow-model``; reuse the import when it already is."""
    from serving.packaging import import_bundle, use_bentoml_home

    use_bentoml_home(bentoml_home)
    current = latest_bento_model(info["name"], info["version"], bundle_dir)
    if current is not None:
        return current, False
    tag = import_bundle(
        bundle_dir,
        name=BENTO_MODEL,
        labels={
            "registered_model": info["name"],
            "version": str(info["version"]),
            "run_id": str(info.get("run_id", "")),
        },
        metadata={"registered_model": info["name"], "model_version": str(info["version"])},
    )
    return tag, True


def latest_bento_model(model_name: str, version: str | int, bundle_dir: Path) -> str | None:
    """The newest ``oncoflow-model`` tag if it *is* this bundle (labels and bytes), else None.

    Only the newest counts: `bentoml build` and `oncoflow serve` default to ``:latest``. The
    files are compared too, so a registry rebuilt under the same version numbers (or any other
    mix-up) leads to a fresh import, never to serving a stale model.
    """
    import bentoml
    from bentoml.exceptions import NotFound as BentoNotFound

    try:
        latest = bentoml.models.get(f"{BENTO_MODEL}:latest")
    except BentoNotFound:
        return None
    labels = latest.info.labels
    if labels.get("registered_model") != model_name or labels.get("version") != str(version):
        return None
    return str(latest.tag) if same_files(bundle_dir, Path(latest.path)) else None


def same_files(bundle_dir: Path, other: Path) -> bool:
    """True when every file of `bundle_dir` exists in `other` with the same SHA-256."""
    import hashlib

    def digest(path: Path) -> str:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    files = [p for p in bundle_dir.rglob("*") if p.is_file()]
    return bool(files) and all(
        (other / p.relative_to(bundle_dir)).is_file()
        and digest(p) == digest(other / p.relative_to(bundle_dir))
        for p in files
    )


@task(name="build-bento", cache_policy=NO_CACHE, retries=1)
def build_task(bentoml_home: Path) -> str:
    from serving.packaging import build_bento

    return build_bento(PROJECT_ROOT, bentoml_home=bentoml_home)


def model_card(info: dict[str, Any], bundle_dir: Path, bento_model: str, bento: str | None) -> str:
    """A markdown model card from the registry entry and the bundle's own metadata."""
    meta = json.loads((bundle_dir / "bundle.json").read_text())
    metrics = meta.get("metrics") or {}
    headline = [
        f"| {name} | {metrics[name]:.4f} |"
        for name in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc", "ece")
        if isinstance(metrics.get(name), int | float)
    ]
    pre = meta.get("preprocessing") or {}
    privacy = meta.get("privacy") or {"mode": "none"}
    lines = [
        f"# Model card: {info['name']} v{info['version']}",
        "",
        f"- Aliases: {', '.join(info.get('aliases') or []) or 'none'}",
        f"- Architecture: `{meta.get('architecture')}`",
        f"- Classes (output order): {', '.join(meta.get('class_names', []))}",
        f"- Input: {pre.get('size')}px, {pre.get('channels')} channel(s)",
        f"- Data fingerprint: `{meta.get('data_fingerprint', '')}`",
        f"- Test-set fingerprint: `{info.get('test_set_fingerprint', '')}`",
        f"- Gate: {info.get('gate_decision', '')} — {info.get('gate_reason', '')}",
        f"- Privacy: `{json.dumps(privacy, default=str)}`",
        f"- MLflow run: `{info.get('run_id')}`",
        f"- Bento model: `{bento_model}`" + (f", Bento: `{bento}`" if bento else ""),
        "",
        "| test metric | value |",
        "|---|---|",
        *headline,
    ]
    return "\n".join(lines)


@flow(name="promote_and_package", on_failure=[record_failure], on_crashed=[record_failure])
def promote_and_package(
    overrides: list[str] | None = None,
    version: str = "champion",
    model_name: str | None = None,
    reason: str | None = None,
    build_bento: bool | None = None,
) -> dict[str, Any]:
    """Package a registered model version for serving.

    overrides:   Hydra overrides of the training run (registry URI, model name, workspace)
    version:     alias or version number; default the champion
    model_name:  registered model (default ``registry.model_name`` of the composed config)
    reason:      when set, first move the champion alias to `version` (a manual promotion)
    build_bento: run ``bentoml build`` (default ``package.build_bento`` of the config)
    """
    from components.config import compose, to_container

    cfg = to_container(compose(list(overrides or [])))
    workspace = Workspace.from_env(cfg["paths"]["workspace"])
    prepare_environment(workspace)
    tracking_uri = cfg["registry"]["tracking_uri"]
    name = model_name or cfg["registry"]["model_name"]
    build = cfg["package"]["build_bento"] if build_bento is None else build_bento
    logger = get_run_logger()

    info = resolve_version_task(tracking_uri, workspace, name, str(version), reason)
    bundle_dir, downloaded = download_task(tracking_uri, workspace, info)
    bento_model, imported = import_task(bundle_dir, info, workspace.bentoml_home)
    bento = build_task(workspace.bentoml_home) if build else None
    logger.info(
        "%s v%s: bundle %s, Bento model %s (%s)%s",
        name,
        info["version"],
        "downloaded" if downloaded else "already local",
        bento_model,
        "imported" if imported else "already the latest import",
        f", Bento {bento}" if bento else "",
    )
    _markdown_artifact(
        f"model-card-{_slug(name)}", model_card(info, bundle_dir, bento_model, bento)
    )
    summary = {
        "model_name": name,
        "version": str(info["version"]),
        "aliases": info.get("aliases", []),
        "run_id": info.get("run_id"),
        "bundle_dir": str(bundle_dir),
        "downloaded": downloaded,
        "bento_model": bento_model,
        "imported": imported,
        "bento": bento,
    }
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    out = workspace.root / "runs" / f"{stamp}-promote-{_slug(name)}" / "summary.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _markdown_artifact(key: str, text: str) -> None:
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(key=key[:100], markdown=text)


def run_promote(args: list[str], version: str, reason: str | None, build: bool | None) -> dict:
    """Entry for a CLI (``oncoflow promote``): prepare the environment, then run the flow."""
    from components.config import compose

    prepare_environment(Workspace.from_env(compose(args).paths.workspace))
    with settings_from_environment():
        return promote_and_package(list(args), version=version, reason=reason, build_bento=build)


@contextlib.contextmanager
def settings_from_environment() -> Iterator[None]:
    """Run with Prefect settings re-read from ``os.environ``.

    Prefect reads its settings once, when first imported; `prepare_environment` runs later
    (this module imports prefect at the top), so its PREFECT_HOME and ephemeral-server
    start-up timeout would otherwise be ignored.
    """
    import prefect.context
    from prefect.settings import Settings

    current = prefect.context.get_settings_context()
    with prefect.context.SettingsContext(profile=current.profile, settings=Settings()):
        yield


# ----------------------------------------------------------------------------- local stack


def _prefect_cli() -> list[str]:
    exe = Path(sys.executable).with_name("prefect")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "prefect"]


def stack_env(workspace: Workspace, api_url: str | None = None) -> dict[str, str]:
    """Environment for the server, worker and CLI calls: homes in the workspace, quiet."""
    from flows.runtime import _QUIET

    env = {**os.environ, **_QUIET}
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
            "run `python -m flows.deploy down` first"
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


def deploy_all(
    api_url: str | None = None,
    workspace: str | os.PathLike | None = None,
    pool: str = POOL,
    prefect_file: str | os.PathLike = PREFECT_FILE,
    pool_type: str = "process",
    base_job_template: str | os.PathLike | None = None,
) -> list[str]:
    """Create the pool/queue and run ``prefect deploy --all``; return the deployment names.

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
            "no Prefect API: start one with `python -m flows.deploy up` or set PREFECT_API_URL"
        )
    ensure_work_pool(api_url, ws, pool, pool_type, base_job_template)
    env = stack_env(ws, api_url)
    args = ["--no-prompt", "deploy", "--all", "--prefect-file", str(Path(prefect_file).resolve())]
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


# ----------------------------------------------------------------------------- new-data events


def announce_data(
    overrides: list[str],
    api_url: str | None = None,
    workspace: str | os.PathLike | None = None,
) -> str:
    """Emit ``oncoflow.data.arrived`` for the dataset of `overrides`; returns the resource id.

    The validate-data deployment's trigger (prefect.yaml) runs validation with `overrides`.
    Call it from whatever lands new data (an upload job, a cron on the data directory). The
    API is `api_url`, else the stack `up` started in the workspace, else $PREFECT_API_URL.
    """
    import asyncio

    from prefect.events import Event

    from components.config import compose
    from components.errors import ConfigError

    stack = read_stack(Workspace.from_env(workspace)) or {}
    api_url = api_url or stack.get("api_url") or os.environ.get("PREFECT_API_URL")
    if not api_url:
        raise ConfigError("no Prefect API to announce to: pass --api-url or set PREFECT_API_URL")
    dataset = compose(list(overrides)).dataset.name
    resource = f"oncoflow.dataset.{dataset}"
    event = Event(
        event=DATA_ARRIVED_EVENT,
        resource={"prefect.resource.id": resource, "prefect.resource.name": dataset},
        payload={"overrides": list(overrides)},
    )
    asyncio.run(_emit(event, api_url))
    return resource


async def _emit(event, api_url: str) -> None:
    """Send one event now (not through the background worker, which may outlive us)."""
    from prefect.events.clients import PrefectEventsClient

    async with PrefectEventsClient(api_url=api_url) as client:
        await client.emit(event)


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flows.deploy",
        description="Run oncoflow's Prefect deployments: local server/worker, deploy, promote.",
    )
    parser.add_argument("--workspace", default=None, help="default $ONCOFLOW_WORKSPACE")
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start a Prefect server and a process worker (background)")
    p_up.add_argument("--port", type=int, default=4200)
    p_up.add_argument("--no-worker", action="store_true")
    p_up.add_argument("--pool", default=POOL)
    p_deploy = sub.add_parser("deploy", help="create the work pool and deploy prefect.yaml")
    p_deploy.add_argument("--api-url", default=None)
    p_deploy.add_argument("--pool", default=POOL)
    p_deploy.add_argument("--prefect-file", default=str(PREFECT_FILE))
    p_deploy.add_argument("--pool-type", default="process", help="process | docker | kubernetes")
    p_deploy.add_argument("--base-job-template", default=None, help="work-pool template JSON")
    sub.add_parser("down", help="stop what `up` started")
    sub.add_parser("status", help="print the running stack")
    p_promote = sub.add_parser("promote", help="package a registered version (default champion)")
    p_promote.add_argument("overrides", nargs="*")
    p_promote.add_argument("--version", default="champion")
    p_promote.add_argument("--reason", default=None, help="move the champion alias first")
    p_promote.add_argument("--no-build", action="store_true", help="import only, no Bento")
    p_data = sub.add_parser("data-arrived", help="announce new data (triggers validation)")
    p_data.add_argument("overrides", nargs="*")
    p_data.add_argument("--api-url", default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.workspace:  # the config's paths.workspace reads it too
        os.environ["ONCOFLOW_WORKSPACE"] = str(Path(args.workspace).expanduser().resolve())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from components.errors import OncoflowError

    try:
        result = _dispatch(args)
    except OncoflowError as exc:
        print(f"oncoflow: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str))
    return 0


def _dispatch(args: argparse.Namespace) -> Any:
    if args.command == "up":
        return up(args.port, args.workspace, pool=args.pool, worker=not args.no_worker)
    if args.command == "deploy":
        names = deploy_all(
            args.api_url,
            args.workspace,
            args.pool,
            args.prefect_file,
            args.pool_type,
            args.base_job_template,
        )
        return {"deployments": names}
    if args.command == "down":
        return {"stopped": down(args.workspace)}
    if args.command == "status":
        ws = Workspace.from_env(args.workspace)
        stack = read_stack(ws) or {}
        return stack | {"alive": {k: _alive(p) for k, p in stack.get("pids", {}).items()}}
    if args.command == "promote":
        build = False if args.no_build else None
        return run_promote(args.overrides, args.version, args.reason, build)
    if args.command == "data-arrived":
        return {"announced": announce_data(args.overrides, args.api_url, args.workspace)}
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
