"""The manifest suite on real (tiny) image files: every expectation fails when it should,
the report names exactly the planted rows, quarantine drops exactly those rows."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.data.manifest import COLUMNS, conform, row_id
from components.errors import ConfigError, ValidationFailed
from components.workspace import Workspace
from validation import validate_manifest
from validation.manifest_suite import source_name

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

CLASSES = ["benign", "malignant"]
LIMITS = {"min_side": 16, "max_side": 256, "min_per_class": 3}


def _decode(path) -> dict:
    """Geometry and pixel hash of an image file, as the ingest step records them."""
    try:
        with Image.open(path) as image:
            image.load()
            digest = hashlib.sha256(
                f"{image.mode}{image.size}".encode() + image.tobytes()
            ).hexdigest()
            return {
                "width": image.width,
                "height": image.height,
                "channels": len(image.getbands()),
                "sha256": digest,
                "decode_error": "",
            }
    except OSError as exc:
        return {"width": 0, "height": 0, "channels": 0, "sha256": "", "decode_error": str(exc)}


def _write(path, seed: int, size=(32, 32), mode="L") -> str:
    rng = np.random.default_rng(seed)
    bands = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, size=(size[1], size[0], bands), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if bands == 1 else pixels, mode=mode).save(path)
    return str(path)


def _row(path: str, label: str, split: str) -> dict:
    return {
        "id": row_id(path),
        "source": path,
        "format": "png",
        "label": label,
        "split": split,
        "given_split": "",
        "site": "site-a",
        **_decode(path),
    }


@pytest.fixture
def images(tmp_path):
    """24 distinct 32x32 grey images: per class 8 train, 2 val, 2 test."""
    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for i in range(24):
        label = CLASSES[i % 2]
        split = ["train"] * 8 + ["val"] * 2 + ["test"] * 2
        path = _write(folder / f"case_{i:02d}.png", seed=i)
        rows.append(_row(path, label, split[i // 2]))
    return folder, rows


def _manifest(rows) -> pd.DataFrame:
    return conform(pd.DataFrame(rows))


def _offender_ids(report: dict, name: str) -> set[str]:
    return {o["id"] for o in report["expectations"][name].get("offenders", [])}


def _failing_report(frame, classes=CLASSES, **limits) -> dict:
    with pytest.raises(ValidationFailed) as caught:
        validate_manifest(frame, classes, **{**LIMITS, **limits})
    return caught.value.report


def test_clean_manifest_passes(images):
    _, rows = images
    frame = _manifest(rows)
    outcome = validate_manifest(frame, CLASSES, **LIMITS)
    assert outcome.passed
    assert outcome.report["failed"] == []
    assert outcome.quarantined.empty
    pd.testing.assert_frame_equal(outcome.validated, frame)
    names = set(outcome.report["expectations"])
    assert {"labels_in_classes", "image_in_one_split", "class_min_count"} <= names
    assert "passed" in outcome.summary()


def test_missing_column_and_wrong_types_stop_even_in_quarantine_mode(images):
    _, rows = images
    frame = _manifest(rows).drop(columns=["site"])
    for mode in ("stop", "quarantine"):
        with pytest.raises(ValidationFailed, match="columns_match_manifest") as caught:
            validate_manifest(frame, CLASSES, **LIMITS, on_failure=mode)
        assert caught.value.report["expectations"]["columns_match_manifest"]["success"] is False

    typed = _manifest(rows).astype({"width": "float64"})
    report = _failing_report(typed)
    assert report["failed"] == ["type_of_width"]
    assert report["expectations"]["type_of_width"]["observed_value"] == "float64"

    mixed = _manifest(rows).astype({"label": object})
    mixed.loc[4, "label"] = 7
    report = _failing_report(mixed)
    assert report["failed"] == ["type_of_label"]
    assert _offender_ids(report, "type_of_label") == {rows[4]["id"]}


def test_labels_outside_declared_classes(images):
    _, rows = images
    frame = _manifest(rows)
    frame.loc[[3, 15], "label"] = ["cat", "Benign"]
    report = _failing_report(frame)
    assert _offender_ids(report, "labels_in_classes") == {rows[3]["id"], rows[15]["id"]}
    values = {o["value"] for o in report["expectations"]["labels_in_classes"]["offenders"]}
    assert values == {"cat", "Benign"}


def test_undecodable_images_and_duplicate_ids(images):
    folder, rows = images
    broken = folder / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    bad_row = _row(str(broken), "benign", "train")
    assert bad_row["decode_error"]  # PIL really could not read it
    duplicate = {**rows[5], "source": str(folder / "elsewhere.png")}  # same id twice
    frame = _manifest([*rows, bad_row, duplicate])

    report = _failing_report(frame)
    assert _offender_ids(report, "images_decodable") == {bad_row["id"]}
    # geometry checks apply to decodable rows only: the broken file is not blamed twice
    assert report["expectations"]["width_in_range"]["success"]
    assert report["expectations"]["channels_allowed"]["success"]
    assert _offender_ids(report, "ids_unique") == {rows[5]["id"]}
    assert report["expectations"]["ids_unique"]["unexpected_count"] == 2
    files = {o["file"] for o in report["expectations"]["ids_unique"]["offenders"]}
    assert files == {"case_05.png", "elsewhere.png"}


def test_geometry_out_of_range(images):
    folder, rows = images
    small = _row(_write(folder / "small.png", 100, size=(8, 40)), "benign", "train")
    large = _row(_write(folder / "large.png", 101, size=(40, 300)), "malignant", "train")
    two_band = _row(_write(folder / "la.png", 102, mode="LA"), "benign", "train")
    rgba = _row(_write(folder / "rgba.png", 103, mode="RGBA"), "malignant", "train")
    report = _failing_report(_manifest([*rows, small, large, two_band, rgba]))
    assert _offender_ids(report, "width_in_range") == {small["id"]}
    assert _offender_ids(report, "height_in_range") == {large["id"]}
    assert _offender_ids(report, "channels_allowed") == {two_band["id"]}  # RGBA (4) is fine
    assert report["expectations"]["width_in_range"]["offenders"][0]["value"] == 8
    assert set(report["failed"]) == {"width_in_range", "height_in_range", "channels_allowed"}


def test_same_image_in_two_splits(images):
    folder, rows = images
    copy = folder / "copy_of_00.png"
    shutil.copy(rows[0]["source"], copy)
    leaked = _row(str(copy), rows[0]["label"], "test")  # rows[0] is in train
    report = _failing_report(_manifest([*rows, leaked]))
    assert report["failed"] == ["image_in_one_split"]
    assert _offender_ids(report, "image_in_one_split") == {rows[0]["id"], leaked["id"]}


def test_same_image_with_two_labels(images):
    folder, rows = images
    copy = folder / "relabelled_01.png"
    shutil.copy(rows[1]["source"], copy)
    conflict = _row(str(copy), "benign", rows[1]["split"])  # rows[1] is malignant
    report = _failing_report(_manifest([*rows, conflict]))
    assert report["failed"] == ["image_has_one_label"]
    assert _offender_ids(report, "image_has_one_label") == {rows[1]["id"], conflict["id"]}


def test_class_counts_and_missing_classes(images):
    _, rows = images
    frame = _manifest(rows)
    report = _failing_report(frame, min_per_class=9)  # 8 train images per class
    assert report["failed"] == ["class_min_count"]
    offenders = report["expectations"]["class_min_count"]["offenders"]
    assert {o["class"]: o["value"] for o in offenders} == {"benign": 8, "malignant": 8}

    report = _failing_report(frame, classes=[*CLASSES, "normal"])
    assert report["failed"] == ["classes_present"]
    assert "normal" in report["expectations"]["classes_present"]["explanation"]

    unsplit = frame.assign(split="")  # no splits yet: counted over all 12 rows per class
    assert validate_manifest(unsplit, CLASSES, **{**LIMITS, "min_per_class": 12}).passed


def test_stop_mode_message_names_expectations(images):
    _, rows = images
    frame = _manifest(rows)
    frame.loc[2, "label"] = "cat"
    with pytest.raises(ValidationFailed) as caught:
        validate_manifest(frame, CLASSES, **LIMITS, on_failure="stop")
    message = str(caught.value)
    assert "labels_in_classes" in message
    assert "1 offending row" in message
    assert "case_02.png" in message
    assert "images_decodable" not in message  # passing expectations are not listed as failures


def test_quarantine_drops_exactly_the_planted_rows(images):
    folder, rows = images
    frame_rows = list(rows)
    frame_rows[3] = {**rows[3], "label": "cat"}
    copy = folder / "copy_of_06.png"
    shutil.copy(rows[6]["source"], copy)
    leaked = _row(str(copy), rows[6]["label"], "val")
    tiny = _row(_write(folder / "tiny.png", 200, size=(4, 4)), "benign", "train")
    frame = _manifest([*frame_rows, leaked, tiny])

    outcome = validate_manifest(frame, CLASSES, **LIMITS, on_failure="quarantine")
    planted = {rows[3]["id"], rows[6]["id"], leaked["id"], tiny["id"]}
    assert set(outcome.quarantined["id"]) == planted
    assert len(outcome.quarantined) == 4
    assert set(outcome.validated["id"]) == set(frame["id"]) - planted
    assert len(outcome.validated) == len(frame) - 4
    assert list(outcome.validated.columns) == list(COLUMNS)
    assert not outcome.passed  # the input as given did not pass
    assert outcome.report["after_quarantine"]["passed"]

    reasons = dict(zip(outcome.quarantined["id"], outcome.quarantined["reason"], strict=True))
    assert reasons[rows[3]["id"]] == "labels_in_classes (label='cat')"
    assert reasons[tiny["id"]].startswith("width_in_range")
    assert "height_in_range" in reasons[tiny["id"]]
    for key in (rows[6]["id"], leaked["id"]):
        assert reasons[key].startswith("image_in_one_split")
        assert "sha256 group quarantined" in reasons[key]


def test_quarantine_still_fails_when_too_few_images_remain(images):
    _, rows = images
    frame = _manifest(rows)
    benign_train = frame.index[(frame["label"] == "benign") & (frame["split"] == "train")]
    frame.loc[benign_train[:6], "label"] = "unknown"  # leaves 2 benign train images
    with pytest.raises(ValidationFailed, match="class_min_count") as caught:
        validate_manifest(frame, CLASSES, **LIMITS, on_failure="quarantine")
    report = caught.value.report
    assert report["rows_quarantined"] == 6
    assert report["after_quarantine"]["failed"] == ["class_min_count"]
    assert report["after_quarantine"]["expectations"]["class_min_count"]["offenders"] == [
        {"class": "benign", "value": 2}
    ]


def test_workspace_gets_report_quarantine_and_data_docs(images, tmp_path):
    _, rows = images
    frame = _manifest(rows)
    frame.loc[7, "label"] = "cat"
    workspace = Workspace(tmp_path / "ws")
    outcome = validate_manifest(
        frame, CLASSES, **LIMITS, on_failure="quarantine", workspace=workspace
    )
    assert outcome.data_docs == workspace.data_docs / "index.html"
    assert outcome.data_docs.is_file()
    assert list((workspace.data_docs / "validations").rglob("*.html"))

    (csv,) = workspace.quarantine.glob("*.csv")
    assert list(pd.read_csv(csv)["id"]) == [rows[7]["id"]]
    (report_file,) = workspace.reports.glob("validation-*.json")
    saved = json.loads(report_file.read_text())
    assert saved["rows_quarantined"] == 1
    assert saved["files"]["quarantine"] == str(csv)
    offender = saved["expectations"]["labels_in_classes"]["offenders"][0]
    assert offender == {"id": rows[7]["id"], "file": "case_07.png", "value": "cat"}
    assert str(csv) in outcome.summary()

    # a failing run in stop mode still leaves its report and docs behind
    with pytest.raises(ValidationFailed):
        validate_manifest(frame, CLASSES, **LIMITS, workspace=workspace)
    assert len(list(workspace.reports.glob("validation-*.json"))) == 2
    assert not list(tmp_path.glob("gx")) and not os.path.exists("gx")


def test_bad_arguments_are_config_errors(images):
    _, rows = images
    frame = _manifest(rows)
    with pytest.raises(ConfigError, match="on_failure"):
        validate_manifest(frame, CLASSES, **LIMITS, on_failure="ignore")
    with pytest.raises(ConfigError, match="min_side"):
        validate_manifest(frame, CLASSES, min_side=300, max_side=256, min_per_class=1)


def test_source_names_keep_only_the_file_name():
    assert source_name("/data/patients/jane/scan.png") == "scan.png"
    assert (
        source_name("/data/breastmnist.npz::train_images/12") == "breastmnist.npz::train_images/12"
    )
