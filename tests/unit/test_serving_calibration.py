"""Calibration in the serving engine, in process: the micro-batched path applies T, a
calibrated bundle answers with its prediction set and referral, an uncalibrated one with null
fields; the block survives bundle save/load; the PDF says what the referral is."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
import torch

from components.bundle import ModelBundle
from components.bundle_builder import make_bundle
from components.calibration.record import Calibration
from components.data.preprocess import Preprocessing
from components.models import build_model
from serving.batching import MicroBatcher
from serving.engine import DiagnosisEngine
from serving.schemas import ModelRef

CLASSES = ["benign", "malignant", "normal"]
CALIBRATION = {
    "method": "temperature",
    "temperature": 3.0,
    "coverage": 0.9,
    "qhat": 0.5,
    "fitted_on": "validation split (100 cases)",
    "n_fit": 100,
    "classes": CLASSES,
    "dangerous": ["malignant"],
}
REF = ModelRef(name="m", version="1", tag="oncoflow-model:test")


def _bundle(tmp_path, calibration):
    architecture = {"name": "small_cnn", "num_classes": 3, "in_channels": 3, "width": 4}
    torch.manual_seed(0)
    return make_bundle(
        build_model(**architecture).eval(),
        architecture=architecture,
        class_names=CLASSES,
        preprocessing=Preprocessing(size=16, channels=3),
        metrics={"macro_f1": 0.5, "calibration": {"ece_before": 0.3, "ece_after": 0.05}},
        data_fingerprint="f" * 64,
        config={},
        background_size=2,
        out_dir=tmp_path / "bundle",
        calibration=calibration,
    )


def _rows(engine, n=6):
    return engine._example_rows(n).numpy()


def _logits(engine, rows):
    with torch.inference_mode():
        return engine.model(*engine._unpack(torch.from_numpy(rows))).numpy()


def test_calibration_block_survives_save_and_load(tmp_path):
    bundle = ModelBundle.load(_bundle(tmp_path, CALIBRATION))
    assert bundle.calibration == CALIBRATION
    assert Calibration.from_dict(bundle.calibration).temperature == 3.0


def test_batched_predictions_are_softmax_of_logits_over_t(tmp_path):
    engine = DiagnosisEngine.from_dir(_bundle(tmp_path, CALIBRATION), REF)
    rows = _rows(engine)
    expected = torch.softmax(torch.from_numpy(_logits(engine, rows)) / 3.0, dim=1).numpy()

    async def batched():
        batcher = MicroBatcher(engine.infer_rows, max_batch=4)
        try:
            return await asyncio.gather(*(batcher.submit(rows[i : i + 1]) for i in range(6)))
        finally:
            batcher.close()

    got = np.stack(asyncio.run(batched()))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    answer = engine.predict_response(got[0], 0.0)
    decision = Calibration.from_dict(CALIBRATION).decide(got[0])
    assert answer.calibrated and answer.prediction_set == decision.prediction_set
    assert answer.refer is decision.refer and answer.referral_reason == decision.reason
    card = engine.card()
    assert card.calibration.temperature == 3.0
    assert card.calibration.test == {"ece_before": 0.3, "ece_after": 0.05}


def test_referral_names_a_dangerous_class_the_model_cannot_rule_out(tmp_path):
    engine = DiagnosisEngine.from_dir(_bundle(tmp_path, CALIBRATION), REF)
    answer = engine.predict_response(np.array([0.45, 0.40, 0.15]), 0.0)
    assert answer.prediction_set == ["benign", "malignant"]
    assert answer.refer is True
    assert "cannot rule out malignant" in answer.referral_reason
    sure = engine.predict_response(np.array([0.05, 0.9, 0.05]), 0.0)
    assert sure.prediction_set == ["malignant"] and sure.refer is False


def test_uncalibrated_bundle_serves_with_null_fields(tmp_path):
    engine = DiagnosisEngine.from_dir(_bundle(tmp_path, None), REF)
    rows = _rows(engine, 2)
    expected = torch.softmax(torch.from_numpy(_logits(engine, rows)), dim=1).numpy()
    got = engine.infer_rows(rows)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    answer = engine.predict_response(got[0], 0.0)
    assert answer.calibrated is False
    assert answer.prediction_set is None and answer.refer is None
    assert answer.referral_reason is None
    assert engine.card().calibration is None
    assert any("Not calibrated" in line for line in engine.card().limitations)


def test_a_calibration_for_other_classes_is_refused_at_start(tmp_path):
    from components.errors import ModelError

    other = CALIBRATION | {"classes": ["a", "b", "c"], "dangerous": []}
    with pytest.raises(ModelError, match="other classes"):
        DiagnosisEngine.from_dir(_bundle(tmp_path, other), REF)


def _pdf_text(**referral) -> str:
    from PIL import Image
    from pypdf import PdfReader

    from components.reports.pdf import ReportInput, render_report

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG")
    pdf = render_report(
        ReportInput(
            image_png=buffer.getvalue(),
            predicted_label="benign",
            probabilities={"benign": 0.55, "malignant": 0.4, "normal": 0.05},
            model_name="m",
            model_version="1",
            architecture="small_cnn",
            **referral,
        )
    )
    return " ".join(" ".join(p.extract_text() for p in PdfReader(io.BytesIO(pdf)).pages).split())


def test_pdf_shows_the_set_and_the_referral_in_words():
    reason = "The model cannot rule out malignant — refer for specialist review."
    text = _pdf_text(prediction_set=["benign", "malignant"], refer=True, referral_reason=reason)
    assert "Refer for specialist review" in text
    assert "Prediction set: benign, malignant" in text
    assert "cannot rule out malignant" in text
    assert "No prediction set" in _pdf_text()
