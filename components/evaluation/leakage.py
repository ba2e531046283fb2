"""The leakage certificate's test score: headline metrics on every test image and on those
without a near-match in training (`components.data.splits.proximity` finds them).

The evaluate step of a pipeline run and `bench/leakage_report.py --run` (an already trained
run) both build the block with `clean_subset_metrics`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

from components.evaluation.metrics import evaluate

HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc")


def headline(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The certificate's metrics out of `evaluate`'s result."""
    return {k: metrics.get(k) for k in HEADLINE}


def clean_subset_metrics(
    ids: Sequence[str],
    y: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    near_matched: Collection[str],
    full: Mapping[str, Any],
    certificate: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """`certificate` plus the headline test metrics on all test images (`full`, `evaluate`'s
    result on them) and on those whose id is not in `near_matched`; the subset's row is
    absent when every test image is near-matched."""
    clean = np.array([str(i) not in near_matched for i in ids], dtype=bool)
    out: dict[str, Any] = {
        **(certificate or {}),
        "test_images": len(clean),
        "test_near_matched": int((~clean).sum()),
        "test_full": headline(full),
    }
    if clean.any():
        out["test_without_near_matches"] = headline(
            evaluate(np.asarray(y)[clean], np.asarray(probs)[clean], classes)
        )
    return out
