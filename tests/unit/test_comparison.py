"""The baseline comparison of a model reading clinical records, and the binary danger AUROC."""

from __future__ import annotations

import numpy as np
import pytest

from components.evaluation.comparison import compare, logistic_regression_probabilities
from components.evaluation.metrics import evaluate

CLASSES = ["benign", "cancer", "other"]


def test_dangerous_auroc_scores_the_summed_probability_of_the_dangerous_classes():
    y = np.array([0, 1, 2, 1])
    probs = np.array(
        [[0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.1, 0.1, 0.8], [0.1, 0.8, 0.1]], dtype=float
    )
    metrics = evaluate(y, probs, CLASSES, dangerous=["cancer", "other"])
    # positives (cancer or other) score 0.8, 0.9, 0.9; the one negative 0.2: perfectly ranked
    assert metrics["dangerous_auroc"] == pytest.approx(1.0)
    assert metrics["dangerous_vs_rest"] == {
        "classes": ["cancer", "other"],
        "n_positive": 3,
        "n_negative": 1,
    }
    only_cancer = evaluate(y, probs, CLASSES, dangerous=["cancer"])
    # cancer scores 0.3, 0.8 vs negatives 0.1, 0.1: still ranked above
    assert only_cancer["dangerous_auroc"] == pytest.approx(1.0)
    assert "dangerous_auroc" not in evaluate(y, probs, CLASSES)


def test_logistic_regression_learns_a_linear_signal_and_imputes_missing_values():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    x = np.stack([y + rng.normal(0, 0.3, 300), rng.normal(0, 1, 300)], axis=1).astype(np.float32)
    x[rng.random(300) < 0.2, 1] = np.nan  # missing cells must not break the baseline
    probs = logistic_regression_probabilities(x[:200], y[:200], x[200:], 3)
    assert probs.shape == (100, 3)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-9)
    assert (probs.argmax(1) == y[200:]).mean() > 0.9


def test_a_class_absent_from_training_gets_probability_zero():
    x = np.array([[0.0], [0.1], [1.0], [1.1]], dtype=np.float32)
    probs = logistic_regression_probabilities(x, np.array([0, 0, 2, 2]), x, 3)
    assert np.all(probs[:, 1] == 0)


def test_verdict_says_plainly_when_the_model_does_not_beat_a_baseline():
    y = np.array([0, 1, 2] * 10)
    perfect = np.eye(3)[y] * 0.9 + 0.1 / 3
    noisy = np.roll(perfect, 1, axis=0)  # wrong for most rows
    result = compare(y, {"fusion": noisy, "image_only": perfect, "lr": perfect}, CLASSES, "fusion")
    assert result["beats"] == {"image_only": False, "lr": False}
    assert result["beats_all_baselines"] is False
    assert result["verdict"].startswith("fusion does NOT beat image_only, lr")
    won = compare(y, {"fusion": perfect, "lr": noisy}, CLASSES, "fusion")
    assert won["beats_all_baselines"] is True
    assert won["metrics"]["fusion"]["macro_f1"] == pytest.approx(1.0)
    assert won["verdict"].startswith("fusion beats every baseline")
