"""Preprocessed split arrays: correct values, cached so a second call decodes nothing."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from components.data import cache as cache_mod
from components.data.cache import load_split_arrays
from components.data.ingest import ingest_folder
from components.data.preprocess import Preprocessing
from components.data.splits import assign_splits
from components.data.synthetic import write_synthetic_folder
from components.errors import DataError

CLASSES = ["healthy", "lesion_left", "lesion_right"]


@pytest.fixture
def split_manifest(tmp_path):
    write_synthetic_folder(tmp_path / "syn", 8, size=16, seed=0)
    frame = ingest_folder(tmp_path / "syn")
    out, _ = assign_splits(frame, True, 0.25, 0.25, seed=0)
    return out


def test_arrays_shapes_labels_and_values(tmp_path, split_manifest):
    prep = Preprocessing(size=16, channels=3)
    arrays = load_split_arrays(split_manifest, CLASSES, prep, tmp_path / "cache")
    assert set(arrays) == {"train", "val", "test"}
    assert sum(len(a) for a in arrays.values()) == 24
    for split, part in arrays.items():
        rows = split_manifest[split_manifest["split"] == split]
        assert part.x.shape == (len(rows), 3, 16, 16) and part.x.dtype == np.uint8
        assert part.y.dtype == np.int64
        assert part.y.tolist() == [CLASSES.index(label) for label in rows["label"]]
        assert part.ids == rows["id"].tolist()
        first = np.asarray(Image.open(rows["source"].iloc[0]).convert("RGB")).transpose(2, 0, 1)
        assert np.array_equal(part.x[0], first)


def test_second_call_decodes_nothing(tmp_path, split_manifest, monkeypatch):
    prep = Preprocessing(size=12, channels=1)
    first = load_split_arrays(split_manifest, CLASSES, prep, tmp_path / "cache")

    def refuse(*_args, **_kwargs):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(cache_mod.images, "open_image", refuse)
    second = load_split_arrays(split_manifest, CLASSES, prep, tmp_path / "cache")
    for split in first:
        assert np.array_equal(first[split].x, second[split].x)
        assert np.array_equal(first[split].y, second[split].y)
    # a different spec is a different cache entry, so it must decode (and here fails)
    with pytest.raises(AssertionError, match="decoded although cached"):
        load_split_arrays(split_manifest, CLASSES, Preprocessing(size=8), tmp_path / "cache")


def test_unknown_label_and_changed_file(tmp_path, split_manifest):
    prep = Preprocessing(size=16, channels=3)
    with pytest.raises(DataError, match=r"'lesion_right' \(8 rows\)"):
        load_split_arrays(split_manifest, CLASSES[:2], prep, tmp_path / "cache")
    row = split_manifest[split_manifest["split"] == "train"].iloc[0]
    Image.new("RGB", (16, 16), (1, 2, 3)).save(row["source"])
    with pytest.raises(DataError, match="changed since ingest"):
        load_split_arrays(split_manifest, CLASSES, prep, tmp_path / "other-cache")


def test_empty_split_has_correct_shape(tmp_path, split_manifest):
    frame = split_manifest.copy()
    frame.loc[frame["split"] == "val", "split"] = ""
    arrays = load_split_arrays(frame, CLASSES, Preprocessing(size=10), tmp_path / "c")
    assert arrays["val"].x.shape == (0, 3, 10, 10) and arrays["val"].y.shape == (0,)
