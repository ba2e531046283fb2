"""Flower's deployment engine, the commands: a SuperLink, one SuperNode per site, runs submitted
with `flwr run`.

Command lines (`superlink_command`, `supernode_command`) are plain argument lists so the CLI, a
container entry point or a test can start them. Security defaults: TLS on (certificates from
`certs.make_certificates`), runtime dependency installation off on the SuperLink (SuperNodes
have it off by default: hospitals are often air-gapped, so oncoflow must be installed on every
machine), optional SuperNode authentication (`--enable-supernode-auth` + registered keys).

What each machine of a deployment runs (`oncoflow fl certs|superlink|supernode|submit`; the
federation is written under <root> by `oncoflow fl prepare <root> dataset=... federation=...`,
which runs the pipeline's ingest, split and validation steps and then
`layout.prepare_federation`):

    certs(<root>/certs, hosts=["superlink.example.org"])             # once, on the SuperLink
    superlink(<root>, port=9092, host="0.0.0.0")                      # SuperLink machine
    supernode(<site dir>, superlink="superlink.example.org:9092",     # each hospital, its own
              root_cert="ca.crt")                                     #   site directory only
    submit(<root>, superlink="superlink.example.org:9092", root_cert=".../ca.crt")

The long-running ones run in the foreground and return their exit code. `local_deployment`
runs the whole federation as child processes on one machine.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from components.errors import ConfigError, DataError, ModelError
from components.federated.certs import CertPaths, make_certificates, make_supernode_keys
from components.federated.task import check_site_dir
from components.telemetry import TELEMETRY_OFF

log = logging.getLogger(__name__)

CONNECTION = "oncoflow"  # name of the SuperLink connection in FLWR_HOME/config.toml
APP_DIR_NAME = "oncoflow-app"
SERVER_APP = "components.federated.server_app:app"
CLIENT_APP = "components.federated.client_app:app"
TERMINAL_OK = "finished:completed"


def flower_executable(name: str) -> str:
    """Path of a Flower console script next to this Python (the project's venv), else `name`."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def base_env(flwr_home: str | Path | None = None) -> dict[str, str]:
    """Environment for Flower processes: telemetry off, the venv first on PATH, FLWR_HOME."""
    env = {**os.environ, **TELEMETRY_OFF}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def superlink_command(
    *,
    port: int = 9092,
    host: str = "127.0.0.1",
    certs: CertPaths | None = None,
    insecure: bool = False,
    supernode_auth: bool = False,
    database: str | Path | None = None,
) -> list[str]:
    """`flower-superlink` serving its Fleet, Control and Runtime APIs on host:port.

    TLS needs `certs` unless `insecure` is set explicitly (local experiments only).
    """
    cmd = [
        flower_executable("flower-superlink"),
        "--host",
        host,
        "--port",
        str(int(port)),
        "--isolation",
        "subprocess",
        "--disable-runtime-dependency-installation",
    ]
    if certs is not None:
        cmd += [
            "--ssl-ca-certfile",
            str(certs.ca_cert),
            "--ssl-certfile",
            str(certs.server_cert),
            "--ssl-keyfile",
            str(certs.server_key),
        ]
    elif insecure:
        cmd.append("--insecure")
    else:
        raise ConfigError(
            "the SuperLink needs TLS certificates (run `oncoflow fl certs`) or an explicit "
            "insecure=True for a local experiment"
        )
    if supernode_auth:
        cmd.append("--enable-supernode-auth")
    if database is not None:
        cmd += ["--database", str(database)]
    return cmd


def supernode_command(
    site_dir: str | Path,
    *,
    superlink: str,
    port: int = 9094,
    host: str = "127.0.0.1",
    root_cert: str | Path | None = None,
    insecure: bool = False,
    auth_key: str | Path | None = None,
) -> list[str]:
    """`flower-supernode` for one site: it reads only `site_dir` (checked to exist now).

    `port` is the SuperNode's local ClientApp API (one per SuperNode on a machine).
    """
    path = check_site_dir(site_dir).resolve()
    if '"' in str(path):
        raise DataError(f"site directory {path} contains a double quote; move it")
    cmd = [
        flower_executable("flower-supernode"),
        "--superlink",
        superlink,
        "--host",
        host,
        "--port",
        str(int(port)),
        "--isolation",
        "subprocess",
        "--node-config",
        f'data-dir="{path}"',
    ]
    if root_cert is not None:
        cmd += ["--root-certificates", str(root_cert)]
    elif insecure:
        cmd.append("--insecure")
    else:
        raise ConfigError(
            "the SuperNode needs the federation's CA certificate (root_cert) or insecure=True"
        )
    if auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(auth_key)]
    return cmd


