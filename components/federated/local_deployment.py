"""The process supervisor of a local deployment: `LocalDeployment` starts a SuperLink and one
SuperNode per site as child processes on 127.0.0.1, watches them and stops them (with the
ServerApp/ClientApp processes they start). Used by `federation.engine=deployment` and by the
integration tests; what each process runs comes from `deployment` (the commands).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from components.errors import ModelError
from components.federated.certs import KeyPair, make_certificates, make_supernode_keys
from components.federated.deployment import (
    APP_DIR_NAME,
    base_env,
    register_supernode,
    run_budget,
    submit_run,
    superlink_command,
    supernode_command,
    wait_for_run,
    write_app,
    write_flwr_config,
)
from components.net import free_port

log = logging.getLogger(__name__)


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
        """Wait for the run, at most `timeout` (default: `run_budget` of the federation);
        fail at once if the SuperLink process exits meanwhile."""
        budget = timeout or run_budget(self.layout.settings)
        return wait_for_run(run_id, self.flwr_home, timeout=budget, alive=self._superlink_gone)

    def _superlink_gone(self) -> str | None:
        if self.superlink is None:
            return "the SuperLink is not running"
        code = self.superlink.poll()
        if code is not None:
            return f"the SuperLink exited with code {code} (see {self.logs / 'superlink.log'})"
        return None

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


__all__ = ["LocalDeployment", "free_port", "run_local_deployment"]
