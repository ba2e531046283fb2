"""Split assignment: stratification, determinism, duplicates, conflicts, no leakage."""

from __future__ import annotations

import pandas as pd
import pytest

from components.data import manifest
from components.data.splits import SplitReport, _check_no_leak, assign_splits
from components.errors import DataError


def make_manifest(rows: list[tuple]) -> pd.DataFrame:
    """rows: (sha256, label, given_split[, decode_error]) -> a conforming manifest."""
    records = []
    for i, row in enumerate(rows):
        sha, label, given = row[:3]
        error = row[3] if len(row) > 3 else ""
        source = f"/data/{given or 'all'}/{label}/{i:05d}.png"
        records.append(
            {
                "id": manifest.row_id(source),
                "source": source,
                "format": "png",
                "label": label,
                "split": "",
                "given_split": given,
                "site": "",
                "width": 0 if error else 8,
                "height": 0 if error else 8,
                "channels": 0 if error else 3,
                "sha256": "" if error else sha,
                "decode_error": error,
            }
        )
    return manifest.conform(pd.DataFrame(records))


def unique_rows(counts: dict[str, int], given: str = "") -> list[tuple]:
    return [(f"{label}-{i}", label, given) for label, n in counts.items() for i in range(n)]


def splits_by_sha(frame: pd.DataFrame) -> pd.Series:
    return frame[frame["split"] != ""].groupby("sha256")["split"].nunique()


def test_stratified_proportions_per_class():
    counts = {"a": 200, "b": 100, "c": 60}
    out, report = assign_splits(make_manifest(unique_rows(counts)), True, 0.15, 0.2, seed=0)
    assert report.strategy == "stratified"
    for label, n in counts.items():
        per_split = out[out["label"] == label]["split"].value_counts()
        assert abs(per_split["val"] - 0.15 * n) <= 1
        assert abs(per_split["test"] - 0.2 * n) <= 1
        assert per_split.sum() == n
    assert report.final_counts["test"] == {"a": 40, "b": 20, "c": 12}


def test_seed_determinism():
    frame = make_manifest(unique_rows({"a": 50, "b": 50}))
    one, _ = assign_splits(frame, False, 0.2, 0.2, seed=3)
    two, _ = assign_splits(frame.sample(frac=1, random_state=1), False, 0.2, 0.2, seed=3)
    other, _ = assign_splits(frame, False, 0.2, 0.2, seed=4)
    key = ["source", "split"]
    assert one[key].sort_values("source").values.tolist() == (
        two[key].sort_values("source").values.tolist()
    )
    assert one["split"].tolist() != other["split"].tolist()


def test_keep_given_carves_val_from_train_only():
    rows = unique_rows({"a": 40, "b": 20}, "train") + [
        (f"t{label}{i}", label, "test") for label in "ab" for i in range(5)
    ]
    out, report = assign_splits(make_manifest(rows), True, 0.25, 0.2, seed=0)
    assert report.strategy == "given+carved val"
    test = out[out["split"] == "test"]
    assert len(test) == 10 and (test["given_split"] == "test").all()
    val = out[out["split"] == "val"]
    assert (val["given_split"] == "train").all()
    assert val["label"].value_counts().to_dict() == {"a": 10, "b": 5}
    assert report.carved == {"val": 15}


def test_keep_given_without_test_carves_both():
    out, report = assign_splits(
        make_manifest(unique_rows({"a": 20, "b": 20}, "train")), True, 0.1, 0.2, seed=0
    )
    assert report.strategy == "given+carved val/test"
    assert out["split"].value_counts().to_dict() == {"train": 28, "test": 8, "val": 4}


def test_ignoring_given_splits_restratifies():
    rows = unique_rows({"a": 30}, "train") + unique_rows({"b": 30}, "test")
    out, report = assign_splits(make_manifest(rows), False, 0.2, 0.2, seed=0)
    assert report.strategy == "stratified"
    assert set(out.loc[out["label"] == "b", "split"]) == {"train", "val", "test"}


