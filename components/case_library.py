"""The site-local similar-case library: a hospital's own labelled images, embedded by the model
it serves, so `/similar` never needs training data from the model bundle.

A library is a directory::

    library.json   format version, the model fingerprint it was built with, classes, size,
                   cases per class, thumbnail size, build time (no file names or paths)
    cases.npz      features (N, D) float32, labels (N,) int64, thumbnails (N, t, t, C) uint8

`build_case_library` embeds images (uint8 (N, C, H, W) at the model's input size) with a
bundle's model; `build_from_folder` reads a folder with one sub-folder per class (named as the
model's classes). `load_case_library` refuses a library built with another model
(`components.bundle.model_fingerprint`). `bundle_case_index` wraps the index a central, non-DP
bundle may carry (`package.training_images`), labelled as such.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from components.bundle import ModelBundle, model_fingerprint
from components.errors import ConfigError, DataError, ModelError, NotFound
from components.similar import SimilarCaseIndex

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
THUMBNAIL_SIZE = 48
LIBRARY_SOURCE = "site-local case library"
BUNDLE_SOURCE = "model bundle (training images)"
BUILD_HINT = (
    "build one from this site's own labelled images with `oncoflow case-library build "
    "--images DIR --model TAG --out LIBRARY` and start the service with `oncoflow serve "
    "--case-library LIBRARY` (serving.case_library, ONCOFLOW_CASE_LIBRARY)"
)
_META = "library.json"
_CASES = "cases.npz"
_BATCH = 256


class NoCaseLibrary(NotFound):
    """Similar cases were asked of a server without a site-local case library (404)."""


@dataclass(frozen=True)
class CaseLibrary:
    """A loaded similar-case index and where its cases come from (`source`)."""

    index: SimilarCaseIndex
    source: str
    model_fingerprint: str
    built_at: str = ""

    def __len__(self) -> int:
        return len(self.index)


def thumbnails(x_uint8: np.ndarray) -> np.ndarray:
    """uint8 (N, C, H, W) -> uint8 (N, t, t, C) gallery thumbnails."""
    import torch
    import torch.nn.functional as F

    out = []
    for start in range(0, len(x_uint8), 512):
        batch = torch.from_numpy(np.ascontiguousarray(x_uint8[start : start + 512])).float()
        small = F.interpolate(batch, size=(THUMBNAIL_SIZE, THUMBNAIL_SIZE), mode="area")
        out.append(small.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    if not out:
        channels = x_uint8.shape[1] if x_uint8.ndim == 4 else 3
        return np.zeros((0, THUMBNAIL_SIZE, THUMBNAIL_SIZE, channels), np.uint8)
    return np.concatenate(out)


def embed_cases(bundle: ModelBundle, model, images: np.ndarray, records=None) -> np.ndarray:
    """The model's penultimate features (N, D) of uint8 images (N, C, H, W) (+ encoded clinical
    records (N, D_tab) for a fusion model)."""
    import torch

    from components.evaluation.predict import embed_arrays

    kind = _kind(bundle)
    if kind == "tabular":
        raise ModelError("a tabular model reads no images: it has no similar cases")
    if kind == "image":
        if records is not None:
            raise DataError("this image model takes no clinical records")
        return embed_arrays(model, images, bundle.preprocessing)
    if records is None or len(records) != len(images):
        raise DataError("a fusion model embeds image + clinical record: give one record per image")
    table = torch.as_tensor(np.asarray(records, dtype=np.float32))
    out = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(images), _BATCH):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + _BATCH]))
            x = bundle.preprocessing.normalise(batch)
            out.append(model.embed(x, table[start : start + _BATCH]).float().numpy())
    return np.concatenate(out).astype(np.float32)


def build_case_library(
    bundle: ModelBundle,
    images: np.ndarray,
    labels: np.ndarray,
    out_dir: str | Path,
    *,
    records=None,
) -> Path:
    """Embed a site's labelled images with `bundle`'s model and write the library to `out_dir`.

    `images`: uint8 (N, C, H, W) at the model's input size and channels; `labels`: class
    indices in the bundle's class order; `records`: encoded clinical records (N, D), fusion
    models only. Nothing that names a patient or a file is stored.
    """
    images = np.asarray(images)
    labels = np.asarray(labels, dtype=np.int64)
    p = bundle.preprocessing
    if images.dtype != np.uint8 or images.shape[1:] != (p.channels, p.size, p.size):
        raise DataError(
            f"case images must be uint8 (N, {p.channels}, {p.size}, {p.size}) for this model, "
            f"got {images.dtype} {images.shape}"
        )
    if len(images) == 0 or labels.shape != (len(images),):
        raise DataError(f"{len(images)} images but {labels.shape[0]} labels (need one each, N>0)")
    if labels.min() < 0 or labels.max() >= len(bundle.class_names):
        raise DataError(f"labels fall outside the model's {len(bundle.class_names)} classes")
    model = bundle.build_model()
    features = embed_cases(bundle, model, images, records).astype(np.float32)
    small = thumbnails(images)
    SimilarCaseIndex(features, labels, small, bundle.class_names)  # checks before writing
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / _CASES, features=features, labels=labels, thumbnails=small)
    counts = np.bincount(labels, minlength=len(bundle.class_names))
    meta = {
        "format_version": FORMAT_VERSION,
        "source": LIBRARY_SOURCE,
        "model_fingerprint": model_fingerprint(bundle),
        "architecture": bundle.architecture,
        "class_names": list(bundle.class_names),
        "size": len(labels),
        "per_class": {c: int(n) for c, n in zip(bundle.class_names, counts, strict=True)},
        "thumbnail_size": THUMBNAIL_SIZE,
        "feature_dim": int(features.shape[1]),
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (out / _META).write_text(json.dumps(meta, indent=2))
    log.info("case library: %d cases (%s)", len(labels), meta["per_class"])
    return out


def read_folder(directory: str | Path, class_names: list[str], preprocessing):
    """uint8 images (N, C, H, W) at the model's size and their labels from a folder holding one
    sub-folder per class; a sub-folder that is not a class is refused, unreadable files are
    skipped (counted, never named: a path may identify a patient)."""
    from components.data.images import DICOM_SUFFIXES, open_image
    from components.data.ingest import IMAGE_SUFFIXES

    root = Path(directory)
    if not root.is_dir():
        raise DataError(f"no folder of case images at {root}")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in folders if p.name not in class_names]
    if unknown:
        raise DataError(
            f"case folders {unknown} are not classes of this model; name each sub-folder after "
            f"one of {list(class_names)}"
        )
    suffixes = IMAGE_SUFFIXES | set(DICOM_SUFFIXES)
    images, labels, skipped = [], [], Counter()
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
            if hidden or not path.is_file():
                continue
            if path.suffix.lower() not in suffixes:
                skipped["not an image"] += 1
                continue
            try:
                images.append(preprocessing.to_uint8(open_image(str(path))))
            except DataError as exc:
                skipped[str(exc)] += 1
                continue
            labels.append(class_names.index(folder.name))
    if skipped:
        log.warning("skipped %s", ", ".join(f"{n} ({why})" for why, n in sorted(skipped.items())))
    if not images:
        raise DataError(f"no readable images in the class folders under {root}")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def build_from_folder(bundle: ModelBundle, images_dir: str | Path, out_dir: str | Path) -> Path:
    """`build_case_library` from a folder with one sub-folder of images per class."""
    kind = _kind(bundle)
    if kind != "image":
        raise DataError(
            f"a {kind} model needs a clinical record with each case image; build its library "
            "from Python with components.case_library.build_case_library(..., records=...)"
        )
    images, labels = read_folder(images_dir, list(bundle.class_names), bundle.preprocessing)
    return build_case_library(bundle, images, labels, out_dir)


def load_case_library(directory: str | Path, bundle: ModelBundle) -> CaseLibrary:
    """The library at `directory`, refused (ConfigError) unless built with `bundle`'s model."""
    root = Path(directory)
    try:
        meta = json.loads((root / _META).read_text())
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise ConfigError(f"{root} is not a case library (no {_META}); {BUILD_HINT}") from exc
    except ValueError as exc:
        raise ConfigError(f"the case library's {_META} at {root} is not valid JSON") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"case library format {meta.get('format_version')} is not supported")
    expected = model_fingerprint(bundle)
    built_with = str(meta.get("model_fingerprint", ""))
    if built_with != expected:
        raise ConfigError(
            f"the case library at {root} was built with model {built_with[:12] or '?'}, not "
            f"with the served model {expected[:12]}: its features are not comparable; rebuild "
            "it for this model with `oncoflow case-library build`"
        )
    try:
        with np.load(root / _CASES) as data:
            arrays = {k: data[k] for k in ("features", "labels", "thumbnails")}
    except (FileNotFoundError, KeyError, ValueError, OSError) as exc:
        raise ModelError(f"the case library at {root} has no usable {_CASES}: {exc}") from exc
    index = SimilarCaseIndex(
        arrays["features"], arrays["labels"], arrays["thumbnails"], bundle.class_names
    )
    return CaseLibrary(index, LIBRARY_SOURCE, built_with, str(meta.get("built_at", "")))


def bundle_case_index(bundle: ModelBundle) -> CaseLibrary | None:
    """The training-image index a bundle carries (central non-DP runs with
    `package.training_images` only), or None."""
    if not bundle.embeddings:
        return None
    return CaseLibrary(SimilarCaseIndex.from_bundle(bundle), BUNDLE_SOURCE, "")


def library_summary(directory: str | Path) -> dict[str, Any]:
    """library.json of a built library (what the CLI prints)."""
    return json.loads((Path(directory) / _META).read_text())


def _kind(bundle: ModelBundle) -> str:
    from components.models.fusion import FUSION_ARCHITECTURE
    from components.models.tabular import TABULAR_ARCHITECTURE

    if bundle.architecture == FUSION_ARCHITECTURE:
        return "fusion"
    if bundle.architecture == TABULAR_ARCHITECTURE:
        return "tabular"
    return "image"


__all__ = [
    "BUNDLE_SOURCE",
    "LIBRARY_SOURCE",
    "THUMBNAIL_SIZE",
    "CaseLibrary",
    "NoCaseLibrary",
    "build_case_library",
    "build_from_folder",
    "bundle_case_index",
    "load_case_library",
    "read_folder",
    "thumbnails",
]
