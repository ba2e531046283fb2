"""Test-time views (`dataset.tta`): what the views are, that they travel with the bundle, and
that evaluation, the service's batched path, its OOD path and `/explain` all average the same
logits over them."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
import torch
from PIL import Image
from test_serving_calibration import CALIBRATION, REF, _bundle

from components.bundle import ModelBundle
from components.calibration.ood import fit_detector
from components.config import compose
from components.data.preprocess import Preprocessing
from components.errors import ConfigError
from components.evaluation.predict import predict_logits, predict_proba
from components.models import build_model
from serving.batching import MicroBatcher
from serving.engine import DiagnosisEngine

BOTH = ("crop", "hflip")


def _stripes() -> torch.Tensor:
    """(2, 3, 8, 8): the left half bright, the right half dark."""
    x = torch.zeros(2, 3, 8, 8)
    x[..., :4] = 1.0
    return x


def test_the_views_are_the_image_a_centre_crop_and_their_mirror_images():
    x = _stripes()
    (same,) = Preprocessing(size=8).views(x)
    assert same is x
    image, crop, mirror, mirror_crop = Preprocessing(size=8, tta=BOTH, tta_crop=0.5).views(x)
    assert image is x and crop.shape == mirror.shape == x.shape
    # the centre half (columns 2..5) stretched to full width: bright left half, dark right half
    assert crop[0, 0, 0, 0] == 1.0 and crop[0, 0, 0, -1] == 0.0
    torch.testing.assert_close(mirror, x.flip(-1))
    torch.testing.assert_close(mirror_crop, crop.flip(-1))
    assert Preprocessing(tta=("hflip",)).view_count == 2
    assert Preprocessing(tta=BOTH).view_count == 4


def test_views_of_normalised_pixels_are_normalised_views():
    pre = Preprocessing(size=8, tta=BOTH)
    pixels = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    for a, b in zip(pre.views(pre.normalise(pixels)), pre.views(pixels.float()), strict=True):
        torch.testing.assert_close(a, pre.normalise(b), atol=1e-5, rtol=0)


def test_views_travel_with_the_preprocessing_and_old_bundles_read_as_before():
    pre = Preprocessing(size=16, tta=("hflip", "crop"), tta_crop=0.8)
    assert pre.tta == BOTH  # one canonical order
    again = Preprocessing.from_dict(pre.to_dict())
    assert again == pre
    plain = Preprocessing(size=16).to_dict()
    assert "tta" not in plain and "tta_crop" not in plain  # unchanged bundle.json, fingerprint
    assert Preprocessing.from_dict(plain).tta == ()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"tta": ("rotate",)}, "unknown test-time views"), ({"tta_crop": 1.0}, "tta_crop")],
)
def test_a_bad_view_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Preprocessing(**kwargs)


def test_the_config_refuses_mirror_views_where_laterality_counts():
    with pytest.raises(ConfigError, match=r"dataset\.hflip is false"):
        compose(["dataset.hflip=false", "dataset.tta=[hflip]"])
    with pytest.raises(ConfigError, match=r"dataset\.tta names"):
        compose(["dataset.tta=[rotate]"])
    cfg = compose(["dataset.hflip=true", "dataset.tta=[crop,hflip]", "dataset.tta_crop=0.8"])
    from components.training.assembly import preprocessing_from_config

    assert preprocessing_from_config(cfg).tta == BOTH


def test_evaluation_averages_the_logits_over_the_views():
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=3, in_channels=3, width=4).eval()
    pixels = np.random.default_rng(0).integers(0, 256, (5, 3, 16, 16), dtype=np.uint8)
    pre = Preprocessing(size=16, tta=BOTH)
    with torch.no_grad():
        views = pre.views(pre.normalise(torch.from_numpy(pixels)))
        expected = torch.stack([model(v) for v in views]).mean(0)
        single = model(views[0])
    np.testing.assert_allclose(predict_logits(model, pixels, pre), expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(
        predict_proba(model, pixels, pre), torch.softmax(expected, 1).numpy(), atol=1e-5
    )
    assert not np.allclose(expected.numpy(), single.numpy(), atol=1e-4)  # the views matter
    plain = Preprocessing(size=16)
    np.testing.assert_allclose(predict_logits(model, pixels, plain), single.numpy(), atol=1e-5)


def _served(tmp_path, calibration=CALIBRATION) -> DiagnosisEngine:
    directory = _bundle(tmp_path, calibration)
    bundle = ModelBundle.load(directory)
    bundle.preprocessing = Preprocessing(size=16, channels=3, tta=BOTH)
    bundle.save(directory)
    return DiagnosisEngine.from_dir(directory, REF)


def _expected(engine: DiagnosisEngine, rows: np.ndarray) -> torch.Tensor:
    """Mean logits of the model as trained over the four views of each row's image."""
    x = torch.from_numpy(rows).reshape(-1, 3, 16, 16)
    with torch.inference_mode():
        return torch.stack([engine.model(v) for v in engine.bundle.preprocessing.views(x)]).mean(0)


