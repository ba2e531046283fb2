"""Train/val/test assignment that never leaks an image across splits.

Order of work on the decodable rows (rows with `decode_error` keep split "" for validation):

1. Inside each given split, exact duplicates (same sha256 and label) collapse to one row.
2. An image (sha256) found in several given splits keeps only the copies of the split with
   the highest precedence, test > val > train, so a published test set stays intact.
3. Splits: with `keep_given` and a given split, keep it and carve what is missing (val, and
   test if none was given) out of train, stratified (rows without a given split join
   train); otherwise a stratified, seeded
   train/val/test split over unique images. Rows of one sha256 always move together, so
   conflicting labels (same pixels, different labels: reported, not resolved) never straddle.
4. Postcondition: no sha256 in two splits (checked, not assumed).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from components.data import manifest
from components.errors import DataError

log = logging.getLogger(__name__)

PRECEDENCE = {"test": 3, "val": 2, "train": 1, "": 0}


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
    carved: dict[str, int] = field(default_factory=dict)
    rows_out: int = 0
    final_counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

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
        if self.conflicting_labels["groups"]:
            parts.append(
                f"{self.conflicting_labels['groups']} images carry conflicting labels "
                f"({self.conflicting_labels['rows']} rows); kept together in one split for "
                "validation to report."
            )
        if self.carved:
            carved = ", ".join(f"{s} {n}" for s, n in self.carved.items())
            parts.append(f"Carved out of train (stratified): {carved}.")
        totals = ", ".join(
            f"{split} {sum(counts.values())}" for split, counts in self.final_counts.items()
        )
        parts.append(f"Strategy {self.strategy}; final: {totals} ({self.rows_out} rows).")
        return " ".join(parts)


def _stratified_holdout(
    keys: list[str], labels: list[str], fractions: dict[str, float], seed: int
) -> dict[str, str]:
    """Assign each key to 'train' or a holdout split, per class, in the given fractions.

    Each holdout with a positive fraction gets at least one image of every class, so every
    class needs at least 1 + (number of holdouts) unique images (DataError otherwise).
    """
    holdouts = [name for name, frac in fractions.items() if frac > 0]
    if sum(fractions.values()) >= 1.0:
        raise DataError(f"split fractions {fractions} leave nothing for train")
    by_class: dict[str, list[str]] = {}
    for key, label in sorted(zip(keys, labels, strict=True)):
        by_class.setdefault(label, []).append(key)
    need = 1 + len(holdouts)
    small = {label: len(members) for label, members in by_class.items() if len(members) < need}
    if small:
        names = ", ".join(f"{label!r} has {n}" for label, n in sorted(small.items()))
        raise DataError(
            f"classes too small to stratify into train/{'/'.join(holdouts)}: {names} unique "
            f"image(s), need at least {need}; add data, drop the class or lower the fractions"
        )
    rng = np.random.default_rng(seed)
    assignment = {}
    for label in sorted(by_class):
        members = by_class[label]
        order = rng.permutation(len(members))
        start = 0
        for name in holdouts:
            count = max(1, round(len(members) * fractions[name]))
            count = min(count, len(members) - start - 1)
            for idx in order[start : start + count]:
                assignment[members[idx]] = name
            start += count
        for idx in order[start:]:
            assignment[members[idx]] = "train"
    return assignment


def _group_label(frame: pd.DataFrame) -> pd.Series:
    """One stratification label per sha256 (the first label when labels conflict)."""
    return frame.groupby("sha256")["label"].min()


def _check_no_leak(frame: pd.DataFrame) -> None:
    placed = frame[frame["split"] != ""]
    splits_per_hash = placed.groupby("sha256")["split"].nunique()
    leaked = splits_per_hash[splits_per_hash > 1]
    if len(leaked):
        raise AssertionError(f"{len(leaked)} images were assigned to more than one split")


def assign_splits(
    frame: pd.DataFrame,
    keep_given: bool,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> tuple[pd.DataFrame, SplitReport]:
    """Deduplicate and split the manifest (see module docstring); returns (manifest, report)."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1):
        raise DataError("val_fraction and test_fraction must be in [0, 1)")
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
    good = good[keep_mask].copy()

    # 3. split assignment over unique images
    given = [s for s in report.given_splits if s]
    if keep_given and given:
        good["split"] = good["given_split"].where(good["given_split"] != "", "train")
        missing = {
            name: frac
            for name, frac in (("val", val_fraction), ("test", test_fraction))
            if name not in given and frac > 0
        }
        report.strategy = "given" + ("+carved " + "/".join(missing) if missing else "")
        if missing:
            train = good[good["split"] == "train"]
            groups = _group_label(train)
            assignment = _stratified_holdout(list(groups.index), list(groups.values), missing, seed)
            moved = train["sha256"].map(assignment)
            good.loc[moved.index, "split"] = moved
            report.carved = {
                name: int((good.loc[moved.index, "split"] == name).sum()) for name in missing
            }
    else:
        report.strategy = "stratified"
        groups = _group_label(good)
        assignment = _stratified_holdout(
            list(groups.index),
            list(groups.values),
            {"val": val_fraction, "test": test_fraction},
            seed,
        )
        good["split"] = good["sha256"].map(assignment)

    out = manifest.conform(pd.concat([good, bad]).sort_values("source", kind="stable"))
    _check_no_leak(out)

    # 4. report
    placed = out[out["split"] != ""]
    report.rows_out = len(out)
    report.final_counts = {
        split: {
            label: int(n)
            for label, n in sorted(Counter(placed.loc[placed["split"] == split, "label"]).items())
        }
        for split in manifest.SPLITS
    }
    log.info("splits: %s", report.summary())
    return out, report
