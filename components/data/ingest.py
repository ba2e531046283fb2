"""Ingest adapters: turn a dataset on disk into a manifest (see `manifest.COLUMNS`).

Adapters only describe what is there: labels are taken as found (validation judges them),
every image is decoded once to record its geometry and content hash, and an image that does
not decode becomes a row with `decode_error` set instead of an exception.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from components.data import manifest
from components.data.images import (
    ARRAY_SEPARATOR,
    DICOM_SUFFIXES,
    channels_of,
    content_hash,
    is_dicom_bytes,
    open_image,
)
from components.data.near_duplicates import thumbnail
from components.errors import DataError
from components.workspace import Workspace

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"})
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "test": "test",
    "testing": "test",
    "val": "val",
    "valid": "val",
    "validation": "val",
}
FORMAT_BY_SUFFIX = {
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".png": "png",
    ".bmp": "bmp",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".webp": "webp",
    ".gif": "gif",
    ".dcm": "dicom",
    ".dicom": "dicom",
    ".npz": "npz",
}
DECODE_THREADS = 2
PROGRESS_EVERY = 500
DECODE_CACHE_FILE = "ingest_decode_cache.parquet"
ADAPTERS = ("folder", "csv", "npz", "dicom", "synthetic", "table")


@dataclass
class Candidate:
    """One image to describe: its manifest source, label and declared split."""

    source: str
    label: str
    given_split: str = ""
    site: str = ""
    error: str = ""  # known before decoding (e.g. file not found)


@dataclass(frozen=True)
class Description:
    width: int
    height: int
    channels: int
    sha256: str
    decode_error: str
    format: str
    thumbnail: str = ""


# ---------------------------------------------------------------------------------------------
# decode cache: (source, size, mtime) -> description


class DecodeCache:
    """Remembers descriptions of unchanged files, stored as parquet under the workspace cache.

    The key includes the file's size and modification time (ns), so a changed file is re-read.
    """

    COLUMNS = ("source", "size", "mtime_ns", *Description.__dataclass_fields__)

    def __init__(self, cache_dir: Path | None) -> None:
        self.path = Path(cache_dir) / DECODE_CACHE_FILE if cache_dir else None
        self.entries: dict[str, tuple] = {}
        self.hits = 0
        self._dirty = False
        if self.path and self.path.exists():
            try:
                frame = pd.read_parquet(self.path)
                if tuple(frame.columns) != self.COLUMNS:  # written by an older version
                    frame = frame.iloc[0:0]
                for row in frame.itertuples(index=False):
                    self.entries[row.source] = tuple(row)[1:]
            except Exception as exc:  # a corrupt cache is rebuilt, never trusted
                log.warning("ignoring unreadable decode cache %s: %s", self.path, exc)
                self.entries = {}

    @staticmethod
    def stat_key(source: str) -> tuple[int, int] | None:
        path = source.split(ARRAY_SEPARATOR, 1)[0]
        try:
            stat = os.stat(path)
        except OSError:
            return None
        return stat.st_size, stat.st_mtime_ns

    def get(self, source: str, key: tuple[int, int] | None) -> Description | None:
        entry = self.entries.get(source)
        if key is None or entry is None or (int(entry[0]), int(entry[1])) != key:
            return None
        self.hits += 1
        width, height, channels, sha, error, fmt, thumb = entry[2:]
        return Description(int(width), int(height), int(channels), sha, error, fmt, thumb)

    def put(self, source: str, key: tuple[int, int] | None, info: Description) -> None:
        if key is None:
            return
        self.entries[source] = (
            key[0],
            key[1],
            info.width,
            info.height,
            info.channels,
            info.sha256,
            info.decode_error,
            info.format,
            info.thumbnail,
        )
        self._dirty = True

    def save(self) -> None:
        if not self.path or not self._dirty:
            return
        rows = [(source, *values) for source, values in self.entries.items()]
        frame = pd.DataFrame(rows, columns=list(self.COLUMNS))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        frame.to_parquet(tmp, index=False)
        tmp.replace(self.path)
        self._dirty = False


# ---------------------------------------------------------------------------------------------
# decoding


def format_hint(source: str) -> str:
    if ARRAY_SEPARATOR in source:
        return "npz"
    return FORMAT_BY_SUFFIX.get(Path(source).suffix.lower(), Path(source).suffix.lower()[1:])


def describe(source: str) -> Description:
    """Decode `source` once: geometry, content hash, thumbnail and format, or the reason
    it failed."""
    try:
        image = open_image(source)
    except DataError as exc:
        return Description(0, 0, 0, "", str(exc) or "undecodable image", format_hint(source))
    except Exception as exc:  # never let one bad image stop an ingest
        return Description(0, 0, 0, "", f"unexpected decode failure: {exc!r}", format_hint(source))
    fmt = (image.format or format_hint(source)).lower()
    return Description(
        image.width,
        image.height,
        channels_of(image),
        content_hash(image),
        "",
        fmt,
        thumbnail(image),
    )


def _parallel(func: Callable, items: list, what: str) -> list:
    """Map `func` over `items` with a small thread pool, logging progress."""
    results = []
    total = len(items)
    if not total:
        return results
    with ThreadPoolExecutor(max_workers=DECODE_THREADS) as pool:
        for done, result in enumerate(pool.map(func, items), start=1):
            results.append(result)
            if done % PROGRESS_EVERY == 0 and done < total:
                log.info("%s %d/%d images", what, done, total)
    return results


def describe_all(candidates: list[Candidate], cache_dir: Path | None) -> pd.DataFrame:
    """Decode every candidate (cache permitting) and build the manifest frame."""
    started = time.perf_counter()
    cache = DecodeCache(cache_dir)
    keys = [DecodeCache.stat_key(c.source) for c in candidates]
    infos: list[Description | None] = []
    todo = []
    for i, (cand, key) in enumerate(zip(candidates, keys, strict=True)):
        if cand.error:
            infos.append(Description(0, 0, 0, "", cand.error, format_hint(cand.source)))
            continue
        cached = cache.get(cand.source, key)
        infos.append(cached)
        if cached is None:
            todo.append(i)
    fresh = _parallel(lambda i: describe(candidates[i].source), todo, "decoded")
    for i, info in zip(todo, fresh, strict=True):
        infos[i] = info
        cache.put(candidates[i].source, keys[i], info)
    cache.save()
    rows = [
        {
            "id": manifest.row_id(c.source),
            "source": c.source,
            "format": info.format,
            "label": c.label,
            "split": "",
            "given_split": c.given_split,
            "site": c.site,
            "width": info.width,
            "height": info.height,
            "channels": info.channels,
            "sha256": info.sha256,
            "thumbnail": info.thumbnail,
            "decode_error": info.decode_error,
        }
        for c, info in zip(candidates, infos, strict=True)
    ]
    frame = manifest.conform(pd.DataFrame(rows, columns=list(manifest.COLUMNS)))
    failed = int((frame["decode_error"] != "").sum())
    log.info(
        "described %d images in %.1f s (%d decoded, %d from cache, %d undecodable)",
        len(frame),
        time.perf_counter() - started,
        len(todo),
        cache.hits,
        failed,
    )
    return frame


# ---------------------------------------------------------------------------------------------
# folder layouts


def _is_hidden(path: Path, base: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(base).parts)


def scan_folder(root: str | Path, accept: Callable[[Path], str]) -> tuple[list[Candidate], Counter]:
    """Find `<root>/<class>/**` or `<root>/<split>/<class>/**` files.

    `accept(path)` returns "" to take a file, or the reason to skip it (counted). Split folder
    names map case-insensitively through `SPLIT_ALIASES`.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    skipped: Counter = Counter()
    top = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            skipped["hidden"] += 1
        elif entry.is_dir():
            top.append(entry)
        else:
            skipped["outside class folders"] += 1
    split_dirs = [d for d in top if d.name.lower() in SPLIT_ALIASES]
    if split_dirs and len(split_dirs) != len(top):
        others = sorted(d.name for d in top if d not in split_dirs)
        raise DataError(
            f"{root} mixes split folders {[d.name for d in split_dirs]} with other folders "
            f"{others}; use either <root>/<class>/ or <root>/<split>/<class>/"
        )
    groups: list[tuple[str, Path]] = []
    if split_dirs:
        for split_dir in split_dirs:
            for entry in sorted(split_dir.iterdir()):
                if entry.name.startswith("."):
                    skipped["hidden"] += 1
                elif entry.is_dir():
                    groups.append((SPLIT_ALIASES[split_dir.name.lower()], entry))
                else:
                    skipped["outside class folders"] += 1
    else:
        groups = [("", d) for d in top]
    if not groups:
        raise DataError(f"no class folders under {root}; expected <root>/<class>/<images>")
    found: list[Candidate] = []
    per_folder: Counter = Counter()
    for split, class_dir in groups:
        for path in sorted(class_dir.rglob("*")):
            if _is_hidden(path, class_dir):
                if path.is_file():
                    skipped["hidden"] += 1
                continue
            if not path.is_file():
                continue
            reason = accept(path)
            if reason:
                skipped[reason] += 1
                continue
            found.append(Candidate(str(path.resolve()), class_dir.name, split))
            per_folder[str(class_dir.relative_to(root))] += 1
    summary = ", ".join(f"{folder}: {n}" for folder, n in sorted(per_folder.items()))
    ignored = ", ".join(f"{n} {why}" for why, n in sorted(skipped.items())) or "nothing"
    log.info("found %d files under %s (%s); ignored %s", len(found), root, summary, ignored)
    if not found:
        raise DataError(f"no usable image files under {root} (ignored: {ignored})")
    return found, skipped


