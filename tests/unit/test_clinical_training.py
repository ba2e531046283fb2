"""Models that read clinical records, trained by the pipeline's own central training step.

The splits are `SplitArrays` with images and encoded records, as `load_split_arrays` gives them
for a dataset with a clinical table; the config is the real tree with tiny overrides.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.data.cache import SplitArrays
from components.errors import ConfigError, DataError
from components.evaluation.predict import predict_proba
from components.models.tabular import TabularLayout
from components.training.assembly import preprocessing_from_config
from components.training.central import build_clinical_aware, train_central

SCHEMA = [
    {"name": "score", "type": "float", "min": -5.0, "max": 15.0},
    {"name": "smoker", "type": "bool", "required": False},
    {"name": "site", "type": "category", "allowed": ["arm", "face", "back"]},
]


def splits(n_per_class: int, seed: int) -> dict[str, SplitArrays]:
    """Synthetic images (3 classes) and records whose `score` is the class index plus noise."""
    from components.data.synthetic import make_synthetic

    out = {}
    for offset, name in enumerate(("train", "val", "test")):
        data = make_synthetic(n_per_class, size=32, seed=seed + offset)
        rng = np.random.default_rng(seed + 10 + offset)
        records = [
            {
                "score": float(label * 5 + rng.normal(0, 0.5)),
                "smoker": None if rng.random() < 0.3 else bool(rng.random() < 0.5),
                "site": str(rng.choice(["arm", "face", "back"])),
            }
            for label in data.labels
        ]
        out[name] = SplitArrays(
            x=data.images.transpose(0, 3, 1, 2).copy(),
            y=data.labels.astype(np.int64),
            ids=[f"{name}-{i}" for i in range(len(data.labels))],
            clinical=TabularLayout.from_schema(SCHEMA).encode_rows(records),
            schema=SCHEMA,
        )
    return out


@pytest.fixture(scope="module")
def data():
    return splits(24, seed=3)


def test_tabular_model_learns_from_records_alone(tiny_cfg, data, tmp_path):
    cfg = tiny_cfg("model=tabular", trainer={"max_epochs": 15, "lr": 0.01})
    result = train_central(cfg, data, tmp_path)
    model = result.model
    assert model.architecture == "tabular_mlp"
    probs = predict_proba(model, data["test"], preprocessing_from_config(cfg))
    accuracy = float((probs.argmax(1) == data["test"].y).mean())
    assert accuracy >= 0.9, accuracy
    # imputation and scaling statistics come from the training records
    score = data["train"].clinical[:, 0]
    assert float(model.encoder.fill[0]) == pytest.approx(float(np.nanmean(score)), rel=1e-4)


def test_fusion_model_trains_on_images_and_records(tiny_cfg, data, tmp_path):
    cfg = tiny_cfg(
        "model=fusion",
        model={"image_architecture": "small_cnn", "pretrained": False, "small_input": True},
        trainer={"max_epochs": 2},
    )
    result = train_central(cfg, data, tmp_path)
    assert result.architecture["image_architecture"] == "small_cnn"
    assert "tabular_schema" not in result.architecture  # the bundle carries the schema once
    probs = predict_proba(result.model, data["test"], preprocessing_from_config(cfg))
    assert probs.shape == (len(data["test"]), 3)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    # the model really reads the record: changing it changes the prediction
    test = data["test"]
    shifted = test.clinical.copy()
    shifted[:, 0] += 10.0
    moved = predict_proba(result.model, (test.x, shifted), preprocessing_from_config(cfg))
    assert np.abs(moved - probs).max() > 1e-3


def test_image_model_reads_only_the_images_of_a_clinical_split(data):
    (x,) = data["test"].inputs("small_cnn")
    assert x is data["test"].x
    assert len(data["test"].inputs("fusion")) == 2
    assert data["test"].inputs("tabular_mlp")[0] is data["test"].clinical


def test_clinical_model_without_records_is_refused(tiny_cfg, data, tmp_path):
    images_only = {k: SplitArrays(x=v.x, y=v.y, ids=v.ids) for k, v in data.items()}
    with pytest.raises(ConfigError, match="reads clinical records"):
        train_central(tiny_cfg("model=tabular"), images_only, tmp_path)
    with pytest.raises(DataError, match="clinical"):
        images_only["test"].inputs("fusion")


def test_private_runs_scale_records_from_the_schema_not_the_data(data):
    architecture = {"name": "tabular_mlp", "num_classes": 3, "hidden": [8], "dropout": 0.0}
    blind = SplitArrays(
        x=None,
        y=data["train"].y,
        ids=data["train"].ids,
        clinical=np.full_like(data["train"].clinical, 1234.0),
        schema=SCHEMA,
    )
    model = build_clinical_aware(architecture, blind, from_schema=True)
    encoder = model.encoder
    assert float(encoder.fill[0]) == pytest.approx(5.0)  # middle of [-5, 15]
    assert float(encoder.scale[0]) == pytest.approx(10.0)
    assert float(encoder.fill[1]) == pytest.approx(0.5)  # yes/no unknown
    np.testing.assert_allclose(encoder.fill[2:].numpy(), 1 / 3, rtol=1e-6)
    baseline = model.clinical_baseline(2)
    assert baseline.shape == (2, 5) and torch.equal(baseline[0], encoder.fill)
