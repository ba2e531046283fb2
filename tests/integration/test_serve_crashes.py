"""`oncoflow serve` under kill -9, with real processes (the outside test's faults 3-5).

One tiny model, one server started the way an operator does (`serving.launch.serve`), then:
the explanation process is killed (it is started again, predictions go on, the worker stays),
the worker is killed in the middle of an upload (clients get a fast error, not a hang; the
server comes back by itself; nothing of the upload is on disk), then the `oncoflow serve`
process itself is killed (no BentoML process stays behind holding the port, and the next
`oncoflow serve` on the same port comes up).
"""

from __future__ import annotations

import io
import os
import signal
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from server_process import TELEMETRY_OFF, ServerProcess, free_port, port_is_free

# three server starts (about 20 s each on two busy cores): `make test-slow`
pytestmark = [pytest.mark.integration, pytest.mark.slow]

KEY = "crash-key-1"


@pytest.fixture(scope="module")
def spool(tmp_path_factory) -> Path:
    """The server's temp directory (TMPDIR): where an upload would land if it went to disk."""
    return tmp_path_factory.mktemp("server-tmp")


def start(tiny_model_tag, spool: Path, port: int, log: Path) -> ServerProcess:
    from serving.launch import PROJECT_ROOT

    tag, home = tiny_model_tag
    code = f"from serving.launch import serve; raise SystemExit(serve({tag!r}, port={port}))"
    env = {
        **os.environ,
        **TELEMETRY_OFF,
        "BENTOML_HOME": str(home),
        "ONCOFLOW_API_KEYS": KEY,
        "ONCOFLOW_CHAT": "0",
        "ONCOFLOW_TORCH_THREADS": "1",
        "TMPDIR": str(spool),
    }
    env.pop("ONCOFLOW_ALLOW_NO_AUTH", None)
    server = ServerProcess([sys.executable, "-c", code], env, log, PROJECT_ROOT)
    server.wait_until(f"http://127.0.0.1:{port}/readyz", timeout_s=240)
    return server


def workers(server: ServerProcess) -> list[psutil.Process]:
    return [
        p
        for p in psutil.Process(server.process.pid).children(recursive=True)
        if "_bentoml_impl.worker.service" in " ".join(p.cmdline())
    ]


def explainers(server: ServerProcess) -> list[psutil.Process]:
    """The explanation processes (serving.explainer) under the server, waiting for one."""
    deadline = time.monotonic() + 30
    while True:
        found = [
            p
            for p in psutil.Process(server.process.pid).children(recursive=True)
            if "serving.explainer" in " ".join(p.cmdline())
        ]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 20, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def spooled_files(spool: Path, needle: bytes) -> list[Path]:
    """Files under `spool` named like BentoML's request folders or holding `needle`."""
    found = []
    for path in spool.rglob("*"):
        if "bentoml-request-" in str(path):
            found.append(path)
        elif path.is_file():
            try:
                if needle in path.read_bytes():
                    found.append(path)
            except OSError:
                pass
    return found


def test_killed_worker_and_killed_launcher(tiny_model_tag, spool, tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {KEY}"}
    server = start(tiny_model_tag, spool, port, tmp_path / "serve-1.log")
    try:
        image = png()
        response = httpx.post(
            base + "/predict",
            files={"image": ("Doe_Jane_MRN123.png", image, "image/png")},
            headers=auth,
            timeout=60,
        )
        assert response.status_code == 200, response.text

        # -- the explanation process is killed: started again, the worker stays --------
        (worker,) = workers(server)
        explain = {"files": {"image": ("x.png", image, "image/png")}, "headers": auth}
        assert httpx.post(base + "/explain", timeout=120, **explain).status_code == 200
        (first,) = explainers(server)
        os.kill(first.pid, signal.SIGKILL)
        assert httpx.post(base + "/predict", timeout=60, **explain).status_code == 200
        answered = httpx.post(base + "/explain", timeout=120, **explain)
        if answered.status_code == 503:  # sent before the worker saw its child die
            answered = httpx.post(base + "/explain", timeout=120, **explain)
        assert answered.status_code == 200, answered.text
        (second,) = explainers(server)
        assert second.pid != first.pid and workers(server) == [worker]

        # -- the worker dies while an upload streams in ----------------------------------
        needle = image[-64:]

        def slow_body():
            boundary = b"--b0undary"
            yield boundary + b'\r\nContent-Disposition: form-data; name="image"; '
            yield b'filename="Doe_Jane_MRN123.png"\r\nContent-Type: image/png\r\n\r\n'
            yield image
            time.sleep(0.5)
            os.kill(worker.pid, signal.SIGKILL)  # mid-upload: the closing boundary never came
            time.sleep(1.0)
            yield b"\r\n" + boundary + b"--\r\n"

        with pytest.raises(httpx.HTTPError):
            httpx.post(
                base + "/predict",
                content=slow_body(),
                headers={**auth, "Content-Type": "multipart/form-data; boundary=b0undary"},
                timeout=60,
            )
        # clients of the dead worker get a fast error, not a wait in the listen queue
        started = time.monotonic()
        with pytest.raises(httpx.HTTPError):
            for _ in range(3):
                httpx.get(base + "/readyz", timeout=5).raise_for_status()
                time.sleep(0.3)
        assert time.monotonic() - started < 5
        waited = server.wait_until(base + "/readyz", timeout_s=240)  # restarted by itself
        print(f"back after {waited:.1f} s")
        assert httpx.post(
            base + "/predict", files={"image": ("x.png", image, "image/png")}, headers=auth
        ).is_success
        assert not spooled_files(spool, needle), "an upload was left on disk"
        assert not second.is_running(), "the dead worker's explanation process lives on"

        # -- the launcher itself is killed ----------------------------------------------
        children = psutil.Process(server.process.pid).children(recursive=True)
        assert children
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=10)
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, [p.cmdline() for p in alive]
        deadline = time.monotonic() + 10
        while not port_is_free(port) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert port_is_free(port), "a process still holds the port"
    finally:
        server.stop()

    again = start(tiny_model_tag, spool, port, tmp_path / "serve-2.log")  # the same port
    try:
        assert httpx.get(base + "/readyz", timeout=10).status_code == 200
    finally:
        again.stop()
    assert not spooled_files(spool, needle)
