"""The federated round driver end to end on the inline engine (same ServerApp driver and
ClientApp handlers as the Flower engines): learning, per-site evaluation and best local
models, hygiene, dropped sites, missing data, checkpoint/resume. One slow test runs Flower's
simulation engine (Ray) and checks it computes the same rounds."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from tiny_config import tiny_cfg

from components.bundle import ModelBundle
from components.data.preprocess import Preprocessing
from components.data.synthetic import make_synthetic
from components.errors import ConfigError, DataError
from components.federated.checkpoint import read_ledger
from components.federated.client_app import build_client_app
from components.federated.engines import run_prepared
from components.federated.inline import InlineGrid
from components.federated.layout import FederationLayout, prepare_federation
from components.federated.result import load_result
from components.federated.server_app import await_sites, run_federation

SIZE = 16
PREP = Preprocessing(size=SIZE, channels=3)


@pytest.fixture(scope="module")
def data():
    d = make_synthetic(n_per_class=30, size=SIZE, seed=0)
    x, y = d.images.transpose(0, 3, 1, 2).copy(), d.labels
    a, b = int(len(y) * 0.6), int(len(y) * 0.75)
    return {"train": (x[:a], y[:a]), "val": (x[a:b], y[a:b]), "test": (x[b:], y[b:])}, d.class_names


def config(**federation) -> dict:
    fed = {"engine": "inline", "num_sites": 3, "partition": "iid", "rounds": 2, "local_epochs": 2}
    return tiny_cfg(
        "training=federated",
        "seed=3",
        "model.norm=group",
        trainer={"batch_size": 8, "lr": 0.01, "imbalance": "none", "augment": False},
        federation=fed | federation,
    )


def prepare(data, root, **federation) -> FederationLayout:
    arrays, classes = data
    return prepare_federation(config(**federation), arrays, classes, PREP, root, threads=1)


def test_rounds_history_site_metrics_and_best_local_models(data, tmp_path):
    layout = prepare(data, tmp_path / "fed", rounds=2)
    assert sorted(layout.sites) == ["site-1", "site-2", "site-3"]
    result = run_prepared(layout)

    assert [row["round"] for row in result.history] == [1, 2]
    for row in result.history:
        assert row["accepted"] == 3 and row["rejected"] == row["failed"] == 0
        assert set(row["server"]) >= {"accuracy", "macro_f1", "macro_auroc", "loss"}
        assert set(row["sites"]) == set(layout.sites)
        for site in row["sites"].values():
            assert site["status"] == "accepted" and site["update_norm"] > 0
            assert 0 <= site["val_macro_f1"] <= 1 and site["num_examples"] > 0
        assert "val_macro_f1" in row["sites_eval"]
        assert row["round_seconds"] > 0
    assert result.round_seconds == [row["round_seconds"] for row in result.history]
    assert set(result.per_site) == set(layout.sites)
    assert [r["round"] for r in result.per_site["site-2"]] == [1, 2]

    # the returned model is the final global model: it reproduces the server's last score
    from components.evaluation.predict import predict_proba

    x_test, y_test = data[0]["test"]
    accuracy = float((predict_proba(result.model, x_test, PREP).argmax(1) == y_test).mean())
    assert accuracy == pytest.approx(result.history[-1]["server"]["accuracy"])
    assert result.test_metrics["accuracy"] == pytest.approx(accuracy)
    assert result.test_metrics["confusion_matrix"]

    # every site keeps its best model (a loadable bundle) on its own side
    for name, site_dir in layout.sites.items():
        meta = json.loads((site_dir / "best_model" / "best.json").read_text())
        assert meta["source"] in ("local", "global") and meta["round"] in (1, 2)
        bundle = ModelBundle.load(site_dir / "best_model")
        assert bundle.extra["site"] == name
        bundle.build_model()
        best = max(r["best_val_macro_f1"] for r in result.per_site[name])
        assert meta["val_macro_f1"] == pytest.approx(best)

    assert [row["round"] for row in read_ledger(result.out_dir / "ledger.jsonl")] == [1, 2]
    rows = result.mlflow_history()
    assert rows[0]["step"] == 1 and "macro_f1" in rows[0]["server"]


def test_a_nan_site_and_a_dropped_site_do_not_stop_the_round(data, tmp_path):
    layout = prepare(
        data,
        tmp_path / "fed",
        num_sites=4,
        rounds=2,
        min_fit_sites=2,
        min_available_sites=2,
        attack={"behaviour": "nan", "sites": ["site-2"]},
    )
    grid = InlineGrid(build_client_app(), [{"data-dir": str(p)} for p in layout.sites.values()])
    original = grid.send_and_receive

    def send_and_receive(messages, *, timeout=None):
        # site-4 (node 4) is sampled for round 2, then its machine goes away mid-round
        messages = list(messages)
        if int(messages[0].content["config"].get("server-round", 0)) == 2:
            grid.offline.add(4)
        return original(messages, timeout=timeout)

    grid.send_and_receive = send_and_receive
    result = run_federation(grid, layout.spec)
    first, second = result["history"]
    assert first["accepted"] == 3 and first["rejected"] == 1
    assert first["sites"]["site-2"]["status"] == "rejected"
    assert (second["accepted"], second["rejected"], second["failed"]) == (2, 1, 1)
    assert second["sites"]["site-4"]["status"] == "failed"
    reasons = [(r["round"], r["site"], r["reason"]) for r in result["rejected"]]
    assert (1, "site-2") in [(r, s) for r, s, _ in reasons]
    assert any("non-finite" in why for _, s, why in reasons if s == "site-2")
    assert any(s == "site-4" and "Node Unavailable" in why for r, s, why in reasons if r == 2)
    assert all(np.isfinite(v) for v in second["server"].values())


def test_missing_site_data_is_reported_per_site(data, tmp_path):
    layout = prepare(data, tmp_path / "fed", rounds=1, min_fit_sites=2)
    dirs = [str(p) for p in layout.sites.values()]
    dirs[2] = str(tmp_path / "not-there")
    grid = InlineGrid(build_client_app(), [{"data-dir": d} for d in dirs])
    result = run_federation(grid, layout.spec)
    # the preflight finds it (sanitised: no path) and the rounds go on without it
    sites = result["preflight"]["sites"]
    row = sites["node-3"]  # it could not even read its own name
    assert row["status"] == "site_data" and sites["site-3"]["status"] == "absent"
    assert "no site data in <path>" in row["reason"] and str(tmp_path) not in row["reason"]
    assert result["history"][0]["accepted"] == 2 and not result["rejected"]


def test_too_few_connected_sites_fail_instead_of_hanging(data, tmp_path):
    layout = prepare(data, tmp_path / "fed", rounds=1)
    grid = InlineGrid(build_client_app(), [{"data-dir": str(p)} for p in layout.sites.values()])
    grid.offline.update({2, 3})
    with pytest.raises(DataError, match="only 1 of 3 sites connected"):
        await_sites(grid, expected=3, minimum=2, timeout=0.5)


def test_an_interrupted_run_resumes_from_its_last_checkpoint(data, tmp_path):
    layout = prepare(data, tmp_path / "fed", rounds=3)
    train_rounds: list[int] = []

    class Crash(RuntimeError):
        pass

    def grid_that_crashes_in(round_to_crash: int | None) -> InlineGrid:
        grid = InlineGrid(build_client_app(), [{"data-dir": str(p)} for p in layout.sites.values()])
        original = grid.send_and_receive

        def send_and_receive(messages, *, timeout=None):
            messages = list(messages)
            config = messages[0].content["config"]
            if messages[0].metadata.message_type == "train":
                train_rounds.append(int(config["server-round"]))
                if int(config["server-round"]) == round_to_crash:
                    raise Crash("the server machine lost power")
            return original(messages, timeout=timeout)

        grid.send_and_receive = send_and_receive
        return grid

    with pytest.raises(Crash):
        run_federation(grid_that_crashes_in(2), layout.spec)
    assert train_rounds == [1, 2]
    assert not (layout.out_dir / "result.json").exists()

    result = run_federation(grid_that_crashes_in(None), layout.spec)
    assert train_rounds == [1, 2, 2, 3]  # round 1 was not trained again
    assert result["resumed_from"] == 1
    assert [row["round"] for row in result["history"]] == [1, 2, 3]
    assert [row["round"] for row in read_ledger(layout.out_dir / "ledger.jsonl")] == [1, 2, 3]
    assert load_result(layout).resumed_from == 1

    # other settings in the same directory: refused up front instead of mixed in
    with pytest.raises(ConfigError, match="different federation settings"):
        prepare(data, tmp_path / "fed", rounds=3, strategy="median")
    # ... and by the ServerApp too (a spec edited by hand, a deployment)
    other = prepare(data, tmp_path / "other", rounds=3, strategy="median")
    spec = dataclasses.replace(other.spec, out_dir=str(layout.out_dir))
    with pytest.raises(ConfigError, match="different federation settings"):
        run_federation(grid_that_crashes_in(None), spec)


def test_resume_is_equivalent_to_an_uninterrupted_run(data, tmp_path):
    straight = run_prepared(prepare(data, tmp_path / "a", rounds=2))
    layout = prepare(data, tmp_path / "b", rounds=1)
    run_prepared(layout)
    resumed = run_prepared(prepare(data, tmp_path / "b", rounds=2))
    assert resumed.resumed_from == 1
    for a, b in zip(straight.history, resumed.history, strict=True):
        assert a["server"]["accuracy"] == pytest.approx(b["server"]["accuracy"])
        assert a["server"]["loss"] == pytest.approx(b["server"]["loss"], rel=1e-5)


@pytest.mark.slow
def test_flower_simulation_engine_matches_the_inline_engine(data, tmp_path):
    """Flower's simulation engine (Ray, each site a virtual SuperNode) runs the same rounds."""
    inline = run_prepared(prepare(data, tmp_path / "inline", rounds=2))
    layout = prepare(
        data,
        tmp_path / "sim",
        rounds=2,
        engine="simulation",
        simulation={"cpus_per_site": 1, "total_cpus": 2, "threads_per_site": 1},
    )
    simulated = run_prepared(layout)
    assert [row["accepted"] for row in simulated.history] == [3, 3]
    for a, b in zip(inline.history, simulated.history, strict=True):
        assert a["server"]["accuracy"] == pytest.approx(b["server"]["accuracy"], abs=0.05)
    for site_dir in layout.sites.values():
        assert (site_dir / "best_model" / "bundle.json").is_file()


def test_a_prepared_federation_reopens_from_disk(data, tmp_path):
    layout = prepare(data, tmp_path / "fed", rounds=1)
    again = FederationLayout.open(tmp_path / "fed")
    assert again.spec == layout.spec and again.spec.fingerprint() == layout.spec.fingerprint()
    assert again.sites == layout.sites and again.report == layout.report
    assert "| site-1 |" in again.report_markdown
    with pytest.raises(DataError, match="no prepared federation"):
        FederationLayout.open(tmp_path / "elsewhere")


def test_cli_certs_writes_a_ca_a_server_certificate_and_site_keys(tmp_path):
    from components.federated import deployment

    paths = deployment.certs(
        tmp_path / "certs", hosts=["fl.example.org", "10.0.0.5"], sites=["site-1"]
    )
    assert all(Path(paths[k]).is_file() for k in ("ca_cert", "server_cert", "server_key"))
    assert Path(paths["supernode_keys"]["site-1"]["public"]).read_text().startswith("ecdsa-")
    with pytest.raises(ConfigError, match="no TLS certificates"):
        deployment.superlink(tmp_path / "nothing-here")
