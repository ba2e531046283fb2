"""A dataset's clinical table (`adapter: table`): read it, give every column its role, join
its rows to their images.

Roles come from `dataset.clinical`: `key` (the column naming each row's image; null for a
tabular-only dataset), `label`, `group` (the patient), `features` and `exclude`; `site` names
a column (a feature too, or a column of its own) whose value is each row's federated site. A column
without a role, or a role naming a column the table lacks, is an error that names it. The
patient id is kept only as a keyed hash (`group_key`); errors name table lines, never ids.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from components.data.manifest import CLINICAL_PREFIX, GROUP
from components.errors import ConfigError, DataError

log = logging.getLogger(__name__)

FIRST_LINE = 2  # the table's first data row is line 2 of the file (line 1: the header)
EXAMPLES = 5  # lines named in an error


@dataclass(frozen=True)
class TableSpec:
    """Where the table is and what each of its columns is for (`dataset.clinical`)."""

    table: Path
    root: Path
    key: str | None
    image_name: str
    label: str
    label_names: Mapping[str, str]
    group: str | None
    features: tuple[str, ...]
    exclude: tuple[str, ...]
    missing_values: tuple[str, ...]
    site: str | None = None

    @classmethod
    def from_config(cls, clinical: Mapping, root: str | Path) -> TableSpec:
        """From the composed `dataset.clinical` section; a relative table path is taken
        under `root` (the dataset folder)."""
        root = Path(root).expanduser()
        table = Path(str(clinical["table"])).expanduser()
        return cls(
            table=table if table.is_absolute() else root / table,
            root=root,
            key=clinical.get("key"),
            image_name=str(clinical["image_name"]),
            label=str(clinical["label"]),
            label_names={str(k): str(v) for k, v in (clinical.get("label_names") or {}).items()},
            group=clinical.get("group"),
            features=tuple(str(f["name"]) for f in clinical["features"]),
            exclude=tuple(clinical.get("exclude") or ()),
            missing_values=tuple(str(v) for v in clinical["missing_values"]),
            site=clinical.get("site"),
        )

    @property
    def roles(self) -> dict[str, str]:
        """Column -> its role."""
        out = {c: "feature" for c in self.features} | {c: "exclude" for c in self.exclude}
        for role in ("key", "label", "group"):
            column = getattr(self, role)
            if column:
                out[column] = role
        if self.site and self.site not in out:  # a feature may name the site as well
            out[self.site] = "site"
        return out

    def image_path(self, key: str) -> Path:
        name = self.image_name.format(key=key, stem=Path(key).stem)
        return self.root / name


def read_table(path: Path, missing_values: Sequence[str]) -> pd.DataFrame:
    """Every cell as stripped text; the `missing_values` tokens become None."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise DataError(f"clinical table {path} not found") from exc
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot parse clinical table {path}: {exc}") from exc
    table.columns = [str(c).strip() for c in table.columns]
    missing = set(missing_values)
    return table.apply(lambda col: col.str.strip().map(lambda v: None if v in missing else v))


def check_roles(columns: Sequence[str], spec: TableSpec) -> None:
    """Every table column has a role and every role names a table column."""
    roles = spec.roles
    unassigned = [c for c in columns if c not in roles]
    if unassigned:
        raise ConfigError(
            f"clinical table {spec.table.name} has columns without a role: {unassigned}; list "
            "each in dataset.clinical.features (with its type) or dataset.clinical.exclude"
        )
    absent = {c: role for c, role in roles.items() if c not in set(columns)}
    if absent:
        named = ", ".join(f"{role} column {c!r}" for c, role in absent.items())
        raise DataError(
            f"clinical table {spec.table.name} lacks the {named} (its columns: {list(columns)})"
        )


def group_key(secret: bytes, patient: str) -> str:
    """The patient's keyed hash (HMAC-SHA-256, 16 hex): equal ids give equal keys, and the
    id cannot be recovered by hashing candidate ids without the table itself (`secret`)."""
    return hmac.new(secret, patient.encode(), hashlib.sha256).hexdigest()[:16]


def record_hash(values: Sequence) -> str:
    """SHA-256 of a record's feature values in schema order (the content hash of a row
    without an image: identical records share it, like identical images)."""
    return hashlib.sha256(json.dumps(list(values)).encode()).hexdigest()


