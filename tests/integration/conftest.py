"""Fixtures for tests that start real servers on 127.0.0.1 (free ports, logs captured)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

TELEMETRY_OFF = {
    "DO_NOT_TRACK": "1",
    "BENTOML_DO_NOT_TRACK": "true",
    "MLFLOW_ENABLE_TELEMETRY": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "FLWR_TELEMETRY_ENABLED": "0",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A server subprocess in its own process group, its output captured to `log_path`."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path, cwd: Path):
        self.command = command
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command,
            env=env,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_until(self, url: str, timeout_s: float = 180.0, headers: dict | None = None) -> float:
        """Poll `url` until it answers 200; return seconds waited. Fails with the server log."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.process.poll() is not None:
                pytest.fail(
                    f"server exited with {self.process.returncode} before {url} was ready:\n"
                    f"{self.log_tail()}"
                )
            try:
                if httpx.get(url, timeout=2.0, headers=headers).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        pytest.fail(f"{url} not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)  # our own session only
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=timeout_s)
            except ProcessLookupError:
                pass
        self._log.close()


@pytest.fixture(scope="module")
def port() -> int:
    """A free port for this module's server."""
    return free_port()


@pytest.fixture(scope="module")
def start_server(tmp_path_factory) -> Iterator:
    """Factory: ``start_server(command, env, cwd) -> ServerProcess``; stopped at module end."""
    servers: list[ServerProcess] = []
    logs = tmp_path_factory.mktemp("server-logs")

    def start(command: list[str], env: dict[str, str], cwd: Path) -> ServerProcess:
        full_env = {**os.environ, **TELEMETRY_OFF, **env}
        server = ServerProcess(command, full_env, logs / f"server-{len(servers)}.log", cwd)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def _import_bundle_tag(bundle_dir: Path, bento_home: Path, **kwargs) -> str:
    """Import a model bundle into the Bento store at `bento_home` in a subprocess (as
    `oncoflow` does); returns the Bento model tag. `kwargs` go to `import_bundle`."""
    from serving.launch import PROJECT_ROOT

    args = "".join(f", {key}={value!r}" for key, value in kwargs.items())
    code = (
        "from serving.packaging import import_bundle; "
        f"print(import_bundle({str(bundle_dir)!r}{args}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "BENTOML_HOME": str(bento_home), "BENTOML_DO_NOT_TRACK": "true"},
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def import_bundle_tag():
    """``import_bundle_tag(bundle_dir, bento_home, **import_bundle_kwargs) -> tag``."""
    return _import_bundle_tag


@pytest.fixture(scope="module")
def serve_bundle(start_server, port):
    """``serve_bundle(bundle_dir, bento_home, env) -> (base_url, process)``: import the bundle
    (no assistant index) and `bentoml serve` it on this module's port with `env` added; returns
    once /readyz answers."""
    from serving.launch import PROJECT_ROOT, serve_command, serve_env

    def serve(bundle_dir: Path, bento_home: Path, env: dict[str, str]):
        tag = _import_bundle_tag(bundle_dir, bento_home, assistant_index=False)
        command = serve_command("127.0.0.1", port)
        proc = start_server(command, serve_env(tag, bento_home, base={}) | env, PROJECT_ROOT)
        base = f"http://127.0.0.1:{port}"
        proc.wait_until(f"{base}/readyz")
        return base, proc

    return serve
