"""The OOD check and the operating point in the serving engine, in process: the bundle keeps
the detector's statistics (ood.npz) and says so in `contents`; the micro-batched path returns
the OOD score with the probabilities; an input unlike the training images gets status
`out_of_distribution`, no label and a referral (also in the PDF); a too-small image is refused."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
import torch
from PIL import Image
from test_serving_calibration import CALIBRATION, REF, _bundle

from components.bundle import OOD_STATISTICS, ModelBundle
from components.calibration.ood import fit_detector
from components.errors import InputError
from serving.batching import MicroBatcher
from serving.engine import OOD_REASON, DiagnosisEngine

POINT = {
    "threshold": 0.3,
    "target_sensitivity": 0.95,
    "sensitivity": 0.96,
    "specificity": 0.7,
    "n_positive": 50,
    "n_negative": 50,
}


def _images(n: int, seed: int) -> torch.Tensor:
    """Normalised 16x16 images like the 'training data': smooth random blobs."""
    g = torch.Generator().manual_seed(seed)
    small = torch.randn(n, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(small, size=16, mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """An engine whose bundle has an operating point and a Mahalanobis OOD check fitted on
    the features of smooth random images."""
    tmp = tmp_path_factory.mktemp("ood")
    plain = DiagnosisEngine.from_dir(_bundle(tmp / "plain", CALIBRATION), REF, optimise=False)
    with torch.inference_mode():
        train, val = plain.model.embed(_images(200, 1)), plain.model.embed(_images(100, 2))
        val_logits = plain.model.head(val)
    detector = fit_detector(
        "mahalanobis",
        val_logits=val_logits.numpy(),
        val_features=val.numpy(),
        false_alarm=0.05,
        train_features=train.numpy(),
        train_labels=np.arange(200) % 3,
        n_classes=3,
    )
    block = CALIBRATION | {"operating_point": POINT, "ood": detector.meta()}
    bundle_dir = _bundle(tmp / "ood", block)
    bundle = ModelBundle.load(bundle_dir)
    bundle.ood_stats = detector.arrays()
    bundle.config = {"dataset": {"limits": {"min_side": 8}}}
    bundle.save(bundle_dir)
    return DiagnosisEngine.from_dir(bundle_dir, REF), detector


def test_bundle_keeps_the_statistics_and_says_what_they_are(served):
    engine, detector = served
    again = ModelBundle.load(engine.model_dir)
    np.testing.assert_array_equal(again.ood_stats["precision"], detector.arrays()["precision"])
    assert again.contents()["ood_statistics"] == OOD_STATISTICS
    card = engine.card()
    assert card.contents.ood_statistics == OOD_STATISTICS
    assert card.calibration.ood["score"] == "mahalanobis"
    assert card.calibration.operating_point["threshold"] == 0.3


def test_batched_rows_carry_the_ood_score_of_the_served_model(served):
    engine, detector = served
    far = np.random.default_rng(0).normal(0.0, 40.0, (2, 768))  # wild, unlike any image
    rows = np.concatenate([_images(4, 3).reshape(4, -1), far]).astype(np.float32)

    async def batched():
        batcher = MicroBatcher(engine.infer_rows, max_batch=4)
        try:
            return await asyncio.gather(*(batcher.submit(rows[i : i + 1]) for i in range(6)))
        finally:
            batcher.close()

    got = np.stack(asyncio.run(batched()))
    assert got.shape == (6, 4)  # 3 probabilities + the score
    with torch.inference_mode():
        x = torch.from_numpy(rows).reshape(-1, 3, 16, 16)
        logits = engine.model(x)
        expected = detector.scores(None, engine.model.embed(x).numpy())
    np.testing.assert_allclose(got[:, :3], torch.softmax(logits / 3.0, 1).numpy(), atol=1e-5)
    np.testing.assert_allclose(got[:, 3], expected, rtol=1e-3)
    inside = [engine.predict_response(r, 0.0) for r in got[:4]]
    assert sum(a.status == "ok" for a in inside) >= 3  # 5 % false alarms at most, in expectation
    for answer in inside:
        if answer.status == "ok":
            assert answer.label in engine.classes and answer.ood_score <= answer.ood_threshold
            assert answer.danger_probability == pytest.approx(answer.probabilities["malignant"])
            assert answer.danger_threshold == 0.3
            assert answer.danger_flagged is (answer.danger_probability >= 0.3)
    junk = engine.predict_response(got[4], 0.0)
    assert junk.status == "out_of_distribution" and junk.refer is True
    assert junk.label is None and junk.probabilities is None and junk.prediction_set is None
    assert junk.referral_reason == OOD_REASON and junk.ood_score > junk.ood_threshold


def _png(size: tuple[int, int], value: int | None) -> bytes:
    """A blank image of grey `value`, or pixel noise (None)."""
    buffer = io.BytesIO()
    if value is None:
        noise = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(noise).save(buffer, "PNG")
    else:
        Image.new("RGB", size, (value, value, value)).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_too_small_image_is_refused_naming_the_limit(served):
    engine, _ = served
    with pytest.raises(InputError, match=r"1x1 pixels.*at least 8 pixels"):
        engine.prepare(_png((1, 1), 0))
    engine.prepare(_png((8, 8), None))  # the limit itself is fine


def test_the_pdf_of_an_ood_image_gives_no_diagnosis(served):
    from pypdf import PdfReader

    engine, _ = served
    case = engine.prepare(_png((16, 16), None))  # pixel noise
    assert engine.predict(case).status == "out_of_distribution"
    pdf = engine.report(case)
    text = " ".join(" ".join(p.extract_text() for p in PdfReader(io.BytesIO(pdf)).pages).split())
    assert "No diagnosis: the image is unlike the training images" in text
    assert "gives no diagnosis" in text
    assert "Predicted class" not in text and "Grad-CAM" not in text


def test_a_blank_image_is_refused_in_words(served):
    engine, _ = served
    for grey in (0, 128):
        with pytest.raises(InputError, match="blank"):
            engine.prepare(_png((40, 24), grey))
