"""Patients named in file names (`dataset.patient_from_name`) and the Kaggle chest X-ray
layout: a val folder too small to calibrate on joins train, validation is carved by child,
and a child also in the published test set keeps only its test images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.config import compose
from components.data.ingest import ingest
from components.data.patients import compile_pattern, patient_in_name, with_name_patients
from components.data.splits import assign_splits, split_by_config
from components.errors import ConfigError
from components.workspace import Workspace


@pytest.fixture(scope="module")
def chest():
    """The composed chest_xray dataset section."""
    return compose(["dataset=chest_xray"]).dataset


def write_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (70, 70), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def kaggle_tree(root: Path) -> dict[str, list[str]]:
    """train/val/test × NORMAL/PNEUMONIA, named as the Kaggle set names them: 30 children per
    class in train (1-3 images each), 2 per class in val, 10 per class in test; `person3`
    has images in train and in test. Returns the file names per given split."""
    rng = np.random.default_rng(0)
    names: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    seed = 0

    def add(split: str, label: str, name: str) -> None:
        nonlocal seed
        seed += 1
        write_image(root / split / label / name, seed)
        names[split].append(name)

    for child in range(1, 31):
        for k in range(int(rng.integers(1, 4))):
            add("train", "PNEUMONIA", f"person{child}_bacteria_{10 * child + k}.jpeg")
            add("train", "NORMAL", f"IM-{child:04d}-{k + 1:04d}.jpeg")
    for child in (101, 102):
        add("val", "PNEUMONIA", f"person{child}_virus_{child}.jpeg")
        add("val", "NORMAL", f"NORMAL2-IM-{child:04d}-0001.jpeg")
    for child in (3, *range(201, 210)):
        add("test", "PNEUMONIA", f"person{child}_virus_{child + 1000}.jpeg")
        add("test", "NORMAL", f"NORMAL2-IM-{child:04d}-0001.jpeg")
    return names


@pytest.mark.parametrize(
    ("name", "patient"),
    [
        ("person12_bacteria_47.jpeg", "person12"),
        ("person12_virus_3.jpeg", "person12"),
        ("person1_bacteria_1.jpeg", "person1"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("NORMAL2-IM-0333-0001.jpeg", "NORMAL2-IM-0333"),
        ("scan_0001.jpeg", ""),
        ("aperson12_bacteria_1.jpeg", ""),
    ],
)
def test_the_chest_xray_pattern_finds_the_child(chest, name, patient):
    assert patient_in_name(name, compile_pattern(chest.patient_from_name)) == patient


def test_a_pattern_without_groups_takes_the_whole_match():
    assert patient_in_name("case-0042_slice7.png", compile_pattern(r"case-\d+")) == "case-0042"


def test_kaggle_layout_split_by_child_with_the_tiny_val_folded(tmp_path, chest):
    names = kaggle_tree(tmp_path / "chest_xray")
    frame = ingest(
        "folder",
        tmp_path / "chest_xray",
        ["NORMAL", "PNEUMONIA"],
        Workspace(tmp_path / "ws"),
        patient_from_name=chest.patient_from_name,
    )
    # the manifest keeps keyed hashes, never the ids; one child, one key
    keys = frame["group"].astype(str)
    assert keys.str.fullmatch(r"[0-9a-f]{16}").all()
    child = frame["source"].map(
        lambda s: patient_in_name(Path(s).name, compile_pattern(chest.patient_from_name))
    )
    assert (keys.groupby(child).nunique() == 1).all()
    assert child.nunique() == keys.nunique()

    out, report = split_by_config(frame, chest.split, seed=0)
    out = out[out["split"] != ""]
    # the val folder (2 per class) joined train; validation was carved from train, by child
    assert report.folded_val == {"rows": 4, "smallest_class": 2, "min_per_class": 20}
    assert report.carved["val"] > 4
    assert (out.groupby("group")["split"].nunique() == 1).all()
    # the published test set is whole; person3 lost only its training images
    in_test = out.loc[out["split"] == "test", "source"].map(lambda s: Path(s).name)
    assert sorted(in_test) == sorted(names["test"])
    person3 = out["source"].str.contains("/person3_")
    assert set(out.loc[person3, "split"]) == {"test"}
    dropped = sum(1 for n in names["train"] if n.startswith("person3_"))
    assert report.cross_split_patients == {
        "patients": 1,
        "rows_dropped": dropped,
        "pairs": {"test/train": 1},
    }
    assert len(out) == sum(map(len, names.values())) - dropped
    assert "person3" not in report.summary()  # ids stay out of the report
    assert "1 patient has images in more than one given split" in report.summary()


def test_a_large_enough_given_val_is_kept(tmp_path, chest):
    kaggle_tree(tmp_path / "chest_xray")
    frame = with_name_patients(
        ingest("folder", tmp_path / "chest_xray", None, Workspace(tmp_path / "ws")),
        chest.patient_from_name,
    )
    out, report = assign_splits(frame, True, 0.1, 0.2, 0, min_val_per_class=2)
    assert report.folded_val == {}
    assert report.strategy == "given"
    assert (out["split"] == "val").sum() == 4


def test_without_a_pattern_the_manifest_names_no_patient(tmp_path):
    kaggle_tree(tmp_path / "chest_xray")
    frame = ingest("folder", tmp_path / "chest_xray", None, Workspace(tmp_path / "ws"))
    assert "group" not in frame.columns


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["dataset.patient_from_name='[person'"], "not a regular expression"),
        (["dataset.adapter=dicom"], "needs image files by name"),
        (["dataset.split.min_val_per_class=-1"], "min_val_per_class"),
    ],
)
def test_bad_patient_settings_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose(["dataset=chest_xray", *overrides])