def test_planted_duplicates_across_given_splits_never_leak():
    rows = unique_rows({"a": 20, "b": 20}, "train") + unique_rows({"a": 5, "b": 5}, "test")
    rows = [(f"tr-{s}", lab, g) if g == "train" else (f"te-{s}", lab, g) for s, lab, g in rows]
    # three test images also sit in train (one of them twice), one val image also in train
    rows += [("te-a-0", "a", "train"), ("te-a-1", "a", "train"), ("te-a-1", "a", "train")]
    rows += [("te-b-0", "b", "train")]
    rows += [("va-0", "a", "val"), ("va-1", "b", "val"), ("va-0", "a", "train")]
    rows += [("te-b-1", "b", "val")]  # test and val
    out, report = assign_splits(make_manifest(rows), True, 0.1, 0.2, seed=0)
    assert (splits_by_sha(out) == 1).all()
    assert report.within_split_duplicates["train"] == {"groups": 1, "rows_dropped": 1}
    assert report.within_split_duplicates["test"] == {"groups": 0, "rows_dropped": 0}
    cross = report.cross_split_duplicates
    assert cross["groups"] == 5
    assert cross["rows_dropped"] == 5
    assert cross["pairs"] == {"test/train": 3, "train/val": 1, "test/val": 1}
    for sha in ("te-a-0", "te-a-1", "te-b-0", "te-b-1"):
        kept = out[out["sha256"] == sha]
        assert len(kept) == 1 and kept["split"].iloc[0] == "test"
    kept = out[out["sha256"] == "va-0"]
    assert len(kept) == 1 and kept["split"].iloc[0] == "val"
    assert report.rows_in == len(rows)
    assert report.rows_out == len(rows) - 1 - 5
    assert "Found 1 exact duplicate groups inside train (1 rows dropped)" in report.summary()
    assert "Found 5 images in more than one given split" in report.summary()


def test_within_split_duplicate_counts_exact_without_given_split():
    rows = unique_rows({"a": 10, "b": 10})
    rows += [("a-0", "a", "")] * 3 + [("b-4", "b", "")]
    out, report = assign_splits(make_manifest(rows), True, 0.2, 0.2, seed=0)
    assert report.within_split_duplicates[""] == {"groups": 2, "rows_dropped": 4}
    assert len(out) == 20 and out["sha256"].is_unique


def test_conflicting_labels_never_straddle_splits():
    rows = unique_rows({"a": 12, "b": 12})
    conflicts = [(f"x{i}", "a", "") for i in range(6)] + [(f"x{i}", "b", "") for i in range(6)]
    rows += conflicts
    for seed in range(5):
        out, report = assign_splits(make_manifest(rows), True, 0.2, 0.2, seed=seed)
        assert report.conflicting_labels == {"groups": 6, "rows": 12}
        for i in range(6):
            kept = out[out["sha256"] == f"x{i}"]
            assert len(kept) == 2 and kept["split"].nunique() == 1
        assert (splits_by_sha(out) == 1).all()


def test_conflict_across_given_splits_keeps_test_copy():
    rows = unique_rows({"a": 10, "b": 10}, "train") + unique_rows({"a": 3, "b": 3}, "test")
    rows += [("same", "a", "train"), ("same", "b", "test")]
    out, report = assign_splits(make_manifest(rows), True, 0.2, 0.2, seed=0)
    assert report.conflicting_labels["groups"] == 1
    kept = out[out["sha256"] == "same"]
    assert kept[["label", "split"]].values.tolist() == [["b", "test"]]


def test_undecodable_rows_left_alone():
    rows = [*unique_rows({"a": 10, "b": 10}), ("", "a", "", "truncated"), ("", "b", "", "bad")]
    out, report = assign_splits(make_manifest(rows), True, 0.2, 0.2, seed=0)
    bad = out[out["decode_error"] != ""]
    assert len(bad) == 2 and (bad["split"] == "").all()
    assert report.rows_undecodable == 2
    assert sum(sum(c.values()) for c in report.final_counts.values()) == 20


def test_small_class_is_a_clear_error():
    rows = unique_rows({"big": 30, "tiny": 2})
    with pytest.raises(DataError, match="'tiny' has 2 unique image"):
        assign_splits(make_manifest(rows), True, 0.2, 0.2, seed=0)
    # duplicates do not count as separate images
    rows = unique_rows({"big": 30}) + [("t", "tiny", "")] * 5
    with pytest.raises(DataError, match="'tiny' has 1 unique image"):
        assign_splits(make_manifest(rows), True, 0.2, 0.2, seed=0)


def test_bad_fractions():
    with pytest.raises(DataError):
        assign_splits(make_manifest(unique_rows({"a": 10})), False, 0.6, 0.5, seed=0)
    with pytest.raises(DataError):
        assign_splits(make_manifest(unique_rows({"a": 10})), False, -0.1, 0.5, seed=0)


def test_leak_check_detects_leaks():
    frame = make_manifest([("s", "a", ""), ("s", "a", "")])
    frame["split"] = ["train", "test"]
    with pytest.raises(AssertionError, match="more than one split"):
        _check_no_leak(frame)


def test_report_serialises():
    _, report = assign_splits(make_manifest(unique_rows({"a": 10, "b": 10})), True, 0.2, 0.2, 0)
    data = report.to_dict()
    assert data["rows_in"] == 20 and data["final_counts"]["train"] == {"a": 6, "b": 6}
    assert isinstance(report, SplitReport) and "final: train 12, val 4, test 4" in report.summary()
