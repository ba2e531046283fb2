"""Faults of a real federation, on real SuperLink/SuperNodes (`LocalDeployment`, TLS) and
small synthetic hospitals; each ends as deployments/README.md section 6 documents, with the
reason at the coordinator (`oncoflow fl status`, run_state.json / preflight.json, and the
MLflow run's tags where the coordinator's flow runs):

- a site whose data fails validation stops `oncoflow site prepare` (exit 2, the report stays
  at the site, no partition), cannot start its SuperNode, and the coordinator's preflight lists
  it as not connected; a site that refuses the spec is listed as refused with its reason
  (default suite: one preflight phase through the SuperLink);
- a site killed mid-round (SIGKILL of its SuperNode): the round goes on with the others, the
  site shows as failed with a sanitised reason within the round timeout (slow);
- a SuperLink restart mid-run: the run in progress is lost with its ServerApp; the
  coordinator's flow fails with that reason (run_state.json, fl status, MLflow), within a
  bounded time (slow; the record it leaves is also checked on its own, in the default suite).

The SuperLink/SuperNodes and the coordinator's flow run a snapshot of the sources taken at the
start: a site's approval binds the fingerprint of the code it runs, and the working tree may
change while the test runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_config import tiny_overrides

from components.config import compose, to_container
from components.data.synthetic import write_synthetic_folder
from components.errors import DataError
from components.federated import approval, site_prepare
from components.federated.coordinator import (
    FederationConnection,
    coordinator_layout,
    request_path,
)
from components.federated.deployment import supernode_command
from components.federated.local_deployment import LocalDeployment
from components.federated.preflight import read_preflight
from components.federated.status import read_status
from components.telemetry import TELEMETRY_OFF

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("components", "flows", "validation", "serving", "conf")


def federation_overrides(**federation) -> list[str]:
    fed = {
        "engine": "deployment",
        "rounds": 2,
        "local_epochs": 1,
        "min_fit_sites": 2,
        "min_available_sites": 2,
        "connect_timeout": 20,
        "round_timeout": 90,
    } | federation
    return tiny_overrides(
        "training=federated",
        "dataset=synthetic",
        "dataset.adapter=folder",
        "model.norm=group",
        "package.build_bento=false",
        validation={"min_per_class": 2},
        trainer={"batch_size": 8, "imbalance": "none"},
        federation=fed,
    )


@pytest.fixture
def sources(tmp_path, monkeypatch) -> Path:
    """A snapshot of the sources for every process this test starts, and the fingerprint of
    that snapshot for the approvals written here."""
    target = tmp_path / "src"
    for name in SOURCES:
        shutil.copytree(ROOT / name, target / name, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setenv("PYTHONPATH", str(target))
    fingerprint = approval.code_fingerprint.__wrapped__(str(target))
    monkeypatch.setattr(approval, "code_fingerprint", lambda root=None: fingerprint)
    return target


def prepare_site(cfg, folder: Path, name: str, site_dir: Path) -> None:
    """What `oncoflow site prepare` does, in this process (the flow's steps, without Prefect)."""
    ctx = site_prepare.site_context(cfg, folder, name, site_dir)
    frame = site_prepare.validate_site(
        ctx, site_prepare.split_site(ctx, site_prepare.ingest_site(ctx))
    )
    arrays = site_prepare.site_arrays(ctx, frame)
    site_prepare.write_site_partition(ctx, arrays)
    site_prepare.compute_site_stats(ctx, frame, arrays)


def hospitals(tmp_path: Path, cfg, names, n_per_class: int = 10) -> dict[str, Path]:
    dirs = {}
    for seed, name in enumerate(names):
        folder = tmp_path / "data" / name
        write_synthetic_folder(folder, n_per_class=n_per_class, size=32, seed=seed)
        dirs[name] = tmp_path / "sites" / name
        prepare_site(cfg, folder, name, dirs[name])
    return dirs


def approve_all(layout, dirs: dict[str, Path], refusals: dict[str, str] | None = None) -> None:
    request = approval.read_request(request_path(layout))
    for name, site_dir in dirs.items():
        why = (refusals or {}).get(name)
        approval.decide(site_dir, request, accept=why is None, reason=why or "")


def oncoflow(*args: str, sources: Path, env: dict[str, str] | None = None, timeout: float = 600):
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=sources,
        env={**os.environ, **TELEMETRY_OFF, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def wait_for(predicate, timeout: float, what: str, deployment: LocalDeployment):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}\n{deployment.log_tail()}")


# --------------------------------------------------------------------------- default suite


def test_a_site_failing_validation_and_a_refusing_site_are_named_by_the_preflight(
    tmp_path, sources, capsys
):
    overrides = federation_overrides(rounds=1, connect_timeout=5)
    cfg = to_container(compose(overrides))

    # east's folder has 6 images of each class; its suite wants at least 20 per class. Its
    # `oncoflow site prepare` runs meanwhile (a process of its own, as at a hospital).
    east_data, east = tmp_path / "data" / "east", tmp_path / "sites" / "east"
    write_synthetic_folder(east_data, n_per_class=6, size=32, seed=9)
    strict = [o for o in overrides if not o.startswith("validation.")]
    strict.append("validation.min_per_class=20")
    east_prepare = subprocess.Popen(
        [
            sys.executable, "-m", "flows.cli", "site", "prepare", str(east_data),
            "--site", "east", "--out", str(east), *strict,
        ],
        cwd=sources,
        env={**os.environ, **TELEMETRY_OFF, "ONCOFLOW_WORKSPACE": str(tmp_path / "east-ws")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip

    dirs = hospitals(tmp_path, cfg, ["north", "south"])
    layout = coordinator_layout(cfg, ["north", "south", "east"], tmp_path / "fed", site_dirs=dirs)
    approve_all(layout, dirs, refusals={"south": "our ethics board has not reviewed this study"})
    with LocalDeployment(layout, tls=True) as deployment:
        deployment.start_superlink()
        for name in dirs:
            deployment.start_supernode(name)
        FederationConnection(flwr_home=deployment.flwr_home).run(layout, "preflight")

    _, err = east_prepare.communicate(timeout=600)
    assert east_prepare.returncode == 2, err[-3000:]
    assert "validation FAILED" in err  # the readable summary, on the site's terminal
    assert "site east is not ready: its data failed validation (class_min_count)" in err
    report = json.loads((east / "validation_report.json").read_text())
    assert report["passed"] is False and report["failed"] == ["class_min_count"]
    assert not [p.name for p in east.iterdir() if p.suffix == ".npz" or p.name == "site.json"]
    with pytest.raises(DataError, match="no site data"):  # `oncoflow fl supernode` refuses
        supernode_command(east, superlink="127.0.0.1:9092", insecure=True)

    report = read_preflight(layout.out_dir)
    assert report is not None and report["ok"] is False and report["approved"] == ["north"]
    sites = report["sites"]
    assert sites["south"]["status"] == "refused"
    assert "ethics board has not reviewed" in sites["south"]["reason"]
    assert (sites["east"]["status"], sites["east"]["reason"]) == ("absent", "not connected")
    assert sites["north"]["stats"]["num_images"]["train"] > 0

    from flows.cli import main

    capsys.readouterr()
    assert main(["fl", "status", str(layout.root), "--json"]) == 1  # refused: not ok
    status = json.loads(capsys.readouterr().out)
    assert status["state"] == "refused" and status["rounds_done"] == 0
    assert "1 of 3 site(s) approved (minimum 2)" in status["reason"]["message"]
    by_site = {s["site"]: s for s in status["sites"]}
    assert by_site["south"]["status"] == "refused"
    assert "ethics board" in by_site["south"]["message"]
    assert by_site["east"]["status"] == "absent"
    assert by_site["north"]["status"] == "approved"


def test_a_run_lost_with_its_serverapp_is_recorded_as_interrupted_once(tmp_path):
    """What the coordinator's wait writes when the SuperLink restart killed the round driver
    (the slow test below does it for real): only over a run still marked running."""
    from components.federated.checkpoint import write_ledger
    from components.federated.status import record_interrupted, update_run_state

    out = tmp_path / "server" / "out"
    update_run_state(out, state="running", rounds_planned=3, sites=["a", "b"])
    update_run_state(out, current={"round": 2, "phase": "training", "failures": []})
    write_ledger(out / "ledger.jsonl", [{"round": 1, "sites": {}}])
    why = "federated run 7 ended as finished:failed; `flwr log 7` at /srv/coordinator/x"
    assert record_interrupted(out, why)["state"] == "failed"
    status = read_status(tmp_path)
    assert status.state == "failed" and not status.ok and status.current is None
    assert status.reason["category"] == "interrupted"
    assert "during round 2 (federated run 7 ended as finished:failed)" in status.reason["message"]
    assert "1 round(s)" in status.reason["message"] and "/srv" not in status.reason["message"]
    assert record_interrupted(out, "again") is None  # the end is recorded once


# --------------------------------------------------------------------------- slow


class Coordinator:
    """`oncoflow fl coordinate` (the coordinator's flow) in a subprocess against a deployment."""

    def __init__(self, tmp_path: Path, deployment: LocalDeployment, sites, overrides, sources):
        self.workspace = tmp_path / "coordinator"
        env = {
            **os.environ,
            **TELEMETRY_OFF,
            "ONCOFLOW_WORKSPACE": str(self.workspace),
            "PREFECT_HOME": str(self.workspace / "prefect"),
            "BENTOML_HOME": str(self.workspace / "bentoml"),
            "PYTHONUNBUFFERED": "1",
        }
        args = [a for s in sites for a in ("--site", s)]
        self.stdout, self.stderr = tmp_path / "coordinator.out", tmp_path / "coordinator.err"
        with self.stdout.open("w") as out, self.stderr.open("w") as err:
            self.process = subprocess.Popen(
                [
                    sys.executable, "-m", "flows.cli", "fl", "coordinate", *args,
                    "--superlink", deployment.address,
                    "--root-cert", str(deployment.certs.ca_cert), *overrides,
                ],
                cwd=sources,
                env=env,
                stdout=out,
                stderr=err,
            )  # fmt: skip

    def federation(self) -> Path | None:
        """The run directory's federation root, once the flow has written it."""
        found = sorted(self.workspace.glob("runs/*/federation/server/out"))
        return found[-1].parents[1] if found else None

    def wait(self, timeout: float) -> tuple[int, str, str]:
        try:
            code = self.process.wait(timeout=timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
        return code, self.stdout.read_text(), self.stderr.read_text()


def _mlflow_run(workspace: Path, run_id: str | None = None):
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    if run_id:
        return client.get_run(run_id)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs, "the coordinator's flow opened no MLflow run"
    return runs[0]


@pytest.mark.slow
def test_a_site_killed_mid_round_shows_as_failed_and_the_others_finish(tmp_path, sources):
    overrides = federation_overrides()
    cfg = to_container(compose(overrides))
    names = ["north", "south", "east"]
    dirs = hospitals(tmp_path, cfg, names)
    layout = coordinator_layout(cfg, names, tmp_path / "fed", site_dirs=dirs)
    approve_all(layout, dirs)
    victim, log_name = "east", f"supernode-{dirs['east'].name}"
    round_timeout = cfg["federation"]["round_timeout"]
    with LocalDeployment(layout, tls=True) as deployment:
        deployment.start()
        coordinator = Coordinator(tmp_path, deployment, names, overrides, sources)
        wait_for(
            lambda: "Receiving: train message" in deployment.log_tail(log_name, lines=400),
            900,
            f"{victim} to receive its first train message",
            deployment,
        )
        deployment.kill_supernode(victim)  # the site's machine goes away mid-round
        killed_at = time.monotonic()
        root = coordinator.federation()

        def victim_failed():
            site = {s.site: s for s in read_status(root).sites}.get(victim)
            return site if site and site.status == "failed" else None

        seen = wait_for(victim_failed, round_timeout + 60, "the coordinator to see it", deployment)
        seen_after = time.monotonic() - killed_at
        code, out, err = coordinator.wait(timeout=1200)
    assert code == 0, err[-5000:]
    assert seen.category in ("timeout", "unavailable"), seen
    assert seen_after <= round_timeout + 60
    assert "/" not in (seen.message or "")  # sanitised: no path

    summary = json.loads(out[out.rfind("\n{\n") + 1 :])
    assert summary["approved"] == sorted(names) and summary["rounds"] == 2
    ledger = [json.loads(line) for line in (root / "server" / "out" / "ledger.jsonl").open()]
    assert ledger[0]["failed_sites"] == [victim]
    assert ledger[0]["accepted_sites"] == ["north", "south"]
    assert ledger[-1]["accepted"] == 2
    reason = ledger[0]["sites"][victim]["reason"]
    assert reason["category"] in ("timeout", "unavailable")

    proc = oncoflow("fl", "status", str(root), "--json", sources=sources)
    status = json.loads(proc.stdout)
    assert proc.returncode == 0 and status["state"] == "completed"
    last = {s["site"]: s for s in status["sites"]}[victim]
    assert last["status"] == "failed" and last["category"] in ("timeout", "unavailable")

    run = _mlflow_run(coordinator.workspace, summary["mlflow_run_id"])
    assert run.data.tags["federation.status"] == "completed"
    tag = run.data.tags[f"federation.site.{victim}"]  # "failed (<category>: <message>)"
    assert tag.startswith("failed (") and seen.category in tag, tag
    evaluation = summary["pooled_metrics"]
    assert f"site.{victim}.macro_f1" not in evaluation and "site.north.macro_f1" in evaluation


@pytest.mark.slow
def test_a_superlink_restart_mid_run_fails_the_run_with_its_reason(tmp_path, sources):
    overrides = federation_overrides(rounds=3)
    cfg = to_container(compose(overrides))
    names = ["north", "south", "east"]
    dirs = hospitals(tmp_path, cfg, names)
    layout = coordinator_layout(cfg, names, tmp_path / "fed", site_dirs=dirs)
    approve_all(layout, dirs)
    with LocalDeployment(layout, tls=True) as deployment:
        deployment.start()
        coordinator = Coordinator(tmp_path, deployment, names, overrides, sources)
        ledger = wait_for(
            lambda: (
                (r := coordinator.federation())
                and (r / "server/out/ledger.jsonl").is_file()
                and (r / "server/out/ledger.jsonl").read_text().strip()
                and r
            ),
            900,
            "round 1 to end",
            deployment,
        )
        deployment.stop_superlink()  # SIGKILL: the coordinator's machine crashes ...
        restarted_at = time.monotonic()
        deployment.start_superlink()  # ... and comes back with its state database
        code, out, err = coordinator.wait(timeout=1200)
        ended_after = time.monotonic() - restarted_at
    root = ledger
    assert code != 0, out[-3000:]
    assert "interrupted" in err, err[-3000:]
    state = json.loads((root / "server" / "out" / "run_state.json").read_text())
    assert state["state"] == "failed"
    assert state["reason"]["category"] == "interrupted", state["reason"]
    assert "resume" in state["reason"]["message"] or "checkpoint" in state["reason"]["message"]
    proc = oncoflow("fl", "status", str(root), sources=sources)
    assert proc.returncode == 1 and "interrupted" in proc.stdout, proc.stdout
    run = _mlflow_run(coordinator.workspace)
    assert run.info.status == "FAILED"
    assert run.data.tags["federation.status"] == "failed"
    assert "interrupted" in run.data.tags.get("federation.reason", ""), run.data.tags
    assert ended_after < 600, ended_after  # bounded: not the whole run budget
