"""Near-duplicates and likely-same-patient groups: found from thumbnails made at ingest, kept
in one split, distinct images never merged; the calibration carve; the GX group check."""

from __future__ import annotations

import io
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw, ImageFilter

from components.data.ingest import ingest_folder
from components.data.near_duplicates import (
    connected_groups,
    example_montage,
    nearest_similarity,
    sequence_pairs,
    similar_pairs,
    thumbnail,
    vectors,
)
from components.data.splits import CALIBRATION, LeakageSettings, assign_splits
from components.errors import ValidationFailed
from validation import validate_manifest

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

SIDE = 256  # an overlay as small against the image as calipers on a real scan


def texture(seed: int, shape: str) -> Image.Image:
    """A distinct synthetic scan: a smooth random texture (its own seed) with one shape."""
    rng = np.random.default_rng(seed)
    noise = Image.fromarray(rng.integers(0, 256, (SIDE, SIDE), dtype=np.uint8), mode="L")
    image = noise.filter(ImageFilter.GaussianBlur(8)).point(lambda v: (v - 118) * 8)
    draw = ImageDraw.Draw(image)
    x, y = rng.integers(20, SIDE - 90, 2)
    box = (int(x), int(y), int(x) + 64, int(y) + 64)
    if shape == "circle":
        draw.ellipse(box, fill=230)
    elif shape == "square":
        draw.rectangle(box, fill=20)
    else:
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], 250)
    return image.convert("RGB")


def resized(image: Image.Image) -> Image.Image:
    return image.resize((180, 180), Image.Resampling.BICUBIC)


def reencoded(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=35)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def with_calipers(image: Image.Image) -> Image.Image:
    out = image.copy()
    draw = ImageDraw.Draw(out)
    draw.line((10, 30, 60, 70), fill=(255, 255, 255), width=1)
    draw.text((5, SIDE - 14), "12mm", fill=(255, 255, 255))
    return out


VARIANTS = {"resized": resized, "jpeg": reencoded, "calipers": with_calipers}
SETTINGS = LeakageSettings(
    near_duplicates=True,
    near_similarity=0.95,
    group_by="none",
    match_similarity=0.9,
    proximity_warn_gap=0.1,
)


def sim(a: Image.Image, b: Image.Image) -> float:
    rows = vectors([thumbnail(a), thumbnail(b)])
    return float(rows[0] @ rows[1])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_of_one_image_are_near_duplicates(variant):
    for seed, shape in ((1, "circle"), (2, "square"), (3, "triangle")):
        original = texture(seed, shape)
        assert sim(original, VARIANTS[variant](original)) >= SETTINGS.near_similarity


def test_distinct_images_are_not_similar():
    images = [texture(seed, shape) for seed in range(10) for shape in ("circle", "square")]
    rows = vectors([thumbnail(i) for i in images])
    pairs, values = similar_pairs(rows, SETTINGS.match_similarity)
    assert len(pairs) == 0, values
    # and the same texture with a different shape elsewhere is still not a near-duplicate
    assert sim(texture(4, "circle"), texture(4, "square")) < SETTINGS.near_similarity


def test_similar_pairs_blocks_and_nearest_agree_with_brute_force(monkeypatch):
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(50, 8)).astype(np.float32)
    rows[10] = rows[3] + 0.01
    rows[40] = rows[3] * 2
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    monkeypatch.setattr("components.data.near_duplicates.BLOCK", 7)
    pairs, values = similar_pairs(rows, 0.99)
    assert sorted(map(tuple, pairs)) == [(3, 10), (3, 40), (10, 40)]
    assert np.all(values >= 0.99)
    best = nearest_similarity(rows[[3, 5]], rows[[10, 20]])
    assert best[0] == pytest.approx(float(rows[3] @ rows[10]))
    assert best[1] == pytest.approx(float((rows[[10, 20]] @ rows[5]).max()))
    assert connected_groups(5, np.array([[0, 1], [1, 2]])).tolist()[:3] == [0, 0, 0]


