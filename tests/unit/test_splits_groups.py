"""Patient-level splits: rows sharing `group` move together (with their near-duplicates), are
stratified by label, and the manifest suite checks that no patient is in two splits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from components.data import manifest
from components.data.splits import LeakageSettings, assign_splits
from components.errors import ValidationFailed
from validation import validate_manifest

CLASSES = ["a", "b", "c"]
LEAKAGE = LeakageSettings(
    near_duplicates=True,
    near_similarity=0.95,
    group_by="none",
    match_similarity=0.9,
    proximity_warn_gap=0.1,
)


def patient_manifest(seed: int, patients: int = 90, images: bool = True) -> pd.DataFrame:
    """1-4 rows per patient, each with its own content; a patient's rows mostly share a label
    (a fifth of patients have a second lesion of another class)."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        label = CLASSES[p % 3]
        for r in range(int(rng.integers(1, 5))):
            if r and rng.random() < 0.2:
                label = CLASSES[int(rng.integers(0, 3))]
            source = f"/data/p{p}/{r}.jpg" if images else ""
            rows.append(
                {
                    "id": manifest.row_id(f"p{p}/{r}"),
                    "source": source,
                    "format": "jpeg" if images else "",
                    "label": label,
                    "split": "",
                    "given_split": "",
                    "site": "",
                    "width": 8 * images,
                    "height": 8 * images,
                    "channels": 3 * images,
                    "sha256": f"content-{p}-{r}",
                    "decode_error": "",
                    "group": f"{p:016x}",
                }
            )
    return manifest.conform(pd.DataFrame(rows))


@pytest.mark.parametrize("seed", range(6))
def test_no_patient_is_in_two_splits(seed):
    frame = patient_manifest(seed)
    out, report = assign_splits(frame, True, 0.15, 0.15, seed)
    assert (out.groupby("group")["split"].nunique() == 1).all()
    placed = out.groupby("split")["group"].nunique()
    assert set(placed.index) == {"train", "val", "test"}
    for split in ("val", "test"):  # stratified: every class in every held-out split
        assert set(out.loc[out["split"] == split, "label"]) == set(CLASSES)
        assert 0.08 < (out["split"] == split).mean() < 0.25
    assert report.patients["patients"] == frame["group"].nunique() == 90
    assert report.patients["per_split"] == {s: int(n) for s, n in placed.items()}
    assert report.patients["largest"] == frame["group"].value_counts().max()
    assert "Split by patient: 90 patients" in report.summary()
    assert report.certificate()["patients"]["in_two_splits"] == 0


def test_patients_sharing_an_image_move_together():
    """An exact copy under two patients (the same photo filed twice) joins both patients."""
    frame = patient_manifest(1)
    first = frame.index[frame["group"] == f"{3:016x}"][0]
    other = frame.index[frame["group"] == f"{40:016x}"][0]
    frame.loc[other, "sha256"] = frame.loc[first, "sha256"]
    frame.loc[other, "label"] = frame.loc[first, "label"]
    for seed in range(5):
        out, _ = assign_splits(frame, True, 0.2, 0.2, seed)
        both = out[out["group"].isin([f"{3:016x}", f"{40:016x}"])]
        assert both["split"].nunique() == 1


def test_rows_without_images_split_by_patient_without_thumbnails():
    frame = patient_manifest(2, images=False)
    out, report = assign_splits(frame, True, 0.15, 0.15, 2, leakage=LEAKAGE)
    assert (out.groupby("group")["split"].nunique() == 1).all()
    assert report.near_duplicates == {} and report.proximity == {}  # nothing to compare
    assert (out["thumbnail"] == "").all()


def test_rows_without_a_patient_id_are_their_own_unit():
    frame = patient_manifest(3)
    frame.loc[frame.index[:30], "group"] = ""
    out, report = assign_splits(frame, True, 0.15, 0.15, 3)
    assert report.patients["rows_with_patient"] == len(frame) - 30
    named = out[out["group"] != ""]
    assert (named.groupby("group")["split"].nunique() == 1).all()


def test_the_manifest_suite_refuses_a_patient_in_two_splits():
    out, _ = assign_splits(patient_manifest(4), True, 0.15, 0.15, 4)
    sizes = out["group"].value_counts()
    patient = sizes[sizes > 1].index[0]
    rows = out.index[out["group"] == patient]
    out.loc[rows[0], "split"] = "train"
    out.loc[rows[1], "split"] = "test"
    common = {"min_side": 4, "max_side": 64, "min_per_class": 1}
    with pytest.raises(ValidationFailed, match="patient_in_one_split") as caught:
        validate_manifest(out, CLASSES, **common)
    entry = caught.value.report["expectations"]["patient_in_one_split"]
    assert entry["unexpected_count"] == len(rows)
    assert set(entry["offenders"][0]) == {"id", "value"}  # no file name: it may name the patient
    kept = validate_manifest(out, CLASSES, on_failure="quarantine", **common)
    assert patient not in set(kept.validated["group"])
    assert len(kept.quarantined) == len(rows)
    assert kept.quarantined["reason"].str.startswith("patient_in_one_split").all()


def test_tabular_manifests_skip_the_image_checks():
    out, _ = assign_splits(patient_manifest(5, images=False), True, 0.15, 0.15, 5)
    outcome = validate_manifest(
        out, CLASSES, min_side=16, max_side=64, min_per_class=1, images=False
    )
    checks = set(outcome.report["expectations"])
    assert {"record_in_one_split", "patient_in_one_split", "labels_in_classes"} <= checks
    assert not checks & {"width_in_range", "channels_allowed", "image_has_one_label"}
    with pytest.raises(ValidationFailed, match="width_in_range"):  # as an image manifest
        validate_manifest(out, CLASSES, min_side=16, max_side=64, min_per_class=1)
