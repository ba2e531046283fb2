"""prefect.yaml against a real Prefect server and process worker.

`oncoflow prefect up` starts `prefect server start` on a free port and a process worker
(PREFECT_HOME in a temporary workspace); `deploy` creates the work pool and runs
`prefect deploy --all`. Then: the declared schedules, concurrency limits and triggers are on
the server; a run of the nightly deployment (with tiny synthetic overrides) is picked up by
the worker and registers a model version; its completion triggers promote-and-package with
the same overrides; an `oncoflow.data.arrived` event triggers data validation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
DEPLOY = [sys.executable, "-m", "flows.cli", "prefect"]
TRAIN_OVERRIDES = [
    "dataset=synthetic",
    "dataset.synthetic.n_per_class=20",
    "model=small_cnn",
    "trainer.max_epochs=2",
    "trainer.batch_size=16",
    "validation.min_per_class=3",
    "package.build_bento=false",
]
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _deploy_cli(args: list[str], env: dict[str, str], timeout: float = 600) -> dict:
    proc = subprocess.run(
        [*DEPLOY, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout[proc.stdout.index("{") :])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("workspace")


@pytest.fixture(scope="module")
def stack(workspace, port):
    """A server + process worker for this module, with every deployment of prefect.yaml."""
    env = {
        **os.environ,  # telemetry is off in the suite's environment (tests/conftest.py)
        "PREFECT_WORKER_QUERY_SECONDS": "2",  # pick runs up quickly
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("PREFECT_API_URL", None)
    ws = ["--workspace", str(workspace)]
    record = _deploy_cli([*ws, "up", "--port", str(port)], env)
    try:
        deployed = _deploy_cli([*ws, "deploy"], env)
        yield {"api": record["api_url"], "record": record, "deployed": deployed["deployments"]}
    finally:
        subprocess.run([*DEPLOY, *ws, "down"], cwd=ROOT, env=env, capture_output=True, timeout=120)


def _post(api: str, path: str, body: dict | None = None) -> list | dict:
    """POST to the Prefect API; a 503 (the server's SQLite busy for a moment, as when a worker
    and a deploy write at once) is retried, as Prefect's own client does."""
    for attempt in range(5):
        response = httpx.post(f"{api}{path}", json=body or {}, timeout=30)
        if response.status_code != 503:
            break
        time.sleep(2.0 * (attempt + 1))
    assert response.status_code < 300, response.text
    return response.json()


def _deployments(api: str) -> dict[str, dict]:
    return {d["name"]: d for d in _post(api, "/deployments/filter")}


def _flow_runs(api: str, flow_name: str) -> list[dict]:
    body = {"flows": {"name": {"any_": [flow_name]}}, "sort": "EXPECTED_START_TIME_ASC"}
    return _post(api, "/flow_runs/filter", body)


def _wait_final(api: str, run_id: str, worker_log: str, timeout_s: float = 900) -> dict:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        run = httpx.get(f"{api}/flow_runs/{run_id}", timeout=30).json()
        if run["state_type"] in FINAL:
            return run
        time.sleep(3)
    pytest.fail(f"flow run {run_id} not finished after {timeout_s:.0f} s:\n{_tail(worker_log)}")


def _wait_for_run_of(api: str, flow_name: str, worker_log: str, timeout_s: float = 300) -> dict:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        runs = _flow_runs(api, flow_name)
        if runs:
            return runs[0]
        time.sleep(3)
    pytest.fail(f"no {flow_name} run was triggered after {timeout_s:.0f} s:\n{_tail(worker_log)}")


def _tail(path: str, lines: int = 60) -> str:
    text = Path(path).read_text(errors="replace") if Path(path).exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def test_every_deployment_is_on_the_server_with_its_schedule(stack):
    deployments = _deployments(stack["api"])
    assert set(deployments) == {  # site-prepare is deployed by each hospital, not here
        "nightly-central",
        "weekly-federated",
        "validate-data",
        "promote-and-package",
        "federated-coordinator",
    }
    assert sorted(stack["deployed"]) == [
        "federated_pipeline/federated-coordinator",
        "promote_and_package/promote-and-package",
        "train_pipeline/nightly-central",
        "train_pipeline/weekly-federated",
        "validate_data/validate-data",
    ]

    def schedules(name: str) -> list[dict]:
        return [s["schedule"] for s in deployments[name]["schedules"] if s["active"]]

    assert schedules("nightly-central") == [
        {"cron": "0 2 * * *", "timezone": "UTC", "day_or": True}
    ]
    assert schedules("weekly-federated") == [
        {"cron": "0 3 * * 0", "timezone": "UTC", "day_or": True}
    ]
    (interval,) = schedules("validate-data")
    assert interval["interval"] == 21600.0
    assert schedules("promote-and-package") == []

    for name in deployments:
        d = deployments[name]
        assert d["work_pool_name"] == "oncoflow-process"
        assert d["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}
        ]
    assert deployments["nightly-central"]["parameters"] == {
        "overrides": ["dataset=brain_tumor_mri", "model=efficientnet_lite0"]
    }
    assert deployments["weekly-federated"]["parameters"] == {
        "overrides": ["training=federated", "federation=fedavg"]
    }


