"""Split a dataset into federated sites: IID, label-skewed Dirichlet(α), or given site labels.

`partition()` splits one set of labels; `partition_splits()` splits the train and validation
splits consistently (the same per-class site proportions, so each site's validation data looks
like its training data). The held-out test split is never partitioned: it stays on the server.
`site_report()` describes the result (class histogram per site) for logs and artifacts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from components.errors import ConfigError, DataError

MAX_DRAWS = 1000


@dataclass(frozen=True)
class SiteIndices:
    """One site's images: rows of the pooled train split, rows of the pooled validation split,
    and rows of the train split moved to the site's validation set (see `partition_splits`)."""

    train: np.ndarray
    val: np.ndarray
    val_from_train: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def num_val(self) -> int:
        return len(self.val) + len(self.val_from_train)


def site_names(num_sites: int) -> list[str]:
    """Names of synthetic sites: site-1 … site-N (zero-padded when N >= 10, so they sort)."""
    width = len(str(num_sites)) if num_sites >= 10 else 1
    return [f"site-{i:0{width}d}" for i in range(1, num_sites + 1)]


def safe_site_name(name: str) -> str:
    """A directory-safe form of a site name (letters, digits, `._-`)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).strip("-.")
    return cleaned or "site"


def _labels(labels: Sequence[int] | np.ndarray, name: str) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise DataError(f"{name} labels must be 1-D")
    if len(y) and not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{name} labels must be integer class indices, got {y.dtype}")
    if len(y) and y.min() < 0:
        raise DataError(f"{name} labels must be >= 0")
    return y.astype(np.int64)


def dirichlet_proportions(
    num_classes: int, num_sites: int, alpha: float, rng: np.random.Generator
) -> np.ndarray:
    """(num_classes, num_sites): for each class, the share of its images each site gets."""
    return rng.dirichlet(np.full(num_sites, float(alpha)), size=num_classes)


def _allocate(y: np.ndarray, shares: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Deal each class's (shuffled) images to sites by cumulative `shares` (K, S)."""
    num_sites = shares.shape[1]
    buckets: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
    for cls in range(shares.shape[0]):
        idx = np.flatnonzero(y == cls)
        if not len(idx):
            continue
        idx = rng.permutation(idx)
        cuts = np.round(np.cumsum(shares[cls])[:-1] * len(idx)).astype(int)
        for site, part in enumerate(np.split(idx, cuts)):
            buckets[site].append(part)
    return [np.sort(np.concatenate(b)) if b else np.zeros(0, dtype=np.int64) for b in buckets]


def _iid_shares(y: np.ndarray, num_classes: int, num_sites: int) -> np.ndarray:
    return np.full((num_classes, num_sites), 1.0 / num_sites)


def _check_room(n: int, num_sites: int, min_samples: int) -> None:
    if n < num_sites * min_samples:
        raise ConfigError(
            f"federation.num_sites={num_sites} needs at least {num_sites * min_samples} training "
            f"images ({min_samples} per site) but the train split has {n}; lower "
            "federation.num_sites (or federation.min_site_samples), or use more data"
        )


def partition(
    labels: Sequence[int] | np.ndarray,
    scheme: str,
    num_sites: int | None = None,
    *,
    alpha: float = 0.5,
    seed: int = 0,
    groups: Sequence[str] | np.ndarray | None = None,
    num_classes: int | None = None,
    min_samples: int = 1,
) -> dict[str, np.ndarray]:
    """Split one set of labels into sites; returns {site name: sorted row indices}.

    - `iid`: every class dealt evenly (stratified) over `num_sites`;
    - `dirichlet`: class c's images go to sites with shares ~ Dirichlet(α·1); redrawn until
      every site holds at least `min_samples` images (else `ConfigError`);
    - `given`: `groups[i]` names the site of image i (the manifest's `site` column).
    """
    y = _labels(labels, "train")
    return {
        name: parts.train
        for name, parts in partition_splits(
            y,
            np.zeros(0, dtype=np.int64),
            scheme,
            num_sites,
            alpha=alpha,
            seed=seed,
            train_groups=groups,
            val_groups=[] if groups is not None else None,
            num_classes=num_classes,
            min_samples=min_samples,
            top_up=False,
        ).items()
    }


