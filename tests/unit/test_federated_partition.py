"""Splitting data into sites: IID, Dirichlet(α) label skew, given site labels; the site report."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from components.errors import ConfigError, DataError
from components.federated.partition import (
    partition,
    partition_splits,
    site_column,
    site_names,
    site_report,
    site_report_markdown,
)

CLASSES = ["a", "b", "c"]


def labels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 3, n)


def _all(parts: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate(list(parts.values()))


def test_iid_is_a_stratified_disjoint_cover():
    y = labels(300)
    parts = partition(y, "iid", 5, seed=1)
    assert list(parts) == site_names(5) == ["site-1", "site-2", "site-3", "site-4", "site-5"]
    merged = _all(parts)
    assert len(merged) == len(y) and len(set(merged)) == len(y)
    overall = np.bincount(y, minlength=3) / len(y)
    for idx in parts.values():
        share = np.bincount(y[idx], minlength=3) / len(idx)
        assert np.abs(share - overall).max() < 0.05


def test_dirichlet_small_alpha_skews_labels_and_is_seeded():
    y = labels(600)
    skewed = partition(y, "dirichlet", 5, alpha=0.1, seed=3)
    flat = partition(y, "dirichlet", 5, alpha=100.0, seed=3)
    assert len(set(_all(skewed))) == len(y)

    def max_share(parts):  # mean over sites of the largest class share
        return np.mean([np.bincount(y[i], minlength=3).max() / len(i) for i in parts.values()])

    assert max_share(skewed) > 0.7 > 0.45 > max_share(flat)
    again = partition(y, "dirichlet", 5, alpha=0.1, seed=3)
    assert all(np.array_equal(skewed[k], again[k]) for k in skewed)
    other = partition(y, "dirichlet", 5, alpha=0.1, seed=4)
    assert any(not np.array_equal(skewed[k], other[k]) for k in skewed)


def test_train_and_validation_share_site_proportions_and_every_site_can_evaluate():
    y_train, y_val = labels(400, 1), labels(80, 2)
    sites = partition_splits(y_train, y_val, "dirichlet", 4, alpha=0.3, seed=5)
    for parts in sites.values():
        assert parts.num_val >= 1
        assert not set(parts.train) & set(parts.val_from_train)
        tr = np.bincount(y_train[parts.train], minlength=3)
        # the class the site holds most of in training is present in its validation data
        va = np.bincount(y_val[parts.val], minlength=3) + np.bincount(
            y_train[parts.val_from_train], minlength=3
        )
        assert va[tr.argmax()] > 0
    val_rows = np.concatenate([p.val for p in sites.values()])
    assert sorted(val_rows) == list(range(len(y_val)))  # the validation split is covered


def test_given_sites_come_from_the_manifest_column():
    frame = pd.DataFrame({"id": [f"r{i}" for i in range(8)], "site": list("AABBBCCC")})
    groups = site_column(frame, ["r7", "r0", "r3", "r1", "r2", "r4", "r5", "r6"])
    assert list(groups) == list("CABABBCC")
    y = np.array([0, 1, 0, 1, 2, 2, 0, 1])
    sites = partition_splits(y, np.array([0]), "given", None, train_groups=groups, val_groups=["B"])
    assert list(sites) == ["A", "B", "C"]
    assert sorted(sites["A"].train.tolist() + sites["A"].val_from_train.tolist()) == [1, 3]
    assert sites["B"].val.tolist() == [0]


@pytest.mark.parametrize(
    ("call", "error", "fragment"),
    [
        (
            lambda: partition(labels(9), "dirichlet", 5, min_samples=2),
            ConfigError,
            "needs at least 10 training images",
        ),
        (
            lambda: partition(labels(40), "dirichlet", 12, alpha=0.01, min_samples=3, seed=0),
            ConfigError,
            "raise federation.alpha",
        ),
        (
            lambda: partition(labels(10), "given", groups=["A"] * 5 + [""] * 5),
            DataError,
            "5 training image(s) have no site",
        ),
        (lambda: partition(labels(10), "given", groups=["A"] * 10), DataError, "needs at least 2"),
        (
            lambda: partition(labels(10), "given", 3, groups=["A", "B"] * 5),
            ConfigError,
            "set federation.num_sites=2",
        ),
        (lambda: partition(labels(10), "given"), DataError, "needs the manifest's site column"),
        (lambda: partition(labels(10), "shards", 2), ConfigError, "unknown partition scheme"),
    ],
)
def test_impossible_splits_fail_with_the_fix(call, error, fragment):
    with pytest.raises(error) as info:
        call()
    assert fragment in str(info.value)


def test_site_report_counts_classes_per_site():
    y_train, y_val = np.array([0, 0, 1, 2, 2, 2]), np.array([1, 2])
    sites = partition_splits(y_train, y_val, "iid", 2, seed=0, min_samples=1)
    report = site_report(sites, y_train, y_val, CLASSES, scheme="iid")
    assert report["train_total"] + sum(len(p.val_from_train) for p in sites.values()) == 6
    assert report["val_total"] == 2 + sum(len(p.val_from_train) for p in sites.values())
    for name, parts in sites.items():
        row = report["sites"][name]
        assert row["train"] == len(parts.train)
        assert sum(row["train_classes"].values()) == row["train"]
    text = site_report_markdown(report)
    assert "| site | train | val | a | b | c |" in text
    assert text.count("| site-") == 2
