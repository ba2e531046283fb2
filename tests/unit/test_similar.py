"""Similar cases from a site-local case library: a library image finds itself first;
neighbours share its class; no ids; a library is refused by any other model; without one the
engine answers 404 (a central non-DP bundle's own index is labelled as such)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from components.bundle import ModelBundle
from components.bundle_builder import make_bundle
from components.case_library import (
    BUNDLE_SOURCE,
    LIBRARY_SOURCE,
    THUMBNAIL_SIZE,
    NoCaseLibrary,
    build_case_library,
    build_from_folder,
    load_case_library,
)
from components.data.preprocess import Preprocessing
from components.data.synthetic import make_synthetic
from components.errors import ConfigError, DataError, InputError, ModelError
from components.models import build_model
from components.similar import SimilarCaseIndex

RESULT_KEYS = {"rank", "label", "label_index", "distance", "thumbnail_png_base64"}


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    """A small_cnn trained briefly on synthetic lesions, packaged (weights only) and loaded
    back, with a case library of the same images (as a site would build from its own)."""
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
        assert bundle.embeddings is None  # the bundle carries no case index
        library_dir = build_case_library(
            bundle, x_uint8, data.labels, tmp_path_factory.mktemp("library")
        )
        library = load_case_library(library_dir, bundle)
        yield bundle, bundle.build_model(), x, data, library
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def training_images_bundle(packaged, tmp_path_factory):
    """The same model packaged by a central non-DP run with package.training_images."""
    bundle, model, _, data, _ = packaged
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = make_bundle(
            model,
            architecture={"name": "small_cnn", "num_classes": 3, "width": 8},
            class_names=data.class_names,
            preprocessing=bundle.preprocessing,
            train_x=np.ascontiguousarray(data.images.transpose(0, 3, 1, 2)),
            train_y=data.labels,
            training_images=True,
            metrics={},
            data_fingerprint="synthetic-test",
            config={"training": {"mode": "central"}},
            background_size=12,
            out_dir=tmp_path_factory.mktemp("bundle-with-images"),
        )
        yield out
    finally:
        torch.set_num_threads(threads)


def test_a_library_image_finds_itself_first(packaged):
    _bundle, model, x, data, library = packaged
    index = library.index
    assert library.source == LIBRARY_SOURCE and len(index) == len(data.labels)
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
    bundle, model, _, data, library = packaged
    preprocessing = bundle.preprocessing
    index = library.index
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


def _png(image_hwc: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image_hwc).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_library_is_refused_by_another_model(packaged, tmp_path):
    bundle, _, _, data, _ = packaged
    torch.manual_seed(1)
    other = build_model("small_cnn", num_classes=3, width=8)
    retrained = ModelBundle(
        architecture=bundle.architecture,
        architecture_kwargs=bundle.architecture_kwargs,
        class_names=bundle.class_names,
        preprocessing=bundle.preprocessing,
        state_dict=other.state_dict(),
    )
    library_dir = build_case_library(
        retrained,
        np.ascontiguousarray(data.images[:6].transpose(0, 3, 1, 2)),
        data.labels[:6],
        tmp_path / "other",
    )
    with pytest.raises(ConfigError, match=r"built with model .* not with the served model"):
        load_case_library(library_dir, bundle)
    with pytest.raises(ConfigError, match="not a case library"):
        load_case_library(tmp_path / "nowhere", bundle)
    meta = json.loads((library_dir / "library.json").read_text())
    assert meta["size"] == 6 and meta["source"] == LIBRARY_SOURCE
    assert not any(str(tmp_path) in str(v) for v in meta.values())  # no paths stored


def test_library_from_a_folder_of_class_subfolders(packaged, tmp_path):
    bundle, model, x, data, _ = packaged
    images = tmp_path / "our-cases"
    picked = [0, 1, 40, 41, 80]
    for i in picked:
        folder = images / data.class_names[data.labels[i]]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"case-{i}.png").write_bytes(_png(data.images[i]))
    (images / data.class_names[0] / "notes.txt").write_text("not an image")
    out = build_from_folder(bundle, images, tmp_path / "library")
    library = load_case_library(out, bundle)
    assert len(library) == len(picked)
    counts = library.index.label_counts()
    assert counts == {
        name: sum(data.labels[i] == c for i in picked) for c, name in enumerate(data.class_names)
    }
    found = library.index.query_image(model, x[40], k=1)[0]
    assert found["distance"] == pytest.approx(0.0, abs=1e-5)
    (images / "not-a-class").mkdir()
    with pytest.raises(DataError, match="not-a-class"):
        build_from_folder(bundle, images, tmp_path / "again")


def _engine(bundle_dir, library=None):
    from serving.engine import DiagnosisEngine
    from serving.schemas import ModelRef

    ref = ModelRef(name="m", version="1", tag="oncoflow-model:t")
    return DiagnosisEngine.from_dir(bundle_dir, ref, optimise=False, case_library=library)


def test_engine_answers_from_the_site_library_only(packaged, tmp_path):
    bundle, _, _, data, _ = packaged
    bundle_dir = bundle.save(tmp_path / "bundle")
    library_dir = build_case_library(
        bundle,
        np.ascontiguousarray(data.images.transpose(0, 3, 1, 2)),
        data.labels,
        tmp_path / "library",
    )
    without = _engine(bundle_dir)
    with pytest.raises(NoCaseLibrary, match="no site-local case library") as info:
        without.check_similar()
    assert info.value.http_status == 404 and "oncoflow case-library build" in str(info.value)
    card = without.card()
    assert card.similar_cases == 0 and card.similar_source is None
    assert card.contents.training_images is False and card.contents.case_index == 0
    assert card.contents.background == "constant grey levels (not patient data)"

    served = _engine(bundle_dir, library_dir)
    answer = served.similar(served.prepare(_png(data.images[7])), k=3)
    assert answer.source == LIBRARY_SOURCE and answer.index_size == len(data.labels)
    assert answer.neighbours[0].distance == pytest.approx(0.0, abs=1e-5)
    assert served.card().similar_source == LIBRARY_SOURCE


def test_a_central_bundle_with_training_images_keeps_its_own_index(
    packaged, training_images_bundle, tmp_path
):
    _, _, _, data, _ = packaged
    engine = _engine(training_images_bundle)
    answer = engine.similar(engine.prepare(_png(data.images[3])), k=2)
    assert answer.source == BUNDLE_SOURCE and answer.index_size == len(data.labels)
    card = engine.card()
    assert card.contents.training_images and card.contents.case_index == len(data.labels)
    assert card.contents.background == "training images"
    # a site library, when given, replaces the bundle's index
    library_dir = build_case_library(
        ModelBundle.load(training_images_bundle),
        np.ascontiguousarray(data.images[:9].transpose(0, 3, 1, 2)),
        data.labels[:9],
        tmp_path / "library",
    )
    engine = _engine(training_images_bundle, library_dir)
    answer = engine.similar(engine.prepare(_png(data.images[3])), k=2)
    assert answer.source == LIBRARY_SOURCE and answer.index_size == 9