# --------------------------------------------------------------------------- through ingest


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two classes of 14 distinct images; 4 originals per class have each variant as a file."""
    root = tmp_path_factory.mktemp("near")
    for c, label in enumerate(("benign", "malignant")):
        (root / label).mkdir()
        for i in range(14):
            image = texture(100 * c + i, ("circle", "square", "triangle")[i % 3])
            image.save(root / label / f"{label}-{i:02d}.png")
            if i < 4:
                for name, make in VARIANTS.items():
                    suffix = ".jpg" if name == "jpeg" else ".png"
                    make(image).save(root / label / f"{label}-{i:02d}-{name}{suffix}")
    return root


def originals(frame: pd.DataFrame) -> pd.Series:
    """The original's name for each row (`benign-01-jpeg.jpg` -> `benign-01`)."""
    return frame["source"].map(os.path.basename).str.extract(r"^([a-z]+-\d\d)", expand=False)


def test_ingest_caches_a_thumbnail_per_image(folder):
    frame = ingest_folder(folder)
    assert (frame["thumbnail"].str.len() > 0).all()
    assert vectors(frame["thumbnail"].tolist()).shape == (len(frame), 1024)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_near_duplicates_stay_in_one_split_and_distinct_images_are_not_merged(folder, seed):
    frame = ingest_folder(folder)
    frame["label"] = frame["source"].map(lambda s: os.path.basename(s).split("-")[0])
    out, report = assign_splits(frame, True, 0.2, 0.2, seed, leakage=SETTINGS)
    per_original = out.groupby(originals(out))["split"].nunique()
    assert (per_original == 1).all()
    near = report.near_duplicates
    assert near["groups"] == 8 and near["images_in_groups"] == 8 * 4  # nothing else merged
    assert near["pairs"] == 8 * 6  # 4 images per group, all pairwise similar
    assert set(report.proximity["near_duplicate_pairs_by_final_split"]) <= {
        "train/train",
        "val/val",
        "test/test",
    }
    assert report.certificate()["near_duplicates"] == near
    assert "Near-duplicates (thumbnail similarity >= 0.95): 48 pairs" in report.summary()
    assert len(report.example_pairs) > 0
    assert "example_pairs" not in report.to_dict() and "near_matched_ids" not in report.to_dict()


def test_without_near_duplicate_detection_groups_straddle(folder):
    frame = ingest_folder(folder)
    off = LeakageSettings(False, 0.95, "none", 0.9, 0.1)
    straddled = 0
    for seed in range(4):
        out, report = assign_splits(frame, True, 0.3, 0.3, seed, leakage=off)
        straddled += int((out.groupby(originals(out))["split"].nunique() > 1).sum())
        assert report.near_duplicates == {}
        cross = report.proximity["near_duplicate_pairs_by_final_split"]
        assert set(cross) != {"train/train", "val/val", "test/test"} or straddled == 0
    assert straddled > 0  # the check the feature exists for


def test_given_test_copy_wins_and_the_train_near_duplicate_is_dropped(folder):
    frame = ingest_folder(folder)
    name = frame["source"].map(os.path.basename)
    frame["given_split"] = "train"
    frame.loc[name.str.startswith(("benign-1", "malignant-1")), "given_split"] = "test"
    frame.loc[name == "benign-00-jpeg.jpg", "given_split"] = "test"  # its siblings in train
    out, report = assign_splits(frame, True, 0.2, 0.2, 0, leakage=SETTINGS)
    kept = out[originals(out) == "benign-00"]
    assert kept["split"].tolist() == ["test"]  # the 3 train siblings were dropped
    assert report.near_duplicates["rows_dropped"] == 3
    assert report.near_duplicates["pairs_by_split"]["test/train"] == 3
    # the same with the dropped copies last in the manifest (pairs index rows before the drop)
    last = (originals(frame) == "benign-00").to_numpy() & (frame["given_split"] == "train")
    reordered = pd.concat([frame[~last], frame[last]]).reset_index(drop=True)
    out, report = assign_splits(reordered, True, 0.2, 0.2, 0, leakage=SETTINGS)
    assert out[originals(out) == "benign-00"]["split"].tolist() == ["test"]
    assert report.near_duplicates["rows_dropped"] == 3
    assert report.near_duplicates["pairs_with_different_labels"] == 0


