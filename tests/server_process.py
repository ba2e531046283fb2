"""Real server processes for tests: free ports, a subprocess in its own session with its
output in a log file, stopped with its whole process group. Shared by the integration and
browser test fixtures (tests/ is on pytest's `pythonpath`)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from components.net import free_port
from components.telemetry import TELEMETRY_OFF


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


def port_is_free(port: int) -> bool:
    """Whether a server could bind 127.0.0.1:`port` now."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


__all__ = ["TELEMETRY_OFF", "ServerProcess", "free_port", "port_is_free"]
