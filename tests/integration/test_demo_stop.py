"""`oncoflow demo`'s serving stage leaves nothing running once it is stopped.

The demo starts `oncoflow serve` and `oncoflow ui` as children. Stopped with SIGTERM (what a
process manager or `kill` sends) it stops both as Ctrl-C does; killed outright (SIGKILL) it
takes both along (`serving.lifeline`). Either way no process of its tree stays behind and both
ports are free for the next demo.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import psutil
import pytest
from server_process import TELEMETRY_OFF, ServerProcess, free_port, port_is_free

# a service and a UI start per case (about a minute on two busy cores): `make test-slow`
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def serving_demo(tiny_model_tag, tmp_path) -> tuple[ServerProcess, int, int]:
    from serving.launch import PROJECT_ROOT

    tag, home = tiny_model_tag
    service_port, ui_port = free_port(), free_port()
    workspace = tmp_path / "workspace"
    code = (
        "from pathlib import Path; from flows.demo import _serve_service_and_ui; "
        f"raise SystemExit(_serve_service_and_ui({tag!r}, Path({str(workspace)!r})))"
    )
    env = {
        **os.environ,
        **TELEMETRY_OFF,
        "BENTOML_HOME": str(home),
        "ONCOFLOW_WORKSPACE": str(workspace),
        "ONCOFLOW_PORT": str(service_port),
        "ONCOFLOW_UI_PORT": str(ui_port),
        "ONCOFLOW_API_KEYS": "demo-stop-key",
        "ONCOFLOW_UI_ADMIN_PASSWORD": "demo-stop-password",
        "ONCOFLOW_CHAT": "0",
        "ONCOFLOW_TORCH_THREADS": "1",
    }
    env.pop("ONCOFLOW_ALLOW_NO_AUTH", None)
    demo = ServerProcess([sys.executable, "-c", code], env, tmp_path / "demo.log", PROJECT_ROOT)
    demo.wait_until(f"http://127.0.0.1:{ui_port}/", timeout_s=300)
    return demo, service_port, ui_port


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_stopped_demo_leaves_no_process_and_frees_its_ports(tiny_model_tag, tmp_path, sig):
    demo, service_port, ui_port = serving_demo(tiny_model_tag, tmp_path)
    tree = psutil.Process(demo.process.pid).children(recursive=True)
    try:
        commands = [" ".join(p.cmdline()) for p in tree]
        assert any(" serve " in c for c in commands) and any(" ui " in c for c in commands)
        os.kill(demo.process.pid, sig)  # the demo alone, not its process group
        demo.process.wait(timeout=60)
        if sig == signal.SIGTERM:
            assert demo.process.returncode == 0, demo.log_tail()
        _, alive = psutil.wait_procs(tree, timeout=60)
        assert not alive, [" ".join(p.cmdline()) for p in alive]
        deadline = time.monotonic() + 10
        while not (port_is_free(service_port) and port_is_free(ui_port)):
            assert time.monotonic() < deadline, "a port is still held"
            time.sleep(0.2)
    finally:
        demo.stop()
        for process in tree:  # what a failed case left behind
            if process.is_running():
                process.kill()
