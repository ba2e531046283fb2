"""Train/val/test assignment that never leaks an image across splits.

Order of work on the decodable rows (rows with `decode_error` keep split "" for validation):

1. Inside each given split, exact duplicates (same sha256 and label) collapse to one row.
2. An image (sha256) found in several given splits keeps only the copies of the split with
   the highest precedence, test > val > train, so a published test set stays intact.
3. Splits: with `keep_given` and a given split, keep it and carve what is missing (val, and
   test if none was given) out of train, stratified (rows without a given split join
   train). A given val split too small to select and calibrate on (`min_val_per_class`)
   joins train first, and val is carved. A patient (`group`) found in several kept given
   splits keeps only the rows of the split of highest precedence, like an image. Otherwise
   a stratified, seeded
   train/val/test split over unique images. Rows of one sha256 always move together, so
   conflicting labels (same pixels, different labels: reported, not resolved) never straddle.
4. Postcondition: no sha256 in two splits (checked, not assumed).

With a patient column (`group`, from a clinical table) the rows of one patient form one unit
with their near-duplicates, so no patient is in two splits (checked too). Rows without an
image (a tabular-only dataset) are units by their record hash alone: no thumbnails, no
near-duplicate search.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from components.data import manifest
from components.data.near_duplicates import (
    connected_groups,
    nearest_similarity,
    sequence_pairs,
    similar_pairs,
    thumbnail,
    vectors,
)
from components.errors import DataError

log = logging.getLogger(__name__)

PRECEDENCE = {"test": 3, "val": 2, "train": 1, "": 0}
CALIBRATION = "calibration"  # the held-out share of the test split (calibration.fit_on)
GROUP_BY = ("none", "sequence", "similarity", "sequence+similarity")
EXAMPLES = 6  # near-duplicate pairs kept for the report's montage


@dataclass(frozen=True)
class LeakageSettings:
    """What the split does beyond exact copies (`dataset.split` in the config)."""

    near_duplicates: bool  # join images whose thumbnails correlate >= near_similarity
    near_similarity: float
    group_by: str  # none | sequence | similarity | sequence+similarity (see GROUP_BY)
    match_similarity: float  # grouping links and the proximity check count images this close
    proximity_warn_gap: float  # warn when val's near-matched share exceeds test's by this

    @classmethod
    def from_config(cls, split: Mapping[str, Any]) -> LeakageSettings:
        """From the composed `dataset.split` section (`config.check` has checked it)."""
        return cls(
            near_duplicates=bool(split["near_duplicates"]),
            near_similarity=float(split["near_similarity"]),
            group_by=str(split["group_by"]),
            match_similarity=float(split["match_similarity"]),
            proximity_warn_gap=float(split["proximity_warn_gap"]),
        )


@dataclass
class SplitReport:
    """What splitting found and did; `to_dict()` for artifacts, `summary()` for people."""

    strategy: str = ""
    seed: int = 0
    val_fraction: float = 0.0
    test_fraction: float = 0.0
    rows_in: int = 0
    rows_undecodable: int = 0
    given_splits: dict[str, int] = field(default_factory=dict)
    within_split_duplicates: dict[str, dict[str, int]] = field(default_factory=dict)
    cross_split_duplicates: dict = field(
        default_factory=lambda: {"groups": 0, "rows_dropped": 0, "pairs": {}}
    )
    conflicting_labels: dict = field(default_factory=lambda: {"groups": 0, "rows": 0})
    near_duplicates: dict = field(default_factory=dict)  # empty: not looked for
    grouping: dict = field(default_factory=dict)  # empty: no grouping beyond near-duplicates
    patients: dict = field(default_factory=dict)  # empty: no patient column
    # patients in several kept given splits: rows outside the split of highest precedence
    # dropped (empty: no patient column or no given splits kept)
    cross_split_patients: dict = field(default_factory=dict)
    folded_val: dict = field(default_factory=dict)  # a given val too small: joined train
    carved: dict[str, int] = field(default_factory=dict)
    rows_out: int = 0
    final_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    proximity: dict = field(default_factory=dict)  # held-out splits' closeness to training
    # not in `to_dict` (file paths and row ids stay in the run): montage pairs, near-matched rows
    example_pairs: list[tuple[str, str, int]] = field(default_factory=list)
    near_matched_ids: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("example_pairs")
        data.pop("near_matched_ids")
        return data

    def certificate(self) -> dict:
        """The leakage certificate: exact and near-duplicate counts per split pair, the
        grouping used and each held-out split's near-matched share (JSON-safe)."""
        return {
            "exact_duplicates_across_given_splits": self.cross_split_duplicates,
            "near_duplicates": self.near_duplicates,
            "grouping": self.grouping or {"method": "none"},
            "patients": self.patients or {"column": None},
            "patients_across_given_splits": self.cross_split_patients,
            "proximity": self.proximity,
            "strategy": self.strategy,
        }

    def summary(self) -> str:
        given = ", ".join(f"{s or 'none'} {n}" for s, n in self.given_splits.items()) or "none"
        parts = [
            f"{self.rows_in} rows in ({self.rows_undecodable} undecodable, left unsplit); "
            f"given splits: {given}."
        ]
        for split, info in self.within_split_duplicates.items():
            if info["groups"]:
                parts.append(
                    f"Found {info['groups']} exact duplicate groups inside "
                    f"{split or 'the unsplit data'} ({info['rows_dropped']} rows dropped)."
                )
        cross = self.cross_split_duplicates
        if cross["groups"]:
            pairs = ", ".join(f"{p}: {n}" for p, n in cross["pairs"].items())
            parts.append(
                f"Found {cross['groups']} images in more than one given split ({pairs}); "
                f"kept in the split of highest precedence (test > val > train), "
                f"{cross['rows_dropped']} rows dropped."
            )
        patients = self.cross_split_patients
        if patients.get("patients"):
            pairs = ", ".join(f"{p}: {n}" for p, n in patients["pairs"].items())
            count = patients["patients"]
            who = "1 patient has" if count == 1 else f"{count} patients have"
            parts.append(
                f"WARNING: {who} images in more than one given split ({pairs}); kept in the "
                f"split of highest precedence, {patients['rows_dropped']} rows dropped."
            )
        if self.folded_val:
            f = self.folded_val
            parts.append(
                f"The given val split ({f['rows']} images, {f['smallest_class']} of the "
                f"smallest class) is under {f['min_per_class']} images per class: it joined "
                "train, and val was carved instead."
            )
        if self.conflicting_labels["groups"]:
            parts.append(
                f"{self.conflicting_labels['groups']} images carry conflicting labels "
                f"({self.conflicting_labels['rows']} rows); kept together in one split for "
                "validation to report."
            )
        near = self.near_duplicates
        if near:
            pairs = ", ".join(f"{p}: {n}" for p, n in near["pairs_by_split"].items()) or "none"
            parts.append(
                f"Near-duplicates (thumbnail similarity >= {near['min_similarity']}): "
                f"{near['pairs']} pairs ({pairs}) in {near['groups']} groups kept whole"
                + (f", {near['rows_dropped']} rows dropped" if near["rows_dropped"] else "")
                + (
                    f"; {near['pairs_with_different_labels']} pairs carry different labels"
                    if near["pairs_with_different_labels"]
                    else ""
                )
                + "."
            )
        if self.grouping:
            g = self.grouping
            parts.append(
                f"Grouped by {g['method']} (similarity >= {g['min_similarity']}): {g['groups']} "
                f"groups of {g['images_in_groups']} images (largest {g['largest_group']})."
            )
        if self.patients:
            p = self.patients
            per_split = ", ".join(f"{s} {n}" for s, n in p["per_split"].items())
            parts.append(
                f"Split by patient: {p['patients']} patients ({p['with_several_rows']} with "
                f"several rows, at most {p['largest']}), none in two splits ({per_split})."
            )
        if self.carved:
            carved = ", ".join(f"{s} {n}" for s, n in self.carved.items())
            parts.append(f"Carved (stratified, whole groups): {carved}.")
        shares = (self.proximity or {}).get("splits", {})
        if shares:
            near_shares = ", ".join(
                f"{s} {v['near_matched']}/{v['images']}" for s, v in shares.items()
            )
            parts.append(
                f"Near-matched to training (similarity >= {self.proximity['min_similarity']}): "
                f"{near_shares}."
            )
            if self.proximity["warning"]:
                parts.append(f"WARNING: {self.proximity['warning']}.")
        totals = ", ".join(
            f"{split} {sum(counts.values())}" for split, counts in self.final_counts.items()
        )
        parts.append(f"Strategy {self.strategy}; final: {totals} ({self.rows_out} rows).")
        return " ".join(parts)


