"""Patients named in image file names (`dataset.patient_from_name`).

Some published image sets carry no patient table but name each file after the patient, e.g.
the Kaggle chest X-ray set's `person12_bacteria_47.jpeg`. A regular expression finds the
patient in each file name: the first of its groups that matched, or the whole match when it
has none. The manifest keeps only a keyed hash of it in `group` (as a clinical table's patient
column), and splitting then keeps each patient in one split (components/data/splits.py).
A name the expression does not match gets no patient: its image is a unit of its own.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import pandas as pd

from components.data import manifest
from components.data.clinical import group_key
from components.errors import ConfigError

log = logging.getLogger(__name__)

ADAPTERS = ("folder", "csv", "synthetic")  # whose manifest sources are image files by name


def compile_pattern(pattern: str) -> re.Pattern:
    """`pattern` compiled; a ConfigError naming the setting when it is not a valid expression."""
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(
            f"dataset.patient_from_name {pattern!r} is not a regular expression: {exc}"
        ) from exc


def patient_in_name(name: str, pattern: re.Pattern) -> str:
    """The patient the expression finds in file name `name`, "" when it finds none."""
    found = pattern.search(name)
    if found is None:
        return ""
    groups = [g for g in found.groups() if g]
    return groups[0] if groups else found.group(0)


def with_name_patients(frame: pd.DataFrame, pattern: str) -> pd.DataFrame:
    """`frame` (a manifest) with `group`: the keyed hash of the patient each row's file name
    names ("" for none). The key is derived from the images' content hashes, so the same data
    gives the same keys and the ids themselves are never written."""
    if manifest.GROUP in frame.columns:
        raise ConfigError(
            "dataset.patient_from_name cannot be combined with a clinical table's patient column"
        )
    compiled = compile_pattern(pattern)
    names = [Path(str(source).split("::", 1)[0]).name for source in frame["source"]]
    patients = [patient_in_name(name, compiled) for name in names]
    secret = hashlib.sha256("\n".join(sorted(frame["sha256"].astype(str))).encode()).digest()
    out = frame.copy()
    out[manifest.GROUP] = [group_key(secret, p) if p else "" for p in patients]
    log.info(
        "patients from file names: %d patients in %d of %d images (an image whose name names "
        "none is a unit of its own)",
        len({p for p in patients if p}),
        sum(1 for p in patients if p),
        len(patients),
    )
    return manifest.conform(out)


__all__ = ["ADAPTERS", "compile_pattern", "patient_in_name", "with_name_patients"]
