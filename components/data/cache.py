"""Preprocessed uint8 arrays per split, cached on disk so repeated runs skip decoding.

The store is keyed by (content hash of the image, preprocessing spec): one file per spec
holds every image ever preprocessed with it, so identical pixels are stored once and a second
run on the same manifest decodes nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.data import images
from components.data.manifest import CLINICAL_PREFIX, SPLITS
from components.data.preprocess import Preprocessing
from components.errors import DataError

log = logging.getLogger(__name__)

STORE_VERSION = 1
DECODE_THREADS = 2
#: a held-out share of the test split for calibration (`calibration.fit_on=held_out`): loaded
#: when the manifest has rows in it, absent from the result otherwise
CALIBRATION_SPLIT = "calibration"


@dataclass
class SplitArrays:
    """One split: x uint8 (N,C,H,W) images (None for a table without images), y int64 (N,),
    ids (manifest row ids, same order), and with a clinical table `clinical` float32 (N, D),
    the records encoded by `schema` (`components.models.tabular.TabularLayout`)."""

    x: np.ndarray | None
    y: np.ndarray
    ids: list[str]
    clinical: np.ndarray | None = None
    schema: list[dict] | None = None

    def __len__(self) -> int:
        return len(self.y)

    def inputs(self, model_or_architecture: Any = None) -> tuple[np.ndarray, ...]:
        """The arrays `model(*inputs)` reads (`components.data.inputs.input_kinds`); without
        a model, everything the split holds (image first)."""
        from components.data.inputs import CLINICAL, IMAGE, input_kinds

        arrays = {IMAGE: self.x, CLINICAL: self.clinical}
        if model_or_architecture is None:
            return tuple(a for a in arrays.values() if a is not None)
        kinds = input_kinds(model_or_architecture)
        missing = [k for k in kinds if arrays[k] is None]
        if missing:
            raise DataError(f"the model reads {', '.join(missing)} data this split does not hold")
        return tuple(arrays[k] for k in kinds)


def spec_key(preprocessing: Preprocessing) -> str:
    """What determines the uint8 pixels (normalisation happens later, so mean/std do not)."""
    spec = {"v": STORE_VERSION, "size": preprocessing.size, "channels": preprocessing.channels}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


class ArrayStore:
    """sha256 -> uint8 (C,H,W) for one preprocessing spec, persisted as one .npz."""

    def __init__(self, cache_dir: Path, preprocessing: Preprocessing) -> None:
        self.path = Path(cache_dir) / "arrays" / f"{spec_key(preprocessing)}.npz"
        self.shape = (preprocessing.channels, preprocessing.size, preprocessing.size)
        self.arrays: dict[str, np.ndarray] = {}
        self._dirty = False
        if self.path.exists():
            try:
                with np.load(self.path, allow_pickle=False) as data:
                    keys, pixels = data["keys"], data["pixels"]
                if pixels.shape[1:] != self.shape or len(keys) != len(pixels):
                    raise ValueError(f"unexpected shape {pixels.shape}")
                self.arrays = {str(k): pixels[i] for i, k in enumerate(keys)}
            except Exception as exc:  # a damaged cache is rebuilt, never trusted
                log.warning("ignoring unreadable array cache %s: %s", self.path, exc)

    def get(self, sha: str) -> np.ndarray | None:
        return self.arrays.get(sha) if sha else None

    def put(self, sha: str, array: np.ndarray) -> None:
        self.arrays[sha] = array
        self._dirty = True

    def save(self) -> None:
        if not self._dirty:
            return
        keys = sorted(self.arrays)
        pixels = (
            np.stack([self.arrays[k] for k in keys])
            if keys
            else np.zeros((0, *self.shape), dtype=np.uint8)
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.stem}.tmp{os.getpid()}.npz")
        np.savez(tmp, keys=np.array(keys, dtype=str), pixels=pixels)
        tmp.replace(self.path)
        self._dirty = False


def _decode(source: str, expected_sha: str, preprocessing: Preprocessing) -> tuple[str, np.ndarray]:
    try:
        image = images.open_image(source)
    except DataError as exc:
        raise DataError(f"cannot load {source}: {exc}") from exc
    sha = images.content_hash(image)
    if expected_sha and sha != expected_sha:
        raise DataError(f"{source} changed since ingest (content hash differs); re-run ingest")
    return sha, preprocessing.to_uint8(image)


def load_split_arrays(
    manifest: pd.DataFrame,
    class_names: list[str],
    preprocessing: Preprocessing,
    cache_dir: str | Path,
    schema: list[dict] | None = None,
) -> dict[str, SplitArrays]:
    """uint8 arrays and integer labels for train/val/test (and `calibration` when the manifest
    has that split), decoding only what is not cached. With a clinical `schema` each split also
    holds its records (the manifest's `clin__<feature>` columns) encoded by it; rows without an
    image (a table-only dataset) give `x=None`."""
    index = {name: i for i, name in enumerate(class_names)}
    splits = list(SPLITS)
    if CALIBRATION_SPLIT not in splits and (manifest["split"] == CALIBRATION_SPLIT).any():
        splits.append(CALIBRATION_SPLIT)
    rows = manifest[manifest["split"].isin(splits)]
    unknown = sorted(set(rows["label"]) - set(index))
    if unknown:
        counts = rows["label"].value_counts()
        listed = ", ".join(f"{label!r} ({counts[label]} rows)" for label in unknown)
        raise DataError(f"labels not among the model's classes {class_names}: {listed}")
    has_images = bool(len(rows)) and bool((rows["source"].fillna("") != "").all())
    if not has_images:
        if not schema:
            raise DataError("the manifest has rows without an image and no clinical schema")
        return {
            split: _split(rows[rows["split"] == split], None, index, schema) for split in splits
        }
    store = ArrayStore(Path(cache_dir), preprocessing)
    todo = {}
    for source, sha in zip(rows["source"], rows["sha256"], strict=True):
        if store.get(sha) is None:
            todo.setdefault(sha or source, (source, sha))
    if todo:
        log.info("preprocessing %d images (%d rows cached)", len(todo), len(rows) - len(todo))
        jobs = list(todo.values())
        with ThreadPoolExecutor(max_workers=DECODE_THREADS) as pool:
            decoded = list(pool.map(lambda job: _decode(*job, preprocessing), jobs))
        computed = {}
        for (source, _expected), (sha, array) in zip(jobs, decoded, strict=True):
            store.put(sha, array)
            computed[source] = sha
        store.save()
    else:
        computed = {}
    out = {}
    for split in splits:
        part = rows[rows["split"] == split]
        shas = [
            sha or computed[src] for src, sha in zip(part["source"], part["sha256"], strict=True)
        ]
        x = (
            np.stack([store.get(sha) for sha in shas])
            if shas
            else np.zeros((0, *store.shape), dtype=np.uint8)
        )
        out[split] = _split(part, x, index, schema)
    return out


def _split(
    part: pd.DataFrame, x: np.ndarray | None, index: dict[str, int], schema: list[dict] | None
) -> SplitArrays:
    y = np.array([index[label] for label in part["label"]], dtype=np.int64)
    clinical = encode_clinical(part, schema) if schema else None
    return SplitArrays(x=x, y=y, ids=[str(i) for i in part["id"]], clinical=clinical, schema=schema)


def encode_clinical(frame: pd.DataFrame, schema: list[dict]) -> np.ndarray:
    """float32 (N, D): the manifest rows' `clin__<feature>` columns encoded by `schema`."""
    from components.models.tabular import TabularLayout

    names = [str(entry["name"]) for entry in schema]
    missing = [n for n in names if f"{CLINICAL_PREFIX}{n}" not in frame.columns]
    if missing:
        raise DataError(f"the manifest has no clinical column for features {missing}")
    records = frame[[f"{CLINICAL_PREFIX}{n}" for n in names]].set_axis(names, axis=1)
    records = records.astype(object).where(records.notna(), None)
    return TabularLayout.from_schema(schema).encode_rows(records)