def _stratified_holdout(
    keys: list,
    labels: list[str],
    fractions: dict[str, float],
    seed: int,
    sizes: list[int] | None = None,
    rest: str = "train",
) -> dict:
    """Assign each key (a unit of images that moves together) to `rest` or a holdout split,
    per class, so each holdout gets its fraction of the class's images (`sizes`: images per
    key, default 1; a unit is never cut, so a holdout may overshoot by less than one unit).

    Each holdout with a positive fraction gets at least one unit of every class, so every
    class needs at least 1 + (number of holdouts) units (DataError otherwise).
    """
    holdouts = [name for name, frac in fractions.items() if frac > 0]
    if sum(fractions.values()) >= 1.0:
        raise DataError(f"split fractions {fractions} leave nothing for {rest}")
    sizes = list(sizes) if sizes is not None else [1] * len(keys)
    size_of = dict(zip(keys, sizes, strict=True))
    by_class: dict[str, list] = {}
    for key, label in sorted(zip(keys, labels, strict=True), key=lambda kl: str(kl[0])):
        by_class.setdefault(label, []).append(key)
    need = 1 + len(holdouts)
    grouped = any(size > 1 for size in sizes)
    unit = "unique image group(s)" if grouped else "unique image(s)"
    small = {label: len(members) for label, members in by_class.items() if len(members) < need}
    if small:
        names = ", ".join(f"{label!r} has {n}" for label, n in sorted(small.items()))
        raise DataError(
            f"classes too small to stratify into {rest}/{'/'.join(holdouts)}: {names} {unit}, "
            f"need at least {need}; add data, drop the class or lower the fractions"
        )
    rng = np.random.default_rng(seed)
    assignment = {}
    for label in sorted(by_class):
        members = by_class[label]
        order = [members[i] for i in rng.permutation(len(members))]
        total = sum(size_of[k] for k in members)
        start = 0
        for position, name in enumerate(holdouts):
            target = max(1, round(total * fractions[name]))
            last = len(order) - (len(holdouts) - position)  # leave a unit for each later split
            taken = 0
            while start < last and (taken == 0 or taken < target):
                if taken and taken + size_of[order[start]] > target + size_of[order[start]] / 2:
                    break  # this unit would overshoot by more than half of itself
                assignment[order[start]] = name
                taken += size_of[order[start]]
                start += 1
        for key in order[start:]:
            assignment[key] = rest
    return assignment


