"""The coordinator's `federated_pipeline` end to end in one process (engine=inline): three
hospital folders become sites that approve the spec, the MLflow run opened before training gets
each round as it ends (its own end time), the federated evaluation's pooled and per-site
metrics, and the champion gate; nothing the coordinator wrote to MLflow names a site's files.
(The same flow through real SuperLink/SuperNodes: test_federation_sites.py, slow.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hospitals import OVERRIDES, write_hospitals

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_coordinator_flow_logs_rounds_live_and_registers_the_pooled_result(tmp_path):
    folders = write_hospitals(tmp_path / "hospitals", per_class=24)
    workspace = tmp_path / "workspace"
    env = {
        **os.environ,
        "ONCOFLOW_WORKSPACE": str(workspace),
        "PREFECT_HOME": str(workspace / "prefect"),
        "PYTHONUNBUFFERED": "1",
    }
    sites = [f"--site=h{i}={folders / f'hospital-{i}'}" for i in (1, 2, 3)]
    overrides = [
        *OVERRIDES,
        "federation.rounds=3",
        "federation.engine=inline",
        "package.build_bento=false",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "fl", "local", *sites, *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads(proc.stdout[proc.stdout.rfind("\n{\n") + 1 :])
    assert summary["approved"] == ["h1", "h2", "h3"] and summary["rounds"] == 3
    assert summary["champion"] is True

    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["federation.status"] == "completed"
    pooled = summary["pooled_metrics"]
    assert run.data.metrics["test_macro_f1"] == pytest.approx(pooled["macro_f1"])
    assert "site.h2.macro_f1" in pooled
    # calibrated from the sites' validation sums; measured on their pooled test sums
    run_dir = Path(summary["run_dir"])
    block = json.loads((run_dir / "bundle" / "bundle.json").read_text())["calibration"]
    assert block["temperature"] > 0 and 0 < block["qhat"] <= 1
    assert block["fitted_on"].startswith("validation splits of 3 sites")
    report = json.loads((run_dir / "calibration.json").read_text())
    assert report["n"] == pooled["n"] > 0
    assert 0 < report["conformal"]["coverage"] <= 1 and report["conformal"]["mean_set_size"] >= 1
    point = report["operating_point"]  # fitted on the sites' danger histograms
    assert point["fitted"]["sensitivity"] >= point["target_sensitivity"]
    assert point["test"]["n_positive"] + point["test"]["n_negative"] == report["n"]
    # each round was logged as it ended: one point per round, each with its own end time
    ledger = summary["run_dir"] + "/federation/server/out/ledger.jsonl"
    rows = [json.loads(line) for line in Path(ledger).read_text().splitlines()]
    series = client.get_metric_history(run.info.run_id, _round_metric(client, run.info.run_id))
    assert [p.step for p in series] == [1, 2, 3]
    ends = [p.timestamp for p in series]
    assert ends == sorted(ends) and len(set(ends)) == 3
    assert len(rows) == 3
    # nothing in the MLflow database names a hospital's folder or file
    db = (workspace / "mlflow.db").read_bytes()
    for folder in folders.iterdir():
        assert str(folder).encode() not in db
        for image in list(folder.rglob("*.png"))[:20]:
            assert image.name.encode() not in db


def _round_metric(client, run_id: str) -> str:
    """A server metric logged per round (the first one with three points)."""
    run = client.get_run(run_id)
    for key in sorted(run.data.metrics):
        if len(client.get_metric_history(run_id, key)) == 3:
            return key
    raise AssertionError(f"no per-round metric among {sorted(run.data.metrics)}")
