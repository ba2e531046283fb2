"""The PDF report parses back (pypdf) and contains what it claims, and nothing identifying."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pytest
from PIL import Image
from pypdf import PdfReader

from components.bundle import ModelBundle
from components.data.preprocess import Preprocessing
from components.errors import InputError
from components.explain.gradcam import overlay_png
from components.reports.pdf import (
    DISCLAIMER,
    NO_PRIVACY,
    ReportInput,
    bundle_facts,
    format_probability,
    render_report,
)


def _png(seed: int, size: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _text(pdf: bytes) -> tuple[str, PdfReader]:
    reader = PdfReader(io.BytesIO(pdf))
    text = "\n".join(page.extract_text() for page in reader.pages)
    return " ".join(text.split()), reader  # line breaks from wrapping become spaces


@pytest.fixture
def bundle() -> ModelBundle:
    return ModelBundle(
        architecture="efficientnet_lite0",
        architecture_kwargs={"num_classes": 3},
        class_names=["benign", "malignant", "normal"],
        preprocessing=Preprocessing(size=96, channels=3),
        state_dict={},
        metrics={"accuracy": 0.8512, "macro_f1": 0.8023, "per_class": {"benign": 0.9}},
        privacy={"epsilon": 7.93, "delta": 1e-5, "accountant": "rdp", "rounds": 20},
        data_fingerprint="sha256:5be1f0c2",
    )


def _report(bundle: ModelBundle, **changes) -> ReportInput:
    image = np.full((48, 48, 3), 100, np.uint8)
    heat = np.zeros((48, 48), np.float32)
    heat[10:20, 30:40] = 1.0
    fields = {
        "image_png": _png(0),
        "overlay_png": overlay_png(image, heat),
        "predicted_label": "malignant",
        "probabilities": {"benign": 0.1234, "malignant": 0.8456, "normal": 0.031},
        "model_name": "busi-classifier",
        "model_version": "7",
        "cam_method": "gradcam++",
        "heat_summary": "The heat is focal and centred in the upper right of the image.",
        "shap_features": [
            {"feature": "age", "value": 61.0, "unit": "years", "shap": 0.0821},
            {"feature": "hpv_positive", "value": True, "unit": "", "shap": -0.0312},
            {"feature": "bmi", "value": None, "unit": "kg/m2", "shap": 0.0011},
            {
                "feature": "fitspatrick",
                "value": 3,
                "unit": "",
                "description": "Fitzpatrick skin type",
                "shap": 0.0004,
            },
        ],
        "case_id": "case-0042",
        "created_at": datetime(2025, 3, 4, 10, 5, 6, tzinfo=UTC),
        **bundle_facts(bundle),
    }
    return ReportInput(**(fields | changes))


def test_report_contains_what_it_claims(bundle):
    pdf = render_report(_report(bundle))
    assert pdf.startswith(b"%PDF")
    text, reader = _text(pdf)
    assert "Predicted class: malignant (84.6%)" in text
    for p in (0.1234, 0.8456, 0.031):
        assert format_probability(p) in text
    assert {"12.3%", "84.6%", "3.1%"} <= set(text.split())
    assert "busi-classifier version 7" in text and "efficientnet_lite0" in text
    assert "sha256:5be1f0c2" in text
    assert "accuracy 0.851" in text and "macro_f1 0.802" in text
    assert "per_class" not in text  # nested metrics stay in the model card
    assert "epsilon = 7.93, delta = 1e-05, accountant: rdp" in text and "rounds: 20" in text
    # features by their names in words, with the schema's description where it has one
    assert "Age 61 years +0.0821" in text and "Hpv positive True -0.0312" in text
    assert "Bmi missing" in text and "Fitspatrick (Fitzpatrick skin type) 3 +0.0004" in text
    assert "gradcam++ overlay for malignant" in text
    assert "upper right" in text
    assert "2025-03-04 10:05:06 UTC" in text and "case-0042" in text
    assert " ".join(DISCLAIMER.split()) in text
    images = [image for page in reader.pages for image in page.images]
    assert len(images) == 2  # the input image and the Grad-CAM overlay
    assert reader.metadata.title == "oncoflow decision-support report"


def test_report_without_privacy_shap_or_overlay_says_so(bundle):
    bundle.privacy = None
    report = _report(bundle, overlay_png=None, shap_features=None, case_id=None)
    text, reader = _text(render_report(report))
    assert " ".join(NO_PRIVACY.split()) in text
    assert "SHAP" not in text and "overlay" not in text and "Case" not in text
    assert sum(len(page.images) for page in reader.pages) == 1
    infinite = _report(bundle, privacy={"epsilon": float("inf"), "delta": 1e-5})
    assert " ".join(NO_PRIVACY.split()) in _text(render_report(infinite))[0]


def test_timestamp_is_utc(bundle):
    local = datetime(2025, 3, 4, 12, 5, 6, tzinfo=timezone(timedelta(hours=2)))
    text, _ = _text(render_report(_report(bundle, created_at=local)))
    assert "2025-03-04 10:05:06 UTC" in text


def test_text_is_escaped_not_interpreted(bundle):
    report = _report(bundle, model_name="<b>model</b> & co")
    assert "<b>model</b> & co version 7" in _text(render_report(report))[0]


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"case_id": "Jane Doe"}, "pseudonymous"),
        ({"probabilities": {"benign": 1.2, "malignant": 0.1}}, r"\[0, 1\]"),
        ({"probabilities": {"benign": 0.9}}, "no probability"),
        ({"probabilities": {}}, "probabilities"),
        ({"image_png": b"not a png"}, "not a readable image"),
        ({"shap_features": [{"value": 1.0}]}, "SHAP"),
    ],
)
def test_bad_input_is_refused(bundle, changes, match):
    with pytest.raises(InputError, match=match):
        render_report(_report(bundle, **changes))