def partition_splits(
    train_labels: Sequence[int] | np.ndarray,
    val_labels: Sequence[int] | np.ndarray,
    scheme: str,
    num_sites: int | None = None,
    *,
    alpha: float = 0.5,
    seed: int = 0,
    train_groups: Sequence[str] | np.ndarray | None = None,
    val_groups: Sequence[str] | np.ndarray | None = None,
    num_classes: int | None = None,
    min_samples: int = 2,
    top_up: bool = True,
) -> dict[str, SiteIndices]:
    """Split the train and validation splits into sites with the same per-class shares.

    With `top_up`, a site whose share of the validation split is empty gets one of its
    training images moved to validation (when it has more than `min_samples`), so every site
    can evaluate.
    """
    y_train = _labels(train_labels, "train")
    y_val = _labels(val_labels, "validation")
    if not len(y_train):
        raise DataError("the train split is empty: nothing to federate")
    k = int(num_classes or (max(y_train.max(), y_val.max() if len(y_val) else 0) + 1))
    rng = np.random.default_rng(seed)

    if scheme == "given":
        given = _given(y_train, y_val, train_groups, val_groups, num_sites, min_samples)
        return _top_up(given, y_train, min_samples) if top_up else given
    if scheme not in ("iid", "dirichlet"):
        raise ConfigError(f"unknown partition scheme {scheme!r}; use given, iid or dirichlet")
    if num_sites is None or num_sites < 2:
        raise ConfigError(f"federation.num_sites must be >= 2 for partition={scheme}")
    _check_room(len(y_train), num_sites, min_samples)

    if scheme == "iid":
        shares = _iid_shares(y_train, k, num_sites)
        train_parts = _allocate(y_train, shares, rng)
        if min(len(p) for p in train_parts) < min_samples:  # rounding on tiny classes
            train_parts = [
                np.sort(p) for p in np.array_split(rng.permutation(len(y_train)), num_sites)
            ]
    else:
        if not alpha > 0:
            raise ConfigError(f"federation.alpha must be > 0, got {alpha}")
        for _ in range(MAX_DRAWS):
            shares = dirichlet_proportions(k, num_sites, alpha, rng)
            train_parts = _allocate(y_train, shares, rng)
            if min(len(p) for p in train_parts) >= min_samples:
                break
        else:
            raise ConfigError(
                f"could not give each of {num_sites} sites at least {min_samples} training "
                f"images with Dirichlet(alpha={alpha}) after {MAX_DRAWS} draws "
                f"({len(y_train)} images, {k} classes); raise federation.alpha, lower "
                "federation.num_sites or federation.min_site_samples"
            )
    val_parts = _allocate(y_val, shares, rng) if len(y_val) else [np.zeros(0, np.int64)] * num_sites
    names = site_names(num_sites)
    sites = {
        name: SiteIndices(train=np.asarray(tr, np.int64), val=np.asarray(va, np.int64))
        for name, tr, va in zip(names, train_parts, val_parts, strict=True)
    }
    return _top_up(sites, y_train, min_samples) if top_up else sites


def _top_up(
    sites: dict[str, SiteIndices], y_train: np.ndarray, min_samples: int
) -> dict[str, SiteIndices]:
    """Give a site with no validation image one of its training images (if it can spare one).

    The image moved is the last of the site's most frequent class; it is listed in
    `SiteIndices.val_from_train` (indices into the train split) and removed from `train`.
    """
    out: dict[str, SiteIndices] = {}
    for name, parts in sites.items():
        tr, va = parts.train, parts.val
        moved = np.zeros(0, np.int64)
        if not len(va) and len(tr) > min_samples:
            classes, counts = np.unique(y_train[tr], return_counts=True)
            moved = tr[y_train[tr] == classes[np.argmax(counts)]][-1:]
            tr = tr[tr != moved[0]]
        out[name] = SiteIndices(train=tr, val=va, val_from_train=moved)
    return out


