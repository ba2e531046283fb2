"""The Diagnose page's result box shows the service's prediction set and referral in words;
an uncalibrated model falls back to the fixed low-confidence threshold."""

from __future__ import annotations

from serving.schemas import ModelRef, PredictResponse
from ui import html
from ui.gateway import _prediction

REF = ModelRef(name="m", version="3", tag="oncoflow-model:x")
REASON = "The model cannot rule out malignant (its 90% prediction set is benign and malignant)"


def _card(prediction) -> str:
    return html.result_card(
        prediction.label,
        prediction.confidence,
        "m",
        "3",
        7,
        None,
        12.0,
        prediction_set=prediction.prediction_set,
        refer=prediction.refer,
        referral_reason=prediction.referral_reason,
    )


def test_a_referred_case_shows_the_set_and_the_reason():
    answer = PredictResponse(
        label="benign",
        probabilities={"benign": 0.9, "malignant": 0.1},
        calibrated=True,
        prediction_set=["benign", "malignant"],
        refer=True,
        referral_reason=REASON,
        model=REF,
        latency_ms=12.0,
    )
    card = _card(_prediction(answer))
    assert "Refer for specialist review" in card
    assert 'id="of-prediction-set"' in card and "Malignant" in card
    assert "cannot rule out malignant" in card
    assert "Low confidence" not in card  # the referral replaces the fixed threshold


def test_a_confident_calibrated_case_is_not_flagged_even_below_the_old_threshold():
    answer = PredictResponse(
        label="benign",
        probabilities={"benign": 0.55, "malignant": 0.45},
        prediction_set=["benign"],
        refer=False,
        referral_reason="The model's 90% prediction set holds benign only.",
        model=REF,
        latency_ms=1.0,
    )
    card = _card(_prediction(answer))
    assert "Refer" not in card and "Low confidence" not in card
    assert "holds benign only" in card


def test_an_uncalibrated_model_falls_back_to_the_low_confidence_threshold():
    answer = PredictResponse(
        label="benign", probabilities={"benign": 0.55, "malignant": 0.45}, model=REF, latency_ms=1
    )
    prediction = _prediction(answer)
    assert prediction.refer is None and prediction.prediction_set is None
    card = _card(prediction)
    assert "Low confidence" in card and "Prediction set" not in card


def test_the_danger_probability_is_shown_against_the_operating_point():
    answer = PredictResponse(
        label="benign",
        probabilities={"benign": 0.7, "malignant": 0.3},
        calibrated=True,
        prediction_set=["benign"],
        refer=True,
        referral_reason="The most likely class is benign, but the probability of malignant is 30%",
        danger_probability=0.3,
        danger_flagged=True,
        danger_threshold=0.2,
        model=REF,
        latency_ms=12.0,
    )
    prediction = _prediction(answer)
    card = html.result_card(
        prediction.label,
        prediction.confidence,
        "m",
        "3",
        7,
        None,
        12.0,
        prediction_set=prediction.prediction_set,
        refer=prediction.refer,
        referral_reason=prediction.referral_reason,
        danger_probability=prediction.danger_probability,
        danger_threshold=prediction.danger_threshold,
    )
    assert 'id="of-danger"' in card and "30.0%: at or above the 20.0% operating point" in card


def test_an_out_of_distribution_answer_has_no_finding_or_confidence():
    answer = PredictResponse(
        status="out_of_distribution",
        calibrated=True,
        refer=True,
        referral_reason="This image is unlike the images the model was trained on",
        ood_score=9.0,
        ood_threshold=2.0,
        model=REF,
        latency_ms=12.0,
    )
    prediction = _prediction(answer)
    assert prediction.out_of_distribution and prediction.label is None
    assert prediction.probabilities == {} and prediction.confidence == 0.0
    card = html.ood_card(prediction.referral_reason, "m", "3", prediction.latency_ms)
    assert 'id="of-ood"' in card and "Refer for specialist review" in card
    assert "unlike the images the model was trained on" in card
    assert "Model confidence" not in card and "Not saved" in card
