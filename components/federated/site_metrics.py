"""Federated evaluation in numbers that pool exactly.

A site scores the final global model on its own held-out test split and sends back only sums:
its confusion matrix, the per-bin counts / correct counts / confidence sums of the ECE bins,
its macro-AUROC and its size (`site_summary`). From those the coordinator computes per-site and
pooled metrics (`metrics_from_summary`, `pool`): accuracy, balanced accuracy, macro-F1,
per-class sensitivity/specificity/F1 and ECE are exactly what
`components.evaluation.metrics.evaluate` gives on the pooled predictions; AUROC does not pool
from counts, so the pooled AUROC is the mean of the sites' AUROCs weighted by site size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from components.evaluation.metrics import ECE_BINS, confusion_matrix, evaluate


def site_summary(y: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """What a site returns for the final evaluation: counts and sums only."""
    y = np.asarray(y, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    k = len(class_names)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    index = np.clip(np.ceil(confidence * ECE_BINS).astype(int) - 1, 0, ECE_BINS - 1)
    auroc = evaluate(y, probs, class_names)["macro_auroc"] if len(y) else None
    return {
        "n": len(y),
        "confusion_matrix": confusion_matrix(y, probs.argmax(axis=1), k).tolist(),
        "ece_count": np.bincount(index, minlength=ECE_BINS).tolist(),
        "ece_correct": np.bincount(index, weights=correct, minlength=ECE_BINS).tolist(),
        "ece_confidence": np.bincount(index, weights=confidence, minlength=ECE_BINS).tolist(),
        "macro_auroc": auroc,
    }


def metrics_from_summary(summary: Mapping[str, Any], class_names: Sequence[str]) -> dict[str, Any]:
    """Metrics of one site (or of a pooled summary) from its counts."""
    cm = np.asarray(summary["confusion_matrix"], dtype=np.int64)
    n = int(cm.sum())
    per_class: dict[str, dict[str, Any]] = {}
    recalls, f1s = [], []
    for c, name in enumerate(class_names):
        tp = int(cm[c, c])
        fn = int(cm[c].sum() - tp)
        fp = int(cm[:, c].sum() - tp)
        tn = n - tp - fn - fp
        sensitivity = tp / (tp + fn) if tp + fn else None
        f1 = 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else None
        per_class[str(name)] = {
            "sensitivity": sensitivity,
            "specificity": tn / (tn + fp) if tn + fp else None,
            "f1": f1,
            "support": tp + fn,
        }
        if tp + fn:
            recalls.append(sensitivity)
        if f1 is not None:
            f1s.append(f1)
    correct = np.asarray(summary["ece_correct"], dtype=np.float64)
    confidence = np.asarray(summary["ece_confidence"], dtype=np.float64)
    return {
        "n": n,
        "accuracy": float(np.trace(cm) / n) if n else None,
        "balanced_accuracy": float(np.mean(recalls)) if recalls else None,
        "macro_f1": float(np.mean(f1s)) if f1s else None,
        "macro_auroc": summary.get("macro_auroc"),
        "ece": float(np.abs(correct - confidence).sum() / n) if n else None,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }


def pool(summaries: Mapping[str, Mapping[str, Any]], class_names: Sequence[str]) -> dict[str, Any]:
    """Per-site metrics and the pooled metrics (sites weighted by their test size)."""
    usable = {site: s for site, s in summaries.items() if int(s["n"]) > 0}
    per_site = {site: metrics_from_summary(s, class_names) for site, s in usable.items()}
    if not usable:
        return {"sites": per_site, "pooled": {}, "weights": {}}
    total = sum(int(s["n"]) for s in usable.values())
    pooled_sums = {
        key: np.sum([np.asarray(s[key], dtype=np.float64) for s in usable.values()], axis=0)
        for key in ("confusion_matrix", "ece_count", "ece_correct", "ece_confidence")
    }
    pooled = metrics_from_summary(
        {**pooled_sums, "confusion_matrix": pooled_sums["confusion_matrix"].astype(np.int64)},
        class_names,
    )
    aurocs = [(int(s["n"]), s["macro_auroc"]) for s in usable.values()]
    defined = [(n, a) for n, a in aurocs if a is not None]
    pooled["macro_auroc"] = (
        float(sum(n * a for n, a in defined) / sum(n for n, _ in defined)) if defined else None
    )
    pooled["macro_auroc_pooling"] = "site-size-weighted mean of site macro-AUROCs"
    weights = {site: int(s["n"]) / total for site, s in usable.items()}
    return {"sites": per_site, "pooled": pooled, "weights": weights}


__all__ = ["metrics_from_summary", "pool", "site_summary"]
