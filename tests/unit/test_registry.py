"""MLflow registry on SQLite: run logging, champion gate end to end, bundle round trip."""

from __future__ import annotations

import json
import math

import pytest

from components.errors import ConfigError, NotFound
from components.registry import GateConfig, RegistryClient, TrainingRecord

CLASSES = ["benign", "malignant"]


def make_bundle(directory, seed: int = 0):
    """A tiny seeded small_cnn bundle (untrained: these tests check registry mechanics)."""
    import torch

    from components.bundle import ModelBundle
    from components.data.preprocess import Preprocessing
    from components.models import build_model

    kwargs = {"num_classes": 2, "in_channels": 3, "width": 4}
    torch.manual_seed(seed)
    model = build_model("small_cnn", **kwargs)
    bundle = ModelBundle(
        architecture="small_cnn",
        architecture_kwargs=kwargs,
        class_names=CLASSES,
        preprocessing=Preprocessing(size=32, channels=3),
        state_dict=model.state_dict(),
        data_fingerprint="f" * 64,
    )
    return bundle.save(directory)


def test_metrics(f1: float) -> dict:
    return {
        "macro_f1": f1,
        "accuracy": f1 + 0.05,
        "per_class": {c: {"sensitivity": f1, "specificity": 0.9} for c in CLASSES},
        "confusion_matrix": [[5, 1], [2, 4]],
    }


test_metrics.__test__ = False  # a helper, not a test


def record(tmp_path, name: str, f1: float, test_fp: str = "testset-A", seed: int = 0):
    from PIL import Image

    bundle = make_bundle(tmp_path / f"bundle-{name}", seed=seed)
    png = tmp_path / f"cm-{name}.png"
    Image.new("RGB", (8, 8), "white").save(png)
    report = tmp_path / f"data-{name}.json"
    report.write_text(json.dumps({"rows": 12, "classes": CLASSES}))
    return TrainingRecord(
        config={"model": {"name": "small_cnn", "width": 4}, "note": "x" * 7000, "seed": 1},
        bundle_dir=bundle,
        test_metrics=test_metrics(f1),
        history=[
            {"epoch": 0, "train_loss": 0.9, "val_macro_f1": 0.5},
            {"epoch": 1, "train_loss": 0.7, "val_macro_f1": 0.6},
        ],
        manifest_fingerprint="manifest-fp",
        test_fingerprint=test_fp,
        reports={"data": report, "split": {"train": 8, "test": 4}},
        figures={"confusion_matrix": png},
        run_name=name,
    )


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    return RegistryClient(f"sqlite:///{root}/mlflow.db")


@pytest.mark.parametrize("uri", ["/tmp/mlruns", "file:///tmp/mlruns", "./mlruns", ""])
def test_file_store_is_refused(uri):
    with pytest.raises(ConfigError):
        RegistryClient(uri)


def test_log_training_run_records_everything(registry, tmp_path):
    run_id = registry.log_training_run(record(tmp_path, "logged", 0.7))
    run = registry.client.get_run(run_id)
    assert run.info.status == "FINISHED"
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    assert params["model.name"] == "small_cnn" and params["model.width"] == "4"
    assert len(params["note"]) <= 6000 and params["note"].endswith("...")
    assert metrics["test_macro_f1"] == pytest.approx(0.7)
    assert metrics["test_per_class.malignant.sensitivity"] == pytest.approx(0.7)
    history = registry.client.get_metric_history(run_id, "val_macro_f1")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.5), (1, 0.6)]
    assert tags["manifest_fingerprint"] == "manifest-fp"
    assert tags["test_set_fingerprint"] == "testset-A"
    files = {f.path for f in registry.client.list_artifacts(run_id)}
    assert {"bundle", "figures", "reports", "test_metrics.json", "config.json"} <= files
    assert {f.path for f in registry.client.list_artifacts(run_id, "bundle")} >= {
        "bundle/bundle.json",
        "bundle/weights.pt",
    }
    assert {f.path for f in registry.client.list_artifacts(run_id, "reports")} == {
        "reports/data-logged.json",
        "reports/split.json",
    }
    assert [f.path for f in registry.client.list_artifacts(run_id, "figures")] == [
        "figures/cm-logged.png"
    ]


def test_log_training_run_refuses_a_directory_without_bundle(registry, tmp_path):
    bad = record(tmp_path, "bad", 0.5)
    bad.bundle_dir = tmp_path
    with pytest.raises(ConfigError, match="not a saved model bundle"):
        registry.log_training_run(bad)


