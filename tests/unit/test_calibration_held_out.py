"""Calibrating on held-out deployment data: the array cache loads a `calibration` split when the
manifest has one, and the calibrate task fits T, the conformal threshold and the operating
point on it (`calibration.fit_on=held_out`), on `val` otherwise, saying which (with counts)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from prefect.logging import disable_run_logger
from tiny_config import tiny_cfg

from components.data.cache import CALIBRATION_SPLIT, load_split_arrays
from components.data.ingest import ingest_folder
from components.data.splits import assign_splits
from components.data.synthetic import write_synthetic_folder
from components.errors import DataError
from components.models import build_model
from components.training.assembly import preprocessing_from_config
from components.workspace import Workspace
from flows.promote import calibration_lines
from flows.tasks import RunContext, calibrate_task, calibration_data

CLASSES = ["healthy", "lesion_left", "lesion_right"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """Synthetic images split as usual, then half of the test split (every other row of each
    class, by hand) moved to `calibration`, as the split step does with fit_on=held_out."""
    root = tmp_path_factory.mktemp("syn")
    write_synthetic_folder(root, 30, size=16, seed=0)
    frame, _ = assign_splits(ingest_folder(root), True, 0.2, 0.4, seed=0)
    test = frame.index[frame["split"] == "test"]
    moved = [i for _, rows in frame.loc[test].groupby("label") for i in rows.index[::2]]
    frame.loc[moved, "split"] = CALIBRATION_SPLIT
    return frame


def _cfg(fit_on: str):
    return tiny_cfg("dataset=synthetic", dataset={"image_size": 16}, calibration={"fit_on": fit_on})


def test_cache_loads_the_calibration_split_only_when_present(manifest, tmp_path):
    pre = preprocessing_from_config(_cfg("held_out"))
    arrays = load_split_arrays(manifest, CLASSES, pre, tmp_path / "cache")
    assert set(arrays) == {"train", "val", "test", CALIBRATION_SPLIT}
    held = manifest[manifest["split"] == CALIBRATION_SPLIT]
    assert arrays[CALIBRATION_SPLIT].ids == held["id"].tolist()
    assert len(arrays[CALIBRATION_SPLIT]) + len(arrays["test"]) == 36
    plain = manifest[manifest["split"] != CALIBRATION_SPLIT]
    assert set(load_split_arrays(plain, CLASSES, pre, tmp_path / "cache")) == {
        "train",
        "val",
        "test",
    }


def test_calibration_data_names_the_split_and_its_size(manifest, tmp_path):
    pre = preprocessing_from_config(_cfg("held_out"))
    arrays = load_split_arrays(manifest, CLASSES, pre, tmp_path / "cache")
    held, words = calibration_data(_cfg("held_out")["calibration"], arrays)
    assert held is arrays[CALIBRATION_SPLIT]
    assert words.startswith(f"held-out calibration split ({len(held)} cases")
    assert "50% share of the de-duplicated test split" in words
    val, words = calibration_data(_cfg("val")["calibration"], arrays)
    assert val is arrays["val"] and words.startswith(f"validation split ({len(val)} cases")
    without = {k: v for k, v in arrays.items() if k != CALIBRATION_SPLIT}
    with pytest.raises(DataError, match="no held-out `calibration` split"):
        calibration_data(_cfg("held_out")["calibration"], without)


def test_calibrate_task_fits_every_part_on_the_held_out_split(manifest, tmp_path):
    cfg = _cfg("held_out")
    pre = preprocessing_from_config(cfg)
    arrays = load_split_arrays(manifest, CLASSES, pre, tmp_path / "cache")
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=3, in_channels=3, width=4).eval()
    ctx = RunContext(cfg=cfg, workspace=Workspace(tmp_path / "ws"), run_dir=tmp_path)
    with disable_run_logger():
        calibrated = calibrate_task.fn(ctx, model, arrays)
    block, report = calibrated.calibration, calibrated.report
    n_held = len(arrays[CALIBRATION_SPLIT])
    assert block["n_fit"] == n_held and block["fitted_on"].startswith("held-out calibration")
    assert block["sources"]["temperature"] == block["sources"]["conformal"] == block["fitted_on"]
    point = block["operating_point"]
    assert point["n_positive"] + point["n_negative"] == n_held
    assert point["n_positive"] == int(np.isin(arrays[CALIBRATION_SPLIT].y, [1, 2]).sum())
    # the OOD check: statistics on train, threshold on the held-out split too
    assert block["ood"]["n_statistics"] == len(arrays["train"])
    assert block["ood"]["n_threshold"] == n_held
    assert calibrated.ood_stats["means"].shape[0] == 3
    assert report["n"] == len(arrays["test"]) and report["operating_point"]["test"]
    assert (tmp_path / "calibration.json").is_file()
    card = "\n".join(calibration_lines(block, report))
    assert f"held-out calibration split ({n_held} cases" in card
    assert "Operating point" in card and "on the test split: sensitivity" in card
    assert f"threshold on the held-out calibration split ({n_held} cases)" in card


def test_a_private_run_gets_the_energy_check_and_no_training_statistics(manifest, tmp_path):
    from components.bundle_builder import make_bundle
    from components.errors import ConfigError

    cfg = tiny_cfg(
        "dataset=synthetic",
        "privacy=dp_eps8",
        "model.norm=group",
        dataset={"image_size": 16},
        trainer={"imbalance": "none"},
    )
    pre = preprocessing_from_config(cfg)
    arrays = load_split_arrays(manifest, CLASSES, pre, tmp_path / "cache")
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=3, in_channels=3, width=4).eval()
    ctx = RunContext(cfg=cfg, workspace=Workspace(tmp_path / "ws"), run_dir=tmp_path)
    with disable_run_logger():
        calibrated = calibrate_task.fn(ctx, model, arrays)
    assert calibrated.calibration["ood"]["score"] == "energy"
    assert calibrated.ood_stats is None and "privacy" in calibrated.report["ood"]["note"]
    stats = {"means": np.zeros((3, 16), np.float32), "precision": np.eye(16, dtype=np.float32)}
    with pytest.raises(ConfigError, match="un-noised statistics"):
        make_bundle(
            model,
            architecture={"name": "small_cnn", "num_classes": 3, "width": 4},
            class_names=CLASSES,
            preprocessing=pre,
            metrics={},
            data_fingerprint="",
            config=cfg,
            background_size=2,
            out_dir=tmp_path / "bundle",
            privacy={"mode": "dp_sgd", "epsilon": 8.0},
            ood_stats=stats,
        )
