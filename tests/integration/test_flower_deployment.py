"""Flower's deployment engine for real: a SuperLink and one SuperNode per site as separate
processes on 127.0.0.1 (TLS on; SuperNode authentication in the first test), runs submitted
with `flwr run`. Each SuperNode reads only its own site directory.

These start ~5 Python processes plus one ClientApp process per site and message, so they take
minutes on a small machine: the two-round run is in the default suite, the kill/restart and
SecAgg+ runs are marked slow.
"""

from __future__ import annotations

import time

import psutil
import pytest
from tiny_config import tiny_cfg

from components.data.preprocess import Preprocessing
from components.data.synthetic import make_synthetic
from components.federated.checkpoint import read_ledger
from components.federated.layout import prepare_federation
from components.federated.local_deployment import LocalDeployment
from components.federated.result import load_result

pytestmark = pytest.mark.integration

SIZE = 16


def prepare(root, privacy=None, **federation):
    d = make_synthetic(n_per_class=10, size=SIZE, seed=0)
    x, y = d.images.transpose(0, 3, 1, 2).copy(), d.labels
    arrays = {"train": (x[:18], y[:18]), "val": (x[18:24], y[18:24]), "test": (x[24:], y[24:])}
    fed = {
        "engine": "deployment",
        "num_sites": 3,
        "partition": "iid",
        "rounds": 2,
        "evaluate_sites": False,
        "min_fit_sites": 2,
        "min_available_sites": 2,
        "round_timeout": 300,
    } | federation
    cfg = tiny_cfg(
        "training=federated",
        "seed=0",
        "model.norm=group",
        trainer={"batch_size": 8, "lr": 0.01, "imbalance": "none", "augment": False},
        federation=fed,
        privacy=privacy or {"mode": "none"},
    )
    return prepare_federation(cfg, arrays, d.class_names, Preprocessing(SIZE, 3), root)


def wait_for(predicate, timeout: float, what: str, deployment: LocalDeployment) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}\n{deployment.log_tail()}")


def serverapps() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "flwr-serverapp" in cmd:
            found.append(proc)
    return found


def test_superlink_and_three_supernodes_complete_two_rounds(tmp_path):
    layout = prepare(tmp_path / "fed", evaluate_sites=True, min_fit_sites=3, min_available_sites=3)
    with LocalDeployment(layout, tls=True, supernode_auth=True) as deployment:
        deployment.start()
        processes = [deployment.superlink, *deployment.supernodes.values()]
        assert len({p.pid for p in processes}) == 4  # separate processes
        run_id = deployment.submit()
        assert deployment.wait(run_id) == "finished:completed"
        family = [c for p in processes for c in psutil.Process(p.pid).children(recursive=True)]
        for name in ("superlink", *(f"supernode-{p.name}" for p in layout.sites.values())):
            assert "--insecure" not in deployment.log_tail(name, lines=400)
    # everything the deployment started is gone
    assert all(p.poll() is not None for p in processes)
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not [c for c in alive if c.status() != psutil.STATUS_ZOMBIE]

    result = load_result(layout)
    assert [row["round"] for row in result.history] == [1, 2]
    for row in result.history:
        assert row["accepted"] == 3
        assert {s["status"] for s in row["sites"].values()} == {"accepted"}
        assert all("val_macro_f1" in s for s in row["sites"].values())  # evaluated on site
    for site_dir in layout.sites.values():
        assert (site_dir / "best_model" / "bundle.json").is_file()
    assert (layout.root / "certs" / "ca.crt").is_file()


@pytest.mark.slow
def test_secure_aggregation_with_site_dp_over_the_deployment_engine(tmp_path):
    privacy = {"mode": "secagg_dp", "epsilon": 8.0, "update_norm_bound": 5.0}
    layout = prepare(tmp_path / "fed", privacy, min_fit_sites=3, min_available_sites=3)
    with LocalDeployment(layout, tls=True) as deployment:
        deployment.start()
        assert deployment.wait(deployment.submit()) == "finished:completed"
    result = load_result(layout)
    assert [row["accepted"] for row in result.history] == [3, 3]
    assert all("update_norm" not in s for r in result.history for s in r["sites"].values())
    assert result.privacy["secure_aggregation"] and 0 < result.privacy["epsilon"] <= 8.0


@pytest.mark.slow
def test_a_supernode_killed_mid_run_does_not_stop_the_run(tmp_path):
    layout = prepare(tmp_path / "fed")
    victim = "site-3"
    log_name = f"supernode-{layout.sites[victim].name}"
    with LocalDeployment(layout, tls=True) as deployment:
        deployment.start()
        run_id = deployment.submit()
        wait_for(
            lambda: "Receiving: train message" in deployment.log_tail(log_name, lines=400),
            600,
            f"{victim} to receive its first train message",
            deployment,
        )
        deployment.kill_supernode(victim)  # the site's machine goes away mid-round
        assert deployment.wait(run_id) == "finished:completed"

    result = load_result(layout)
    assert [row["round"] for row in result.history] == [1, 2]
    assert result.history[-1]["accepted"] == 2
    failures = [r for r in result.rejected if r["site"] == victim]
    assert failures, result.rejected
    assert all(r["site"] == victim for r in result.rejected)


@pytest.mark.slow
def test_a_restarted_superlink_resumes_from_its_checkpoint(tmp_path):
    layout = prepare(tmp_path / "fed", rounds=3)
    first_checkpoint = layout.out_dir / "checkpoints" / "round-0001"
    with LocalDeployment(layout, tls=True) as deployment:
        deployment.start()
        deployment.submit()
        wait_for(first_checkpoint.exists, 900, "the round-1 checkpoint", deployment)
        deployment.stop_superlink()  # SIGKILL: the server machine crashes
        assert not serverapps()
        assert not (layout.out_dir / "result.json").exists()

        deployment.start_superlink()  # same state database: the SuperNodes are still known
        run_id = deployment.submit()
        assert deployment.wait(run_id) == "finished:completed"

    result = load_result(layout)
    assert 1 <= result.resumed_from < 3  # not round 1 again
    assert [row["round"] for row in result.history] == [1, 2, 3]
    assert [row["round"] for row in read_ledger(layout.out_dir / "ledger.jsonl")] == [1, 2, 3]
