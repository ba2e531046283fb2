"""Differential privacy inside a federation, on the inline engine (the same ServerApp driver and
ClientApp handlers as Flower's engines): DP-SGD at each site with its own ledger on the site's
disk, server-side central DP (Flower's wrappers), ε checked against Opacus' accountant computed
independently, ε growing round over round and the budget stop firing before it is exceeded."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from tiny_config import tiny_cfg

from components.data.preprocess import Preprocessing
from components.data.synthetic import make_synthetic
from components.errors import ConfigError
from components.federated.checkpoint import CHECKPOINT_DIR, read_ledger
from components.federated.engines import run_prepared
from components.federated.layout import prepare_federation
from components.privacy.dp import steps_per_epoch
from components.privacy.federated import SITE_LEDGER, bound_update

SIZE = 12
PREP = Preprocessing(size=SIZE, channels=3)
BATCH = 8
LOCAL_EPOCHS = 1


@pytest.fixture(scope="module")
def data():
    d = make_synthetic(n_per_class=24, size=SIZE, seed=1)
    x, y = d.images.transpose(0, 3, 1, 2).copy(), d.labels
    a, b = int(len(y) * 0.6), int(len(y) * 0.75)
    return {"train": (x[:a], y[:a]), "val": (x[a:b], y[a:b]), "test": (x[b:], y[b:])}, d.class_names


def prepare(data, root, privacy: dict, **federation):
    fed = {
        "engine": "inline",
        "num_sites": 3,
        "partition": "iid",
        "rounds": 3,
        "local_epochs": LOCAL_EPOCHS,
        "evaluate_sites": False,
    }
    cfg = tiny_cfg(
        "training=federated",
        "seed=5",
        trainer={"batch_size": BATCH, "lr": 0.05, "imbalance": "none", "augment": False},
        federation=fed | federation,
        privacy=privacy,
    )
    arrays, classes = data
    return prepare_federation(cfg, arrays, classes, PREP, root, threads=1)


def opacus_epsilon(sigma: float, q: float, steps: int, delta: float = 1e-5) -> float:
    """ε from Opacus' own RDP accountant, fed the (σ, q, steps) history directly."""
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(sigma, q, steps)]
    return float(acc.get_epsilon(delta))


def site_sizes(layout) -> dict[str, int]:
    return {
        name: json.loads((path / "site.json").read_text())["num_train"]
        for name, path in layout.sites.items()
    }


