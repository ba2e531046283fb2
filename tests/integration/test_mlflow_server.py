"""The pipeline against a real `mlflow server` over HTTP (server mode, proxied artifacts).

The server keeps runs in its own SQLite file and artifacts under its own
`--artifacts-destination`; the pipeline's workspace is elsewhere, as on another machine.
The registered version is then found through MLflow's REST API, and a second, empty
workspace (a serving machine) packages the champion by downloading it over HTTP.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
MODEL = "oncoflow-synthetic"
SYNTHETIC = [
    "dataset=synthetic",
    "dataset.synthetic.n_per_class=20",
    "model=small_cnn",
    "trainer.max_epochs=2",
    "trainer.batch_size=16",
    "validation.min_per_class=3",
    "package.build_bento=false",
]


def _json_tail(stdout: str) -> dict:
    return json.loads(stdout[stdout.rfind("\n{\n") + 1 :])


def _run(command: list[str], env: dict[str, str]) -> dict:
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return _json_tail("\n" + proc.stdout)


@pytest.fixture(scope="module")
def server(tmp_path_factory, start_server, port) -> dict:
    root = tmp_path_factory.mktemp("mlflow-server")
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    command = [
        *[mlflow, "server", "--host", "127.0.0.1", "--port", str(port)],
        *["--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"],
        *["--artifacts-destination", str(root / "artifacts"), "--serve-artifacts"],
        *["--workers", "1"],
    ]
    proc = start_server(command, {}, root)
    url = f"http://127.0.0.1:{port}"
    proc.wait_until(f"{url}/health", timeout_s=240)
    return {"url": url, "artifacts": root / "artifacts"}


def _env(workspace: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "ONCOFLOW_WORKSPACE": str(workspace),
        "BENTOML_HOME": str(workspace / "bentoml"),
        "PREFECT_HOME": str(workspace / "prefect"),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("PREFECT_API_URL", None)  # an ephemeral Prefect per run
    env.pop("MLFLOW_TRACKING_URI", None)  # the override below must be what is used
    return env


@pytest.fixture(scope="module")
def training(server, tmp_path_factory) -> dict:
    workspace = tmp_path_factory.mktemp("trainer-machine")
    overrides = [*SYNTHETIC, f"registry.tracking_uri={server['url']}"]
    summary = _run([sys.executable, "-m", "flows.cli", "run", *overrides], _env(workspace))
    return {"summary": summary, "workspace": workspace, "overrides": overrides}


def test_registered_version_is_visible_through_the_rest_api(server, training):
    assert training["summary"]["model_version"] == "1"
    api = f"{server['url']}/api/2.0/mlflow"
    model = httpx.get(f"{api}/registered-models/get", params={"name": MODEL}, timeout=30)
    assert model.status_code == 200, model.text
    assert model.json()["registered_model"]["name"] == MODEL

    found = httpx.get(
        f"{api}/model-versions/search", params={"filter": f"name='{MODEL}'"}, timeout=30
    ).json()["model_versions"]
    assert [v["version"] for v in found] == ["1"]
    version = found[0]
    assert version["run_id"] == training["summary"]["mlflow_run_id"]
    tags = {t["key"]: t["value"] for t in version.get("tags", [])}
    assert tags["gate_decision"] == "promoted"
    assert tags["gate_reason"].startswith("no champion yet")

    alias = httpx.get(
        f"{api}/registered-models/alias", params={"name": MODEL, "alias": "champion"}, timeout=30
    ).json()["model_version"]
    assert alias["version"] == "1"

    run = httpx.get(f"{api}/runs/get", params={"run_id": version["run_id"]}, timeout=30).json()
    metrics = {m["key"]: m["value"] for m in run["run"]["data"]["metrics"]}
    assert 0.0 <= metrics["test_accuracy"] <= 1.0


def test_artifacts_live_on_the_server_not_the_training_machine(server, training):
    bundles = list(server["artifacts"].rglob("bundle/bundle.json"))
    assert len(bundles) == 1, "the model bundle was not uploaded through the server"
    assert not (training["workspace"] / "mlartifacts").exists()
    assert not (training["workspace"] / "mlflow.db").exists()


def test_another_machine_packages_the_champion_over_http(server, training, tmp_path):
    serving = tmp_path / "serving-machine"
    command = [sys.executable, "-m", "flows.cli", "prefect", "promote", *training["overrides"]]
    first = _run(command, _env(serving))
    assert first["version"] == "1"
    assert first["downloaded"] is True
    assert first["imported"] is True
    assert first["bento"] is None
    bundle = Path(first["bundle_dir"])
    assert bundle.is_relative_to(serving)
    assert json.loads((bundle / "bundle.json").read_text())["class_names"] == [
        "healthy",
        "lesion_left",
        "lesion_right",
    ]
    stored = serving / "bentoml" / "models" / "oncoflow-model" / first["bento_model"].split(":")[1]
    assert (stored / "bundle.json").is_file()

    again = _run(command, _env(serving))  # same version: nothing to fetch or import
    assert (again["downloaded"], again["imported"]) == (False, False)
    assert again["bento_model"] == first["bento_model"]