def test_training_runs_are_limited_to_one_at_a_time(stack):
    deployments = _deployments(stack["api"])
    for name in ("nightly-central", "weekly-federated"):
        d = deployments[name]
        assert d["work_queue_name"] == "training"
        assert d["global_concurrency_limit"]["limit"] == 1
        assert d["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    queue = httpx.get(
        f"{stack['api']}/work_pools/oncoflow-process/queues/training", timeout=30
    ).json()
    assert queue["concurrency_limit"] == 1
    pool = httpx.get(f"{stack['api']}/work_pools/oncoflow-process", timeout=30).json()
    assert pool["type"] == "process"


def test_triggers_are_declared_as_automations(stack):
    deployments = _deployments(stack["api"])
    automations = {a["name"]: a for a in _post(stack["api"], "/automations/filter")}
    package = automations["oncoflow-package-after-training"]
    assert package["trigger"]["expect"] == ["prefect.flow-run.Completed"]
    assert package["trigger"]["match_related"] == {
        "prefect.resource.role": "flow",
        "prefect.resource.name": "train_pipeline",
    }
    (action,) = package["actions"]
    assert action["type"] == "run-deployment"
    assert action["deployment_id"] == deployments["promote-and-package"]["id"]
    validate = automations["oncoflow-validate-on-new-data"]
    assert validate["trigger"]["expect"] == ["oncoflow.data.arrived"]
    assert validate["actions"][0]["deployment_id"] == deployments["validate-data"]["id"]


@pytest.fixture(scope="module")
def training_run(stack) -> dict:
    deployment = _deployments(stack["api"])["nightly-central"]
    created = _post(
        stack["api"],
        f"/deployments/{deployment['id']}/create_flow_run",
        {"parameters": {"overrides": TRAIN_OVERRIDES}},
    )
    return _wait_final(stack["api"], created["id"], stack["record"]["logs"]["worker"])


def test_worker_runs_the_nightly_deployment_and_registers_a_version(training_run, stack, workspace):
    assert training_run["state_type"] == "COMPLETED", (
        f"{training_run['state']['message']}\n{_tail(stack['record']['logs']['worker'])}"
    )
    assert training_run["parameters"] == {"overrides": TRAIN_OVERRIDES}
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    versions = client.search_model_versions("name='oncoflow-synthetic'")
    assert [str(v.version) for v in versions] == ["1"]
    run = client.get_run(versions[0].run_id)
    assert run.info.status == "FINISHED"
    assert 0.0 <= run.data.metrics["test_accuracy"] <= 1.0


def test_completed_training_triggers_promote_and_package(training_run, stack, workspace):
    worker_log = stack["record"]["logs"]["worker"]
    triggered = _wait_for_run_of(stack["api"], "promote_and_package", worker_log)
    # The automation passed the training run's own overrides through its template.
    assert triggered["parameters"]["overrides"] == TRAIN_OVERRIDES
    assert triggered["parameters"]["version"] == "champion"
    final = _wait_final(stack["api"], triggered["id"], worker_log)
    assert final["state_type"] == "COMPLETED", f"{final['state']['message']}\n{_tail(worker_log)}"
    (summary_file,) = workspace.glob("runs/*-promote-oncoflow-synthetic/summary.json")
    summary = json.loads(summary_file.read_text())
    assert summary["version"] == "1"
    assert "champion" in summary["aliases"]
    assert summary["bento_model"].startswith("oncoflow-model:")
    assert summary["bento"] is None  # package.build_bento=false came through the overrides
    assert (Path(summary["bundle_dir"]) / "bundle.json").is_file()
    model_dir = workspace / "bentoml" / "models" / "oncoflow-model"
    assert (model_dir / summary["bento_model"].split(":")[1] / "bundle.json").is_file()


def test_new_data_event_triggers_validation(stack, workspace):
    worker_log = stack["record"]["logs"]["worker"]
    overrides = ["dataset=synthetic", "dataset.synthetic.n_per_class=10"]
    env = {**os.environ, "PREFECT_HOME": str(workspace / "prefect")}
    announced = _deploy_cli(["data-arrived", *overrides, "--api-url", stack["api"]], env)
    assert announced == {"announced": "oncoflow.dataset.synthetic"}
    run = _wait_for_run_of(stack["api"], "validate_data", worker_log)
    assert run["parameters"] == {"overrides": overrides}
    final = _wait_final(stack["api"], run["id"], worker_log)
    assert final["state_type"] == "COMPLETED", f"{final['state']['message']}\n{_tail(worker_log)}"
    reports = list(workspace.glob("runs/*-synthetic-validate/validation_report.json"))
    assert len(reports) == 1