def _given(
    y_train: np.ndarray,
    y_val: np.ndarray,
    train_groups,
    val_groups,
    num_sites: int | None,
    min_samples: int,
) -> dict[str, SiteIndices]:
    if train_groups is None:
        raise DataError(
            "partition=given needs the manifest's site column for every training image; "
            "fill `site` in the manifest or use federation.partition=dirichlet|iid"
        )
    g_train = np.asarray(train_groups, dtype=object)
    g_val = np.asarray(val_groups if val_groups is not None else [], dtype=object)
    if len(g_train) != len(y_train) or (len(y_val) and len(g_val) != len(y_val)):
        raise DataError("partition=given: one site label per image is required")
    missing = sum(1 for s in g_train if not isinstance(s, str) or not s.strip())
    if missing:
        raise DataError(
            f"partition=given: {missing} training image(s) have no site; fill the manifest's "
            "`site` column (e.g. one folder per hospital) or use federation.partition=dirichlet"
        )
    names = sorted({str(s).strip() for s in g_train})
    if len(names) < 2:
        raise DataError(
            f"partition=given found {len(names)} site ({', '.join(names)}); federated training "
            "needs at least 2. Use federation.partition=dirichlet|iid to simulate sites"
        )
    if num_sites is not None and num_sites != len(names):
        raise ConfigError(
            f"the manifest names {len(names)} sites ({', '.join(names)}) but "
            f"federation.num_sites={num_sites}; set federation.num_sites={len(names)} or null"
        )
    g_train = np.array([str(s).strip() for s in g_train], dtype=object)
    g_val = np.array([str(s).strip() if isinstance(s, str) else "" for s in g_val], dtype=object)
    unknown = sorted({s for s in g_val if s and s not in names})
    if unknown:
        raise DataError(
            f"validation images belong to site(s) {', '.join(unknown)} with no training images"
        )
    out: dict[str, SiteIndices] = {}
    for name in names:
        tr = np.flatnonzero(g_train == name)
        if len(tr) < min_samples:
            raise DataError(
                f"site {name!r} has {len(tr)} training image(s), fewer than "
                f"federation.min_site_samples={min_samples}; add data or merge the site"
            )
        out[name] = SiteIndices(train=tr.astype(np.int64), val=np.flatnonzero(g_val == name))
    return out


def site_report(
    sites: Mapping[str, SiteIndices],
    train_labels: np.ndarray,
    val_labels: np.ndarray,
    class_names: Sequence[str],
    *,
    scheme: str = "",
    alpha: float | None = None,
) -> dict[str, Any]:
    """Class histogram per site (train and validation), JSON-safe."""
    y_train, y_val = np.asarray(train_labels), np.asarray(val_labels)
    k = len(class_names)
    rows: dict[str, Any] = {}
    for name, parts in sites.items():
        tr = (
            np.bincount(y_train[parts.train], minlength=k) if len(parts.train) else np.zeros(k, int)
        )
        va = np.bincount(y_val[parts.val], minlength=k) if len(parts.val) else np.zeros(k, int)
        if len(parts.val_from_train):
            va = va + np.bincount(y_train[parts.val_from_train], minlength=k)
        rows[name] = {
            "train": int(tr.sum()),
            "val": int(va.sum()),
            "train_classes": {c: int(n) for c, n in zip(class_names, tr, strict=True)},
            "val_classes": {c: int(n) for c, n in zip(class_names, va, strict=True)},
        }
    return {
        "scheme": scheme,
        "alpha": alpha if scheme == "dirichlet" else None,
        "num_sites": len(rows),
        "class_names": list(class_names),
        "sites": rows,
        "train_total": int(sum(r["train"] for r in rows.values())),
        "val_total": int(sum(r["val"] for r in rows.values())),
    }


def site_report_markdown(report: Mapping[str, Any]) -> str:
    """The site report as a Markdown table (one row per site, training images per class)."""
    classes = list(report["class_names"])
    title = f"# Federated sites ({report['scheme']}"
    title += f", alpha={report['alpha']})" if report.get("alpha") is not None else ")"
    head = "| site | train | val | " + " | ".join(classes) + " |"
    rule = "|" + "---|" * (3 + len(classes))
    lines = [title, "", head, rule]
    for name, row in report["sites"].items():
        counts = " | ".join(str(row["train_classes"][c]) for c in classes)
        lines.append(f"| {name} | {row['train']} | {row['val']} | {counts} |")
    return "\n".join(lines) + "\n"


def site_column(frame, ids: Sequence[str]) -> np.ndarray:
    """The manifest's `site` value for each row id in `ids` (order kept), for partition=given."""
    lookup = frame.set_index("id")["site"]
    try:
        return lookup.loc[list(ids)].astype(str).to_numpy(dtype=object)
    except KeyError as exc:
        raise DataError("some image ids are not in the manifest; rebuild the arrays") from exc


__all__ = [
    "SiteIndices",
    "dirichlet_proportions",
    "partition",
    "partition_splits",
    "safe_site_name",
    "site_column",
    "site_names",
    "site_report",
    "site_report_markdown",
]