def _group_label(frame: pd.DataFrame) -> pd.Series:
    """One stratification label per sha256 (the first label when labels conflict)."""
    return frame.groupby("sha256")["label"].min()


def _check_no_leak(frame: pd.DataFrame, column: str = "sha256", what: str = "images") -> None:
    placed = frame[(frame["split"] != "") & (frame[column].astype(str) != "")]
    splits_per_key = placed.groupby(column)["split"].nunique()
    leaked = splits_per_key[splits_per_key > 1]
    if len(leaked):
        raise AssertionError(f"{len(leaked)} {what} were assigned to more than one split")


def _pair_counts(first: pd.Series, second: pd.Series) -> dict[str, int]:
    """Counts of pairs by their two (sorted) split names, e.g. {"test/train": 3}."""
    names = [
        "/".join(sorted((a or "unsplit", b or "unsplit")))
        for a, b in zip(first.astype(str), second.astype(str), strict=True)
    ]
    return {k: int(v) for k, v in sorted(Counter(names).items())}


def _fill_thumbnails(frame: pd.DataFrame) -> pd.DataFrame:
    """Compute the thumbnail of rows without one (manifests written before `thumbnail`)."""
    missing = frame.index[(frame["thumbnail"] == "") & (frame["source"] != "")]
    if not len(missing):
        return frame
    from components.data.images import open_image

    def thumb(source: str) -> str:
        try:
            return thumbnail(open_image(source))
        except Exception:  # unreadable now: left out of near-duplicate detection
            return ""

    frame = frame.copy()
    frame.loc[missing, "thumbnail"] = [thumb(str(s)) for s in frame.loc[missing, "source"]]
    return frame


