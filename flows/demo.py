"""`oncoflow demo`: the main job — train on real data, register, package, serve, open the UI."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

# A CPU-friendly run on real data: brain MRI with its default recipe (conf/recipe/
# brain_tumor_mri.yaml: pretrained EfficientNet-Lite0 at 96 px, lr 1e-3, crop/gamma/blur
# augmentation), cut to 3 epochs of batch 64 (the full default: up to 10 epochs of batch 32) so
# that `make demo` reaches the UI in about a quarter of an hour on 2 cores (README "Demo").
DEMO_OVERRIDES = [
    "dataset=brain_tumor_mri",
    "trainer.max_epochs=3",
    "trainer.batch_size=64",
]


def demo(overrides: list[str], serve: bool = True) -> int:
    """Run the pipeline with the demo defaults (user overrides win), then serve service + UI."""
    from flows.runtime import prepare

    workspace = prepare([*DEMO_OVERRIDES, *overrides])
    from flows.pipeline import run_pipeline

    summary = run_pipeline([*DEMO_OVERRIDES, *overrides])
    print(json.dumps(summary, indent=2, default=str))
    if not serve:
        return 0
    model_tag = summary.get("bento_model")
    if not model_tag:  # a challenger: serve this registered model's champion, not any latest
        from flows.promote import promote_and_package

        champion = promote_and_package([*DEMO_OVERRIDES, *overrides], build_bento=False)
        model_tag = champion["bento_model"]
        print(
            f"oncoflow: the new model is a challenger; serving the champion "
            f"{champion['model_name']} v{champion['version']} ({model_tag}).",
            flush=True,
        )
    return _serve_service_and_ui(model_tag, workspace.root)


def _serve_service_and_ui(model_tag: str | None, workspace: Path) -> int:
    """Start `oncoflow serve` and `oncoflow ui` as child processes until Ctrl-C."""
    service_port = int(os.environ.get("ONCOFLOW_PORT", "3000"))
    ui_port = int(os.environ.get("ONCOFLOW_UI_PORT", "7860"))
    api_key = os.environ.get("ONCOFLOW_API_KEYS", "").split(",")[0] or secrets.token_urlsafe(24)
    admin = os.environ.get("ONCOFLOW_UI_ADMIN_USER") or "admin"
    password = os.environ.get("ONCOFLOW_UI_ADMIN_PASSWORD") or secrets.token_urlsafe(12)
    url = f"http://127.0.0.1:{service_port}"
    env = {
        **os.environ,
        "ONCOFLOW_API_KEYS": os.environ.get("ONCOFLOW_API_KEYS") or api_key,
        "ONCOFLOW_API_KEY": api_key,
        "ONCOFLOW_SERVICE_URL": url,
        "ONCOFLOW_WORKSPACE": str(workspace),
        "ONCOFLOW_UI_ADMIN_USER": admin,
        "ONCOFLOW_UI_ADMIN_PASSWORD": password,
    }
    from serving.launch import guarded

    cli = [sys.executable, "-m", "flows.cli"]
    service_cmd = [*cli, "serve", "--port", str(service_port)]
    if model_tag:
        service_cmd += ["--model", model_tag]
    # SIGTERM stops the demo as Ctrl-C does; a demo killed outright takes both children along
    signal.signal(signal.SIGTERM, _interrupt)
    service = subprocess.Popen(guarded(service_cmd), env=env)
    if not _wait_ready(f"{url}/readyz", service):
        service.terminate()
        print("oncoflow: the service did not become ready; see its log above.", file=sys.stderr)
        return 1
    ui = subprocess.Popen(guarded([*cli, "ui", "--port", str(ui_port)]), env=env)
    print(
        "\n".join(
            [
                "",
                f"Clinician UI: http://127.0.0.1:{ui_port}   (log in as {admin!r}, "
                f"password {password!r}; an existing UI database keeps its own admin)",
                f"Service:      {url}   (OpenAPI: {url}/docs)",
                f"API key:      {api_key}   (send 'Authorization: Bearer <key>')",
                f"Try:          curl -H 'Authorization: Bearer {api_key}' "
                f"-F image=@<file.jpg> {url}/predict",
                f"MLflow UI:    .venv/bin/mlflow ui --backend-store-uri sqlite:///{workspace}/mlflow.db",
                "Stop with Ctrl-C.",
                "",
            ]
        ),
        flush=True,
    )
    try:
        while service.poll() is None and ui.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        for child in (ui, service):
            if child.poll() is None:
                child.send_signal(signal.SIGINT)
        for child in (ui, service):
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.kill()
    return 0


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def _wait_ready(url: str, process: subprocess.Popen, timeout_s: float = 300) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(1)
    return False
