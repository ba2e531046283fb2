"""Does the clinical record help? A model reading records, against simpler models on the same
test split.

A fusion model (image + record) is compared with an image-only model (the same backbone,
recipe, seed and splits; trained by the caller) and with a clinical-only logistic regression
on the same encoded features; a tabular MLP with the logistic regression. Every model is
scored on its uncalibrated probabilities (temperature scaling keeps each arg-max, so macro-F1
and balanced accuracy are those served; one-vs-rest AUROCs can differ slightly from the
calibrated headline). The verdict says plainly when the model does not beat a baseline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from components.errors import DataError
from components.evaluation.metrics import evaluate

#: what the comparison reports for each model, and the metric the verdict is read on first
COMPARED = ("macro_f1", "macro_auroc", "balanced_accuracy", "dangerous_auroc")
IMAGE_ONLY, CLINICAL_ONLY = "image_only", "clinical_logistic_regression"


def logistic_regression_probabilities(
    train_records: np.ndarray,
    train_labels: np.ndarray,
    test_records: np.ndarray,
    num_classes: int,
    seed: int = 0,
) -> np.ndarray:
    """Test probabilities (N, K) of a class-balanced multinomial logistic regression on the
    encoded records: missing cells imputed with the training mean, columns standardised, both
    fitted on the training records only. A class absent from training gets probability 0."""
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if train_records is None or test_records is None:
        raise DataError("the clinical baseline needs clinical records in both splits")
    present = np.unique(train_labels)
    if len(present) < 2:
        raise DataError("the clinical baseline needs at least two classes in training")
    model = make_pipeline(
        SimpleImputer(strategy="mean", keep_empty_features=True),
        StandardScaler(),
        LogisticRegression(class_weight="balanced", max_iter=5000, random_state=seed),
    )
    model.fit(train_records, train_labels)
    out = np.zeros((len(test_records), num_classes), dtype=np.float64)
    out[:, model.classes_] = model.predict_proba(test_records)
    return out


def compare(
    y_test: np.ndarray,
    probabilities: Mapping[str, np.ndarray],
    class_names: Sequence[str],
    model_name: str,
    dangerous: Sequence[str] = (),
) -> dict[str, Any]:
    """Each model's headline metrics on the same test labels, and the verdict for
    `model_name` (a key of `probabilities`) against every other entry."""
    if model_name not in probabilities:
        raise DataError(f"no probabilities for the compared model {model_name!r}")
    table = {}
    for name, probs in probabilities.items():
        metrics = evaluate(y_test, probs, class_names, dangerous=dangerous)
        table[name] = {k: metrics.get(k) for k in COMPARED if k in metrics}
    ours = table[model_name]
    baselines = [name for name in table if name != model_name]
    beaten = {name: _beats(ours, table[name]) for name in baselines}
    return {
        "model": model_name,
        "n_test": len(y_test),
        "metrics": table,
        "beats": beaten,
        "beats_all_baselines": all(beaten.values()) if beaten else None,
        "verdict": _verdict(model_name, table, beaten),
    }


def _beats(ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> bool:
    """Higher macro-F1 (the gate's metric) and no lower macro AUROC."""
    f1, other_f1 = ours.get("macro_f1"), theirs.get("macro_f1")
    auc, other_auc = ours.get("macro_auroc"), theirs.get("macro_auroc")
    if f1 is None or other_f1 is None or f1 <= other_f1:
        return False
    return auc is None or other_auc is None or auc >= other_auc


def _verdict(model_name: str, table: Mapping[str, Any], beaten: Mapping[str, bool]) -> str:
    if not beaten:
        return f"{model_name}: no baseline to compare with"

    def line(name: str) -> str:
        row = table[name]
        auroc = row.get("macro_auroc")
        return f"{name} macro-F1 {row['macro_f1']:.3f}, AUROC " + (
            "n/a" if auroc is None else f"{auroc:.3f}"
        )

    losers = [name for name, won in beaten.items() if not won]
    head = (
        f"{model_name} beats every baseline"
        if not losers
        else f"{model_name} does NOT beat {', '.join(losers)}"
    )
    return f"{head} on the same test split ({'; '.join(line(n) for n in table)})"


__all__ = [
    "CLINICAL_ONLY",
    "COMPARED",
    "IMAGE_ONLY",
    "compare",
    "logistic_regression_probabilities",
]
