"""Flower over TLS with the certificates of deployments/flower/certs/generate.sh.

A SuperLink serves HTTPS with the generated server certificate; a SuperNode that trusts the
generated CA registers with it, and one that trusts a different CA is refused.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from server_process import free_port

from components.telemetry import TELEMETRY_OFF

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deployments" / "flower" / "certs" / "generate.sh"
BIN = Path(sys.executable).parent


def _certs(directory: Path) -> Path:
    done = subprocess.run(
        [str(SCRIPT), str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "FLOWER_KEY_BITS": "2048"},  # quicker; the chain is the same
    )
    assert done.returncode == 0, done.stderr
    return directory


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    return _certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def superlink(certs, start_server, port, tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("flwr-home")
    server = start_server(
        [
            str(BIN / "flower-superlink"),
            f"--ssl-ca-certfile={certs / 'ca.crt'}",
            f"--ssl-certfile={certs / 'server.pem'}",
            f"--ssl-keyfile={certs / 'server.key'}",
            "--host=127.0.0.1",
            f"--port={port}",
            "--isolation=process",
        ],
        {"FLWR_HOME": str(home)},
        home,
    )
    _wait_for_tls(port, certs / "ca.crt", server)
    return {"port": port, "server": server, "home": home}


def _wait_for_tls(port: int, ca: Path, server, timeout_s: float = 120) -> None:
    context = ssl.create_default_context(cafile=str(ca))
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if server.process.poll() is not None:
            pytest.fail(f"SuperLink exited:\n{server.log_tail()}")
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=3) as raw,
                context.wrap_socket(raw, server_hostname="localhost"),
            ):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"SuperLink TLS not up after {timeout_s:.0f} s:\n{server.log_tail()}")


def _supernode_command(superlink: dict, ca: Path, runtime_port: int) -> list[str]:
    return [
        str(BIN / "flower-supernode"),
        f"--superlink=127.0.0.1:{superlink['port']}",
        f"--root-certificates={ca}",
        "--isolation=process",
        f"--port={runtime_port}",
        "--max-retries=2",
        "--max-wait-time=15",
    ]


def _env(superlink: dict) -> dict[str, str]:
    return {**os.environ, **TELEMETRY_OFF, "FLWR_HOME": str(superlink["home"])}


def test_the_certificate_is_served_for_the_superlinks_names(superlink, certs):
    context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    with (
        socket.create_connection(("127.0.0.1", superlink["port"]), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        names = {value for _, value in tls.getpeercert()["subjectAltName"]}
    assert {"superlink", "flower-superlink", "localhost"} <= names


def test_a_supernode_that_trusts_the_ca_registers(superlink, certs, tmp_path):
    log = tmp_path / "supernode.log"
    with open(log, "wb") as out:
        node = subprocess.Popen(
            _supernode_command(superlink, certs / "ca.crt", free_port()),
            env=_env(superlink),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        started = time.monotonic()
        while time.monotonic() - started < 90:
            if "Activated node_id" in superlink["server"].log_tail(200):
                break
            assert node.poll() is None, log.read_text()[-3000:]
            time.sleep(1)
        else:
            pytest.fail(f"no SuperNode registered:\n{superlink['server'].log_tail()}")
    finally:
        node.terminate()
        try:
            node.wait(timeout=20)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()
    assert "CERTIFICATE_VERIFY_FAILED" not in log.read_text()


def test_a_supernode_with_another_ca_is_refused(superlink, tmp_path):
    other = _certs(tmp_path / "other-ca")
    command = _supernode_command(superlink, other / "ca.crt", free_port())
    done = subprocess.run(command, env=_env(superlink), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in done.stdout + done.stderr