def test_champion_gate_end_to_end(registry, tmp_path):
    name = "oncoflow-test"
    gate = GateConfig("macro_f1", "max", 0.0)
    assert registry.champion_info(name) is None

    first = registry.log_training_run(record(tmp_path, "v1", 0.70, seed=1))
    d1 = registry.register_candidate(first, name, test_metrics(0.70), gate)
    assert (d1.promote, d1.version, d1.alias, d1.status) == (True, "1", "champion", "promoted")

    second = registry.log_training_run(record(tmp_path, "v2", 0.60, seed=2))
    d2 = registry.register_candidate(second, name, test_metrics(0.60), gate)
    assert (d2.promote, d2.version, d2.alias) == (False, "2", "challenger")
    assert d2.previous_champion == "1"
    v2 = registry.version_info(name, 2)
    assert v2["gate_decision"] == "rejected" and "does not beat" in v2["gate_reason"]
    assert v2["aliases"] == ["challenger"]
    assert v2["metrics"]["macro_f1"] == pytest.approx(0.60)
    assert v2["test_set_fingerprint"] == "testset-A" and v2["run_id"] == second
    assert registry.champion_info(name)["version"] == "1"

    third = registry.log_training_run(record(tmp_path, "v3", 0.80, seed=3))
    d3 = registry.register_candidate(third, name, test_metrics(0.80), gate)
    assert (d3.promote, d3.version, d3.previous_champion) == (True, "3", "1")
    champion = registry.champion_info(name)
    assert champion["version"] == "3" and champion["metrics"]["macro_f1"] == pytest.approx(0.8)
    assert registry.version_info(name, 1)["aliases"] == []

    # Better score but a different test set: not comparable, champion kept, reason recorded.
    fourth = registry.log_training_run(record(tmp_path, "v4", 0.95, test_fp="testset-B"))
    d4 = registry.register_candidate(fourth, name, test_metrics(0.95), gate)
    assert (d4.promote, d4.status, d4.alias) == (False, "not_comparable", "challenger")
    assert "different test set" in registry.version_info(name, 4)["gate_reason"]
    assert registry.champion_info(name)["version"] == "3"

    registry.promote(name, 4, "new reference test set after relabelling")
    assert registry.champion_info(name)["version"] == "4"
    assert registry.version_info(name, 4)["gate_decision"] == "promoted_manually"


def test_misconfigured_gate_registers_nothing(registry, tmp_path):
    name = "oncoflow-misconfigured"
    rec = record(tmp_path, "bad-gate", 0.5)
    run_id = registry.log_training_run(rec)
    with pytest.raises(ConfigError, match="macro_f9"):
        registry.register_candidate(run_id, name, rec.test_metrics, GateConfig("macro_f9"))
    assert registry.client.search_model_versions(f"name='{name}'") == []


def test_nan_metrics_are_logged_and_never_promoted_over_a_champion(registry, tmp_path):
    name = "oncoflow-nan"
    first = record(tmp_path, "nan1", 0.5)
    registry.register_candidate(
        registry.log_training_run(first), name, first.test_metrics, GateConfig()
    )
    nan = record(tmp_path, "nan2", float("nan"))
    run_id = registry.log_training_run(nan)
    assert math.isnan(registry.client.get_run(run_id).data.metrics["test_macro_f1"])
    decision = registry.register_candidate(run_id, name, nan.test_metrics, GateConfig())
    assert not decision.promote and registry.champion_info(name)["version"] == "1"


def test_download_bundle_round_trips_byte_identically(registry, tmp_path):
    name = "oncoflow-download"
    rec = record(tmp_path, "dl", 0.5, seed=7)
    run_id = registry.log_training_run(rec)
    registry.register_candidate(run_id, name, rec.test_metrics, GateConfig())
    for i, ref in enumerate(("champion", 1, "1")):
        dst = registry.download_bundle(name, tmp_path / f"out-{i}", ref)
        for file in ("weights.pt", "bundle.json"):
            assert (dst / file).read_bytes() == (rec.bundle_dir / file).read_bytes()

    from components.bundle import ModelBundle

    loaded = ModelBundle.load(tmp_path / "out-0")
    assert loaded.class_names == CLASSES
    with pytest.raises(ConfigError, match="not empty"):
        registry.download_bundle(name, tmp_path / "out-0")
    with pytest.raises(NotFound):
        registry.download_bundle(name, tmp_path / "nope", "challenger")
    with pytest.raises(NotFound):
        registry.download_bundle("no-such-model", tmp_path / "nope2")