def test_validation_suite_accepts_calibration_and_catches_a_group_across_splits(folder):
    frame = ingest_folder(folder)
    frame["label"] = frame["source"].map(lambda s: os.path.basename(s).split("-")[0])
    out, _ = assign_splits(frame, True, 0.2, 0.4, 0, leakage=SETTINGS, calibration_fraction=0.5)
    limits = {"min_side": 16, "max_side": 512, "min_per_class": 2}
    classes = ["benign", "malignant"]
    assert CALIBRATION in set(out["split"])
    assert validate_manifest(out, classes, near_similarity=0.95, **limits).passed
    broken = out.copy()
    twin = broken.index[originals(broken) == "benign-00"]
    split = broken.loc[twin[0], "split"]
    broken.loc[twin[0], "split"] = "test" if split != "test" else "train"
    broken.loc[broken["split"] == "val", "split"] = "holdout"
    with pytest.raises(ValidationFailed) as caught:
        validate_manifest(broken, classes, near_similarity=0.95, **limits)
    failed = set(caught.value.report["failed"])
    assert {"near_duplicates_in_one_split", "split_values_known"} <= failed
    assert "image_in_one_split" not in failed  # distinct files: only the group check sees it


def test_montage_draws_the_example_pairs(folder, tmp_path):
    frame = ingest_folder(folder)
    _, report = assign_splits(frame, True, 0.2, 0.2, 0, leakage=SETTINGS)
    path = example_montage(report.example_pairs, tmp_path / "pairs.png")
    with Image.open(path) as image:
        assert image.height >= len(report.example_pairs) * 96
    assert example_montage([("/nope/a.png", "/nope/b.png", 0.99)], tmp_path / "x.png") is None


# --------------------------------------------------------------------------- grouping


def scan_folder(root, patients: int, slices: int) -> None:
    """One folder per class of numbered slices `p (n).png`: each patient's consecutive slices
    look alike (a shared texture plus a little slice noise), patients differ."""
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        number = 1
        for patient in range(patients):
            rng = np.random.default_rng(1000 * (label == "b") + patient)
            base = rng.normal(size=(24, 24))
            for _ in range(slices):
                field = base + 0.4 * rng.normal(size=(24, 24))
                pixels = np.clip(128 + 40 * field, 0, 255).astype(np.uint8)
                image = Image.fromarray(pixels, "L").resize((64, 64), Image.Resampling.BICUBIC)
                image.save(root / label / f"p ({number}).png")
                number += 1


def test_sequence_pairs_link_numbered_neighbours_only():
    rows = np.eye(4, dtype=np.float32)
    rows[1] = rows[0]  # 1 looks like 0; 3 would look like 2 but is not numbered next to it
    rows[3] = rows[2]
    sources = ["/d/p (1).png", "/d/p (2).png", "/d/p (7).png", "/e/p (8).png"]
    assert sequence_pairs(sources, rows, 0.9).tolist() == [[0, 1]]


