"""Ingest adapters: layouts, CSV, npz, synthetic, decode cache, subsampling."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.data import ingest as ingest_mod
from components.data import manifest
from components.data.ingest import ingest, ingest_csv, ingest_folder, ingest_npz
from components.errors import DataError
from components.workspace import Workspace

REAL_DATA = Path("/work/shared/data")


def write_image(path: Path, value: int, size: tuple[int, int] = (12, 10), mode: str = "RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def workspace(tmp_path) -> Workspace:
    return Workspace(tmp_path / "ws")


def test_class_folders_with_odd_names_hidden_and_junk(tmp_path, caplog):
    root = tmp_path / "busi"
    write_image(root / "benign" / "benign (1).png", 1)
    write_image(root / "benign" / "benign (2).png", 2, mode="L")
    write_image(root / "malignant" / "malignant (1).png", 3)
    write_image(root / "malignant" / ".hidden.png", 4)
    write_image(root / "malignant" / ".ipynb_checkpoints" / "x.png", 5)
    (root / "malignant" / "notes.txt").write_text("x")
    (root / "README.md").write_text("x")
    (root / "malignant" / "broken (3).png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with caplog.at_level(logging.INFO):
        frame = ingest_folder(root)
    assert list(frame.columns) == list(manifest.COLUMNS)
    assert len(frame) == 4
    assert sorted(frame["label"]) == ["benign", "benign", "malignant", "malignant"]
    assert (frame["given_split"] == "").all() and (frame["split"] == "").all()
    ok = frame[frame["decode_error"] == ""]
    assert len(ok) == 3
    assert set(ok["format"]) == {"png"}
    assert sorted(ok["channels"]) == [1, 3, 3]
    assert (ok["width"] == 12).all() and (ok["height"] == 10).all()
    assert ok["sha256"].str.len().eq(64).all()
    bad = frame[frame["decode_error"] != ""].iloc[0]
    assert bad["width"] == 0 and bad["sha256"] == "" and "broken (3).png" in bad["source"]
    assert "2 hidden" in caplog.text and "1 non-image" in caplog.text
    assert frame["id"].is_unique


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (("Training", "Testing"), {"train", "test"}),
        (("train", "test", "val"), {"train", "test", "val"}),
        (("TRAIN", "Valid", "validation"), {"train", "val"}),
    ],
)
def test_split_folder_layouts(tmp_path, names, expected):
    root = tmp_path / "data"
    for k, split in enumerate(names):
        for c, label in enumerate(("NORMAL", "PNEUMONIA")):
            write_image(root / split / label / f"img{k}{c}.jpeg", 10 * k + c)
    frame = ingest_folder(root)
    assert set(frame["given_split"]) == expected
    assert set(frame["label"]) == {"NORMAL", "PNEUMONIA"}
    assert set(frame["format"]) == {"jpeg"}


def test_mixed_split_and_class_folders_is_an_error(tmp_path):
    write_image(tmp_path / "r" / "train" / "a" / "1.png", 1)
    write_image(tmp_path / "r" / "cats" / "1.png", 2)
    with pytest.raises(DataError, match="mixes split folders"):
        ingest_folder(tmp_path / "r")


def test_missing_or_empty_root(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ingest_folder(tmp_path / "nope")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no usable image files"):
        ingest_folder(tmp_path / "empty")


def test_identical_pixels_share_sha256(tmp_path):
    write_image(tmp_path / "r" / "a" / "one.png", 7)
    write_image(tmp_path / "r" / "b" / "two.bmp", 7)
    frame = ingest_folder(tmp_path / "r")
    assert frame["sha256"].nunique() == 1
    assert frame["id"].nunique() == 2


def test_csv_adapter(tmp_path):
    images = tmp_path / "imgs"
    write_image(images / "a.png", 1)
    write_image(images / "b.png", 2)
    csv = tmp_path / "meta" / "list.csv"
    csv.parent.mkdir()
    pd.DataFrame(
        {
            "path": ["../imgs/a.png", str(images / "b.png"), "../imgs/gone.png"],
            "label": ["x", "y", "x"],
            "split": ["Training", "", "test"],
            "site": ["h1", "h2", "h1"],
        }
    ).to_csv(csv, index=False)
    frame = ingest_csv(csv)
    assert len(frame) == 3
    assert frame["given_split"].tolist() == ["train", "", "test"]
    assert frame["site"].tolist() == ["h1", "h2", "h1"]
    assert frame["decode_error"].tolist() == ["", "", "file not found"]
    assert Path(frame["source"][0]) == (images / "a.png").resolve()


def test_csv_errors(tmp_path):
    csv = tmp_path / "m.csv"
    csv.write_text("path,diagnosis\na.png,x\n")
    with pytest.raises(DataError, match=r"lacks required column\(s\) \['label'\]"):
        ingest_csv(csv)
    csv.write_text("path,label,split\na.png,x,holdout\n")
    with pytest.raises(DataError, match="unknown split value 'holdout'"):
        ingest_csv(csv)
    with pytest.raises(DataError, match="not found"):
        ingest_csv(tmp_path / "none.csv")


def test_npz_adapter(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "breastmnist.npz"
    np.savez(
        path,
        train_images=rng.integers(0, 255, (6, 28, 28), dtype=np.uint8),
        train_labels=np.array([[0], [1], [1], [0], [1], [1]]),
        val_images=rng.integers(0, 255, (2, 28, 28), dtype=np.uint8),
        val_labels=np.array([[0], [1]]),
        test_images=rng.integers(0, 255, (3, 28, 28), dtype=np.uint8),
        test_labels=np.array([1, 0, 1]),
    )
    frame = ingest_npz(path, ["malignant", "normal_benign"])
    assert len(frame) == 11
    assert frame["given_split"].value_counts().to_dict() == {"train": 6, "test": 3, "val": 2}
    assert (frame["decode_error"] == "").all()
    assert (frame["width"] == 28).all() and (frame["channels"] == 1).all()
    assert set(frame["format"]) == {"npz"}
    first = frame[frame["source"].str.endswith("::train_images/1")].iloc[0]
    assert first["label"] == "normal_benign"
    with pytest.raises(DataError, match="does not index"):
        ingest_npz(path, ["only_one"])
    with pytest.raises(DataError, match=r"needs dataset\.classes"):
        ingest_npz(path, None)


def test_npz_layout_errors(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataError, match="none of train_labels"):
        ingest_npz(path, ["a", "b"])
    np.savez(path, train_images=np.zeros((2, 4, 4), np.uint8), train_labels=np.zeros(3, int))
    with pytest.raises(DataError, match="2 images but train_labels 3"):
        ingest_npz(path, ["a", "b"])


def test_synthetic_adapter_generates_once(tmp_path, workspace):
    root = tmp_path / "syn"
    classes = ["healthy", "lesion_left", "lesion_right"]
    frame = ingest("synthetic", root, classes, workspace, options={"n_per_class": 4, "size": 16})
    assert len(frame) == 12
    assert frame["label"].value_counts().to_dict() == dict.fromkeys(classes, 4)
    assert (root / "masks.npz").exists()
    marker = next(root.rglob("*.png"))
    before = marker.stat().st_mtime_ns
    again = ingest("synthetic", root, classes, workspace, options={"n_per_class": 9})
    assert len(again) == 12 and marker.stat().st_mtime_ns == before


def test_unknown_adapter(workspace):
    with pytest.raises(DataError, match="unknown ingest adapter 'zip'"):
        ingest("zip", "x", None, workspace)


def test_decode_cache_reused_and_invalidated(tmp_path, workspace, monkeypatch):
    root = tmp_path / "r"
    paths = [write_image(root / "a" / f"{i}.png", i) for i in range(4)]
    first = ingest("folder", root, None, workspace)
    assert (workspace.cache / ingest_mod.DECODE_CACHE_FILE).exists()

    calls = []
    real_open = ingest_mod.open_image

    def counting_open(source, *args, **kwargs):
        calls.append(source)
        return real_open(source, *args, **kwargs)

    monkeypatch.setattr(ingest_mod, "open_image", counting_open)
    second = ingest("folder", root, None, workspace)
    assert calls == []
    pd.testing.assert_frame_equal(first, second)

    # a changed file (new content, same name) must be re-read
    write_image(paths[2], 99, size=(30, 20))
    stat = paths[2].stat()
    os.utime(paths[2], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10_000_000))
    third = ingest("folder", root, None, workspace)
    assert calls == [str(paths[2].resolve())]
    changed = third[third["source"] == str(paths[2].resolve())].iloc[0]
    assert (changed["width"], changed["height"]) == (30, 20)
    assert changed["sha256"] != first.loc[first["source"] == changed["source"], "sha256"].iloc[0]


def test_corrupt_decode_cache_is_ignored(tmp_path, workspace):
    write_image(tmp_path / "r" / "a" / "1.png", 1)
    workspace.cache.mkdir(parents=True)
    (workspace.cache / ingest_mod.DECODE_CACHE_FILE).write_bytes(b"garbage")
    frame = ingest("folder", tmp_path / "r", None, workspace)
    assert frame["decode_error"].tolist() == [""]


def test_max_per_class_is_seeded(tmp_path, workspace):
    root = tmp_path / "r"
    seeds = iter(range(1000))
    for split in ("train", "test"):
        for label in ("a", "b"):
            for i in range(10):
                write_image(root / split / label / f"{i}.png", next(seeds))
    one = ingest("folder", root, None, workspace, max_per_class=3, seed=1)
    two = ingest("folder", root, None, workspace, max_per_class=3, seed=1)
    other = ingest("folder", root, None, workspace, max_per_class=3, seed=2)
    counts = one.groupby(["given_split", "label"]).size()
    assert (counts == 3).all() and len(counts) == 4
    assert one["source"].tolist() == two["source"].tolist()
    assert one["source"].tolist() != other["source"].tolist()


@pytest.mark.skipif(not (REAL_DATA / "brain_tumor_mri").is_dir(), reason="real data absent")
def test_real_brain_tumor_subsample(workspace):
    frame = ingest(
        "folder", REAL_DATA / "brain_tumor_mri", None, workspace, max_per_class=2, seed=0
    )
    assert len(frame) == 16
    assert set(frame["given_split"]) == {"train", "test"}
    assert set(frame["label"]) == {
        "glioma_tumor",
        "meningioma_tumor",
        "no_tumor",
        "pituitary_tumor",
    }
    assert (frame["decode_error"] == "").all()
    assert set(frame["format"]) == {"jpeg"}
