"""Synthetic lesion data: determinism, masks consistent with labels, folder writer."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from components.data.synthetic import MASKS_FILE, make_synthetic, write_synthetic_folder
from components.errors import ConfigError


def test_deterministic_for_a_seed():
    one = make_synthetic(5, size=24, seed=7)
    two = make_synthetic(5, size=24, seed=7)
    other = make_synthetic(5, size=24, seed=8)
    assert np.array_equal(one.images, two.images)
    assert np.array_equal(one.labels, two.labels)
    assert np.array_equal(one.masks, two.masks)
    assert not np.array_equal(one.images, other.images)


@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_and_dtypes(channels):
    data = make_synthetic(4, size=20, seed=0, channels=channels)
    expected = (12, 20, 20) if channels == 1 else (12, 20, 20, 3)
    assert data.images.shape == expected and data.images.dtype == np.uint8
    assert data.labels.dtype == np.int64 and data.masks.dtype == np.bool_
    assert data.masks.shape == (12, 20, 20)
    assert np.bincount(data.labels).tolist() == [4, 4, 4]
    assert data.class_names == ["healthy", "lesion_left", "lesion_right"]


def test_masks_match_labels_and_are_bright():
    size = 32
    data = make_synthetic(20, size=size, seed=1, channels=1)
    cols = np.arange(size)
    for image, label, mask in zip(data.images, data.labels, data.masks, strict=True):
        if label == 0:
            assert not mask.any()
            continue
        assert mask.sum() >= 4
        xs = np.broadcast_to(cols, mask.shape)[mask]
        if label == 1:
            assert xs.max() < size / 2
        else:
            assert xs.min() >= size / 2
        assert image[mask].mean() > image[~mask].mean() + 40


def test_location_alone_separates_the_classes():
    # a trivial feature (brightest column half) classifies nearly perfectly: learnable
    data = make_synthetic(30, size=32, seed=2, channels=3)
    gray = data.images.mean(axis=3)
    left = gray[:, :, :16].max(axis=(1, 2))
    right = gray[:, :, 16:].max(axis=(1, 2))
    background = np.median(gray.reshape(len(gray), -1), axis=1)
    peak = np.maximum(left, right)
    predicted = np.where(peak - background < 60, 0, np.where(left > right, 1, 2))
    assert (predicted == data.labels).mean() > 0.9


def test_write_folder_with_and_without_splits(tmp_path):
    data = write_synthetic_folder(tmp_path / "flat", 5, size=16, seed=0, channels=1)
    files = sorted((tmp_path / "flat").rglob("*.png"))
    assert len(files) == 15
    assert {f.parent.name for f in files} == set(data.class_names)
    saved = np.load(tmp_path / "flat" / MASKS_FILE)
    assert saved["masks"].shape == (15, 16, 16)
    for i in (0, 7, 14):
        rel = str(saved["files"][i])
        image = np.asarray(Image.open(tmp_path / "flat" / rel))
        assert np.array_equal(image, data.images[i])
        assert rel.split("/")[0] == data.class_names[int(saved["labels"][i])]

    write_synthetic_folder(tmp_path / "split", 5, size=16, seed=0, with_splits=True)
    train = list((tmp_path / "split" / "train").rglob("*.png"))
    test = list((tmp_path / "split" / "test").rglob("*.png"))
    assert len(train) == 12 and len(test) == 3


def test_invalid_parameters():
    with pytest.raises(ConfigError, match="exactly 3"):
        make_synthetic(2, classes=("a", "b"))
    with pytest.raises(ConfigError):
        make_synthetic(2, channels=2)
    with pytest.raises(ConfigError):
        make_synthetic(0)
