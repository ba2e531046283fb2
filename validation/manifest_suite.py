"""The manifest expectation suite: is this set of images fit to train and evaluate on?

Three GX batches are validated:

* ``manifest_schema`` (the manifest as given): exact column set and column types;
* ``manifest_rows`` (the manifest plus derived columns): labels, decodability, unique ids,
  geometry, known split names (train, val, test, calibration or none), and — through
  ``n_splits_for_hash`` / ``n_labels_for_hash``, computed with pandas per content hash — no
  image in two splits and no image with two labels; with ``near_similarity``, also
  ``n_splits_for_near_group`` (near-duplicate groups recomputed from the thumbnails,
  independently of the split step): no near-duplicate group in two splits; with a patient
  column (`group`), ``n_splits_for_group``: no patient in two splits;
* ``manifest_class_counts`` (one row per class): a minimum count per class (in the train split
  once splits are assigned) and every declared class present.

A tabular-only manifest (`images=False`: rows without images) skips the image checks
(decodability, geometry, channels, near-duplicates); its `sha256` is the record's hash, so
"in one split" applies to identical records, which may carry different labels (two patients
with the same answers).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from components.data.manifest import COLUMNS, GROUP, SPLITS, conform, extra_columns
from components.errors import ConfigError, ValidationFailed
from components.workspace import Workspace
from validation import gx_engine
from validation.gx_engine import Check
from validation.outcome import CheckResult, ValidationOutcome, section, summarise, timestamp
from validation.runner import finish, row_reasons

logger = logging.getLogger(__name__)

ROW = "row"  # positional row number added to every batch: ids may be duplicated
DECODED = 'decode_error == ""'
CHANNELS = (1, 3, 4)
INT_TYPES = ["int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "int"]
STR_TYPES = ["StringDtype", "str"]
ON_FAILURE = ("stop", "quarantine")
SPLIT_VALUES = ["", *SPLITS, "calibration"]  # "calibration": calibration.fit_on=held_out


def validate_manifest(
    manifest: pd.DataFrame,
    classes: list[str],
    *,
    min_side: int,
    max_side: int,
    min_per_class: int,
    on_failure: str = "stop",
    workspace: Workspace | None = None,
    near_similarity: float | None = None,
    images: bool = True,
) -> ValidationOutcome:
    """Validate an image manifest with Great Expectations.

    on_failure="stop": any failed expectation raises `ValidationFailed` (message: the summary).
    on_failure="quarantine": rows failing a row-level expectation are dropped (every row of a
    duplicated-image group), recorded with a `reason`, and the rest is validated again; a
    failure that dropping rows cannot fix (columns, types, class counts) still raises.
    With a workspace, the report, the quarantined rows and GX Data Docs are written there.
    `near_similarity` (thumbnail correlation, `dataset.split.near_similarity`): also check
    that no near-duplicate group straddles two splits (None: exact copies only).
    `images=False`: the rows have no images (a tabular-only dataset; see the module text).
    """
    if on_failure not in ON_FAILURE:
        raise ConfigError(f"on_failure must be one of {ON_FAILURE}, got {on_failure!r}")
    if not classes:
        raise ConfigError("validate_manifest needs the list of declared classes")
    if not 0 < min_side <= max_side:
        raise ConfigError(f"need 0 < min_side <= max_side, got {min_side} and {max_side}")
    stamp = timestamp()
    session = gx_engine.GxSession(
        results_dir=workspace.reports / "gx" if workspace else None,
        docs_dir=workspace.data_docs if workspace else None,
    )
    frame = _normalise_string_dtypes(manifest.reset_index(drop=True))
    report: dict = {
        "suite": "manifest",
        "on_failure": on_failure,
        "classes": list(classes),
        "parameters": {
            "min_side": min_side,
            "max_side": max_side,
            "min_per_class": min_per_class,
            "near_similarity": near_similarity,
        },
    }
    describe = _describer(frame)
    near = near_similarity if images else None

    schema = session.run(
        frame,
        asset="manifest",
        suite="manifest_schema",
        checks=_schema_checks(frame),
        index_columns=[c for c in ("id",) if c in frame.columns],
        run_name=f"{stamp}-schema",
    )
    if not all(c.success for c in schema):
        report.update(section(schema, describe, len(frame)))
        report["skipped"] = "row and class checks skipped: the manifest's structure is wrong"
        finish(report, pd.DataFrame(), session, workspace, "validation", stamp)
        raise ValidationFailed(summarise(report), report)

    checks = schema + _row_and_count_checks(
        session, frame, classes, min_side, max_side, min_per_class, f"{stamp}-initial", near, images
    )
    report.update(section(checks, describe, len(frame)))
    kept, quarantined = frame, frame.iloc[0:0].assign(reason=pd.Series(dtype="string"))
    if not report["passed"] and on_failure == "quarantine":
        reasons = row_reasons(checks, ROW, _explain(frame, near))
        if reasons:  # frame has a 0..n-1 index, so row numbers are index labels
            bad = frame.loc[sorted(reasons)]
            quarantined = bad.assign(reason=[reasons[i] for i in bad.index])
            quarantined = quarantined.astype({"reason": "string"})
            kept = frame.drop(index=bad.index).reset_index(drop=True)
        after = schema + _row_and_count_checks(
            session,
            kept,
            classes,
            min_side,
            max_side,
            min_per_class,
            f"{stamp}-after-quarantine",
            near,
            images,
        )
        report["after_quarantine"] = section(after, _describer(kept), len(kept))
    report["rows_quarantined"] = len(quarantined)
    report["rows_validated"] = len(kept)
    quarantined = quarantined.reset_index(drop=True)
    docs = finish(report, quarantined, session, workspace, "validation", stamp)
    final_ok = report.get("after_quarantine", report)["passed"]
    if not final_ok:
        raise ValidationFailed(summarise(report), report)
    logger.info("manifest validated: %d rows kept, %d quarantined", len(kept), len(quarantined))
    return ValidationOutcome(
        passed=bool(report["passed"]),
        validated=conform(kept),
        quarantined=quarantined,
        report=report,
        data_docs=docs,
    )


def _row_and_count_checks(
    session: gx_engine.GxSession,
    frame: pd.DataFrame,
    classes: list[str],
    min_side: int,
    max_side: int,
    min_per_class: int,
    run_name: str,
    near_similarity: float | None = None,
    images: bool = True,
) -> list[CheckResult]:
    rows = session.run(
        with_derived_columns(frame, near_similarity),
        asset="manifest",
        suite="manifest_rows" if images else "manifest_records",
        checks=_row_checks(
            classes, min_side, max_side, near_similarity is not None, images, GROUP in frame
        ),
        index_columns=["id", ROW],
        run_name=run_name,
    )
    counts, scope = class_counts(frame, classes)
    count_results = session.run(
        counts,
        asset="manifest_class_counts",
        suite="manifest_class_counts",
        checks=_count_checks(classes, min_per_class, scope, counts),
        index_columns=["class"],
        run_name=run_name,
    )
    return rows + count_results


def with_derived_columns(frame: pd.DataFrame, near_similarity: float | None = None) -> pd.DataFrame:
    """The manifest plus `row`, the per-hash counts of distinct splits and labels and, with
    `near_similarity`, the near-duplicate group of each row (`near_group`, -1: none) and its
    count of distinct splits."""
    out = frame.copy()
    out[ROW] = range(len(out))
    hashed = out[(out["sha256"] != "") & (out["decode_error"] == "")]
    splits = hashed["split"].where(hashed["split"] != "")
    n_splits = splits.groupby(hashed["sha256"]).nunique()
    n_labels = hashed["label"].groupby(hashed["sha256"]).nunique()
    key = out["sha256"].where((out["sha256"] != "") & (out["decode_error"] == ""))
    out["n_splits_for_hash"] = key.map(n_splits).fillna(0).astype("int64")
    out["n_labels_for_hash"] = key.map(n_labels).fillna(0).astype("int64")
    if near_similarity is not None:
        out["near_group"], out["n_splits_for_near_group"] = _near_groups(out, near_similarity)
    if GROUP in out.columns:
        patient = out[GROUP].astype(str).where(out[GROUP].astype(str) != "")
        spans = out["split"].where(out["split"] != "").groupby(patient).nunique()
        out["n_splits_for_group"] = patient.map(spans).fillna(0).astype("int64")
    return out


def _near_groups(frame: pd.DataFrame, near_similarity: float) -> tuple[pd.Series, pd.Series]:
    """Near-duplicate group per decoded row with a thumbnail (-1 otherwise) and the number of
    distinct non-empty splits its group spans."""
    from components.data.splits import near_duplicate_labels

    usable = (frame["decode_error"] == "") & (frame["thumbnail"].astype(str) != "")
    group = pd.Series(-1, index=frame.index, dtype="int64")
    if usable.any():
        group[usable] = near_duplicate_labels(frame[usable], near_similarity).to_numpy()
    splits = frame["split"].where((frame["split"] != "") & usable)
    spans = splits.groupby(group).nunique()
    n_splits = group.map(spans).where(group >= 0, 0).fillna(0).astype("int64")
    return group, n_splits


def class_counts(frame: pd.DataFrame, classes: list[str]) -> tuple[pd.DataFrame, str]:
    """Images per declared class: in the train split once splits exist, else overall."""
    assigned = (frame["split"] != "").any()
    scope = "train split" if assigned else "whole manifest"
    rows = frame[frame["split"] == "train"] if assigned else frame
    labels = rows["label"][rows["label"].isin(classes)].astype(str)
    counts = labels.value_counts()
    table = pd.DataFrame(
        {
            "class": pd.array([str(c) for c in counts.index], dtype="string"),
            "count": counts.to_numpy().astype("int64"),
        }
    )
    return table, scope


def _schema_checks(frame: pd.DataFrame) -> list[Check]:
    e = gx_engine.expectations()
    extra = extra_columns(frame)  # `group` and `clin__*` of a clinical table
    checks = [
        Check(
            "columns_match_manifest",
            e.ExpectTableColumnsToMatchSet(column_set=[*COLUMNS, *extra], exact_match=True),
            scope="table",
            explanation=f"expected exactly {list(COLUMNS)} (plus group and clin__ columns)",
        )
    ]
    for column, dtype in {**COLUMNS, **({GROUP: "string"} if GROUP in extra else {})}.items():
        if column not in frame.columns:
            continue
        types = INT_TYPES if dtype == "int64" else STR_TYPES
        checks.append(
            Check(
                f"type_of_{column}",
                e.ExpectColumnValuesToBeInTypeList(column=column, type_list=types),
                scope="table",
                explanation="integers" if dtype == "int64" else "strings",
            )
        )
    return checks


def _row_checks(
    classes: list[str],
    min_side: int,
    max_side: int,
    near: bool,
    images: bool = True,
    patients: bool = False,
) -> list[Check]:
    e = gx_engine.expectations()
    decoded = {"row_condition": DECODED, "condition_parser": "pandas"}
    near_checks = [
        Check(
            "near_duplicates_in_one_split",
            e.ExpectColumnValuesToBeBetween(column="n_splits_for_near_group", max_value=1),
            explanation="near-duplicate images (thumbnail similarity) must not straddle splits",
        )
    ]
    patient_checks = [
        Check(
            "patient_in_one_split",
            e.ExpectColumnValuesToBeBetween(column="n_splits_for_group", max_value=1),
            explanation="the rows of one patient (group) must not straddle splits",
        )
    ]
    if not images:
        return [
            *_label_checks(classes),
            Check(
                "record_in_one_split",
                e.ExpectColumnValuesToBeBetween(column="n_splits_for_hash", max_value=1),
                explanation="identical records (sha256) must not appear in two splits",
            ),
            *(patient_checks if patients else []),
        ]
    return [
        *_label_checks(classes),
        Check(
            "images_decodable",
            e.ExpectColumnValuesToBeInSet(column="decode_error", value_set=[""]),
        ),
        Check(
            "width_in_range",
            e.ExpectColumnValuesToBeBetween(
                column="width", min_value=min_side, max_value=max_side, **decoded
            ),
        ),
        Check(
            "height_in_range",
            e.ExpectColumnValuesToBeBetween(
                column="height", min_value=min_side, max_value=max_side, **decoded
            ),
        ),
        Check(
            "channels_allowed",
            e.ExpectColumnValuesToBeInSet(column="channels", value_set=list(CHANNELS), **decoded),
        ),
        Check(
            "image_in_one_split",
            e.ExpectColumnValuesToBeBetween(column="n_splits_for_hash", max_value=1),
            explanation="the same image (sha256) must not appear in two splits",
        ),
        Check(
            "image_has_one_label",
            e.ExpectColumnValuesToBeBetween(column="n_labels_for_hash", max_value=1),
            explanation="the same image (sha256) must not carry two labels",
        ),
        *(near_checks if near else []),
        *(patient_checks if patients else []),
    ]


def _label_checks(classes: list[str]) -> list[Check]:
    e = gx_engine.expectations()
    return [
        Check(
            "split_values_known",
            e.ExpectColumnValuesToBeInSet(column="split", value_set=SPLIT_VALUES),
            explanation=f"split must be one of {SPLIT_VALUES}",
        ),
        Check(
            "labels_in_classes",
            e.ExpectColumnValuesToBeInSet(column="label", value_set=list(classes)),
        ),
        Check("ids_unique", e.ExpectColumnValuesToBeUnique(column="id")),
    ]


def _count_checks(
    classes: list[str], min_per_class: int, scope: str, counts: pd.DataFrame
) -> list[Check]:
    e = gx_engine.expectations()
    missing = sorted(set(map(str, classes)) - set(counts["class"].astype(str)))
    return [
        Check(
            "class_min_count",
            e.ExpectColumnValuesToBeBetween(column="count", min_value=min_per_class),
            scope="table",
            explanation=f"at least {min_per_class} images per class in the {scope}",
        ),
        Check(
            "classes_present",
            e.ExpectColumnDistinctValuesToContainSet(
                column="class", value_set=[str(c) for c in classes]
            ),
            scope="table",
            explanation=(
                f"every declared class must occur in the {scope}"
                + (f"; missing: {missing}" if missing else "")
            ),
        ),
    ]


def _normalise_string_dtypes(frame: pd.DataFrame) -> pd.DataFrame:
    """Give every pandas string column one dtype ("string"): pandas 3 has two flavours.

    Only the representation changes; object columns are left for the type checks to judge.
    """
    out = frame.copy()
    for column in out.columns:
        if isinstance(out[column].dtype, pd.StringDtype):
            out[column] = out[column].astype("string")
    return out


def _describer(frame: pd.DataFrame):
    """Offender description: id and the source file's base name (never its full path); with
    a patient column only the id (a clinical table's file names may hold patient ids)."""
    named = "source" in frame.columns and GROUP not in frame.columns
    sources = frame["source"].astype(str).tolist() if named else []

    def describe(row: dict) -> dict:
        if "class" in row:
            return {"class": row["class"]}
        out: dict = {"id": row.get("id")}
        position = row.get(ROW)
        if position is not None and sources:
            out["file"] = source_name(sources[int(position)])
        return out

    return describe


def source_name(source: str) -> str:
    """`dir/a.png` → `a.png`; `dir/x.npz::images/3` → `x.npz::images/3`."""
    path, sep, member = source.partition("::")
    return Path(path).name + sep + member


def _explain(frame: pd.DataFrame, near_similarity: float | None = None):
    """Per-check text added to a quarantined row's reason (hash groups get their detail)."""
    derived = with_derived_columns(frame, near_similarity)

    def explain(check: CheckResult, position: int, value) -> str:
        row = derived.iloc[position]
        if check.name == "image_in_one_split":
            group = derived[derived["sha256"] == row["sha256"]]
            splits = sorted(s for s in group["split"].unique() if s)
            return (
                f"image_in_one_split (same image in splits {splits}; "
                f"all {len(group)} rows of this sha256 group quarantined)"
            )
        if check.name == "image_has_one_label":
            group = derived[derived["sha256"] == row["sha256"]]
            labels = sorted(group["label"].unique())
            return (
                f"image_has_one_label (same image labelled {labels}; "
                f"all {len(group)} rows of this sha256 group quarantined)"
            )
        if check.name in ("patient_in_one_split", "record_in_one_split"):
            return f"{check.name} (all rows of the patient or record quarantined)"
        if check.name == "near_duplicates_in_one_split":
            group = derived[derived["near_group"] == row["near_group"]]
            splits = sorted(s for s in group["split"].unique() if s)
            return (
                f"near_duplicates_in_one_split (near-duplicate group in splits {splits}; "
                f"all {len(group)} rows of the group quarantined)"
            )
        if check.column:
            return f"{check.name} ({check.column}={value!r})"
        return check.name

    return explain