def _signatures(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(positions of rows with a thumbnail, their `vectors`)."""
    has = (frame["thumbnail"].astype(str) != "").to_numpy()
    return np.flatnonzero(has), vectors(frame["thumbnail"][has].tolist())


def near_duplicate_labels(frame: pd.DataFrame, min_similarity: float) -> pd.Series:
    """Near-duplicate group of each row (exact copies and thumbnail pairs correlating at least
    `min_similarity`, joined transitively); rows without a thumbnail: by exact copy only."""
    positions, rows = _signatures(frame)
    found, _ = similar_pairs(rows, min_similarity)
    pairs = positions[found]
    same = frame.groupby("sha256", sort=False).ngroup().to_numpy()
    first = pd.Series(np.arange(len(frame))).groupby(same).transform("min").to_numpy()
    exact = np.stack([first, np.arange(len(frame))], axis=1)
    return pd.Series(connected_groups(len(frame), np.concatenate([pairs, exact])), frame.index)


def _unit_table(frame: pd.DataFrame, units: pd.Series) -> pd.DataFrame:
    """Per unit: its stratification label (most common, then smallest) and size."""
    table = pd.DataFrame({"unit": units.to_numpy(), "label": frame["label"].astype(str)})
    counts = table.groupby(["unit", "label"]).size().reset_index(name="n")
    counts = counts.sort_values(["unit", "n", "label"], ascending=[True, False, True])
    label = counts.drop_duplicates("unit").set_index("unit")["label"]
    return pd.DataFrame({"label": label, "size": table.groupby("unit").size()})


def _carve(frame, units, mask, fractions, seed, rest) -> pd.Series:
    """New split of the rows in `mask`: whole units to the holdouts, stratified by label."""
    table = _unit_table(frame[mask], units[mask])
    assignment = _stratified_holdout(
        list(table.index), list(table["label"]), fractions, seed, list(table["size"]), rest
    )
    return units[mask].map(assignment)


def assign_splits(
    frame: pd.DataFrame,
    keep_given: bool,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    *,
    leakage: LeakageSettings | None = None,
    calibration_fraction: float = 0.0,
    min_val_per_class: int = 0,
) -> tuple[pd.DataFrame, SplitReport]:
    """Deduplicate and split the manifest (see module docstring); returns (manifest, report).

    `leakage`: near-duplicate detection, grouping and the proximity check (None: exact copies
    only). `calibration_fraction` > 0 moves that share of the test split (whole groups) to
    the `calibration` split. A kept given val split with fewer than `min_val_per_class`
    images of some class joins train, and val is carved instead.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1):
        raise DataError("val_fraction and test_fraction must be in [0, 1)")
    if not 0 <= calibration_fraction < 1:
        raise DataError("calibration_fraction must be in [0, 1)")
    frame = manifest.conform(frame)
    report = SplitReport(
        seed=seed, val_fraction=val_fraction, test_fraction=test_fraction, rows_in=len(frame)
    )
    bad = frame[frame["decode_error"] != ""].assign(split="")
    good = frame[frame["decode_error"] == ""].sort_values(["given_split", "source"], kind="stable")
    report.rows_undecodable = len(bad)
    report.given_splits = {
        s: int(n) for s, n in sorted(Counter(good["given_split"]).items(), key=lambda kv: kv[0])
    }

    # 1. exact duplicates inside each given split
    sizes = good.groupby(["given_split", "sha256", "label"]).size()
    for split in report.given_splits:
        in_split = sizes[sizes.index.get_level_values(0) == split]
        dup = in_split[in_split > 1]
        report.within_split_duplicates[split] = {
            "groups": len(dup),
            "rows_dropped": int((dup - 1).sum()),
        }
    good = good.drop_duplicates(["given_split", "sha256", "label"], keep="first")

    # conflicting labels (reported before cross-split resolution, over all given splits)
    labels_per_hash = good.groupby("sha256")["label"].nunique()
    conflicted = labels_per_hash[labels_per_hash > 1].index
    report.conflicting_labels = {
        "groups": len(conflicted),
        "rows": int(good["sha256"].isin(conflicted).sum()),
    }

    # 2. images in several given splits: keep the copies of the highest-precedence split
    rank = good["given_split"].map(PRECEDENCE)
    best = rank.groupby(good["sha256"]).transform("max")
    splits_per_hash = {
        sha: tuple(sorted(set(values)))
        for sha, values in good.groupby("sha256")["given_split"].unique().items()
    }
    multi = [splits for splits in splits_per_hash.values() if len(splits) > 1]
    keep_mask = rank == best
    report.cross_split_duplicates = {
        "groups": len(multi),
        "rows_dropped": int((~keep_mask).sum()),
        "pairs": {"/".join(k): int(v) for k, v in sorted(Counter(multi).items())},
    }
    good = good[keep_mask].reset_index(drop=True)
    given = [s for s in report.given_splits if s]
    keeping = bool(keep_given and given)
    if keeping and "val" in given:
        good = _fold_small_val(good, min_val_per_class, report)
        if report.folded_val:
            given.remove("val")  # now carved like a missing one
    if keeping and manifest.GROUP in good.columns:
        good = _resolve_patients(good, report)

    # 3. near-duplicates, likely-same-patient groups and patients: the units that move together
    units = pd.Series(good.groupby("sha256", sort=False).ngroup().to_numpy(), good.index)
    near = units
    if not (good["source"] != "").any():
        leakage = None  # rows without images: nothing to compare but their record hashes
    if leakage is not None and leakage.near_duplicates:
        good = _fill_thumbnails(good)
        near = near_duplicate_labels(good, leakage.near_similarity)
        good, near, examples = _resolve_near_duplicates(good, near, keeping, leakage, report)
        report.example_pairs = examples
        units = near
    if leakage is not None and leakage.group_by != "none":
        good = _fill_thumbnails(good)
        units = _group_units(good, near, keeping, leakage, report)
    patients = _patient_keys(good)
    if patients is not None:
        units = _join(units, patients)

    # 4. split assignment over units (images that must stay together)
    if keeping:
        good["split"] = good["given_split"].where(good["given_split"] != "", "train")
        missing = {
            name: frac
            for name, frac in (("val", val_fraction), ("test", test_fraction))
            if name not in given and frac > 0
        }
        report.strategy = "given" + ("+carved " + "/".join(missing) if missing else "")
        if missing:
            train = good["split"] == "train"
            moved = _carve(good, units, train, missing, seed, "train")
            good.loc[moved.index, "split"] = moved
            report.carved = {
                name: int((good.loc[moved.index, "split"] == name).sum()) for name in missing
            }
    else:
        report.strategy = "stratified"
        everything = pd.Series(True, good.index)
        good["split"] = _carve(
            good, units, everything, {"val": val_fraction, "test": test_fraction}, seed, "train"
        )

    # 5. the held-out calibration share of the test split (calibration.fit_on=held_out)
    if calibration_fraction > 0:
        test = good["split"] == "test"
        moved = _carve(good, units, test, {CALIBRATION: calibration_fraction}, seed, "test")
        good.loc[moved.index, "split"] = moved
        report.carved[CALIBRATION] = int((moved == CALIBRATION).sum())
        report.strategy += f"+{CALIBRATION} {calibration_fraction:g} of test"

    # 6. postconditions, checked: no image, near-duplicate group or unit in two splits
    _check_no_leak(good)
    for name, labels in (("near-duplicate groups", near), ("image groups", units)):
        _check_no_leak(good.assign(_key=labels.astype(str)), "_key", name)
    if patients is not None:
        _check_no_leak(good, manifest.GROUP, "patients")
        report.patients = _patient_report(good)
    if leakage is not None:
        report.proximity, report.near_matched_ids = proximity(good, leakage)
    out = manifest.conform(pd.concat([good, bad]).sort_values("source", kind="stable"))

    # 7. report
    placed = out[out["split"] != ""]
    report.rows_out = len(out)
    report.final_counts = {
        split: {
            label: int(n)
            for label, n in sorted(Counter(placed.loc[placed["split"] == split, "label"]).items())
        }
        for split in (*manifest.SPLITS, *([CALIBRATION] if calibration_fraction > 0 else []))
    }
    log.info("splits: %s", report.summary())
    return out, report


