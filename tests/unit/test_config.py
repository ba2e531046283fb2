"""The Hydra config tree composes, validates and rejects bad overrides with clear errors."""

from __future__ import annotations

import pytest

from components.config import compose, flatten
from components.errors import ConfigError


def test_defaults_compose_to_a_valid_run():
    cfg = compose([])
    assert cfg.dataset.name == "synthetic"
    assert cfg.model.name == "small_cnn"
    assert cfg.training.mode == "central"
    assert cfg.registry.model_name == "oncoflow-synthetic"


@pytest.mark.parametrize("dataset", ["brain_tumor_mri", "busi", "chest_xray", "breastmnist"])
def test_every_dataset_composes(dataset):
    cfg = compose([f"dataset={dataset}"])
    assert cfg.dataset.name == dataset
    assert len(cfg.dataset.classes) >= 2
    assert cfg.registry.model_name == f"oncoflow-{dataset}"


def test_overrides_reach_nested_keys_and_keep_types():
    cfg = compose(["dataset=busi", "model=resnet18", "trainer.max_epochs=3", "trainer.lr=0.01"])
    assert cfg.model.name == "resnet18"
    assert cfg.trainer.max_epochs == 3
    assert cfg.trainer.lr == pytest.approx(0.01)


def test_data_root_comes_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ONCOFLOW_DATA", str(tmp_path))
    cfg = compose(["dataset=busi"])
    assert cfg.dataset.root == f"{tmp_path}/busi"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("dataset=nope", "invalid configuration"),
        ("trainer.max_epochs=three", "invalid configuration"),
        ("trainer.not_a_key=1", "invalid configuration"),
        ("trainer.imbalance=magic", "trainer.imbalance"),
        ("model.norm=layer", "model.norm"),
        ("validation.on_failure=ignore", "validation.on_failure"),
        ("dataset.split.test_fraction=0.9", "split fractions"),
        ("dataset.channels=2", "channels"),
        ("trainer.lr=0", "positive"),
    ],
)
def test_bad_overrides_fail_with_a_clear_message(override, message):
    with pytest.raises(ConfigError, match=message):
        compose([override])


def test_flatten_nested_dicts():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": "x"}) == {
        "a.b": 1,
        "a.c.d": [1, 2],
        "e": "x",
    }
