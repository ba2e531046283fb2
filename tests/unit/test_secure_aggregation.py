"""SecAgg+ in the federated rounds (inline engine): what the server receives reveals no site's
update, the unmasked aggregate is FedAvg within the quantisation bound, sites that drop out
after sharing keys are left out of the sum, and per-update rules are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from tiny_config import tiny_cfg

from components.data.preprocess import Preprocessing
from components.data.synthetic import make_synthetic
from components.errors import ConfigError
from components.federated.client_app import build_client_app, handle_train
from components.federated.engines import run_prepared
from components.federated.inline import InlineGrid
from components.federated.layout import prepare_federation
from components.federated.protocol import SPEC_KEY, masked_names
from components.federated.secagg_server import aggregate_error_bound, secagg_settings, secure_round
from components.federated.server_app import roll_call
from components.federated.task import from_record, state_arrays, to_record
from components.privacy.settings import validate_privacy

SIZE = 16
PREP = Preprocessing(size=SIZE, channels=3)
SECAGG = {"mode": "secagg", "update_norm_bound": 5.0, "secagg": {"max_weight": 100.0}}


@pytest.fixture(scope="module")
def data():
    d = make_synthetic(n_per_class=20, size=SIZE, seed=0)
    x, y = d.images.transpose(0, 3, 1, 2).copy(), d.labels
    a, b = int(len(y) * 0.6), int(len(y) * 0.75)
    return {"train": (x[:a], y[:a]), "val": (x[a:b], y[a:b]), "test": (x[b:], y[b:])}, d.class_names


def prepare(data, root, privacy=SECAGG, **federation):
    fed = {"engine": "inline", "num_sites": 3, "partition": "iid", "rounds": 1, "local_epochs": 1}
    cfg = tiny_cfg(
        "training=federated",
        "seed=3",
        "model.norm=group",
        trainer={"batch_size": 8, "lr": 0.05, "imbalance": "none", "augment": False},
        federation=fed | federation,
        privacy=privacy,
    )
    arrays, classes = data
    return prepare_federation(cfg, arrays, classes, PREP, root, threads=1)


def initial_arrays(spec) -> dict[str, np.ndarray]:
    torch.manual_seed(spec.settings.seed)
    return state_arrays(spec.model.build())


def grid_for(layout) -> InlineGrid:
    return InlineGrid(build_client_app(), [{"data-dir": str(p)} for p in layout.sites.values()])


def plain_results(layout, arrays, server_round=1) -> dict[int, tuple[dict, int]]:
    """Each node's own training result, by the same handler without SecAgg+: {node: (weights,
    num_examples)}."""
    out = {}
    config = {SPEC_KEY: layout.spec.client_spec.to_json(), "server-round": server_round}
    for node, site_dir in enumerate(layout.sites.values(), start=1):
        content = RecordDict({"arrays": to_record(arrays), "config": ConfigRecord(config)})
        reply = handle_train(Message(content, node, "train"), site_dir)
        metrics = reply.content.metric_records["metrics"]
        out[node] = (from_record(reply.content["arrays"]), int(metrics["num-examples"]))
    return out


def fedavg(results: list[tuple[dict, int]], keys: list[str]) -> dict[str, np.ndarray]:
    total = sum(n for _, n in results)
    return {k: sum(w[k].astype(np.float64) * n for w, n in results) / total for k in keys}


def record_replies(grid: InlineGrid, on_stage=None) -> list[tuple[str, Message]]:
    """Wrap `grid` so that every (stage, reply) the server receives is kept."""
    seen: list[tuple[str, Message]] = []
    original = grid.send_and_receive

    def send_and_receive(messages, *, timeout=None):
        messages = list(messages)
        stage = str(messages[0].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])
        if on_stage is not None:
            on_stage(stage)
        replies = list(original(messages, timeout=timeout))
        seen.extend((stage, r) for r in replies)
        return replies

    grid.send_and_receive = send_and_receive
    return seen


def blobs_of(reply: Message) -> bytes:
    """Every byte string a reply carries (array data, bytes in config records), joined."""
    parts: list[bytes] = []
    for record in reply.content.array_records.values():
        parts += [array.data for array in record.values()]
    for record in reply.content.config_records.values():
        for value in record.values():
            values = value if isinstance(value, list) else [value]
            parts += [v for v in values if isinstance(v, bytes)]
    return b"\x00|\x00".join(parts)


def assert_within_bound(new, arrays, plain, nodes, settings):
    """`new` is FedAvg of the plain results of `nodes` within the SecAgg+ error bound (plus
    float32 rounding of the final weights)."""
    keys = masked_names(arrays)
    expected = fedavg([plain[n] for n in nodes], keys)
    update_max = max(
        float(np.max(np.abs(plain[n][0][k].astype(np.float64) - arrays[k])))
        for n in nodes
        for k in keys
    )
    bound = aggregate_error_bound(settings, [plain[n][1] for n in nodes], update_max)
    assert bound < 1e-3  # the comparison below means something
    for k in keys:
        ref = expected[k]
        error = np.abs(new[k].astype(np.float64) - ref)
        assert np.all(error <= bound + np.abs(ref) * 2.0**-23), (k, float(error.max()), bound)


def test_the_server_sees_only_masked_vectors_and_unmasks_fedavg(data, tmp_path):
    layout = prepare(data, tmp_path / "fed")
    spec, settings = layout.spec, secagg_settings(layout.spec)
    assert settings is not None and settings.max_weight == 100.0
    grid = grid_for(layout)
    arrays = initial_arrays(spec)
    plain = plain_results(layout, arrays)
    seen = record_replies(grid)

    new, sites, rejections, notes = secure_round(grid, spec, 1, arrays, {})

    # every site took part, named, with its example count and metrics, without an update norm
    assert rejections == [] and notes == []
    assert sorted(sites) == sorted(layout.sites)
    by_name = dict(zip(layout.sites, range(1, 4), strict=True))
    for name, row in sites.items():
        assert row["status"] == "accepted" and row["num_examples"] == plain[by_name[name]][1]
        assert np.isfinite(row["train_loss"]) and not any("norm" in k for k in row)

    # what the server received: four stages x three sites, no array, no update in the clear
    assert sorted({stage for stage, _ in seen}) == sorted(
        [Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK]
    )
    assert len(seen) == 12 and not any(r.has_error() for _, r in seen)
    keys = masked_names(arrays)
    blob = b"\x01|\x01".join(blobs_of(r) for _, r in seen)
    for weights, _ in plain.values():
        for k in keys:
            if arrays[k].size < 4:
                continue
            update = weights[k].astype(np.float64) - arrays[k].astype(np.float64)
            for pattern in (weights[k], update, update.astype(np.float32)):
                assert pattern.tobytes() not in blob, k
    for _, reply in seen:
        assert all(len(record) == 0 for record in reply.content.array_records.values())
        metrics = reply.content.metric_records.get("metrics", {})
        assert not any(k.startswith("update-norm") for k in metrics)

    # each masked vector on its own is uniform modulo 2**32: unmasked, every entry would lie in
    # [0, quantization_range], 1/1024 of the ring; masked, almost none does
    uploads = [r for stage, r in seen if stage == Stage.COLLECT_MASKED_VECTORS]
    assert len(uploads) == 3
    for reply in uploads:
        masked = reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
        values = np.concatenate([bytes_to_ndarray(b).ravel() for b in masked]).astype(np.int64)
        assert values.size > 1000
        assert np.mean(values <= settings.quantization_range) < 0.02
        assert np.mean(values >= 2**31) == pytest.approx(0.5, abs=0.05)

    # ... while their sum unmasks to FedAvg of the sites' own results
    assert new is not None and set(new) == set(arrays)
    assert max(float(np.abs(new[k] - arrays[k]).max()) for k in keys) > 1e-3  # it learnt
    assert_within_bound(new, arrays, plain, (1, 2, 3), settings)


def test_a_site_dropping_out_after_sharing_keys_leaves_the_average_of_the_others(data, tmp_path):
    layout = prepare(data, tmp_path / "fed")
    spec, settings = layout.spec, secagg_settings(layout.spec)
    grid = grid_for(layout)
    node_sites: dict[int, str] = {}
    roll_call(grid, node_sites, timeout=10)
    arrays = initial_arrays(spec)
    plain = plain_results(layout, arrays)

    def drop_node_3(stage):
        if stage == Stage.COLLECT_MASKED_VECTORS:
            grid.offline.add(3)

    seen = record_replies(grid, on_stage=drop_node_3)
    new, sites, rejections, notes = secure_round(grid, spec, 1, arrays, node_sites)

    gone = node_sites[3]
    assert sites[gone] == {"status": "failed"}
    assert [r.site for r in rejections] == [gone]
    assert "collect masked vectors" in rejections[0].reason
    assert "Node Unavailable" in rejections[0].reason
    assert any("dropped out" in n for n in notes)
    assert sum(row["status"] == "accepted" for row in sites.values()) == 2
    assert [stage for stage, r in seen if stage == Stage.UNMASK and not r.has_error()] == [
        Stage.UNMASK
    ] * 2
    assert new is not None
    assert_within_bound(new, arrays, plain, (1, 2), settings)
    # and it is not the average of all three
    keys = masked_names(arrays)
    everyone = fedavg(list(plain.values()), keys)
    assert max(float(np.abs(new[k] - everyone[k]).max()) for k in keys) > 1e-3


def test_too_few_sites_left_aborts_the_round_and_keeps_the_model(data, tmp_path):
    layout = prepare(data, tmp_path / "fed")
    grid = grid_for(layout)
    node_sites: dict[int, str] = {}
    roll_call(grid, node_sites, timeout=10)

    def drop_two(stage):
        if stage == Stage.SHARE_KEYS:
            grid.offline.update({2, 3})

    record_replies(grid, on_stage=drop_two)
    arrays = initial_arrays(layout.spec)
    new, sites, rejections, notes = secure_round(grid, layout.spec, 1, arrays, node_sites)
    assert new is None
    assert sites[node_sites[1]]["status"] == "aborted"
    assert {r.site for r in rejections} == {node_sites[2], node_sites[3]}
    assert any("stopped at stage 'share keys'" in n for n in notes)


def test_a_site_over_max_weight_refuses_to_mask(data, tmp_path):
    privacy = SECAGG | {"secagg": {"max_weight": 5.0}}
    layout = prepare(data, tmp_path / "fed", privacy=privacy)
    grid = grid_for(layout)
    arrays = initial_arrays(layout.spec)
    new, _, rejections, _ = secure_round(grid, layout.spec, 1, arrays, {})
    assert new is None and len(rejections) == 3
    assert all("max_weight=5" in r.reason for r in rejections)


def test_secagg_runs_through_the_round_driver_like_fedavg(data, tmp_path):
    """The ClientApp's mod and the server's dispatch: a whole run under SecAgg+ (1 round)
    learns the same model as plain FedAvg (the update bound, 8, is above every site's update
    norm, about 5.6 here, so the plain run is the same computation without masking)."""
    secure = run_prepared(
        prepare(data, tmp_path / "secure", privacy=SECAGG | {"update_norm_bound": 8.0})
    )
    row = secure.history[0]
    assert row["accepted"] == 3 and row["aggregated"] and row["notes"] == []
    assert all("update_norm" not in site for site in row["sites"].values())
    assert "val_macro_f1" in row["sites_eval"]  # evaluation messages pass the mod untouched

    plain = run_prepared(prepare(data, tmp_path / "plain", privacy={"mode": "none"}))
    assert all(site["update_norm"] < 8.0 for site in plain.history[0]["sites"].values())
    a, b = secure.model.state_dict(), plain.model.state_dict()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-4), key


def test_secagg_with_dp_sgd_at_the_sites(data, tmp_path):
    """privacy=secagg_dp: DP-SGD inside each site's training, the site's ε reported in the clear
    beside its masked update, the update itself aggregated under SecAgg+."""
    privacy = SECAGG | {"mode": "secagg_dp", "epsilon": 8.0}
    result = run_prepared(prepare(data, tmp_path / "dp", privacy=privacy))
    row = result.history[0]
    assert row["accepted"] == 3 and row["aggregated"]
    for site in row["sites"].values():
        assert 0 < site["dp_epsilon"] <= 8.0 and "update_norm" not in site
    report = json.loads((result.out_dir / "result.json").read_text())["privacy"]
    assert report["mode"] == "secagg_dp" and report["secure_aggregation"] is True
    assert set(report["per_site"]) == set(row["sites"])


def test_per_update_rules_are_refused_under_secagg():
    with pytest.raises(ConfigError, match="cannot run with privacy=secagg"):
        tiny_cfg("training=federated", "federation=krum", "privacy=secagg")
    with pytest.raises(ConfigError, match="cannot run with privacy=secagg"):
        validate_privacy({"mode": "secagg", "update_norm_bound": 1.0}, {"strategy": "krum"})


@pytest.mark.slow
def test_secagg_on_flower_simulation_engine(data, tmp_path):
    """Flower's simulation engine (Ray, one virtual SuperNode per site) runs the SecAgg+ rounds
    with the same ClientApp mod and server dispatch as the inline engine."""
    layout = prepare(
        data,
        tmp_path / "sim",
        rounds=2,
        engine="simulation",
        simulation={"cpus_per_site": 1, "total_cpus": 2, "threads_per_site": 1},
    )
    result = run_prepared(layout)
    assert [row["accepted"] for row in result.history] == [3, 3]
    assert all(row["aggregated"] and row["notes"] == [] for row in result.history)
    for row in result.history:
        assert all("update_norm" not in site for site in row["sites"].values())
