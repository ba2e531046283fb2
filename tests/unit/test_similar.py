"""Similar cases: a training image finds itself first; neighbours share its class; no ids."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from components.bundle import ModelBundle
from components.bundle_builder import THUMBNAIL_SIZE, make_bundle
from components.data.preprocess import Preprocessing
from components.data.synthetic import make_synthetic
from components.errors import InputError, ModelError
from components.models import build_model
from components.similar import SimilarCaseIndex

RESULT_KEYS = {"rank", "label", "label_index", "distance", "thumbnail_png_base64"}


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    """A small_cnn trained briefly on synthetic lesions, packaged and loaded back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = make_synthetic(40, size=32, seed=0)
        preprocessing = Preprocessing(size=32, channels=3)
        x_uint8 = np.ascontiguousarray(data.images.transpose(0, 3, 1, 2))
        x = preprocessing.normalise(torch.from_numpy(x_uint8))
        y = torch.from_numpy(data.labels)
        torch.manual_seed(0)
        model = build_model("small_cnn", num_classes=3, width=8)
        optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(6):
            model.train()
            order = torch.randperm(len(y))
            for start in range(0, len(y), 32):
                idx = order[start : start + 32]
                optimiser.zero_grad()
                torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                optimiser.step()
        model.eval()
        out = make_bundle(
            model,
            architecture={"name": "small_cnn", "num_classes": 3, "width": 8},
            class_names=data.class_names,
            preprocessing=preprocessing,
            train_x=x_uint8,
            train_y=data.labels,
            metrics={},
            data_fingerprint="synthetic-test",
            config={},
            background_size=12,
            out_dir=tmp_path_factory.mktemp("bundle"),
        )
        bundle = ModelBundle.load(out)
        yield bundle, bundle.build_model(), x, data
    finally:
        torch.set_num_threads(threads)


def test_a_training_image_finds_itself_first(packaged):
    bundle, model, x, data = packaged
    index = SimilarCaseIndex.from_bundle(bundle)
    assert len(index) == len(data.labels)
    for i in (0, 7, 42, len(data.labels) - 1):
        results = index.query_image(model, x[i], k=5)
        assert [r["rank"] for r in results] == [1, 2, 3, 4, 5]
        assert results[0]["distance"] == pytest.approx(0.0, abs=1e-5)
        assert results[0]["label"] == data.class_names[data.labels[i]]
        assert all(set(r) == RESULT_KEYS for r in results)  # nothing that could identify
        distances = [r["distance"] for r in results]
        assert distances == sorted(distances)
        thumb = Image.open(io.BytesIO(base64.b64decode(results[0]["thumbnail_png_base64"])))
        assert thumb.size == (THUMBNAIL_SIZE, THUMBNAIL_SIZE)


def test_neighbours_of_a_trained_model_share_the_class(packaged):
    bundle, model, _, data = packaged
    preprocessing = bundle.preprocessing
    index = SimilarCaseIndex.from_bundle(bundle)
    test = make_synthetic(10, size=32, seed=5)
    xt = preprocessing.normalise(torch.from_numpy(test.images).permute(0, 3, 1, 2))
    agree = [
        np.mean([r["label_index"] == label for r in index.query_image(model, xt[i], k=5)])
        for i, label in enumerate(test.labels)
    ]
    assert np.mean(agree) > 0.7  # chance is 1/3
    assert index.label_counts() == {name: 40 for name in data.class_names}


def test_index_checks_its_inputs():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(6, 4)).astype(np.float32)
    labels = np.array([0, 1, 0, 1, 0, 1])
    thumbs = np.zeros((6, 8, 8, 3), np.uint8)
    index = SimilarCaseIndex(features, labels, thumbs, ["a", "b"])
    assert len(index.query(features[2], k=50)) == 6  # k is capped by the index size
    scaled = index.query(features[2] * 10.0, k=1, thumbnails=False)[0]  # cosine: scale-free
    assert (
        scaled["distance"] == pytest.approx(0.0, abs=1e-6) and "thumbnail_png_base64" not in scaled
    )
    opposite = index.query(-features[2], k=6)[-1]
    assert opposite["distance"] == pytest.approx(2.0, abs=1e-5)
    with pytest.raises(InputError, match="4"):
        index.query(np.zeros(3), k=1)
    with pytest.raises(InputError):
        index.query(features[0], k=0)
    with pytest.raises(InputError):
        index.query(np.full(4, np.nan), k=1)
    with pytest.raises(ModelError, match="inconsistent"):
        SimilarCaseIndex(features, labels[:5], thumbs, ["a", "b"])
    with pytest.raises(ModelError, match="classes"):
        SimilarCaseIndex(features, labels + 1, thumbs, ["a", "b"])
    grey = SimilarCaseIndex(features, labels, np.zeros((6, 8, 8, 1), np.uint8), ["a", "b"])
    png = base64.b64decode(grey.query(features[0], k=1)[0]["thumbnail_png_base64"])
    assert Image.open(io.BytesIO(png)).mode == "L"


def test_bundle_without_index_is_a_model_error(packaged):
    bundle = packaged[0]
    empty = ModelBundle(
        architecture=bundle.architecture,
        architecture_kwargs=bundle.architecture_kwargs,
        class_names=bundle.class_names,
        preprocessing=bundle.preprocessing,
        state_dict={},
    )
    with pytest.raises(ModelError, match="no similar-case index"):
        SimilarCaseIndex.from_bundle(empty)