def split_by_config(
    frame: pd.DataFrame, split: Mapping[str, Any], seed: int, calibration_fraction: float = 0.0
) -> tuple[pd.DataFrame, SplitReport]:
    """`assign_splits` with the settings of a composed `dataset.split` section."""
    return assign_splits(
        frame,
        keep_given=bool(split["keep_given"]),
        val_fraction=float(split["val_fraction"]),
        test_fraction=float(split["test_fraction"]),
        seed=int(seed),
        leakage=LeakageSettings.from_config(split),
        calibration_fraction=calibration_fraction,
        min_val_per_class=int(split["min_val_per_class"]),
    )


def _fold_small_val(good: pd.DataFrame, min_per_class: int, report: SplitReport) -> pd.DataFrame:
    """`good` with a given val split under `min_per_class` images of some class moved to
    train (recorded in `report.folded_val`); unchanged otherwise."""
    val = good["given_split"] == "val"
    counts = good.loc[val, "label"].value_counts()
    smallest = min(int(counts.get(label, 0)) for label in good["label"].unique())
    if smallest >= min_per_class:
        return good
    report.folded_val = {
        "rows": int(val.sum()),
        "smallest_class": smallest,
        "min_per_class": int(min_per_class),
    }
    log.warning(
        "the given val split (%d images, %d of the smallest class) is too small to select and "
        "calibrate on: it joins train, and val is carved from train",
        int(val.sum()),
        smallest,
    )
    return good.assign(given_split=good["given_split"].mask(val, "train"))


