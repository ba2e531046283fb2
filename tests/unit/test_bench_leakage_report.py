"""bench/leakage_report.py --run: a trained run's test score on every test image and on those
without a near-match in training, recomputed from its manifest and bundle (a tiny made-up run)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from bench_modules import bench_module
from PIL import Image, ImageFilter

from components.bundle import ModelBundle
from components.calibration.record import Calibration
from components.data import manifest
from components.data.images import open_image
from components.data.ingest import ingest_folder
from components.data.preprocess import Preprocessing
from components.evaluation.leakage import headline
from components.evaluation.metrics import evaluate
from components.evaluation.predict import predict_proba
from components.models import build_model

CLASSES = ["healthy", "lesion_left", "lesion_right"]  # the synthetic preset's (tiny_cfg)


@pytest.fixture(scope="module")
def bench():
    with bench_module("leakage_report") as module:
        yield module


def scan(seed: int) -> Image.Image:
    """A distinct smooth texture per seed (distinct seeds correlate far below 0.9)."""
    rng = np.random.default_rng(seed)
    noise = Image.fromarray(rng.integers(0, 256, (96, 96), dtype=np.uint8), mode="L")
    return noise.filter(ImageFilter.GaussianBlur(6)).point(lambda v: (v - 118) * 8).convert("RGB")


def jpeg(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=40)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def made_up_run(root: Path, tiny_cfg) -> tuple[Path, ModelBundle]:
    """Per class 3 training and 2 test images; the first class's third test image is a
    re-encoded copy of one of its training images (a near-duplicate across the splits, which
    the run's split report, written before grouping existed, does not know about)."""
    for c, name in enumerate(CLASSES):
        folder = root / "images" / name
        folder.mkdir(parents=True)
        for k in range(5):
            split = "train" if k < 3 else "test"
            scan(10 * c + k).save(folder / f"{split}-{k}.png")
    jpeg(scan(0)).save(root / "images" / CLASSES[0] / "test-copy.jpg")
    frame = ingest_folder(root / "images")
    frame["split"] = frame["source"].map(lambda s: Path(s).name.split("-")[0])
    run = root / "run"
    run.mkdir()
    manifest.save(frame, run / "manifest.parquet")
    torch.manual_seed(0)
    model = build_model("small_cnn", len(CLASSES), width=4)
    calibration = Calibration("temperature", 2.0, 0.9, 1.0, "made up", 3, CLASSES, CLASSES[1:])
    bundle = ModelBundle(
        architecture="small_cnn",
        architecture_kwargs={"num_classes": len(CLASSES), "width": 4},
        class_names=CLASSES,
        preprocessing=Preprocessing(size=32, channels=3),
        state_dict=model.state_dict(),
        config=tiny_cfg(),
        calibration=calibration.to_dict(),
    )
    bundle.save(run / "bundle")
    (run / "split_report.json").write_text(json.dumps({"near_duplicates": {}}))
    return run, bundle


def test_run_mode_scores_the_test_split_with_and_without_near_matches(
    bench, tmp_path, tiny_cfg, capsys
):
    run, bundle = made_up_run(tmp_path, tiny_cfg)
    test = manifest.load(run / "manifest.parquet").query("split == 'test'").reset_index()
    # the score the evaluate step would have recorded: calibrated probabilities
    x = np.stack([bundle.preprocessing.to_uint8(open_image(s)) for s in test["source"]])
    raw = predict_proba(bundle.build_model(), x, bundle.preprocessing)
    probs = Calibration.from_dict(bundle.calibration).recalibrate(raw)
    y = test["label"].map(CLASSES.index).to_numpy()
    full = evaluate(y, probs, CLASSES, dangerous=CLASSES[1:])
    (run / "test_metrics.json").write_text(json.dumps(full))
    out = tmp_path / "out" / "leakage.json"

    result = bench.main(["--run", str(run), "--json", str(out), "--cache", str(tmp_path / "c")])

    copy = test["source"].str.endswith("test-copy.jpg").to_numpy()
    assert (result["test_images"], result["test_near_matched"]) == (7, 1)
    assert result["test_full"] == pytest.approx(headline(full))
    clean = evaluate(y[~copy], probs[~copy], CLASSES)
    assert result["test_without_near_matches"] == pytest.approx(headline(clean))
    assert result["recorded"]["test_metrics_max_abs_difference"] == pytest.approx(0, abs=1e-6)
    assert result["proximity"]["near_duplicate_pairs_by_final_split"] == {"test/train": 1}
    assert result["near_duplicate_grouping"] == {
        "in_run_split": False,
        "groups_across_final_splits": 1,
        "images_in_them": 2,
    }
    assert result["split_settings"]["schema_defaults_for"] == []
    assert json.loads(out.read_text())["test_near_matched"] == 1
    printed = capsys.readouterr().out
    assert "predates near-duplicate grouping" in printed
    assert "without near-matches      6" in printed


def test_run_mode_takes_no_overrides(bench, tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--run", str(tmp_path), "seed=1"])
