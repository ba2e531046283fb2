"""What crossed the wire per site per round (`traffic.MeteredGrid`): a plain FedAvg round on
the inline engine sends each site the global model (train, and evaluate when sites evaluate)
and receives one model-sized update back; the ledger and `oncoflow fl status --json` say so."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny_config import tiny_cfg

from components.data.preprocess import Preprocessing
from components.data.synthetic import make_synthetic
from components.federated.checkpoint import read_ledger
from components.federated.client_app import build_client_app
from components.federated.inline import InlineGrid
from components.federated.layout import prepare_federation
from components.federated.server_app import run_federation
from components.federated.task import state_arrays
from components.federated.traffic import message_array_bytes
from flows.cli import main as oncoflow

SIZE = 16


@pytest.fixture(scope="module")
def data():
    d = make_synthetic(n_per_class=12, size=SIZE, seed=1)
    x, y = d.images.transpose(0, 3, 1, 2).copy(), d.labels
    a, b = int(len(y) * 0.6), int(len(y) * 0.8)
    return {"train": (x[:a], y[:a]), "val": (x[a:b], y[a:b]), "test": (x[b:], y[b:])}, d.class_names


def federate(data, root, *, evaluate_sites: bool):
    cfg = tiny_cfg(
        "training=federated",
        trainer={"batch_size": 8, "imbalance": "none"},
        federation={
            "engine": "inline",
            "num_sites": 3,
            "partition": "iid",
            "rounds": 2,
            "local_epochs": 1,
            "evaluate_sites": evaluate_sites,
        },
    )
    arrays, classes = data
    layout = prepare_federation(cfg, arrays, classes, Preprocessing(SIZE, 3), root, threads=1)
    grid = InlineGrid(build_client_app(), [{"data-dir": str(p)} for p in layout.sites.values()])
    run_federation(grid, layout.spec)
    model_bytes = sum(v.nbytes for v in state_arrays(layout.spec.model.build()).values())
    return layout, read_ledger(layout.out_dir / "ledger.jsonl"), model_bytes


@pytest.mark.parametrize("evaluate_sites", [False, True])
def test_each_site_gets_the_model_and_returns_one_update_per_round(
    data, tmp_path, capsys, evaluate_sites
):
    layout, ledger, model_bytes = federate(data, tmp_path / "fed", evaluate_sites=evaluate_sites)
    assert model_bytes > 10_000  # a real model, not an empty record
    sent = model_bytes * (2 if evaluate_sites else 1)  # train (+ evaluate) carry the model
    assert [row["round"] for row in ledger] == [1, 2]
    for row in ledger:
        assert row["bytes"] == {
            site: {"sent": sent, "received": model_bytes} for site in sorted(layout.sites)
        }

    capsys.readouterr()
    assert oncoflow(["fl", "status", str(layout.root), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    totals = {s["site"]: (s["bytes_sent"], s["bytes_received"]) for s in status["sites"]}
    assert totals == {site: (2 * sent, 2 * model_bytes) for site in layout.sites}


def test_an_error_reply_counts_nothing():
    from flwr.app import Array, ArrayRecord, Error, Message, RecordDict

    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros((3, 5), np.float32))})})
    message = Message(content=content, dst_node_id=1, message_type="train")
    assert message_array_bytes(message) == 3 * 5 * 4
    assert message_array_bytes(Message(Error(code=0, reason="down"), reply_to=message)) == 0