def _resolve_patients(good: pd.DataFrame, report: SplitReport) -> pd.DataFrame:
    """Kept given splits: a patient with rows in several keeps only those of the split of
    highest precedence (test > val > train; no given split counts as train), so a published
    test set stays whole and no patient straddles it."""
    patient = good[manifest.GROUP].astype(str)
    named = patient != ""
    split = good["given_split"].where(good["given_split"] != "", "train")
    rank = split.map(PRECEDENCE)
    best = rank[named].groupby(patient[named]).transform("max")
    drop = pd.Series(False, good.index)
    drop[named] = rank[named] < best
    spans = split[named].groupby(patient[named]).unique()
    crossing = [tuple(sorted(s)) for s in spans if len(s) > 1]
    report.cross_split_patients = {
        "patients": len(crossing),
        "rows_dropped": int(drop.sum()),
        "pairs": {"/".join(k): int(v) for k, v in sorted(Counter(crossing).items())},
    }
    if crossing:
        log.warning(
            "%d patients have images in more than one given split; %d rows outside the split "
            "of highest precedence dropped",
            len(crossing),
            int(drop.sum()),
        )
    return good[~drop].reset_index(drop=True)


def _patient_keys(good: pd.DataFrame) -> pd.Series | None:
    """Each row's patient (`group`; a row without one is its own), or None without the
    column."""
    if manifest.GROUP not in good.columns:
        return None
    group = good[manifest.GROUP].astype(str)
    alone = "row:" + pd.Series(range(len(good)), index=good.index).astype(str)
    return group.where(group != "", alone)


