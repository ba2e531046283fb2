"""Fixtures for browser tests: a small model trained on real MRI slices, a real `bentoml serve`
of it, the UI server pointing at that service, and a headless Debian Chromium (Playwright).
All four are session-wide: every browser test module shares one model, service and UI (each
test signs in its own accounts, so none depends on another's data).

The test process may import torch and components/ (only ui/ may not). Nothing is downloaded:
the browser is the system's, installed by tests/ensure_browser.py.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_process import TELEMETRY_OFF, ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "brain_tumor_mri"
CLASSES = ["glioma_tumor", "meningioma_tumor", "no_tumor", "pituitary_tumor"]
DANGEROUS = ["glioma_tumor", "meningioma_tumor", "pituitary_tumor"]
API_KEY = "e2e-service-key-0001"
ADMIN = ("admin", "chief-e2e-pass-01")
CLINICIAN = ("dr.morgan", "clinician-pass-01")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


# ---------------------------------------------------------------- browser


@pytest.fixture(scope="session")
def chromium_path() -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    from ensure_browser import find_browser

    path = find_browser()
    if not path:
        pytest.skip(
            "Chromium is not installed: run `python tests/ensure_browser.py` as root "
            "(installs Debian's chromium package; no browser is downloaded)"
        )
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("the `playwright` Python package is not installed (dev extra)")
    return path


@pytest.fixture(scope="session")
def browser(chromium_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def accounts() -> tuple[tuple[str, str], tuple[str, str]]:
    """(admin, clinician) as (user name, password); the admin is bootstrapped from env."""
    return ADMIN, CLINICIAN


@pytest.fixture(scope="session")
def mri_image() -> Path:
    """A real held-out MRI slice (a JPEG from the Testing split)."""
    path = DATA / "Testing" / "glioma_tumor" / "image(1).jpg"
    if not path.exists():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    """Where each step's screenshot goes: $ONCOFLOW_SCREENSHOTS, else a temporary directory."""
    explicit = os.environ.get("ONCOFLOW_SCREENSHOTS")
    path = Path(explicit) if explicit else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    print(f"screenshots in {path}")
    return path


# ---------------------------------------------------------------- model and service


def _load(files: list[Path], size: int):
    import numpy as np

    from components.data.images import open_image
    from components.data.preprocess import Preprocessing

    pre = Preprocessing(size=size, channels=3)
    return np.stack([pre.to_uint8(open_image(str(f))) for f in files])


def _pick(split: str, per_class: int) -> tuple[list[Path], list[int]]:
    files, labels = [], []
    for index, name in enumerate(CLASSES):
        chosen = sorted((DATA / split / name).glob("*.jpg"))[:per_class]
        files += chosen
        labels += [index] * len(chosen)
    return files, labels


