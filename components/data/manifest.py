"""The manifest: one row per image, the table every later step reads.

Columns (all always present):
    id            stable row id (hash of the source reference)
    source        file path, or ``<file.npz>::<array>/<index>`` for array datasets
    format        jpeg | png | dicom | npz | ...
    label         class name
    split         train | val | test, or "" before splitting
    given_split   the split the source declared ("" if none)
    site          hospital / site name ("" if none)
    width, height, channels   decoded image geometry (0 when not decodable)
    sha256        hash of the decoded pixels (mode, size, bytes): identical images share it
    thumbnail     32×32 grey thumbnail, base64 (`near_duplicates.thumbnail`): what near-
                  duplicates and likely-same-patient images are found by ("" when not
                  computed; optional on input, `conform` adds it empty)
    decode_error  "" when the image decodes, otherwise why not

A dataset with a clinical table (`adapter: table`) adds `group` (patient key, a keyed hash;
a dataset whose file names name the patient, `dataset.patient_from_name`, adds it too)
and one `clin__<feature>` column per schema feature (raw values, None = missing). Its rows
without an image (a tabular-only dataset) have `source` "", zero geometry, no thumbnail, and
`sha256` = the hash of the canonical record.
"""

from __future__ import annotations

import hashlib
import json

import pandas as pd

from components.errors import DataError

#: a dataset with a clinical table adds one column per schema feature: `clin__<feature name>`
CLINICAL_PREFIX = "clin__"
#: and, with a patient column, `group`: a keyed hash of the patient id (never the id itself)
GROUP = "group"

COLUMNS: dict[str, str] = {
    "id": "string",
    "source": "string",
    "format": "string",
    "label": "string",
    "split": "string",
    "given_split": "string",
    "site": "string",
    "width": "int64",
    "height": "int64",
    "channels": "int64",
    "sha256": "string",
    "thumbnail": "string",
    "decode_error": "string",
}
OPTIONAL = ("thumbnail",)  # columns `conform` adds (empty) to a manifest written without them
SPLITS = ("train", "val", "test")


def empty_manifest() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in COLUMNS.items()})


def extra_columns(frame: pd.DataFrame) -> list[str]:
    """The clinical columns `frame` carries beyond `COLUMNS`: `group`, then `clin__*`."""
    clinical = [c for c in frame.columns if str(c).startswith(CLINICAL_PREFIX)]
    return ([GROUP] if GROUP in frame.columns else []) + clinical


def conform(frame: pd.DataFrame) -> pd.DataFrame:
    """Return `frame` with exactly the manifest columns, in order, with their dtypes (plus
    the clinical columns `extra_columns` names, values as they are)."""
    missing = [c for c in COLUMNS if c not in frame.columns and c not in OPTIONAL]
    if missing:
        raise DataError(f"manifest is missing columns {missing}")
    out = frame.assign(**{c: "" for c in OPTIONAL if c not in frame.columns})
    out = out[[*COLUMNS, *extra_columns(frame)]].copy()
    if GROUP in out.columns:
        out[GROUP] = out[GROUP].fillna("").astype("string")
    for column, dtype in COLUMNS.items():
        if dtype == "string":
            out[column] = out[column].fillna("").astype("string")
        else:
            out[column] = out[column].fillna(0).astype(dtype)
    return out.reset_index(drop=True)


def row_id(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def fingerprint(frame: pd.DataFrame) -> str:
    """A hash of what the model saw: content hashes, labels and splits, order-independent."""
    rows = sorted(zip(frame["sha256"], frame["label"], frame["split"], strict=True))
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def save(frame: pd.DataFrame, path) -> None:
    conform(frame).to_parquet(path, index=False)


def load(path) -> pd.DataFrame:
    try:
        return conform(pd.read_parquet(path))
    except FileNotFoundError as exc:
        raise DataError(f"no manifest at {path}; run ingest first") from exc