def _join(units: pd.Series, keys: pd.Series) -> pd.Series:
    """Units joined transitively with the rows sharing a key."""
    n = len(units)
    links = []
    for codes in (units.to_numpy(), keys.astype(str).to_numpy()):
        first = pd.Series(np.arange(n)).groupby(codes).transform("min").to_numpy()
        links.append(np.stack([first, np.arange(n)], axis=1))
    return pd.Series(connected_groups(n, np.concatenate(links)), units.index)


def _patient_report(good: pd.DataFrame) -> dict:
    """Patients overall and per split (rows with a patient id)."""
    rows = good[good[manifest.GROUP].astype(str) != ""]
    sizes = rows[manifest.GROUP].value_counts()
    per_split = rows.groupby("split")[manifest.GROUP].nunique()
    return {
        "column": manifest.GROUP,
        "patients": len(sizes),
        "rows_with_patient": len(rows),
        "with_several_rows": int((sizes > 1).sum()),
        "largest": int(sizes.max()) if len(sizes) else 0,
        "per_split": {str(s): int(n) for s, n in per_split.items()},
        "in_two_splits": 0,  # checked above (`_check_no_leak`)
    }


def _resolve_near_duplicates(good, near, keeping, leakage, report):
    """Count near-duplicate pairs by given split; with given splits kept, an image with a
    near-duplicate in a split of higher precedence is dropped (like an exact copy), so no group
    straddles kept given splits (a group is joined only through pairs above the threshold)."""
    positions, rows = _signatures(good)
    found, similarity = similar_pairs(rows, leakage.near_similarity)
    i, j = positions[found[:, 0]], positions[found[:, 1]]
    first, second = good["given_split"].iloc[i], good["given_split"].iloc[j]
    cross = first.to_numpy() != second.to_numpy()
    order = np.argsort(~cross, kind="stable")[:EXAMPLES]  # cross-split pairs first
    examples = [
        (str(good["source"].iloc[i[k]]), str(good["source"].iloc[j[k]]), float(similarity[k]))
        for k in order
    ]
    group_sizes = near.value_counts()
    found_groups = int((group_sizes > 1).sum())
    in_groups = int(group_sizes[group_sizes > 1].sum())
    labels = good["label"].astype(str).to_numpy()  # of the rows i and j index (before drops)
    different_labels = int((labels[i] != labels[j]).sum())
    dropped = 0
    if keeping:  # drop each image with a near-duplicate in a split of higher precedence
        rank = good["given_split"].map(PRECEDENCE).to_numpy()
        lower = np.where(rank[i] < rank[j], i, j)[rank[i] != rank[j]]
        keep = np.ones(len(good), dtype=bool)
        keep[lower] = False
        dropped = int((~keep).sum())
        good = good[keep]
        near = near_duplicate_labels(good, leakage.near_similarity)
    report.near_duplicates = {
        "min_similarity": leakage.near_similarity,
        "pairs": len(found),
        "pairs_by_split": _pair_counts(first, second),
        # the same frame under two labels: reported for review, like conflicting exact copies
        "pairs_with_different_labels": different_labels,
        "groups": found_groups,
        "images_in_groups": in_groups,
        "rows_dropped": dropped,
        "rows_without_thumbnail": int(len(good) + dropped - len(positions)),
    }
    return good, near, examples