DP_FIXED = {"mode": "dp_sgd", "noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}


def test_site_dp_sgd_epsilon_matches_opacus_and_grows_every_round(data, tmp_path):
    layout = prepare(data, tmp_path / "fed", DP_FIXED | {"epsilon": None})
    assert layout.spec.model.architecture["norm"] == "group"  # made Opacus-compatible
    result = run_prepared(layout)
    assert result.history and len(result.history) == 3

    worst = [row["privacy"]["worst_site_epsilon"] for row in result.history]
    assert worst[0] > 0 and worst[0] < worst[1] < worst[2]  # ε composes round over round
    sizes = site_sizes(layout)
    for name, n in sizes.items():
        per_round = steps_per_epoch(n, BATCH) * LOCAL_EPOCHS
        q = 1 / steps_per_epoch(n, BATCH)
        for row in result.history:
            site = row["sites"][name]
            steps = per_round * row["round"]
            assert site["dp_steps"] == steps
            assert site["dp_epsilon"] == pytest.approx(opacus_epsilon(1.0, q, steps), rel=1e-9)
        ledger = json.loads((layout.sites[name] / SITE_LEDGER).read_text())
        assert ledger["rounds"] == [1, 2, 3]  # kept on the site's own disk

    # each round's ledger line carries every site's ε as that round ended (what MLflow gets)
    for row in read_ledger(layout.out_dir / "ledger.jsonl"):
        spent = {name: row["sites"][name]["dp_epsilon"] for name in sizes}
        assert row["privacy"]["site_epsilon"] == spent

    report = json.loads((layout.out_dir / "result.json").read_text())["privacy"]
    assert report["mode"] == "dp_sgd" and report["epsilon"] == pytest.approx(worst[-1])
    assert set(report["per_site"]) == set(sizes)
    assert all(np.isfinite(v) for v in result.history[-1]["server"].values())


def test_site_budget_stop_fires_before_the_budget_is_exceeded(data, tmp_path):
    probe = prepare(data, tmp_path / "probe", DP_FIXED | {"epsilon": None})

    def worst(rounds: int) -> float:  # the most-spending site's ε after `rounds` rounds
        return max(
            opacus_epsilon(1.0, 1 / steps_per_epoch(n, BATCH), rounds * steps_per_epoch(n, BATCH))
            for n in site_sizes(probe).values()
        )

    budget = (worst(2) + worst(3)) / 2  # room for two rounds, not three
    layout = prepare(data, tmp_path / "fed", DP_FIXED | {"epsilon": budget}, rounds=5)
    result = run_prepared(layout)
    spent = [row["privacy"]["worst_site_epsilon"] for row in result.history]
    assert len(spent) == 2 and spent[-1] <= budget  # stopped before round 3
    data_out = json.loads((layout.out_dir / "result.json").read_text())
    assert data_out["status"].startswith("stopped: privacy budget")
    assert "round 3" in data_out["status"]
    assert data_out["rounds_completed"] == 2 and data_out["privacy"]["epsilon"] <= budget
    # the kept model is the one after round 2 (within budget)
    assert result.history[-1]["server"] == data_out["history"][-1]["server"]


def test_site_ledger_survives_a_server_restart(data, tmp_path):
    layout = prepare(data, tmp_path / "fed", DP_FIXED | {"epsilon": None})
    run_prepared(layout)
    # the server crashes after the sites trained round 3 but before it checkpointed it
    shutil.rmtree(layout.out_dir / CHECKPOINT_DIR / "round-0003")
    layout = prepare(data, tmp_path / "fed", DP_FIXED | {"epsilon": None}, resume=True)
    result = run_prepared(layout)
    assert result.resumed_from == 2
    for name, n in site_sizes(layout).items():
        ledger = json.loads((layout.sites[name] / SITE_LEDGER).read_text())
        assert ledger["rounds"] == [1, 2, 3, 3]  # round 3's release still counts
        steps = 4 * steps_per_epoch(n, BATCH) * LOCAL_EPOCHS
        assert result.history[-1]["sites"][name]["dp_steps"] == steps
    # a fresh (non-resumed) run starts a new ledger
    layout = prepare(data, tmp_path / "fed", DP_FIXED | {"epsilon": None}, resume=False)
    run_prepared(layout)
    for path in layout.sites.values():
        assert json.loads((path / SITE_LEDGER).read_text())["rounds"] == [1, 2, 3]


def test_calibrated_site_dp_spends_at_most_the_target(data, tmp_path):
    privacy = {"mode": "dp_sgd", "epsilon": 8.0, "delta": 1e-5, "max_grad_norm": 1.0}
    result = run_prepared(prepare(data, tmp_path / "fed", privacy, rounds=2))
    final = result.history[-1]["privacy"]["worst_site_epsilon"]
    assert 6.0 < final <= 8.0  # σ planned over rounds × local epochs, not per round


def test_central_dp_accounting_and_budget_stop(data, tmp_path):
    central = {"clipping": "fixed", "noise_multiplier": 2.0, "clipping_norm": 0.5}
    privacy = {"mode": "central_dp", "epsilon": None, "delta": 1e-5, "central": central}
    result = run_prepared(prepare(data, tmp_path / "fixed", privacy))
    eps = [row["privacy"]["epsilon"] for row in result.history]
    assert eps == pytest.approx([opacus_epsilon(2.0, 1.0, r) for r in (1, 2, 3)], rel=1e-9)
    report = json.loads((result.out_dir / "result.json").read_text())["privacy"]
    assert report["level"].startswith("site") and report["rounds"] == 3
    assert report["noise_multiplier"] == 2.0 and report["sample_rate"] == 1.0

    budget = (eps[1] + eps[2]) / 2
    result = run_prepared(prepare(data, tmp_path / "stop", privacy | {"epsilon": budget}))
    assert len(result.history) == 2 and result.history[-1]["privacy"]["epsilon"] <= budget


def test_central_dp_adds_noise_and_adapts_the_clip(data, tmp_path):
    plain = run_prepared(prepare(data, tmp_path / "plain", {"mode": "none"}, rounds=1))
    central = {
        "clipping": "adaptive",
        "noise_multiplier": 1.0,
        "clipping_norm": 0.01,
        "clipped_count_stddev": 2.0,
    }
    privacy = {"mode": "central_dp", "epsilon": None, "central": central}
    layout = prepare(data, tmp_path / "dp", privacy | {"delta": 1e-5}, rounds=2)
    result = run_prepared(layout)
    clips = [row["privacy"]["clipping_norm"] for row in result.history]
    assert clips[0] != 0.01 and clips[1] != clips[0]  # the bound follows the update norms
    ckpt = json.loads((layout.out_dir / CHECKPOINT_DIR / "round-0002" / "state.json").read_text())
    assert ckpt["privacy"]["clipping_norm"] == pytest.approx(clips[1])
    w_plain = plain.model.state_dict()
    w_dp = result.model.state_dict()
    assert any(not np.allclose(w_plain[k], w_dp[k]) for k in w_plain)


def test_update_norm_bound_scales_only_the_update():
    received = {"w": np.ones(4, np.float32), "n": np.array(3, np.int64)}
    weights = {"w": np.array([4, 1, 1, 5], np.float32), "n": np.array(4, np.int64)}
    bounded, norm = bound_update(weights, received, 1.0)
    assert norm == pytest.approx(5.0)
    delta = bounded["w"] - received["w"]
    assert np.linalg.norm(delta) == pytest.approx(1.0, rel=1e-6)
    assert np.allclose(delta, np.array([3, 0, 0, 4]) / 5.0)  # same direction
    assert bounded["n"] == 4 and bounded["w"].dtype == np.float32
    same, _ = bound_update(weights, received, 10.0)
    assert np.array_equal(same["w"], weights["w"])


@pytest.mark.parametrize(
    ("privacy", "strategy", "message"),
    [
        ({"mode": "central_dp", "epsilon": 8.0}, "krum", "unweighted mean"),
        ({"mode": "dp_sgd", "epsilon": 8.0}, "fedprox", "proximal term"),
        (
            {"mode": "central_dp", "epsilon": 8.0, "central": {"clipping": "adaptive"}},
            "fedavg",
            "clipped_count_stddev",
        ),
        ({"mode": "secagg", "update_norm_bound": 1.0}, "median", "only learns the sum"),
    ],
)
def test_incompatible_privacy_and_strategy_are_refused(data, tmp_path, privacy, strategy, message):
    extra = {"num_malicious": 0} if strategy == "krum" else {}
    extra |= {"proximal_mu": 0.01} if strategy == "fedprox" else {}
    with pytest.raises(ConfigError, match=message):
        prepare(data, tmp_path / "fed", privacy, strategy=strategy, **extra)