def _batched(engine: DiagnosisEngine, rows: np.ndarray) -> np.ndarray:
    async def run():
        batcher = MicroBatcher(engine.infer_rows, max_batch=4)
        try:
            return await asyncio.gather(*(batcher.submit(r[None]) for r in rows))
        finally:
            batcher.close()

    return np.stack(asyncio.run(run()))


def test_the_service_predicts_from_the_same_views(tmp_path):
    engine = _served(tmp_path)
    rows = engine._example_rows(6).numpy()
    expected = torch.softmax(_expected(engine, rows) / 3.0, 1).numpy()
    np.testing.assert_allclose(_batched(engine, rows), expected, atol=1e-5)
    assert engine.card().preprocessing["tta"] == list(BOTH)


def test_the_ood_path_gives_the_same_probabilities_and_the_image_s_own_features(tmp_path):
    plain = _served(tmp_path / "plain")
    images = torch.randn(60, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        features = plain.model.embed(images)
        detector = fit_detector(
            "mahalanobis",
            val_logits=plain.model.head(features).numpy(),
            val_features=features.numpy(),
            false_alarm=0.05,
            train_features=features.numpy(),
            train_labels=np.arange(60) % 3,
            n_classes=3,
        )
    directory = _bundle(tmp_path / "ood", CALIBRATION | {"ood": detector.meta()})
    bundle = ModelBundle.load(directory)
    bundle.preprocessing, bundle.ood_stats = plain.bundle.preprocessing, detector.arrays()
    bundle.save(directory)
    engine = DiagnosisEngine.from_dir(directory, REF)
    rows = images[:4].reshape(4, -1).numpy()
    got = _batched(engine, rows)
    expected = torch.softmax(_expected(engine, rows) / 3.0, 1).numpy()
    np.testing.assert_allclose(got[:, :3], expected, atol=1e-5)
    with torch.inference_mode():
        own = detector.scores(None, engine.model.embed(images[:4]).numpy())
    np.testing.assert_allclose(got[:, 3], own, rtol=1e-3)


def test_an_explanation_names_what_the_prediction_says(tmp_path):
    engine = _served(tmp_path)
    picture = np.random.default_rng(3).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    case = engine.prepare(buffer.getvalue())
    predicted = engine.predict(case)
    explained = engine.explain(case, nsamples=2)
    assert explained.label == predicted.label
    assert explained.target == predicted.label
    for name, p in predicted.probabilities.items():
        assert explained.probabilities[name] == pytest.approx(p, abs=1e-5)


def test_the_model_card_says_which_views_a_prediction_averages():
    from flows.promote import _views_text

    card = _views_text(Preprocessing(size=96, tta=BOTH, tta_crop=0.8).to_dict())
    assert card.startswith("4 views, logits averaged")
    assert "centre 80.0%" in card and "mirror image" in card
    assert _views_text(Preprocessing(size=96).to_dict()) == "none (the image itself)"
