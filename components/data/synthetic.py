"""Seeded synthetic "lesion" images: learnable in seconds, with ground-truth masks.

Three roles, named by `classes`: no lesion, a lesion in the left half, a lesion in the right
half. The class is decided only by where the bright blob sits, so a small CNN learns it in a
few epochs and an explanation method can be scored against the mask.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from components.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_CLASSES = ("healthy", "lesion_left", "lesion_right")
MASKS_FILE = "masks.npz"


@dataclass
class SyntheticData:
    """images uint8 (N,H,W,C) or (N,H,W); labels int64 (N,); masks bool (N,H,W)."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    masks: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth tissue-like texture plus fine noise, float mostly within 40..120."""
    coarse = rng.normal(0.0, 1.0, size=(max(2, size // 8),) * 2)
    smooth = np.asarray(
        Image.fromarray(coarse.astype(np.float32)).resize((size, size), Image.Resampling.BICUBIC)
    )
    fine = rng.normal(0.0, 1.0, size=(size, size))
    return 80.0 + 14.0 * smooth + 8.0 * fine


def _lesion(rng: np.random.Generator, size: int, side: str) -> tuple[np.ndarray, np.ndarray]:
    """A bright Gaussian blob centred inside the `side` half; returns (intensity, mask)."""
    radius = rng.uniform(size / 10, size / 6)
    margin = radius + 1
    half = size / 2
    if side == "left":
        cx = rng.uniform(margin, half - margin)
    else:
        cx = rng.uniform(half + margin, size - margin)
    cy = rng.uniform(margin, size - margin)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    dist2 = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2
    blob = np.exp(-dist2 / (2 * radius**2))
    peak = rng.uniform(100.0, 140.0)
    return peak * blob, dist2 <= radius**2


def make_synthetic(
    n_per_class: int,
    size: int = 32,
    seed: int = 0,
    channels: int = 3,
    classes=DEFAULT_CLASSES,
) -> SyntheticData:
    """Generate `n_per_class` images per class, shuffled, deterministic for `seed`."""
    classes = [str(c) for c in classes]
    if len(classes) != 3 or len(set(classes)) != 3:
        raise ConfigError(
            f"synthetic data has exactly 3 distinct classes (none, left, right); got {classes}"
        )
    if channels not in (1, 3):
        raise ConfigError("synthetic channels must be 1 or 3")
    if n_per_class < 1 or size < 8:
        raise ConfigError("synthetic data needs n_per_class >= 1 and size >= 8")
    rng = np.random.default_rng(seed)
    n = 3 * n_per_class
    labels = np.repeat(np.arange(3, dtype=np.int64), n_per_class)
    labels = labels[rng.permutation(n)]
    images = np.empty((n, size, size, channels), dtype=np.uint8)
    masks = np.zeros((n, size, size), dtype=bool)
    for i, label in enumerate(labels):
        gray = _background(rng, size)
        if label > 0:
            intensity, mask = _lesion(rng, size, "left" if label == 1 else "right")
            gray = gray + intensity
            masks[i] = mask
        if channels == 3:
            tint = rng.uniform(0.9, 1.1, size=3)
            pixel = gray[..., None] * tint[None, None, :]
        else:
            pixel = gray[..., None]
        images[i] = np.clip(pixel, 0, 255).round().astype(np.uint8)
    if channels == 1:
        images = images[..., 0]
    return SyntheticData(images=images, labels=labels, class_names=classes, masks=masks)


def write_synthetic_folder(
    root: str | Path,
    n_per_class: int,
    size: int = 32,
    seed: int = 0,
    channels: int = 3,
    with_splits: bool = False,
    classes=DEFAULT_CLASSES,
) -> SyntheticData:
    """Write PNGs as `<root>/[train|test/]<class>/<class>_<i>.png` plus `<root>/masks.npz`.

    With splits, every fifth image of each class goes to `test`. `masks.npz` holds `masks`,
    `labels` and `files` (paths relative to `root`, in the order of the arrays).
    """
    data = make_synthetic(n_per_class, size=size, seed=seed, channels=channels, classes=classes)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    seen = {name: 0 for name in data.class_names}
    files = []
    for i, label in enumerate(data.labels):
        name = data.class_names[int(label)]
        k = seen[name]
        seen[name] += 1
        folder = root / (("test" if k % 5 == 4 else "train") if with_splits else "") / name
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}_{i:05d}.png"
        Image.fromarray(data.images[i]).save(path)
        files.append(str(path.relative_to(root)))
    np.savez_compressed(
        root / MASKS_FILE, masks=data.masks, labels=data.labels, files=np.array(files)
    )
    log.info("wrote %d synthetic images (%d classes) under %s", len(data), 3, root)
    return data


#: the paired synthetic dataset's classes: the image shows whether there is a lesion, only the
#: clinical record (its `marker`) tells a benign lesion from a malignant one
CLINICAL_CLASSES = ("no_lesion", "benign", "malignant")
CLINICAL_TABLE = "clinical.csv"


def write_synthetic_clinical_folder(
    root: str | Path, n_per_class: int, size: int = 32, seed: int = 0
) -> Path:
    """Write paired images and a clinical table where neither alone gives the label.

    `<root>/images/case_<i>.png` and `<root>/clinical.csv` with columns `image` (the file
    name), `patient` (two or three images per patient), `age`, `smoker` (some missing),
    `site` (a category), `marker` (a lab value) and `diagnosis`. No lesion in the image:
    `no_lesion`; a lesion and a high marker: `malignant`; a lesion and a low one: `benign`.
    So an image-only model cannot tell benign from malignant, a record-only model cannot
    tell a benign lesion from no lesion, and a fusion model can tell all three.
    """
    import pandas as pd

    data = make_synthetic(n_per_class * 2, size=size, seed=seed)
    rng = np.random.default_rng(seed + 7)
    has_lesion = data.labels > 0
    high = rng.random(len(data)) < 0.5
    label = np.where(~has_lesion, 0, np.where(high, 2, 1))
    keep = np.concatenate([np.flatnonzero(label == c)[:n_per_class] for c in range(3)])
    keep = keep[rng.permutation(len(keep))]
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for n, i in enumerate(keep):
        name = f"case_{n:05d}.png"
        Image.fromarray(data.images[i]).save(root / "images" / name)
        marker = rng.normal(7.0, 1.0) if high[i] else rng.normal(3.0, 1.0)
        rows.append(
            {
                "image": name,
                "patient": f"P{n // 2 + (n % 5 == 0):04d}",
                "age": int(rng.integers(30, 80)),
                "smoker": "" if rng.random() < 0.15 else str(bool(rng.random() < 0.3)),
                "site": str(rng.choice(["arm", "back", "face"])),
                "marker": round(float(np.clip(marker, 0.0, 12.0)), 2),
                "diagnosis": CLINICAL_CLASSES[int(label[i])],
            }
        )
    pd.DataFrame(rows).to_csv(root / CLINICAL_TABLE, index=False)
    log.info("wrote %d paired synthetic cases under %s", len(rows), root)
    return root / CLINICAL_TABLE
