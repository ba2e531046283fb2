"""The process supervisor of a local deployment: `LocalDeployment` starts a SuperLink and one
SuperNode per site as child processes on 127.0.0.1, watches them and stops them (with the
ServerApp/ClientApp processes they start). Used by `federation.engine=deployment` and by the
integration tests; what each process runs comes from `deployment` (the commands).

`run_as` (root only) runs the SuperLink and each SuperNode under an OS account of its own, as
on separate machines: the process (and the ServerApp/ClientApps it starts) gets that account's
uid/gid and no supplementary groups, its HOME, FLWR_HOME (where Flower installs the app) and
TMPDIR in the account's `home`, its log in `home/logs`, and a SuperNode its own copy of the
federation's CA certificate there (a hospital receives `ca.crt`; it cannot read the
coordinator's directory).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
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


@dataclass(frozen=True)
class RunAs:
    """The OS account a process of a `LocalDeployment` runs under (the caller must be root)."""

    uid: int
    gid: int
    home: Path  # owned by the account: HOME, FLWR_HOME, TMPDIR, logs/, the CA copy

    def environment(self) -> dict[str, str]:
        home = str(self.home)
        return {"HOME": home, "FLWR_HOME": home, "TMPDIR": home}

    def own(self, path: Path) -> Path:
        os.chown(path, self.uid, self.gid)
        return path


class LocalDeployment:
    """A SuperLink and one SuperNode per site, as separate processes on 127.0.0.1.

    Every process runs in its own process group (so its ServerApp/ClientApp children go with
    it) and logs to `<root>/logs/` (a process with a `run_as` account: to its `home/logs/`).
    `run_as` maps "superlink" or a site name to the account it runs under. Use as a context
    manager; `close()` stops what is left.
    """

    def __init__(
        self,
        layout,
        *,
        tls: bool = True,
        supernode_auth: bool = False,
        host: str = "127.0.0.1",
        superlink_port: int | None = None,
        run_as: Mapping[str, RunAs] | None = None,
    ) -> None:
        self.layout = layout
        self.run_as = dict(run_as or {})
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
        self._log_paths: dict[str, Path] = {}
        self._registered = False

    def log_path(self, name: str) -> Path:
        """The log file of process `name` ("superlink", "supernode-<site dir name>")."""
        return self._log_paths.get(name, self.logs / f"{name}.log")

    def _spawn(self, name: str, cmd: list[str], who: RunAs | None = None) -> subprocess.Popen:
        env, cwd, account = base_env(self.flwr_home), self.root, {}
        log_path = self.logs / f"{name}.log"
        if who is not None:
            log_path = who.own(_mkdir(who.home / "logs")) / f"{name}.log"
            log_path.touch()
            who.own(log_path)
            env |= who.environment()
            cwd = who.home
            account = {"user": who.uid, "group": who.gid, "extra_groups": []}
        self._log_paths[name] = log_path
        handle = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        self._log_handles.append(handle)
        log.info("starting %s: %s", name, " ".join(cmd))
        return subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **account,
        )

    def _root_cert(self, who: RunAs | None) -> Path | None:
        """The CA certificate as the process's account can read it (its own copy)."""
        if self.certs is None or who is None:
            return self.certs.ca_cert if self.certs else None
        return who.own(Path(shutil.copyfile(self.certs.ca_cert, who.home / "ca.crt")))

    def start_superlink(self, timeout: float = 120) -> None:
        cmd = superlink_command(
            port=self.port,
            host=self.host,
            certs=self.certs,
            insecure=not self.tls,
            supernode_auth=self.supernode_auth,
            database=self.database,
        )
        self.superlink = self._spawn("superlink", cmd, self.run_as.get("superlink"))
        _wait_port(self.host, self.port, self.superlink, timeout, self.log_path("superlink"))
        if self.supernode_auth and not self._registered:
            self._registered = True
            for site, pair in self.keys.items():
                node_id = register_supernode(pair.public_key, self.flwr_home)
                log.info("registered site %s as SuperNode %d", site, node_id)

    def start_supernode(self, site: str) -> None:
        who = self.run_as.get(site)
        cmd = supernode_command(
            self.layout.sites[site],
            superlink=self.address,
            port=free_port(self.host),
            host=self.host,
            root_cert=self._root_cert(who),
            insecure=not self.tls,
            auth_key=self.keys[site].private_key if site in self.keys else None,
        )
        name = f"supernode-{Path(self.layout.sites[site]).name}"
        self.supernodes[site] = self._spawn(name, cmd, who)

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
            return f"the SuperLink exited with code {code} (see {self.log_path('superlink')})"
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
        path = self.log_path(name)
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


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


__all__ = ["LocalDeployment", "RunAs", "free_port", "run_local_deployment"]
