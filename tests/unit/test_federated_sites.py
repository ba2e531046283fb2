"""Real sites on the inline engine: three hospitals prepare their own folders, approve (or
refuse) the coordinator's spec, the preflight reports refusals with their reason, training
runs with the approving sites only, and the federated evaluation pools exactly."""

from __future__ import annotations

import json
import stat

import numpy as np
import pytest
from tiny_config import tiny_cfg

from components.calibration.record import Calibration
from components.data.synthetic import write_synthetic_folder
from components.evaluation.metrics import evaluate
from components.evaluation.predict import predict_proba
from components.federated import approval, site_prepare
from components.federated.coordinator import (
    FederationConnection,
    coordinator_layout,
    request_path,
)
from components.federated.preflight import FederationRefused, read_preflight
from components.federated.result import load_result
from components.federated.settings import SiteStatsSettings
from components.federated.site_stats import site_statistics
from components.federated.task import load_site_test

SITES = ("north", "south", "east")


def config(**federation):
    fed = {"engine": "inline", "rounds": 1, "local_epochs": 1, "min_fit_sites": 2}
    return tiny_cfg(
        "training=federated",
        "dataset.adapter=folder",
        "model.norm=group",
        "privacy=dp_eps8",
        validation={"min_per_class": 2},
        trainer={"batch_size": 8, "imbalance": "none"},
        federation=fed | federation,
    )


def prepare(cfg, data_dir, name, site_dir):
    ctx = site_prepare.site_context(cfg, data_dir, name, site_dir)
    frame = site_prepare.validate_site(
        ctx, site_prepare.split_site(ctx, site_prepare.ingest_site(ctx))
    )
    arrays = site_prepare.site_arrays(ctx, frame)
    site_prepare.write_site_partition(ctx, arrays)
    return site_prepare.compute_site_stats(ctx, frame, arrays)


@pytest.fixture(scope="module")
def hospitals(tmp_path_factory):
    root = tmp_path_factory.mktemp("hospitals")
    cfg = config()
    dirs, stats = {}, {}
    for seed, name in enumerate(SITES):
        folder = root / "data" / name
        write_synthetic_folder(folder, n_per_class=12, size=32, seed=seed)
        dirs[name] = root / "sites" / name
        stats[name] = prepare(cfg, folder, name, dirs[name])
    return root, dirs, stats


def approve(layout, dirs, refuse_at=None):
    request = approval.read_request(request_path(layout))
    for name, site_dir in dirs.items():
        if name == refuse_at:  # this site allows at most ε = 3; the spec asks for 8
            approval.decide(site_dir, request, accept=True, max_epsilon=3.0)
        else:
            approval.decide(site_dir, request, accept=True, max_epsilon=10.0)


def test_site_directories_are_private_and_stats_hold_only_aggregates(hospitals):
    _, dirs, stats = hospitals
    for name, site_dir in dirs.items():
        assert stat.S_IMODE(site_dir.stat().st_mode) == 0o700
        assert json.loads((site_dir / "site.json").read_text())["approval_required"] is True
        assert (site_dir / "validation_report.json").is_file()
        s = stats[name]
        sizes = s["num_images"]
        _, y = load_site_test(site_dir)
        assert sizes["test"] == len(y) and sum(sizes.values()) == 36
        assert s["image_sizes"]["width"][0] == 36  # 32 px: the first bin (0..64)
        assert sum(s["intensity"]["histogram"]) == pytest.approx(36, abs=1e-2)
        strings = _strings(s)
        allowed = {"healthy", "lesion_left", "lesion_right", "none", "inf"}
        assert strings <= allowed, strings - allowed  # no paths, ids or hashes


def _strings(data) -> set[str]:
    if isinstance(data, dict):
        return set().union(*(_strings(v) for v in data.values())) if data else set()
    if isinstance(data, list):
        return set().union(*(_strings(v) for v in data)) if data else set()
    return {data} if isinstance(data, str) else set()


def test_dp_noise_changes_the_released_statistics():
    rng = np.random.default_rng(0)
    labels = {"train": rng.integers(0, 3, 50), "val": rng.integers(0, 3, 10), "test": []}
    images = [rng.integers(0, 256, (60, 1, 8, 8), dtype=np.uint8)]
    sides = np.full(60, 300)
    exact = site_statistics(["a", "b", "c"], labels, sides, sides, images, SiteStatsSettings())
    noisy_settings = SiteStatsSettings(noise="laplace", epsilon=0.5)
    noisy = site_statistics(["a", "b", "c"], labels, sides, sides, images, noisy_settings, seed=1)
    assert exact["class_counts"]["train"] == dict(
        zip("abc", np.bincount(labels["train"], minlength=3).tolist(), strict=True)
    )
    assert noisy["class_counts"]["train"] != exact["class_counts"]["train"]
    assert noisy["intensity"]["histogram"] != exact["intensity"]["histogram"]
    assert noisy["privacy"]["epsilon"] == 0.5 and exact["privacy"]["epsilon"] is None
    assert all(v >= 0 for v in noisy["image_sizes"]["width"])