def test_grouping_by_slice_sequence_keeps_each_patient_in_one_split(tmp_path):
    scan_folder(tmp_path, patients=8, slices=5)
    frame = ingest_folder(tmp_path)
    frame["patient"] = frame["source"].map(
        lambda s: (os.path.dirname(s), (int(os.path.basename(s)[3:-5]) - 1) // 5)
    )
    for_similarity = vectors(frame["thumbnail"].tolist())
    pairs, _ = similar_pairs(for_similarity, 0.95)
    assert len(pairs) == 0  # neighbouring slices are not near-duplicates: grouping's job
    grouped = LeakageSettings(True, 0.95, "sequence", 0.8, 0.1)
    spread = 0
    for seed in range(3):
        out, report = assign_splits(frame, True, 0.25, 0.25, seed, leakage=grouped)
        assert (
            out.groupby(frame.set_index("id").loc[out["id"], "patient"].values)["split"].nunique()
            == 1
        ).all()
        assert report.grouping["groups"] == 16 and report.grouping["largest_group"] == 5
        plain, _ = assign_splits(frame, True, 0.25, 0.25, seed, leakage=SETTINGS)
        spread += int(
            (
                plain.groupby(frame.set_index("id").loc[plain["id"], "patient"].values)[
                    "split"
                ].nunique()
                > 1
            ).sum()
        )
    assert spread > 0


def test_proximity_warns_when_validation_is_closer_to_training_than_test(tmp_path):
    scan_folder(tmp_path, patients=8, slices=5)
    frame = ingest_folder(tmp_path)
    frame["given_split"] = "train"
    frame.loc[frame["source"].str.contains(r"p \((?:3[6-9]|40)\)"), "given_split"] = "test"
    loose = LeakageSettings(True, 0.95, "none", 0.8, 0.1)
    _, report = assign_splits(frame, True, 0.25, 0.2, 0, leakage=loose)
    shares = report.proximity["splits"]
    assert shares["test"]["near_matched"] == 0 and shares["val"]["share"] > 0.5
    assert "validation looks much closer to training" in report.proximity["warning"]
    grouped = LeakageSettings(True, 0.95, "sequence", 0.8, 0.1)
    _, report = assign_splits(frame, True, 0.25, 0.2, 0, leakage=grouped)
    assert report.proximity["warning"] == ""
    assert report.proximity["splits"]["val"]["near_matched"] == 0


# --------------------------------------------------------------------------- calibration


def test_calibration_carve_is_stratified_seeded_disjoint_and_keeps_groups(folder):
    frame = ingest_folder(folder)
    frame["label"] = frame["source"].map(lambda s: os.path.basename(s).split("-")[0])
    runs = [
        assign_splits(frame, True, 0.2, 0.4, seed, leakage=SETTINGS, calibration_fraction=0.5)
        for seed in (0, 0, 1)
    ]
    (one, report), (two, _), (other, _) = runs
    assert one["split"].tolist() == two["split"].tolist()  # seeded
    assert one["split"].tolist() != other["split"].tolist()
    assert set(one["split"]) == {"train", "val", "test", CALIBRATION}
    assert (one.groupby(originals(one))["split"].nunique() == 1).all()  # groups whole
    assert one["id"].is_unique  # each image in exactly one split (disjoint)
    for label in ("benign", "malignant"):  # stratified: both classes on both sides
        counts = report.final_counts
        assert counts[CALIBRATION][label] >= 1 and counts["test"][label] >= 1
    assert report.carved[CALIBRATION] == int((one["split"] == CALIBRATION).sum())
    assert f"+{CALIBRATION} 0.5 of test" in report.strategy


# --------------------------------------------------------------------------- certificate


def test_certificate_scores_the_test_images_without_near_matches_apart(tmp_path):
    from components.evaluation.leakage import clean_subset_metrics
    from components.evaluation.metrics import evaluate
    from flows.promote import leakage_lines

    scan_folder(tmp_path, patients=8, slices=5)
    frame = ingest_folder(tmp_path)
    # test: the last patient of each class whole, and one slice of the first (near-matched)
    frame["given_split"] = "train"
    frame.loc[frame["source"].str.contains(r"p \((?:3[6-9]|40|3)\)"), "given_split"] = "test"
    loose = LeakageSettings(True, 0.95, "none", 0.8, 0.1)
    out, report = assign_splits(frame, True, 0.2, 0.3, 0, leakage=loose)
    near_ids = frozenset(report.near_matched_ids)
    test = out[out["split"] == "test"]
    near = test["id"].isin(near_ids).to_numpy()
    assert (near.sum(), len(test)) == (2, 12)
    y = (test["label"] == "b").to_numpy().astype(int)
    right = np.eye(2)[y] * 0.8 + 0.1
    probs = np.where(near[:, None], right, right[:, ::-1])  # right only where near-matched
    full = evaluate(y, probs, ["a", "b"])
    leakage = clean_subset_metrics(
        list(test["id"]), y, probs, ["a", "b"], near_ids, full, report.certificate()
    )
    assert leakage["test_images"] == len(test) and leakage["test_near_matched"] == near.sum()
    assert leakage["test_without_near_matches"]["accuracy"] == 0.0
    assert leakage["test_full"]["accuracy"] == pytest.approx(near.mean())
    assert leakage["near_duplicates"] == report.near_duplicates
    card = "\n".join(leakage_lines(leakage))
    assert "## Leakage certificate" in card
    assert f"| without near-matches in training | {len(test) - near.sum()} |" in card
    assert "Near-matched to a training image (similarity >= 0.8)" in card
