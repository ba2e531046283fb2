"""Flower's deployment engine: a SuperLink, one SuperNode per site, runs submitted with `flwr run`.

Commands (`superlink_command`, `supernode_command`) are plain argument lists so the CLI, a
container entry point or a test can start them. Security defaults: TLS on (certificates from
`certs.make_certificates`), runtime dependency installation off on the SuperLink (SuperNodes
have it off by default: hospitals are often air-gapped, so oncoflow must be installed on every
machine), optional SuperNode authentication (`--enable-supernode-auth` + registered keys).

`LocalDeployment` starts the whole federation as separate processes on 127.0.0.1 (used by
`federation.engine=deployment` and by the integration tests).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from components.errors import ConfigError, DataError, ModelError
from components.federated.certs import CertPaths, KeyPair, make_certificates, make_supernode_keys
from components.federated.task import check_site_dir

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
    env = dict(os.environ)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
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


def _flwr(args: list[str], flwr_home: str | Path, timeout: float = 120) -> str:
    cmd = [flower_executable("flwr"), *args]
    proc = subprocess.run(
        cmd,
        env=base_env(flwr_home),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise ModelError(f"`flwr {args[0]}` failed: {' | '.join(detail)}")
    return proc.stdout


def _json_tail(text: str) -> dict[str, Any]:
    start = text.find("{")
    if start < 0:
        raise ModelError(f"unexpected output from flwr: {text[-300:]}")
    return json.loads(text[start:])


def submit_run(app_dir: str | Path, flwr_home: str | Path, *, connection: str = CONNECTION) -> int:
    """`flwr run <app_dir> <connection>`; returns the run id."""
    out = _flwr(["run", str(app_dir), connection, "--format", "json"], flwr_home)
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
    except (ModelError, subprocess.TimeoutExpired) as exc:
        return f"(log unavailable: {exc})"


def wait_for_run(
    run_id: int,
    flwr_home: str | Path,
    *,
    timeout: float,
    connection: str = CONNECTION,
    poll: float = 5.0,
) -> str:
    """Poll until the run finishes; return `finished:completed` or raise `ModelError`."""
    deadline = time.monotonic() + timeout
    status = "unknown"
    while time.monotonic() < deadline:
        status = run_status(run_id, flwr_home, connection=connection)
        if status.startswith("finished"):
            if status == TERMINAL_OK:
                return status
            tail = "\n".join(run_log(run_id, flwr_home, connection=connection).splitlines()[-60:])
            raise ModelError(f"federated run {run_id} ended as {status}:\n{tail}")
        time.sleep(poll)
    raise ModelError(f"federated run {run_id} still {status} after {timeout:.0f}s")


def register_supernode(
    public_key: str | Path, flwr_home: str | Path, *, connection: str = CONNECTION
) -> int:
    """Register a site's public key with a SuperLink started with --enable-supernode-auth."""
    out = _flwr(
        ["supernode", "register", str(public_key), connection, "--format", "json"], flwr_home
    )
    return int(_json_tail(out)["node-id"])


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _wait_port(
    host: str, port: int, process: subprocess.Popen, timeout: float, log_path: Path
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
            raise ModelError(f"{log_path.stem} exited with code {process.returncode}:\n{tail}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.5)
    raise ModelError(f"{log_path.stem} did not open {host}:{port} within {timeout:.0f}s")


class LocalDeployment:
    """A SuperLink and one SuperNode per site, as separate processes on 127.0.0.1.

    Every process runs in its own process group (so its ServerApp/ClientApp children go with
    it) and logs to `<root>/logs/`. Use as a context manager; `close()` stops what is left.
    """

    def __init__(
        self,
        layout,
        *,
        tls: bool = True,
        supernode_auth: bool = False,
        host: str = "127.0.0.1",
        superlink_port: int | None = None,
    ) -> None:
        self.layout = layout
        self.root = Path(layout.root)
        self.host = host
        self.tls = tls
        self.supernode_auth = supernode_auth
        self.port = superlink_port or free_port(host)
        self.address = f"{host}:{self.port}"
        self.logs = self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.certs = (
            make_certificates(self.root / "certs", hosts=(host, "localhost")) if tls else None
        )
        self.keys: dict[str, KeyPair] = (
            make_supernode_keys(self.root / "keys", layout.sites) if supernode_auth else {}
        )
        # a persistent SuperLink state: after a SuperLink restart the SuperNodes are still known
        # (with an in-memory state they are refused and exit)
        self.database = self.root / "superlink" / "state.db"
        self.database.parent.mkdir(parents=True, exist_ok=True)
        self.flwr_home = self.root / "flwr_home"
        write_flwr_config(
            self.flwr_home, self.address, root_cert=self.certs.ca_cert if self.certs else None
        )
        self.app_dir = write_app(self.root / APP_DIR_NAME, layout.spec_path)
        self.superlink: subprocess.Popen | None = None
        self.supernodes: dict[str, subprocess.Popen] = {}
        self._log_handles: list[Any] = []
        self._registered = False

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log_path = self.logs / f"{name}.log"
        handle = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        self._log_handles.append(handle)
        log.info("starting %s: %s", name, " ".join(cmd))
        return subprocess.Popen(
            cmd,
            env=base_env(self.flwr_home),
            cwd=self.root,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def start_superlink(self, timeout: float = 120) -> None:
        cmd = superlink_command(
            port=self.port,
            host=self.host,
            certs=self.certs,
            insecure=not self.tls,
            supernode_auth=self.supernode_auth,
            database=self.database,
        )
        self.superlink = self._spawn("superlink", cmd)
        _wait_port(self.host, self.port, self.superlink, timeout, self.logs / "superlink.log")
        if self.supernode_auth and not self._registered:
            self._registered = True
            for site, pair in self.keys.items():
                node_id = register_supernode(pair.public_key, self.flwr_home)
                log.info("registered site %s as SuperNode %d", site, node_id)

    def start_supernode(self, site: str) -> None:
        cmd = supernode_command(
            self.layout.sites[site],
            superlink=self.address,
            port=free_port(self.host),
            host=self.host,
            root_cert=self.certs.ca_cert if self.certs else None,
            insecure=not self.tls,
            auth_key=self.keys[site].private_key if site in self.keys else None,
        )
        self.supernodes[site] = self._spawn(f"supernode-{Path(self.layout.sites[site]).name}", cmd)

    def start(self) -> LocalDeployment:
        self.start_superlink()
        for site in self.layout.sites:
            self.start_supernode(site)
        return self

    def submit(self) -> int:
        return submit_run(self.app_dir, self.flwr_home)

    def wait(self, run_id: int, timeout: float | None = None) -> str:
        s = self.layout.settings
        budget = timeout or (s.connect_timeout + s.rounds * (2 * s.round_timeout) + 120)
        return wait_for_run(run_id, self.flwr_home, timeout=budget)

    @staticmethod
    def _stop(
        process: subprocess.Popen | None, sig: int = signal.SIGTERM, grace: float = 15
    ) -> None:
        """Stop `process`, its process group and its descendants (Flower detaches the
        SuperExec that runs ServerApps/ClientApps into a session of its own)."""
        if process is None:
            return
        family = _descendants(process.pid)
        if process.poll() is None:
            _kill_group(process.pid, sig)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _kill_group(process.pid, signal.SIGKILL)
                process.wait(timeout=grace)
        _kill_group(process.pid, signal.SIGKILL)
        for child in family:
            with contextlib.suppress(Exception):
                child.kill()
        _wait_gone(family, grace)

    def kill_supernode(self, site: str) -> None:
        """Simulate a site going away: SIGKILL its SuperNode and its ClientApp processes."""
        self._stop(self.supernodes.pop(site), signal.SIGKILL)

    def stop_superlink(self, sig: int = signal.SIGKILL) -> None:
        """Stop the SuperLink with its ServerApp (SIGKILL = a crash)."""
        self._stop(self.superlink, sig)
        self.superlink = None

    def close(self) -> None:
        for site in list(self.supernodes):
            self._stop(self.supernodes.pop(site))
        self._stop(self.superlink)
        self.superlink = None
        for handle in self._log_handles:
            handle.close()
        self._log_handles.clear()

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log_tail(self, name: str = "superlink", lines: int = 40) -> str:
        path = self.logs / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def _descendants(pid: int) -> list[Any]:
    """psutil handles of every process started (directly or not) by `pid`."""
    try:
        import psutil

        return psutil.Process(pid).children(recursive=True)
    except Exception:  # psutil missing or the process already gone
        return []


def _wait_gone(processes: list[Any], timeout: float) -> None:
    if processes:
        with contextlib.suppress(Exception):
            import psutil

            psutil.wait_procs(processes, timeout=timeout)


def _kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def run_local_deployment(
    layout, *, tls: bool = True, supernode_auth: bool = False, timeout: float | None = None
) -> str:
    """Run a prepared federation on a SuperLink + SuperNodes on 127.0.0.1; wait for the end."""
    with LocalDeployment(layout, tls=tls, supernode_auth=supernode_auth) as deployment:
        deployment.start()
        run_id = deployment.submit()
        log.info("submitted federated run %d to %s", run_id, deployment.address)
        return deployment.wait(run_id, timeout)


__all__ = [
    "CONNECTION",
    "LocalDeployment",
    "base_env",
    "register_supernode",
    "run_local_deployment",
    "run_status",
    "submit_run",
    "superlink_command",
    "supernode_command",
    "wait_for_run",
    "write_app",
    "write_flwr_config",
]