def write_app(app_dir: str | Path, spec_file: str | Path) -> Path:
    """Write the Flower App (`pyproject.toml` with `[tool.flwr.app]`) that `flwr run` submits.

    Its components are the installed `components.federated` apps; its run config carries the
    path of the run spec on the SuperLink's machine.
    """
    app = Path(app_dir)
    app.mkdir(parents=True, exist_ok=True)
    spec = json.dumps(str(Path(spec_file).resolve()))
    (app / "pyproject.toml").write_text(
        f"""[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{APP_DIR_NAME}"
version = "1.0.0"
description = "oncoflow federated training (components.federated)"
license = "Apache-2.0"
dependencies = ["flwr>=1.41,<1.42"]

[tool.flwr.app]
publisher = "oncoflow"

[tool.flwr.app.components]
serverapp = "{SERVER_APP}"
clientapp = "{CLIENT_APP}"

[tool.flwr.app.config]
spec-file = {spec}
phase = "federate"
"""
    )
    return app


def write_flwr_config(
    flwr_home: str | Path,
    address: str,
    *,
    root_cert: str | Path | None = None,
    name: str = CONNECTION,
) -> Path:
    """Write `FLWR_HOME/config.toml` with one SuperLink connection `name` (default too)."""
    home = Path(flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]"]
    lines.append(f"address = {json.dumps(address)}")
    if root_cert is not None:
        lines.append(f"root-certificates = {json.dumps(str(Path(root_cert).resolve()))}")
    else:
        lines.append("insecure = true")
    path = home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


FLWR_TIMEOUT = 120.0  # seconds one `flwr` command may take (the SuperLink answers in ms)