def _accept_image(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return ""
    if suffix in DICOM_SUFFIXES:
        return "DICOM files (use adapter=dicom, which de-identifies them)"
    return "non-image files"


def _accept_dicom(path: Path) -> str:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return ""
    if path.suffix == "":
        try:
            with path.open("rb") as handle:
                if is_dicom_bytes(handle.read(132)):
                    return ""
        except OSError:
            return "unreadable files"
    return "non-DICOM files"


def subsample(candidates: list[Candidate], max_per_class: int | None, seed: int) -> list:
    """Keep at most `max_per_class` per (given_split, label), chosen with a seeded RNG."""
    if not max_per_class:
        return candidates
    if max_per_class < 1:
        raise DataError("max_per_class must be a positive number")
    rng = np.random.default_rng(seed)
    groups: dict[tuple[str, str], list[Candidate]] = {}
    for cand in sorted(candidates, key=lambda c: c.source):
        groups.setdefault((cand.given_split, cand.label), []).append(cand)
    kept: list[Candidate] = []
    for key in sorted(groups):
        members = groups[key]
        if len(members) > max_per_class:
            chosen = np.sort(rng.choice(len(members), size=max_per_class, replace=False))
            members = [members[i] for i in chosen]
        kept.extend(members)
    log.info(
        "subsampled %d of %d images (max %d per split/class)",
        len(kept),
        len(candidates),
        max_per_class,
    )
    return kept


# ---------------------------------------------------------------------------------------------
# adapters


def ingest_folder(
    root: str | Path,
    *,
    cache_dir: Path | None = None,
    max_per_class: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Class-per-folder trees, optionally below Training/Testing/val-style split folders."""
    candidates, _ = scan_folder(root, _accept_image)
    return describe_all(subsample(candidates, max_per_class, seed), cache_dir)


def _normalise_split(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    text = str(value).strip()
    if not text:
        return ""
    if text.lower() not in SPLIT_ALIASES:
        raise DataError(
            f"unknown split value {text!r}; use one of train/val/test (or training/testing/"
            "valid/validation) or leave it empty"
        )
    return SPLIT_ALIASES[text.lower()]


def _resolve_reference(reference: str, base: Path) -> str:
    path, sep, key = reference.partition(ARRAY_SEPARATOR)
    resolved = Path(path).expanduser()
    if not resolved.is_absolute():
        resolved = base / resolved
    return f"{resolved.resolve()}{sep}{key}"


def ingest_csv(
    path: str | Path,
    *,
    cache_dir: Path | None = None,
    max_per_class: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """A CSV with columns path,label[,split,site]; relative paths resolve against its folder."""
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError as exc:
        raise DataError(f"CSV manifest {path} not found") from exc
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot parse CSV manifest {path}: {exc}") from exc
    table.columns = [str(c).strip().lower() for c in table.columns]
    missing = [c for c in ("path", "label") if c not in table.columns]
    if missing:
        raise DataError(
            f"CSV manifest {path} lacks required column(s) {missing}; expected "
            f"path,label[,split,site], found {list(table.columns)}"
        )
    base = path.resolve().parent
    candidates = []
    for row in table.itertuples(index=False):
        reference = str(row.path).strip()
        if not reference:
            raise DataError(f"CSV manifest {path} has a row with an empty path")
        source = _resolve_reference(reference, base)
        file_part = source.split(ARRAY_SEPARATOR, 1)[0]
        error = "" if Path(file_part).is_file() else "file not found"
        candidates.append(
            Candidate(
                source=source,
                label=str(row.label).strip(),
                given_split=_normalise_split(getattr(row, "split", "")),
                site=str(getattr(row, "site", "") or "").strip(),
                error=error,
            )
        )
    if not candidates:
        raise DataError(f"CSV manifest {path} has no rows")
    log.info("CSV manifest %s lists %d images", path, len(candidates))
    return describe_all(subsample(candidates, max_per_class, seed), cache_dir)


def ingest_npz(
    path: str | Path,
    classes: list[str] | None,
    *,
    cache_dir: Path | None = None,
    max_per_class: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """MedMNIST-style .npz: `<split>_images` with integer `<split>_labels` indexing `classes`."""
    path = Path(path).resolve()
    if not classes:
        raise DataError("the npz adapter needs dataset.classes: labels are indices into it")
    if not path.is_file():
        raise DataError(f"array file {path} not found")
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = set(archive.files)
            labels_by_split = {
                split: archive[f"{split}_labels"]
                for split in ("train", "val", "test")
                if f"{split}_labels" in names
            }
            lengths = {
                split: len(archive[f"{split}_images"]) if f"{split}_images" in names else None
                for split in labels_by_split
            }
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path} as an .npz archive: {exc}") from exc
    if not labels_by_split:
        raise DataError(
            f"{path} has none of train_labels/val_labels/test_labels (has {sorted(names)})"
        )
    candidates = []
    for split, labels in labels_by_split.items():
        if lengths[split] is None:
            raise DataError(f"{path} has {split}_labels but no {split}_images")
        labels = np.asarray(labels)
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim != 1:
            raise DataError(
                f"{split}_labels has shape {labels.shape}; only single-label (N,) or (N,1)"
            )
        if len(labels) != lengths[split]:
            raise DataError(
                f"{split}_images has {lengths[split]} images but {split}_labels {len(labels)}"
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{split}_labels must be integers, not {labels.dtype}")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise DataError(
                f"{split}_labels range {labels.min()}..{labels.max()} does not index the "
                f"{len(classes)} declared classes {list(classes)}"
            )
        candidates.extend(
            Candidate(f"{path}{ARRAY_SEPARATOR}{split}_images/{i}", classes[int(lab)], split)
            for i, lab in enumerate(labels)
        )
    log.info("array file %s holds %d images", path.name, len(candidates))
    return describe_all(subsample(candidates, max_per_class, seed), cache_dir)


def _deidentify_one(candidate: Candidate, out_dir: Path) -> Candidate:
    """De-identify one DICOM into out_dir; the candidate's source becomes the copy."""
    from components.data.dicom import content_name, write_deidentified

    try:
        copy = write_deidentified(candidate.source, out_dir)
        return Candidate(str(copy), candidate.label, candidate.given_split, candidate.site)
    except (DataError, OSError) as exc:
        try:
            name = content_name(Path(candidate.source).read_bytes())
        except OSError:
            name = "unreadable"
        reason = str(exc) if isinstance(exc, DataError) else "cannot read file"
        return Candidate(
            f"unreadable-dicom:{name}",
            candidate.label,
            candidate.given_split,
            candidate.site,
            error=f"{reason} (find the file with sha256sum: content hash {name})",
        )


def ingest_dicom(
    root: str | Path,
    out_dir: str | Path,
    *,
    cache_dir: Path | None = None,
    max_per_class: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """`<root>/[<split>/]<class>/*.dcm`: each file is de-identified into `out_dir` first.

    The manifest only ever names the de-identified copies (`<out_dir>/<content hash>.dcm`);
    original file names, which may hold patient names, are neither recorded nor logged.
    """
    out_dir = Path(out_dir)
    originals, _ = scan_folder(root, _accept_dicom)
    originals = subsample(originals, max_per_class, seed)
    copies = _parallel(lambda c: _deidentify_one(c, out_dir), originals, "de-identified")
    unique: dict[tuple[str, str, str], Candidate] = {}
    for cand in copies:
        unique.setdefault((cand.source, cand.label, cand.given_split), cand)
    if len(unique) < len(copies):
        log.info("%d byte-identical DICOM copies collapsed", len(copies) - len(unique))
    failed = sum(1 for c in unique.values() if c.error)
    log.info("de-identified %d DICOM files into %s (%d unreadable)", len(unique), out_dir, failed)
    return describe_all(list(unique.values()), cache_dir)


def ingest_synthetic(
    root: str | Path,
    classes: Iterable[str] | None,
    options: Mapping | None = None,
    *,
    cache_dir: Path | None = None,
    max_per_class: int | None = None,
    seed: int = 0,
    clinical: Mapping | None = None,
) -> pd.DataFrame:
    """Generate synthetic images into `root` unless it already has content, then ingest it.
    With `paired` (dataset=synthetic_clinical): images and a clinical table, ingested by the
    table adapter with `clinical`."""
    from components.data.synthetic import (
        DEFAULT_CLASSES,
        write_synthetic_clinical_folder,
        write_synthetic_folder,
    )

    root = Path(root)
    options = dict(options or {})
    empty = not root.exists() or not any(root.iterdir())
    if options.get("paired"):
        if not clinical:
            raise DataError("paired synthetic data needs dataset.clinical (its table and roles)")
        if empty:
            write_synthetic_clinical_folder(
                root,
                n_per_class=int(options.get("n_per_class", 40)),
                size=int(options.get("size", 32)),
                seed=int(options.get("seed", seed)),
            )
        common = {"cache_dir": cache_dir, "max_per_class": max_per_class, "seed": seed}
        return ingest_table(root, clinical, list(classes or []), **common)
    if empty:
        write_synthetic_folder(
            root,
            n_per_class=int(options.get("n_per_class", 40)),
            size=int(options.get("size", 32)),
            seed=int(options.get("seed", seed)),
            channels=int(options.get("channels", 3)),
            with_splits=bool(options.get("with_splits", False)),
            classes=tuple(classes) if classes else DEFAULT_CLASSES,
        )
    return ingest_folder(root, cache_dir=cache_dir, max_per_class=max_per_class, seed=seed)


def ingest_table(
    root: str | Path,
    clinical: Mapping,
    classes: list[str] | None,
    *,
    cache_dir: Path | None = None,
    max_per_class: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """A clinical table (`dataset.clinical`, components/data/clinical.py) joined to its images
    under `root`: the image columns as the other adapters describe them (decode cache,
    thumbnails, content hashes), plus `group` and one `clin__<feature>` column per feature.
    Without a key column (a tabular-only dataset) rows have no image: `source` "", zero
    geometry, and `sha256` the hash of the record's feature values. With `clinical.site`,
    that column's value is each row's `site` (federation.partition=given)."""
    from components.data.clinical import TableSpec, load_rows

    spec = TableSpec.from_config(clinical, root)
    rows = load_rows(spec, classes or [])
    rows = _subsample_rows(rows, max_per_class, seed)
    sites = rows["site"] if "site" in rows.columns else pd.Series("", index=rows.index)
    if spec.key:
        triples = zip(rows["image"], rows["label"], sites, strict=True)
        candidates = [Candidate(image, label, site=site) for image, label, site in triples]
        frame = describe_all(candidates, cache_dir)
    else:
        frame = pd.DataFrame(
            {
                "id": [manifest.row_id(f"{spec.table.resolve()}::row/{n}") for n in rows["line"]],
                "source": "",
                "format": "",
                "label": rows["label"].to_numpy(),
                "split": "",
                "given_split": "",
                "site": sites.to_numpy(),
                "width": 0,
                "height": 0,
                "channels": 0,
                "sha256": rows["record_sha256"].to_numpy(),
                "thumbnail": "",
                "decode_error": "",
            }
        )
    extra = rows[manifest.extra_columns(rows)].reset_index(drop=True)
    return manifest.conform(pd.concat([frame.reset_index(drop=True), extra], axis=1))


def _subsample_rows(rows: pd.DataFrame, max_per_class: int | None, seed: int) -> pd.DataFrame:
    """At most `max_per_class` table rows per label, chosen with a seeded RNG."""
    if not max_per_class:
        return rows
    if max_per_class < 1:
        raise DataError("max_per_class must be a positive number")
    rng = np.random.default_rng(seed)
    keep = []
    for _, members in sorted(rows.groupby("label").groups.items()):
        chosen = (
            members
            if len(members) <= max_per_class
            else rng.choice(members, size=max_per_class, replace=False)
        )
        keep.extend(chosen)
    return rows.loc[sorted(keep)]


def ingest(
    adapter: str,
    root: str | Path,
    classes: list[str] | None,
    workspace: Workspace,
    max_per_class: int | None = None,
    seed: int = 0,
    *,
    options: Mapping | None = None,
    clinical: Mapping | None = None,
    patient_from_name: str = "",
) -> pd.DataFrame:
    """Run the named adapter; the decode cache and DICOM copies live under `workspace.cache`.

    `options` are adapter options; the synthetic adapter reads n_per_class, size, seed,
    channels and with_splits from them. `clinical` is the `dataset.clinical` section the
    table adapter reads. `patient_from_name`: a regular expression finding the patient in
    each file name (components/data/patients.py), "" for none.
    """
    cache_dir = workspace.cache
    common = {"cache_dir": cache_dir, "max_per_class": max_per_class, "seed": seed}
    started = time.perf_counter()
    if adapter == "folder":
        frame = ingest_folder(root, **common)
    elif adapter == "csv":
        frame = ingest_csv(root, **common)
    elif adapter == "npz":
        frame = ingest_npz(root, classes, **common)
    elif adapter == "dicom":
        frame = ingest_dicom(root, cache_dir / "dicom_deidentified", **common)
    elif adapter == "synthetic":
        frame = ingest_synthetic(root, classes, options, clinical=clinical, **common)
    elif adapter == "table":
        if not clinical or not clinical.get("table"):
            raise DataError("the table adapter needs dataset.clinical (its table, label, ...)")
        frame = ingest_table(root, clinical, classes, **common)
    else:
        raise DataError(f"unknown ingest adapter {adapter!r}; choose one of {list(ADAPTERS)}")
    if patient_from_name:
        from components.data.patients import with_name_patients

        frame = with_name_patients(frame, patient_from_name)
    log.info(
        "ingest (%s) produced %d rows in %.1f s", adapter, len(frame), time.perf_counter() - started
    )
    return frame