def test_a_refusing_site_is_reported_and_the_others_train_and_evaluate(hospitals, tmp_path):
    _, dirs, _ = hospitals
    layout = coordinator_layout(config(), list(SITES), tmp_path / "coord", site_dirs=dirs)
    assert layout.spec.test_path == ""  # the coordinator holds no data
    approve(layout, dirs, refuse_at="east")
    connection = FederationConnection(inline_sites=dict(layout.sites))

    connection.run(layout, "preflight")
    preflight = read_preflight(layout.out_dir)
    assert preflight["ok"] and preflight["approved"] == ["north", "south"]
    east = preflight["sites"]["east"]
    assert east["status"] == "refused" and "above this site's maximum 3" in east["reason"]
    assert preflight["sites"]["north"]["stats"]["num_images"]["test"] > 0

    connection.run(layout, "federate")
    result = load_result(layout)
    row = result.history[0]
    assert row["accepted"] == 2 and set(row["sites"]) == {"north", "south"}
    data = json.loads((layout.out_dir / "result.json").read_text())
    fed = data["federated_evaluation"]
    assert set(fed["sites"]) == {"north", "south"} and not fed["missing"]

    # the pooled numbers are exactly those of the pooled site test predictions, as served:
    # calibrated by the block the sites' validation sums fitted
    assert data["calibration"]["fitted"] and data["calibration"]["sites"] == ["north", "south"]
    calibration = Calibration.from_dict(data["calibration"]["calibration"])
    ys, probs, raw = [], [], []
    for name in ("north", "south"):
        x, y = load_site_test(dirs[name])
        ys.append(y)
        raw.append(predict_proba(result.model, x, layout.spec.model.prep()))
        probs.append(calibration.recalibrate(raw[-1]))
        direct = evaluate(y, probs[-1], layout.spec.model.class_names)
        assert fed["sites"][name]["macro_f1"] == pytest.approx(direct["macro_f1"])
    pooled = evaluate(np.concatenate(ys), np.concatenate(probs), layout.spec.model.class_names)
    uncalibrated = evaluate(np.concatenate(ys), np.concatenate(raw), layout.spec.model.class_names)
    assert fed["calibration"]["ece_before"] == pytest.approx(uncalibrated["ece"], abs=1e-6)
    assert fed["calibration"]["ece_after"] == pytest.approx(pooled["ece"], abs=1e-6)
    got = fed["pooled"]
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "ece"):
        assert got[key] == pytest.approx(pooled[key]), key
    assert got["confusion_matrix"] == pooled["confusion_matrix"]
    for name, row in pooled["per_class"].items():
        assert got["per_class"][name]["sensitivity"] == pytest.approx(row["sensitivity"])
        assert got["per_class"][name]["specificity"] == pytest.approx(row["specificity"])
    sizes = fed["sizes"]
    weighted = sum(sizes[s] * fed["sites"][s]["macro_auroc"] for s in sizes) / sum(sizes.values())
    assert got["macro_auroc"] == pytest.approx(weighted)


def test_the_run_does_not_start_below_the_minimum_of_approved_sites(hospitals, tmp_path):
    _, dirs, _ = hospitals
    cfg = config(min_available_sites=3, min_fit_sites=3)
    layout = coordinator_layout(cfg, list(SITES), tmp_path / "coord", site_dirs=dirs)
    approve(layout, dirs, refuse_at="south")
    with pytest.raises(FederationRefused, match=r"2 of 3 site.*minimum 3.*south: refused"):
        FederationConnection(inline_sites=dict(layout.sites)).run(layout, "federate")
    assert not (layout.out_dir / "result.json").exists()


def test_an_unapproved_spec_or_changed_code_is_refused_before_training(hospitals, tmp_path):
    _, dirs, _ = hospitals
    layout = coordinator_layout(config(rounds=3), list(SITES), tmp_path / "coord")
    spec_json = layout.spec.client_spec.to_json()  # a spec no earlier test approved
    other = coordinator_layout(config(rounds=2), list(SITES), tmp_path / "other")
    approve(other, {"north": dirs["north"]})
    verdict = approval.check(dirs["north"], spec_json, required=True)
    assert not verdict.approved and "has not been approved" in verdict.reason
    approve(layout, {"north": dirs["north"]})
    assert approval.check(dirs["north"], spec_json, required=True).approved
    data = json.loads((dirs["north"] / "approval.json").read_text())
    data["decisions"][verdict.spec_fingerprint]["code_fingerprint"] = "0" * 16
    (dirs["north"] / "approval.json").write_text(json.dumps(data))
    verdict = approval.check(dirs["north"], spec_json, required=True)
    assert not verdict.approved and "not the approved code" in verdict.reason