def _flwr(args: list[str], flwr_home: str | Path, timeout: float = FLWR_TIMEOUT) -> str:
    cmd = [flower_executable("flwr"), *args]
    try:
        proc = subprocess.run(
            cmd,
            env=base_env(flwr_home),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ModelError(
            f"`flwr {args[0]}` got no answer within {timeout:.0f}s; is the SuperLink reachable?"
        ) from None
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise ModelError(f"`flwr {args[0]}` failed: {' | '.join(detail)}")
    return proc.stdout


def _json_tail(text: str) -> dict[str, Any]:
    start = text.find("{")
    if start < 0:
        raise ModelError(f"unexpected output from flwr: {text[-300:]}")
    return json.loads(text[start:])


def submit_run(
    app_dir: str | Path,
    flwr_home: str | Path,
    *,
    connection: str = CONNECTION,
    run_config: dict[str, str] | None = None,
) -> int:
    """`flwr run <app_dir> <connection>` (string `run_config` values override the app's run
    config, e.g. {"phase": "preflight"}); returns the run id."""
    extra = [f"{k}={json.dumps(str(v))}" for k, v in (run_config or {}).items()]
    args = ["run", str(app_dir), connection, "--format", "json"]
    args += [a for item in extra for a in ("--run-config", item)]
    out = _flwr(args, flwr_home)
    data = _json_tail(out)
    if not data.get("success") or not data.get("run-id"):
        raise ModelError(f"the SuperLink did not start the run: {data}")
    return int(data["run-id"])


def run_status(run_id: int, flwr_home: str | Path, *, connection: str = CONNECTION) -> str:
    """The run's status, e.g. `running` or `finished:completed`."""
    out = _flwr(["ls", connection, "--run-id", str(run_id), "--format", "json"], flwr_home)
    runs = _json_tail(out).get("runs", [])
    return str(runs[0]["status"]) if runs else "unknown"


def run_log(run_id: int, flwr_home: str | Path, *, connection: str = CONNECTION) -> str:
    try:
        return _flwr(["log", str(run_id), connection], flwr_home, timeout=60)
    except ModelError as exc:
        return f"(log unavailable: {exc})"


def stop_run(run_id: int, flwr_home: str | Path, *, connection: str = CONNECTION) -> bool:
    """Ask the SuperLink to stop a run (`flwr stop`); False when it could not."""
    try:
        _flwr(["stop", str(run_id), connection], flwr_home, timeout=60)
    except ModelError as exc:
        log.warning("could not stop federated run %d: %s", run_id, exc)
        return False
    return True


def run_budget(settings: Any) -> float:
    """The longest a whole federated run may take, from the federation's own timeouts: every
    round may wait `connect_timeout` for sites and `round_timeout` for each of its roll call,
    training and evaluation; two more exchanges (preflight, final evaluation) and two minutes
    for starting the ServerApp and scoring on the server."""
    per_round = settings.connect_timeout + 3 * settings.round_timeout
    return float(settings.rounds * per_round + 2 * settings.round_timeout + 120)


def wait_for_run(
    run_id: int,
    flwr_home: str | Path,
    *,
    timeout: float,
    connection: str = CONNECTION,
    poll: float = 5.0,
    alive: Callable[[], str | None] | None = None,
) -> str:
    """Poll until the run finishes; return `finished:completed` or raise `ModelError`.

    A failed status query (the SuperLink restarting) is retried until `timeout`; `alive()`,
    when given, names why waiting is pointless (e.g. the local SuperLink exited). A run still
    going at `timeout` is stopped (`flwr stop`) before the error is raised: no wait is
    unbounded and no run is left behind. The round driver's sanitised reason is in the run's
    `run_state.json` (`oncoflow fl status`); the ServerApp log is `flwr log <run id>`."""
    deadline = time.monotonic() + timeout
    status, unreachable = "unknown", None
    while time.monotonic() < deadline:
        try:
            status, unreachable = run_status(run_id, flwr_home, connection=connection), None
        except ModelError as exc:
            unreachable = unreachable or str(exc)
        if status.startswith("finished"):
            if status == TERMINAL_OK:
                return status
            raise ModelError(
                f"federated run {run_id} ended as {status}; `oncoflow fl status <root>` gives "
                f"each site's last state, `flwr log {run_id}` the ServerApp log"
            )
        gone = alive() if alive is not None else None
        if gone:
            raise ModelError(f"federated run {run_id} cannot finish: {gone}")
        time.sleep(min(poll, max(0.0, deadline - time.monotonic())))
    stopped = stop_run(run_id, flwr_home, connection=connection)
    detail = f"; the SuperLink did not answer: {unreachable}" if unreachable else ""
    raise ModelError(
        f"federated run {run_id} still {status} after {timeout:.0f}s (the budget from "
        f"federation.rounds, connect_timeout and round_timeout){detail}; "
        + ("it was stopped" if stopped else "stop it with `flwr stop`")
    )


def register_supernode(
    public_key: str | Path, flwr_home: str | Path, *, connection: str = CONNECTION
) -> int:
    """Register a site's public key with a SuperLink started with --enable-supernode-auth."""
    out = _flwr(
        ["supernode", "register", str(public_key), connection, "--format", "json"], flwr_home
    )
    return int(_json_tail(out)["node-id"])


# --------------------------------------------------------------------------- roles
# What `oncoflow fl certs|superlink|supernode|submit` run on each machine.


def certs(
    out_dir: str | Path,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    sites: Sequence[str] = (),
) -> dict[str, Any]:
    """Create the CA + SuperLink certificate (and SuperNode key pairs for `sites`)."""
    out = Path(out_dir)
    paths = make_certificates(out, hosts=hosts)
    keys = make_supernode_keys(out / "supernode-keys", sites) if sites else {}
    return {
        "ca_cert": str(paths.ca_cert),
        "server_cert": str(paths.server_cert),
        "server_key": str(paths.server_key),
        "supernode_keys": {
            s: {"private": str(k.private_key), "public": str(k.public_key)} for s, k in keys.items()
        },
    }


def _certs_in(root: Path) -> CertPaths:
    cert_dir = root / "certs"
    paths = CertPaths(cert_dir / "ca.crt", cert_dir / "server.pem", cert_dir / "server.key")
    missing = [
        p.name for p in (paths.ca_cert, paths.server_cert, paths.server_key) if not p.is_file()
    ]
    if missing:
        raise ConfigError(
            f"no TLS certificates in {cert_dir} (missing {', '.join(missing)}); "
            "create them with `oncoflow fl certs` or pass insecure=True for a local experiment"
        )
    return paths


def superlink(
    root: str | Path,
    *,
    port: int = 9092,
    host: str = "127.0.0.1",
    insecure: bool = False,
    supernode_auth: bool = False,
) -> int:
    """Run a SuperLink in the foreground (state persisted in <root>/superlink/state.db)."""
    root = Path(root)
    database = root / "superlink" / "state.db"
    database.parent.mkdir(parents=True, exist_ok=True)
    cmd = superlink_command(
        port=port,
        host=host,
        certs=None if insecure else _certs_in(root),
        insecure=insecure,
        supernode_auth=supernode_auth,
        database=database,
    )
    return subprocess.call(cmd, env=base_env())


def supernode(
    site_dir: str | Path,
    *,
    superlink: str,
    port: int = 9094,
    root_cert: str | Path | None = None,
    auth_key: str | Path | None = None,
    insecure: bool = False,
) -> int:
    """Run the SuperNode of one site in the foreground; it reads only `site_dir`."""
    cmd = supernode_command(
        site_dir,
        superlink=superlink,
        port=port,
        root_cert=root_cert,
        insecure=insecure,
        auth_key=auth_key,
    )
    return subprocess.call(cmd, env=base_env())


def _connection(root: Path, superlink: str, root_cert: str | Path | None, insecure: bool) -> Path:
    if root_cert is None and not insecure:
        default = root / "certs" / "ca.crt"
        if not default.is_file():
            raise ConfigError(f"pass root_cert (the federation's ca.crt); {default} is missing")
        root_cert = default
    home = root / "flwr_home"
    write_flwr_config(home, superlink, root_cert=None if insecure else root_cert)
    return home


def register(
    root: str | Path,
    public_key: str | Path,
    *,
    superlink: str,
    root_cert: str | Path | None = None,
) -> int:
    """Register a site's public key with a SuperLink started with supernode_auth=True."""
    home = _connection(Path(root), superlink, root_cert, insecure=False)
    return register_supernode(public_key, home)


def submit(
    root: str | Path,
    *,
    superlink: str,
    root_cert: str | Path | None = None,
    insecure: bool = False,
    wait: bool = True,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Submit the prepared federation under `root` to a SuperLink (`flwr run`).

    With `wait`, block until the run ends and return its summary (the final model and history
    are in <root>/server/out; `result.load_result(FederationLayout.open(root))` loads them).
    """
    from components.federated.layout import FederationLayout
    from components.federated.result import load_result

    root = Path(root)
    layout = FederationLayout.open(root)
    home = _connection(root, superlink, root_cert, insecure)
    app = write_app(root / APP_DIR_NAME, layout.spec_path)
    run_id = submit_run(app, home)
    if not wait:
        return {"run_id": run_id, "status": "submitted"}
    status = wait_for_run(run_id, home, timeout=timeout or run_budget(layout.settings))
    return {"run_id": run_id, "status": status, **load_result(layout).summary()}


__all__ = [
    "CONNECTION",
    "base_env",
    "certs",
    "register",
    "register_supernode",
    "run_budget",
    "run_status",
    "stop_run",
    "submit",
    "submit_run",
    "superlink",
    "superlink_command",
    "supernode",
    "supernode_command",
    "wait_for_run",
    "write_app",
    "write_flwr_config",
]
