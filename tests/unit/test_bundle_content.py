"""Bundle content: a federated or DP bundle holds no training pixels.

The bundles are written the way `flows.tasks.bundle_task` writes them (`make_bundle` with
`bundle_settings` of a run config composed by `tiny_cfg`), from random-noise training images
whose bytes cannot occur by chance. Every file of the bundle (and every member of a zip file:
torch checkpoints, npz) is scanned for the first bytes of each training image as uint8 (CHW
and HWC), as its 48-px thumbnail and as the normalised floats a SHAP background stores. The
same scan finds them in a central bundle built with `package.training_images=true`, which
proves the scan can see them.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_config import tiny_cfg

from components.bundle import BACKGROUND_BASELINES, ModelBundle
from components.bundle_builder import bundle_settings, make_bundle
from components.case_library import thumbnails
from components.data.cache import SplitArrays
from components.errors import ConfigError
from components.models import build_model
from components.privacy.settings import PrivacySettings
from components.training.assembly import architecture_from_config, preprocessing_from_config

NEEDLE_BYTES = 192  # a prefix this long of random pixels never occurs by chance
RUNS = {
    "federated": (("training=federated",), {}),
    "federated_secagg_dp": (
        ("training=federated", "privacy=secagg_dp"),
        {"trainer": {"imbalance": "none"}},
    ),
    "central_dp_sgd": (("privacy=dp_eps8",), {"trainer": {"imbalance": "none"}}),
}


@pytest.fixture(scope="module")
def train() -> SplitArrays:
    """Random-noise training images at the composed dataset's size and channels."""
    ds = tiny_cfg()["dataset"]
    rng = np.random.default_rng(7)
    n = 24
    shape = (n, ds["channels"], ds["image_size"], ds["image_size"])
    x = rng.integers(0, 256, shape, dtype=np.uint8)
    y = np.arange(n, dtype=np.int64) % len(ds["classes"])
    return SplitArrays(x=x, y=y, ids=[f"row-{i}" for i in range(n)])


def bundle_like_the_pipeline(cfg: dict, train: SplitArrays, out: Path) -> Path:
    """`make_bundle` called as `flows.tasks.bundle_task` calls it, for the run `cfg`."""
    privacy = PrivacySettings.from_dict(cfg["privacy"])
    architecture = architecture_from_config(cfg, privacy=privacy)
    torch.manual_seed(0)
    model = build_model(**architecture).eval()
    report = None
    if privacy.enabled:
        report = {"mode": privacy.mode, "epsilon": 8.0, "delta": privacy.delta}
    return make_bundle(
        model,
        architecture=architecture,
        privacy=report,
        class_names=list(cfg["dataset"]["classes"]),
        preprocessing=preprocessing_from_config(cfg),
        train_x=train.x,
        train_y=train.y,
        metrics={"macro_f1": 0.5},
        data_fingerprint="f" * 64,
        config=cfg,
        out_dir=out,
        **bundle_settings(cfg),
    )


def needles(cfg: dict, train: SplitArrays) -> dict[str, list[bytes]]:
    """Prefixes of every training image in each form a bundle could hold it."""
    preprocessing = preprocessing_from_config(cfg)
    normalised = preprocessing.normalise(torch.from_numpy(train.x)).numpy().astype(np.float32)
    small = thumbnails(train.x)
    forms = {
        "uint8 CHW": [x.tobytes() for x in train.x],
        "uint8 HWC": [x.transpose(1, 2, 0).tobytes() for x in train.x],
        "thumbnail": [t.tobytes() for t in small],
        "normalised float32": [v.tobytes() for v in normalised],
    }
    return {form: [b[:NEEDLE_BYTES] for b in blobs] for form, blobs in forms.items()}


def blobs_of(directory: Path) -> dict[str, bytes]:
    """Every file under `directory`, and every member of each zip file, as raw bytes."""
    out = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = str(path.relative_to(directory))
        out[name] = path.read_bytes()
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                for member in archive.namelist():
                    out[f"{name}::{member}"] = archive.read(member)
    return out


def found(directory: Path, cfg: dict, train: SplitArrays) -> dict[str, int]:
    """How many training images of each form occur anywhere in `directory`."""
    blobs = list(blobs_of(directory).values())
    return {
        form: sum(any(needle in blob for blob in blobs) for needle in wanted)
        for form, wanted in needles(cfg, train).items()
    }


@pytest.mark.parametrize("run", sorted(RUNS))
def test_federated_and_dp_bundles_hold_no_training_pixels(run, train, tmp_path):
    overrides, sections = RUNS[run]
    cfg = tiny_cfg(*overrides, **sections)
    assert cfg["package"]["training_images"] is False  # the default
    out = bundle_like_the_pipeline(cfg, train, tmp_path / "bundle")
    assert sorted(p.name for p in out.iterdir()) == ["background.pt", "bundle.json", "weights.pt"]
    assert found(out, cfg, train) == {
        "uint8 CHW": 0,
        "uint8 HWC": 0,
        "thumbnail": 0,
        "normalised float32": 0,
    }
    meta = json.loads((out / "bundle.json").read_text())
    text = (out / "bundle.json").read_text()
    assert cfg["paths"]["workspace"] not in text and cfg["dataset"]["root"] not in text
    assert "paths" not in meta["config"] and "root" not in meta["config"]["dataset"]
    assert meta["contents"] == {
        "weights": True,
        "background": BACKGROUND_BASELINES,
        "case_index": 0,
        "training_images": False,
        "ood_statistics": None,
    }
    bundle = ModelBundle.load(out)
    assert bundle.embeddings is None
    background = bundle.background
    assert background.shape[0] == cfg["serving"]["background_size"]
    flat = background.reshape(background.shape[0], background.shape[1], -1)
    assert torch.all(flat.amax(dim=2) == flat.amin(dim=2))  # every image is one constant grey


def test_the_scan_sees_training_images_in_a_central_bundle_that_asks_for_them(train, tmp_path):
    cfg = tiny_cfg("package.training_images=true")
    out = bundle_like_the_pipeline(cfg, train, tmp_path / "bundle")
    seen = found(out, cfg, train)
    assert seen["thumbnail"] == len(train)  # the case index: every training image
    sampled = ModelBundle.load(out).background.shape[0]  # the stratified background sample
    assert sampled > 0 and seen["normalised float32"] == sampled
    contents = json.loads((out / "bundle.json").read_text())["contents"]
    assert contents["training_images"] and contents["case_index"] == len(train)
    assert contents["background"] == "training images"


def test_make_bundle_itself_refuses_training_images_for_federated_or_dp(train, tmp_path):
    cfg = tiny_cfg("package.training_images=true")
    for config, privacy in (
        (cfg | {"training": {"mode": "federated"}}, None),
        (cfg, {"mode": "dp_sgd", "epsilon": 3.0, "delta": 1e-5}),
    ):
        with pytest.raises(ConfigError, match="central run without differential privacy"):
            make_bundle(
                build_model(**architecture_from_config(cfg)),
                architecture=architecture_from_config(cfg),
                privacy=privacy,
                class_names=list(cfg["dataset"]["classes"]),
                preprocessing=preprocessing_from_config(cfg),
                train_x=train.x,
                train_y=train.y,
                metrics={},
                data_fingerprint="",
                config=config,
                out_dir=tmp_path / "never",
                **bundle_settings(cfg),
            )
        assert not (tmp_path / "never").exists()
