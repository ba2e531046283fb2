"""Model bundles round-trip every architecture family, clinical ones included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.bundle import ModelBundle
from components.data.preprocess import Preprocessing
from components.errors import ConfigError, ModelError
from components.models import build_model
from components.models.tabular import encode_table, wisconsin_breast_cancer


def _bundle(model, architecture, kwargs, classes, schema=None) -> ModelBundle:
    return ModelBundle(
        architecture=architecture,
        architecture_kwargs=kwargs,
        class_names=classes,
        preprocessing=Preprocessing(size=32, channels=3),
        state_dict=model.state_dict(),
        tabular_schema=schema,
    )


def test_tabular_bundle_round_trip_gives_identical_outputs(tmp_path):
    demo = wisconsin_breast_cancer()
    torch.manual_seed(0)
    model = build_model("tabular_mlp", 2, tabular_schema=demo.schema).eval()
    rows = demo.table.head(8).to_dict("records")
    x = encode_table(rows, demo.schema)
    model.fit_normalisation(encode_table(demo.table.to_dict("records"), demo.schema))
    bundle = _bundle(model, "tabular_mlp", {"num_classes": 2}, demo.class_names, demo.schema)
    rebuilt = ModelBundle.load(bundle.save(tmp_path / "b")).build_model()
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))


def test_fusion_bundle_round_trip(tmp_path):
    schema = [{"name": "age", "type": "float", "min": 0, "max": 120, "unit": "years"}]
    torch.manual_seed(0)
    kwargs = {"num_classes": 2, "in_channels": 3, "width": 8}
    model = build_model("fusion", tabular_schema=schema, **kwargs).eval()
    image, table = torch.randn(2, 3, 32, 32), encode_table([{"age": 40}, {"age": 70}], schema)
    model.fit_normalisation(table)
    bundle = _bundle(model, "fusion", kwargs, ["a", "b"], schema)
    rebuilt = ModelBundle.load(bundle.save(tmp_path / "b")).build_model()
    with torch.no_grad():
        assert torch.allclose(model(image, table), rebuilt(image, table))


def test_clinical_architecture_without_schema_is_refused():
    with pytest.raises(ConfigError, match="tabular_schema"):
        build_model("tabular_mlp", 2)


def test_image_architecture_refuses_clinical_options():
    with pytest.raises(ConfigError, match="takes no options"):
        build_model("small_cnn", 2, tabular_schema=[])


def test_weights_that_do_not_fit_raise_model_error(tmp_path):
    small = build_model("small_cnn", 2, width=8)
    bundle = _bundle(small, "small_cnn", {"num_classes": 3, "width": 8}, ["a", "b", "c"])
    with pytest.raises(ModelError, match="do not fit"):
        ModelBundle.load(bundle.save(tmp_path / "b")).build_model()


def test_loading_a_folder_that_is_not_a_bundle_says_so(tmp_path):
    with pytest.raises(ModelError, match="not a model bundle"):
        ModelBundle.load(tmp_path)


def test_contents_are_recorded_and_read_back(tmp_path):
    from components.bundle import BACKGROUND_BASELINES, OOD_STATISTICS, model_fingerprint
    from components.explain.background import grey_levels

    torch.manual_seed(0)
    model = build_model("small_cnn", 2, width=8)
    plain = _bundle(model, "small_cnn", {"num_classes": 2, "width": 8}, ["a", "b"])
    assert plain.contents() == {
        "weights": True,
        "background": "none",
        "case_index": 0,
        "training_images": False,
        "ood_statistics": None,
    }
    plain.background = grey_levels(plain.preprocessing, 4)
    plain.background_source = BACKGROUND_BASELINES
    loaded = ModelBundle.load(plain.save(tmp_path / "b"))
    assert loaded.contents()["background"] == BACKGROUND_BASELINES
    assert loaded.contents()["training_images"] is False
    assert model_fingerprint(loaded) == model_fingerprint(plain)
    # a background whose origin was never recorded counts as training images (to be safe)
    unrecorded = _bundle(model, "small_cnn", {"num_classes": 2, "width": 8}, ["a", "b"])
    unrecorded.background = torch.zeros(2, 3, 32, 32)
    assert unrecorded.contents()["training_images"] is True
    # an index is counted from the arrays themselves
    unrecorded.embeddings = {"labels": torch.zeros(5).numpy()}
    assert unrecorded.contents()["case_index"] == 5
    # the OOD check's aggregate statistics are named, and survive save/load
    plain.ood_stats = {
        "means": np.zeros((2, 8), np.float32),
        "precision": np.eye(8, dtype=np.float32),
    }
    again = ModelBundle.load(plain.save(tmp_path / "ood"))
    assert again.contents()["ood_statistics"] == OOD_STATISTICS
    assert np.array_equal(again.ood_stats["precision"], np.eye(8))
    assert again.contents()["training_images"] is False


def test_the_model_fingerprint_changes_with_any_weight():
    from components.bundle import model_fingerprint

    torch.manual_seed(0)
    model = build_model("small_cnn", 2, width=8)
    bundle = _bundle(model, "small_cnn", {"num_classes": 2, "width": 8}, ["a", "b"])
    before = model_fingerprint(bundle)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name].view(-1)[0] += 1e-6
    bundle.state_dict = state
    assert model_fingerprint(bundle) != before
    bundle.state_dict = model.state_dict()
    bundle.class_names = ["b", "a"]
    assert model_fingerprint(bundle) != before