def _group_units(good, near, keeping, leakage, report) -> pd.Series:
    """Join near-duplicate groups into likely-same-patient groups (`leakage.group_by`)."""
    positions, rows = _signatures(good)
    pairs = []
    if leakage.group_by in ("similarity", "sequence+similarity"):
        found, _ = similar_pairs(rows, leakage.match_similarity)
        pairs.append(positions[found])
    if leakage.group_by in ("sequence", "sequence+similarity"):
        sources = good["source"].iloc[positions].tolist()
        pairs.append(positions[sequence_pairs(sources, rows, leakage.match_similarity)])
    links = np.concatenate([*pairs, np.zeros((0, 2), dtype=np.int64)])
    if keeping:  # kept given splits cannot move: a group is linked inside each one only
        given = good["given_split"].to_numpy()
        links = links[given[links[:, 0]] == given[links[:, 1]]]
    near_codes = near.to_numpy()
    first = pd.Series(np.arange(len(good))).groupby(near_codes).transform("min").to_numpy()
    same = np.stack([first, np.arange(len(good))], axis=1)
    units = pd.Series(connected_groups(len(good), np.concatenate([links, same])), good.index)
    sizes = units.value_counts()
    report.grouping = {
        "method": leakage.group_by,
        "min_similarity": leakage.match_similarity,
        "links": len(links),
        "groups": int((sizes > 1).sum()),
        "images_in_groups": int(sizes[sizes > 1].sum()),
        "largest_group": int(sizes.max()) if len(sizes) else 0,
    }
    return units


def proximity(good: pd.DataFrame, leakage: LeakageSettings) -> tuple[dict, list[str]]:
    """Of the decodable rows of a split manifest (`split` set; rows without a thumbnail are
    left out): the report's `proximity` block (near-duplicate pairs by final split pair, each
    held-out split's share of images with a training image correlating at least
    `match_similarity`, a warning when validation is much closer to training than the test
    split is) and the ids of those near-matched held-out rows, sorted."""
    positions, rows = _signatures(good)
    splits = good["split"].to_numpy()[positions]
    reference = rows[splits == "train"]
    near_train = pd.Series(False, good.index)
    shares: dict[str, dict] = {}
    for split in sorted(set(good["split"]) - {"train", ""}):
        mine = splits == split
        close = nearest_similarity(rows[mine], reference) >= leakage.match_similarity
        near_train.iloc[positions[mine]] = close
        shares[split] = {
            "images": int(mine.sum()),
            "near_matched": int(close.sum()),
            "share": float(close.mean()) if len(close) else 0.0,
        }
    warning = ""
    val, test = shares.get("val"), shares.get("test")
    if val and test and val["share"] - test["share"] > leakage.proximity_warn_gap:
        warning = (
            f"validation looks much closer to training than the test split does: "
            f"{val['share']:.1%} of validation images vs {test['share']:.1%} of test images have "
            f"a training image with thumbnail similarity >= {leakage.match_similarity} "
            f"(warning above a gap of {leakage.proximity_warn_gap:.0%}); validation scores "
            "flatter the model: consider dataset.split.group_by=sequence or similarity"
        )
        log.warning("splits: %s", warning)
    found, _ = similar_pairs(rows, leakage.near_similarity)
    final = pd.Series(splits)
    return {
        "near_duplicate_pairs_by_final_split": _pair_counts(
            final.iloc[found[:, 0]], final.iloc[found[:, 1]]
        ),
        "min_similarity": leakage.match_similarity,
        "warn_gap": leakage.proximity_warn_gap,
        "splits": shares,
        "warning": warning,
    }, sorted(str(i) for i in good.loc[near_train, "id"])
