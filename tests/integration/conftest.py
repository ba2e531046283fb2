"""Fixtures for tests that start real servers on 127.0.0.1 (free ports, logs captured)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_process import TELEMETRY_OFF, ServerProcess, free_port


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
        env={**os.environ, **TELEMETRY_OFF, "BENTOML_HOME": str(bento_home)},
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
def tiny_model_tag(tmp_path_factory) -> tuple[str, Path]:
    """(Bento model tag, BENTOML_HOME) of a tiny two-class image model ("a", "b"; 32 px, four
    SHAP references, no assistant index): for tests of server processes, not of predictions."""
    import torch

    from components.bundle_builder import make_bundle
    from components.data.preprocess import Preprocessing
    from components.models import build_model

    architecture = {"name": "small_cnn", "num_classes": 2, "in_channels": 3, "width": 4}
    torch.manual_seed(0)
    bundle = make_bundle(
        build_model(**architecture).eval(),
        architecture=architecture,
        class_names=["a", "b"],
        preprocessing=Preprocessing(size=32, channels=3),
        metrics={},
        data_fingerprint="c" * 64,
        config={},
        background_size=4,
        out_dir=tmp_path_factory.mktemp("bundle") / "b",
    )
    home = tmp_path_factory.mktemp("bentoml")
    return _import_bundle_tag(bundle, home, assistant_index=False), home


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
