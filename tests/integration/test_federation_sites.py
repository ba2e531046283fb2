"""`oncoflow fl local`: three hospitals' folders (written by bench/make_hospital_folders.py)
become three prepared sites that approve the spec; a SuperLink and three SuperNodes (TLS) run
the federation; the coordinator's flow evaluates on the sites' own test splits, registers the
pooled result in MLflow and packages the champion. Nothing the coordinator wrote names a
site's files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hospitals import OVERRIDES, write_hospitals

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # ~4 min on a busy 2-core machine
ROOT = Path(__file__).resolve().parents[2]


def test_three_hospitals_train_evaluate_register_and_package(tmp_path):
    folders = write_hospitals(tmp_path / "hospitals")
    workspace = tmp_path / "workspace"
    env = {
        **os.environ,
        "ONCOFLOW_WORKSPACE": str(workspace),
        "BENTOML_HOME": str(workspace / "bentoml"),
        "PREFECT_HOME": str(workspace / "prefect"),
        "PYTHONUNBUFFERED": "1",
    }
    sites = [f"--site=hospital-{i}={folders / f'hospital-{i}'}" for i in (1, 2, 3)]
    overrides = [
        *OVERRIDES,
        "federation.rounds=2",
        "federation.engine=deployment",
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
    approvals = [
        json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"site"')
    ]
    assert [a["decision"] for a in approvals] == ["accepted"] * 3
    summary = json.loads(proc.stdout[proc.stdout.rfind("\n{\n") + 1 :])
    assert summary["approved"] == ["hospital-1", "hospital-2", "hospital-3"]
    assert summary["rounds"] == 2 and summary["champion"] is True and summary["bento_model"]
    pooled = summary["pooled_metrics"]
    assert 0 <= pooled["macro_f1"] <= 1 and "site.hospital-2.macro_f1" in pooled

    run_dir = Path(summary["run_dir"])
    result = json.loads((run_dir / "federation" / "server" / "out" / "result.json").read_text())
    evaluation = result["federated_evaluation"]
    assert set(evaluation["sites"]) == {"hospital-1", "hospital-2", "hospital-3"}
    assert result["test_metrics"] == {}  # the coordinator holds no test set

    # what the coordinator side wrote names no site file (MLflow, bundle, run dir, logs)
    leaks = [str(folders), str(workspace / "local-federation" / "sites")]
    for path in [*run_dir.rglob("*"), *(workspace / "mlartifacts").rglob("*")]:
        if path.is_file() and path.suffix in {".json", ".md", ".txt", ".yaml", ".log"}:
            text = path.read_text(errors="replace")
            assert not any(leak in text for leak in leaks), path