def load_rows(spec: TableSpec, classes: Sequence[str]) -> pd.DataFrame:
    """The table's rows as `line`, `label` (class name), `image` (path, or "" without a key
    column), `group` (keyed hash, "" when the row has no patient id, absent without a group
    column), `record_sha256`, `site` (with a site column: its value, "" when missing) and one
    `clin__<feature>` column per feature (raw text, None = missing). DataError on a missing
    label or image, a duplicate key, a label outside `classes` or an image file no row
    names."""
    table = read_table(spec.table, spec.missing_values)
    check_roles(list(table.columns), spec)
    if table.empty:
        raise DataError(f"clinical table {spec.table} has no rows")
    lines = pd.Series(range(FIRST_LINE, FIRST_LINE + len(table)), index=table.index)
    out = pd.DataFrame({"line": lines, "label": _labels(table, spec, classes, lines)})
    out["image"] = _images(table, spec, lines) if spec.key else ""
    if spec.group:
        secret = hashlib.sha256(spec.table.read_bytes()).digest()
        out[GROUP] = [group_key(secret, p) if p else "" for p in table[spec.group]]
    if spec.site:
        out["site"] = table[spec.site].fillna("").astype(str).to_numpy()
    features = table[list(spec.features)]
    out["record_sha256"] = [record_hash(row) for row in features.itertuples(index=False)]
    for name in spec.features:
        values = table[name].astype(object)
        out[f"{CLINICAL_PREFIX}{name}"] = values.where(values.notna(), None)
    log.info(
        "clinical table %s: %d rows, %d features%s",
        spec.table.name,
        len(out),
        len(spec.features),
        f", {out[GROUP].replace('', pd.NA).nunique()} patients" if spec.group else "",
    )
    return out


def _labels(
    table: pd.DataFrame, spec: TableSpec, classes: Sequence[str], lines: pd.Series
) -> pd.Series:
    raw = table[spec.label]
    absent = lines[raw.isna()]
    if len(absent):
        raise DataError(
            f"{len(absent)} rows of {spec.table.name} have no {spec.label!r} value (lines "
            f"{_lines(absent)})"
        )
    labels = raw.map(lambda v: spec.label_names.get(v, v))
    unknown = labels[~labels.isin(list(classes))].value_counts()
    if len(unknown):
        found = ", ".join(f"{value!r} ({n} rows)" for value, n in unknown.items())
        raise DataError(
            f"{spec.table.name}: {spec.label!r} values {found} are not dataset.classes "
            f"{list(classes)}; map raw values to class names with dataset.clinical.label_names"
        )
    return labels


def _images(table: pd.DataFrame, spec: TableSpec, lines: pd.Series) -> list[str]:
    keys = table[spec.key]
    where = f"{spec.table.name}'s key column {spec.key!r}"
    blank = lines[keys.isna()]
    if len(blank):
        raise DataError(f"{where} is empty on {len(blank)} rows (lines {_lines(blank)})")
    repeated = lines[keys.duplicated(keep=False)]
    if len(repeated):
        raise DataError(
            f"{where} repeats values: {len(repeated)} rows name an image another row names "
            f"too (lines {_lines(repeated)}); each image needs exactly one row"
        )
    paths = [spec.image_path(k) for k in keys]
    absent = lines[[not p.is_file() for p in paths]]
    if len(absent):
        raise DataError(
            f"{len(absent)} rows of {spec.table.name} name an image that is not under "
            f"{spec.root} as {spec.image_name!r} (lines {_lines(absent)})"
        )
    _check_no_stray_images(spec, {p.resolve() for p in paths})
    return [str(p.resolve()) for p in paths]


def _check_no_stray_images(spec: TableSpec, named: set[Path]) -> None:
    """Image files in the folder the table's images live in that no row names: the table
    and the folder disagree (another version of either), so nothing is guessed."""
    pattern = Path(spec.image_name)
    if "{" in str(pattern.parent):
        return  # one folder per key: nothing to compare against
    folder = spec.root / pattern.parent
    kinds = {p.suffix.lower() for p in named}  # files of the kinds the table names
    stray = [p for p in folder.iterdir() if p.suffix.lower() in kinds and p.resolve() not in named]
    if stray:  # not named: image file names may hold patient ids
        raise DataError(
            f"{len(stray)} {'/'.join(sorted(kinds))} files in {folder} have no row in "
            f"{spec.table.name}; add their rows or move them out of the folder"
        )


def _lines(lines: pd.Series) -> str:
    shown = ", ".join(str(n) for n in lines.iloc[:EXAMPLES])
    return shown + (", …" if len(lines) > EXAMPLES else "")