def train_bundle(work: Path) -> Path:
    """A small_cnn trained for a few epochs on a small subsample of the real brain MRI data,
    calibrated on its validation images (temperature, conformal sets, operating point, and the
    Mahalanobis OOD check on its training features), evaluated on real held-out Testing
    images, packaged as a model bundle (weights and a grey-level SHAP background) under
    `work`, with the site-local case library the service answers similar cases from
    (`work/case-library`, built from the same images)."""
    import numpy as np
    import torch

    from components.bundle import ModelBundle
    from components.bundle_builder import make_bundle
    from components.calibration.fit import fit_calibration
    from components.calibration.ood import fit_detector
    from components.case_library import build_case_library
    from components.data.preprocess import Preprocessing
    from components.evaluation.metrics import evaluate
    from components.evaluation.predict import embed_arrays, predict_logits, predict_proba
    from components.models import build_model
    from components.training.central import train_classifier

    torch.set_num_threads(2)
    size = 64
    files, labels = _pick("Training", 36)
    x, y = _load(files, size), np.asarray(labels, dtype=np.int64)
    val = np.arange(len(y)) % 6 == 0
    test_files, test_labels = _pick("Testing", 10)
    pre = Preprocessing(size=size, channels=3)
    architecture = {
        "name": "small_cnn",
        "num_classes": len(CLASSES),
        "in_channels": 3,
        "norm": "batch",
        "pretrained": False,
        "small_input": True,
        "width": 8,
    }
    model = build_model(**architecture)
    result = train_classifier(
        model,
        (x[~val], y[~val]),
        (x[val], y[val]),
        pre,
        max_epochs=4,
        batch_size=32,
        lr=3e-3,
        weight_decay=1e-4,
        early_stopping_patience=4,
        imbalance="none",
        augment=False,
        seed=0,
        out_dir=work / "training",
        accelerator="cpu",
    )
    val_logits = predict_logits(result.model, x[val], pre)
    calibration = fit_calibration(
        val_logits, y[val], CLASSES, dangerous=DANGEROUS, fitted_on="e2e validation images"
    )
    detector = fit_detector(
        "mahalanobis",
        val_logits=val_logits,
        val_features=embed_arrays(result.model, x[val], pre),
        # the top of the few validation scores: the real images the journeys upload must get a
        # diagnosis (a 5 % rate on ~20 cases flagged some of them); noise stays far above it
        false_alarm=0.001,
        train_features=embed_arrays(result.model, x[~val], pre),
        train_labels=y[~val],
        n_classes=len(CLASSES),
    )
    block = calibration.to_dict() | {"ood": detector.meta()}
    probs = calibration.recalibrate(predict_proba(result.model, _load(test_files, size), pre))
    metrics = evaluate(np.asarray(test_labels), probs, CLASSES)
    digest = hashlib.sha256("\n".join(str(f.relative_to(DATA)) for f in files).encode())
    bundle_dir = make_bundle(
        result.model,
        architecture=architecture,
        class_names=CLASSES,
        preprocessing=pre,
        metrics=metrics,
        data_fingerprint=digest.hexdigest(),
        config={"note": "e2e test model"},
        background_size=8,
        out_dir=work / "bundle",
        calibration=block,
        ood_stats=detector.arrays(),
    )
    build_case_library(ModelBundle.load(bundle_dir), x[~val], y[~val], work / "case-library")
    return bundle_dir


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory) -> Path:
    """A small model trained on real MRI slices (see `train_bundle`)."""
    if not DATA.is_dir():
        pytest.skip(f"the brain MRI data set is not at {DATA}")
    return train_bundle(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="session")
def service_url(bundle_dir, tmp_path_factory) -> Iterator[str]:
    """A real `bentoml serve` of the bundle, with API-key auth."""
    from serving.launch import serve_command, serve_env

    home = tmp_path_factory.mktemp("bentoml")
    code = (
        "from serving.packaging import import_bundle; print(import_bundle("
        f"{str(bundle_dir)!r}, labels={{'registered_model': 'brain-mri-e2e', 'version': '1'}}))"
    )
    env = {**os.environ, **TELEMETRY_OFF, "BENTOML_HOME": str(home)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    tag = done.stdout.strip().splitlines()[-1]
    port = free_port()
    library = bundle_dir.parent / "case-library"
    env = serve_env(tag, home, base={**os.environ, **TELEMETRY_OFF}, case_library=library)
    env["ONCOFLOW_API_KEYS"] = API_KEY
    env.pop("ONCOFLOW_ALLOW_NO_AUTH", None)
    logs = tmp_path_factory.mktemp("logs")
    server = ServerProcess(serve_command("127.0.0.1", port), env, logs / "service.log", ROOT)
    url = f"http://127.0.0.1:{port}"
    print(f"service ready after {server.wait_until(url + '/readyz', timeout_s=240):.1f} s")
    yield url
    server.stop()


@pytest.fixture(scope="session")
def ui_url(service_url, tmp_path_factory) -> Iterator[str]:
    """`python -m ui` pointing at the service, with a fresh workspace and a bootstrap admin."""
    workspace = tmp_path_factory.mktemp("workspace")
    port = free_port()
    env = {
        **os.environ,
        **TELEMETRY_OFF,
        "ONCOFLOW_SERVICE_URL": service_url,
        "ONCOFLOW_API_KEY": API_KEY,
        "ONCOFLOW_WORKSPACE": str(workspace),
        "ONCOFLOW_UI_ADMIN_USER": ADMIN[0],
        "ONCOFLOW_UI_ADMIN_PASSWORD": ADMIN[1],
        "PYTHONPATH": str(ROOT),
    }
    server = ServerProcess(
        [sys.executable, "-m", "ui", "--host", "127.0.0.1", "--port", str(port)],
        env,
        workspace / "ui.log",
        ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    print(f"UI ready after {server.wait_until(url + '/', timeout_s=240):.1f} s")
    yield url
    server.stop()
