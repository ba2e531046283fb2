"""Evaluation metrics against values worked out by hand; inference and plot helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from components.errors import DataError, ModelError
from components.evaluation.metrics import binary_auroc, evaluate, expected_calibration_error

CLASSES = ["A", "B", "C"]

# 8 cases, 3 classes. Predictions (arg-max of the probabilities below):
#   true:  A A A B B C C C
#   pred:  A A B B B C A A
# confusion (rows = true):  A [2 1 0]   B [0 2 0]   C [2 0 1]
Y_TRUE = np.array([0, 0, 0, 1, 1, 2, 2, 2])
Y_PRED = [0, 0, 1, 1, 1, 2, 0, 0]


def _probs_for(preds: list[int], confidence: float = 0.6, k: int = 3) -> np.ndarray:
    probs = np.full((len(preds), k), (1 - confidence) / (k - 1))
    probs[np.arange(len(preds)), preds] = confidence
    return probs


def test_three_class_metrics_match_hand_computation():
    result = evaluate(Y_TRUE, _probs_for(Y_PRED), CLASSES)

    assert result["n"] == 8
    assert result["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [2, 0, 1]]
    assert result["accuracy"] == pytest.approx(5 / 8)
    # sensitivities A 2/3, B 2/2, C 1/3
    assert result["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 1 / 3) / 3)
    # F1 = 2TP / (2TP + FP + FN): A 4/7, B 4/5, C 2/4
    assert result["macro_f1"] == pytest.approx((4 / 7 + 4 / 5 + 1 / 2) / 3)

    a, b, c = (result["per_class"][name] for name in CLASSES)
    assert a["sensitivity"] == pytest.approx(2 / 3)
    assert b["sensitivity"] == pytest.approx(1.0)
    assert c["sensitivity"] == pytest.approx(1 / 3)
    # specificity TN / (TN + FP): A 3/5 (two C predicted A), B 5/6, C 5/5
    assert a["specificity"] == pytest.approx(3 / 5)
    assert b["specificity"] == pytest.approx(5 / 6)
    assert c["specificity"] == pytest.approx(1.0)
    # precision: A 2/4, B 2/3, C 1/1
    assert a["precision"] == pytest.approx(1 / 2)
    assert b["precision"] == pytest.approx(2 / 3)
    assert c["precision"] == pytest.approx(1.0)
    assert [result["per_class"][n]["support"] for n in CLASSES] == [3, 2, 3]
    json.dumps(result, allow_nan=False)  # JSON-safe, no NaN


def test_ece_on_constructed_case():
    # 4 cases at confidence 0.95 with 3 correct (bin (14/15, 1]): |0.75 - 0.95| = 0.20
    # 4 cases at confidence 0.50 with 2 correct (bin (7/15, 8/15]): |0.50 - 0.50| = 0
    # ECE = 4/8 · 0.20 + 4/8 · 0 = 0.10
    probs = np.array([[0.95, 0.05]] * 4 + [[0.5, 0.5]] * 4)
    y = np.array([0, 0, 0, 1, 0, 0, 1, 1])
    ece, bins = expected_calibration_error(y, probs)
    assert ece == pytest.approx(0.10)
    assert sum(b["n"] for b in bins) == 8
    assert bins[14]["n"] == 4 and bins[14]["accuracy"] == pytest.approx(0.75)
    assert evaluate(y, probs, ["neg", "pos"])["ece"] == pytest.approx(0.10)


def test_ece_perfectly_calibrated_is_zero():
    probs = np.array([[0.8, 0.2]] * 5)
    y = np.array([0, 0, 0, 0, 1])  # 4/5 correct at confidence 0.8
    assert expected_calibration_error(y, probs)[0] == pytest.approx(0.0)


def test_binary_auroc_by_hand_with_a_tie():
    # positives score .9 .4 .7, negatives .6 .2 .4
    # .9 beats 3; .4 beats .2, ties .4 (0.5), loses to .6 -> 1.5; .7 beats 3  => 7.5 / 9
    y = np.array([1, 1, 0, 0, 1, 0])
    p1 = np.array([0.9, 0.4, 0.6, 0.2, 0.7, 0.4])
    assert binary_auroc(y == 1, p1) == pytest.approx(7.5 / 9)
    probs = np.stack([1 - p1, p1], axis=1)
    result = evaluate(y, probs, ["neg", "pos"])
    assert result["macro_auroc"] == pytest.approx(7.5 / 9)
    assert result["per_class"]["pos"]["auroc"] == pytest.approx(7.5 / 9)


def test_absent_class_gives_none_and_a_note():
    y = np.array([0, 0, 1, 1])
    probs = _probs_for([0, 1, 1, 1], confidence=0.7)
    result = evaluate(y, probs, CLASSES)
    c = result["per_class"]["C"]
    assert c["auroc"] is None and c["sensitivity"] is None and c["support"] == 0
    assert c["specificity"] == pytest.approx(1.0)
    assert any("'C'" in note for note in result["notes"])
    # macro AUROC averages A and B only: A scores .7/.15 -> positives (.7, .15) vs negatives
    # (.15, .15): .7 beats both = 2, .15 ties both = 1  => 3/4; B: positives (.7, .7) vs
    # negatives (.15, .7): 1 + .5 + 1 + .5 = 3  => 3/4
    assert result["macro_auroc"] == pytest.approx(0.75)
    # C never occurs and is never predicted: left out of macro-F1 (A 2/3, B 4/5)
    assert result["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    json.dumps(result, allow_nan=False)


@pytest.mark.parametrize(
    ("y", "probs", "names", "error"),
    [
        (np.array([0, 1]), np.array([[0.5, 0.5], [0.5, 0.5]]), CLASSES, ModelError),
        (np.array([0, 1]), np.array([[2.0, -1.0], [0.5, 0.5]]), ["a", "b"], ModelError),
        (np.array([0, 1]), np.array([[3.0, 1.0], [0.2, 0.1]]), ["a", "b"], ModelError),
        (np.array([0, 2]), np.array([[0.5, 0.5], [0.5, 0.5]]), ["a", "b"], DataError),
        (np.array([0]), np.array([[0.5, 0.5], [0.5, 0.5]]), ["a", "b"], DataError),
        (np.array([0.0, 1.0]), np.array([[0.5, 0.5], [0.5, 0.5]]), ["a", "b"], DataError),
    ],
)
def test_bad_inputs_raise_clear_errors(y, probs, names, error):
    with pytest.raises(error):
        evaluate(y, probs, names)


def test_confusion_and_reliability_png(tmp_path):
    from components.evaluation.plots import confusion_matrix_png, reliability_png

    cm = evaluate(Y_TRUE, _probs_for(Y_PRED), CLASSES)["confusion_matrix"]
    for normalise in (True, False):
        path = confusion_matrix_png(cm, CLASSES, tmp_path / f"cm_{normalise}.png", normalise)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    path = reliability_png(Y_TRUE, _probs_for(Y_PRED), tmp_path / "rel.png")
    assert path.stat().st_size > 1000
    with pytest.raises(DataError):
        confusion_matrix_png(cm, ["A", "B"], tmp_path / "bad.png")


def test_predict_proba_and_embed_arrays():
    import torch

    from components.data.preprocess import Preprocessing
    from components.evaluation.predict import embed_arrays, predict_proba
    from components.models import build_model

    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=3, width=4).train()
    prep = Preprocessing(size=16, channels=3)
    x = np.random.default_rng(0).integers(0, 256, size=(5, 3, 16, 16), dtype=np.uint8)
    probs = predict_proba(model, x, prep, batch_size=2)
    assert probs.shape == (5, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert model.training  # caller's mode restored
    # batching does not change results (eval mode: BatchNorm uses running statistics)
    np.testing.assert_allclose(probs, predict_proba(model, x, prep, batch_size=5), rtol=1e-5)
    feats = embed_arrays(model, x, prep)
    assert feats.shape == (5, model.embed_dim)
    with pytest.raises(DataError):
        predict_proba(model, x.astype(np.float32), prep)
    with pytest.raises(DataError):
        predict_proba(model, x[:, :1], prep)
