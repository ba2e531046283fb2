"""The whole pipeline on synthetic data through real Prefect, MLflow on SQLite and `bentoml serve`.

One module: run the flow twice (a good model, then a deliberately worse one), check the registry,
the Bento store and the built Bento, then serve the champion and ask it for a prediction.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from cli_runs import ONCOFLOW, ROOT, run_oncoflow, workspace_env
from PIL import Image
from server_process import free_port

pytestmark = pytest.mark.integration
SYNTHETIC = [
    "dataset=synthetic",
    "dataset.synthetic.n_per_class=40",
    "model=small_cnn",
    "trainer.batch_size=16",
    "validation.min_per_class=5",
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("workspace")


@pytest.fixture(scope="module")
def env(workspace) -> dict[str, str]:
    return workspace_env(workspace)


@pytest.fixture(scope="module")
def first_run(env) -> dict:
    return run_oncoflow(["run", *SYNTHETIC, "trainer.max_epochs=6"], env)


@pytest.fixture(scope="module")
def second_run(env, first_run) -> dict:
    # One DP-SGD epoch at a tiny learning rate: a worse model that must not take the alias.
    args = [
        "run",
        *SYNTHETIC,
        "privacy=dp_eps8",
        "trainer.imbalance=none",
        "trainer.max_epochs=1",
        "trainer.lr=0.00001",
        "package.build_bento=false",
    ]
    return run_oncoflow(args, env)


def test_first_run_trains_registers_and_packages(first_run, workspace):
    assert first_run["champion"] is True
    assert first_run["model_version"] == "1"
    assert first_run["test_metrics"]["accuracy"] >= 0.8
    assert sum(first_run["images"].values()) == 120
    assert first_run["bento_model"].startswith("oncoflow-model:")
    assert first_run["bento"], "bentoml build produced no Bento"
    run_dir = Path(first_run["run_dir"])
    for name in (
        "manifest.parquet",
        "split_report.json",
        "validation_report.json",
        "test_metrics.json",
        "confusion.png",
        "summary.json",
        "calibration.json",
        "reliability.png",
    ):
        assert (run_dir / name).exists(), name
    assert (workspace / "mlflow.db").exists()
    # calibrated on the validation split, measured on the test split, carried by the bundle
    calibration = json.loads((run_dir / "bundle" / "bundle.json").read_text())["calibration"]
    assert calibration["temperature"] > 0 and calibration["coverage"] == 0.9
    assert calibration["fitted_on"].startswith("validation split")
    assert calibration["dangerous"] == ["lesion_left", "lesion_right"]
    test = json.loads((run_dir / "test_metrics.json").read_text())["calibration"]
    assert test["nll_after"] <= test["nll_before"] + 0.05
    assert 1.0 <= test["conformal"]["mean_set_size"] <= 3.0
    assert first_run["calibration"]["conformal"]["referral_rate"] == pytest.approx(
        test["conformal"]["referral_rate"]
    )


def test_worse_model_does_not_take_the_champion_alias(first_run, second_run, env):
    assert second_run["model_version"] == "2"
    privacy = second_run["privacy"]
    assert 0 < privacy["epsilon"] <= privacy["epsilon_budget"] == 8.0
    assert privacy["delta"] == pytest.approx(1e-5)
    assert second_run["champion"] is False
    assert "champion" in second_run["gate_reason"]
    code = (
        "import mlflow, json, sys;"
        "c = mlflow.MlflowClient(sys.argv[1]);"
        "print(json.dumps({a: str(c.get_model_version_by_alias('oncoflow-synthetic', a).version)"
        " for a in ('champion', 'challenger')}))"
    )
    uri = f"sqlite:///{env['ONCOFLOW_WORKSPACE']}/mlflow.db"
    out = subprocess.run(
        [sys.executable, "-c", code, uri], env=env, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"champion": "1", "challenger": "2"}


def test_served_champion_answers_predict(first_run, second_run, env, start_server):
    from components.bundle import ModelBundle
    from components.data.synthetic import make_synthetic

    port = free_port()
    key = "integration-test-key"
    server = start_server(
        [*ONCOFLOW, "serve", "--port", str(port), "--model", first_run["bento_model"]],
        {**env, "ONCOFLOW_API_KEYS": key},
        ROOT,
    )
    server.wait_until(f"http://127.0.0.1:{port}/readyz", timeout_s=240)

    data = make_synthetic(n_per_class=2, size=32, seed=999)
    image = Image.fromarray(data.images[-1])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    headers = {"Authorization": f"Bearer {key}"}
    url = f"http://127.0.0.1:{port}/predict"
    response = httpx.post(
        url,
        files={"image": ("case.png", buffer.getvalue(), "image/png")},
        headers=headers,
        timeout=60,
    )
    assert response.status_code == 200, response.text
    body = response.json()

    bundle = ModelBundle.load(Path(first_run["run_dir"]) / "bundle")
    model = bundle.build_model()
    import torch

    with torch.no_grad():
        logits = model(bundle.preprocessing.to_tensor(image)[None])
        expected = torch.softmax(logits / bundle.calibration["temperature"], 1)[0]
    assert body["label"] == bundle.class_names[int(expected.argmax())]
    assert body["calibrated"] is True and body["prediction_set"][0] == body["label"]
    assert body["refer"] is (len(body["prediction_set"]) > 1) and body["referral_reason"]
    for name, p in zip(bundle.class_names, expected.tolist(), strict=True):
        assert body["probabilities"][name] == pytest.approx(p, abs=1e-4)
    assert str(body["model"]["version"]) == "1"

    garbage = httpx.post(
        url, files={"image": ("x.png", b"not an image", "image/png")}, headers=headers, timeout=30
    )
    assert 400 <= garbage.status_code < 500
    assert "error" in garbage.json()
    assert np.isclose(sum(body["probabilities"].values()), 1.0, atol=1e-4)


def test_federated_training_runs_through_the_same_pipeline(second_run, env):
    summary = run_oncoflow(
        [
            "run",
            *SYNTHETIC,
            "training=federated",
            "federation.engine=inline",
            "federation.num_sites=3",
            "federation.partition=iid",
            "federation.rounds=2",
            "federation.local_epochs=1",
            "privacy=dp_eps8",  # DP-SGD inside every site
            "trainer.imbalance=none",
            "package.build_bento=false",
        ],
        env,
    )
    assert summary["training"] == "federated"
    assert summary["federation"]["rounds"] == 2
    assert summary["federation"]["sites"] == 3
    assert summary["federation"]["status"] == "completed"
    assert summary["model_version"] == "3"
    assert (Path(summary["run_dir"]) / "site_report.json").exists()
    # calibrated from the sites' validation sums (never pooled), measured on the test split
    calibration = summary["calibration"]
    assert calibration["fitted_on"].startswith("validation splits of 3 sites")
    assert calibration["temperature"] > 0 and calibration["conformal"]["mean_set_size"] >= 1
    # the rounds reached MLflow as they ended, in the run that was then registered
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{env['ONCOFLOW_WORKSPACE']}/mlflow.db")
    history = client.get_metric_history(summary["mlflow_run_id"], "server.macro_f1")
    stamps = [m.timestamp for m in sorted(history, key=lambda m: m.step)]
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2]
    assert stamps[0] < stamps[1]  # each round's own end time
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["federation.status"] == "completed"
    assert "privacy.site_epsilon.site-1" in run.data.metrics
    status = subprocess.run(
        [*ONCOFLOW, "fl", "status", summary["run_dir"], "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert status.returncode == 0, status.stderr[-2000:]
    report = json.loads(status.stdout)
    assert report["state"] == "completed" and report["rounds_done"] == 2
    assert {s["site"]: s["status"] for s in report["sites"]} == dict.fromkeys(
        ("site-1", "site-2", "site-3"), "accepted"
    )
    assert all(0 < s["epsilon"] <= 8.0 for s in report["sites"])
    privacy = summary["privacy"]
    assert privacy["mode"] == "dp_sgd" and privacy["level"].startswith("sample")
    assert len(privacy["per_site"]) == 3
    worst = max(site["epsilon"] for site in privacy["per_site"].values())
    assert privacy["epsilon"] == pytest.approx(worst)
    assert 0 < privacy["epsilon"] <= 8.0
    # the model card's facts travel in the bundle
    from components.bundle import ModelBundle

    bundle = ModelBundle.load(Path(summary["run_dir"]) / "bundle")
    assert bundle.privacy["epsilon"] == pytest.approx(privacy["epsilon"])
    assert bundle.architecture_kwargs["norm"] == "group"


def test_fl_prepare_writes_one_directory_per_site_and_the_run_spec(env, tmp_path):
    root = tmp_path / "federation"
    summary = run_oncoflow(
        [
            "fl",
            "prepare",
            str(root),
            *SYNTHETIC,
            "federation.num_sites=3",
            "federation.partition=iid",
            "privacy=secagg",
        ],
        env,
    )
    assert len(summary["sites"]) == 3
    for site_dir in map(Path, summary["sites"].values()):
        assert sorted(p.name for p in site_dir.iterdir()) == ["site.json", "train.npz", "val.npz"]
    spec = json.loads(Path(summary["spec"]).read_text())
    assert spec["privacy"]["mode"] == "secagg" and len(spec["sites"]) == 3
    assert (root / "server" / "test.npz").exists()  # the test split stays with the server
    total = sum(site["train"] for site in summary["site_report"]["sites"].values())
    assert total == summary["site_report"]["train_total"] > 0
