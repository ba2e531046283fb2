"""The clinical-table expectation suite: columns, types, ranges, categories, missing values.

Two GX batches are validated: the table as given (every schema column exists) and the table
plus derived columns computed with the schema's own parsers (`validation.clinical_schema`),
so the table suite and the single-record check used by the HTTP service agree:

* ``<f>__wrong_type`` holds the raw value where it cannot be read as the feature's type
  (expected null everywhere);
* ``<f>__value`` holds the parsed value, checked against ``min``/``max`` or ``allowed``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import pandas as pd

from components.errors import ConfigError, ValidationFailed
from components.workspace import Workspace
from validation import gx_engine
from validation.clinical_schema import (
    ClinicalFeature,
    is_missing,
    parse_schema,
    parse_value,
)
from validation.gx_engine import Check
from validation.outcome import CheckResult, ValidationOutcome, section, summarise, timestamp
from validation.runner import finish, row_reasons

logger = logging.getLogger(__name__)

ROW = "_row"
ON_FAILURE = ("stop", "quarantine")


def validate_clinical(
    table: pd.DataFrame,
    schema: Iterable[Mapping | ClinicalFeature],
    *,
    on_failure: str = "stop",
    max_missing_fraction: float | Mapping[str, float] = 0.0,
    id_column: str = "id",
    workspace: Workspace | None = None,
) -> ValidationOutcome:
    """Validate a clinical table against its feature schema with Great Expectations.

    Offending rows are named by `id_column` when the table has it, else by the table index.
    Required features may not be missing; an optional feature may miss at most its
    ``max_missing_fraction`` (per feature: the mapping argument, then the schema entry, then
    the float argument). `validated` holds the kept rows with typed feature values (float,
    nullable Int64, boolean, category values) and the table's own index.
    Stop/quarantine semantics are those of `validate_manifest`.
    """
    if on_failure not in ON_FAILURE:
        raise ConfigError(f"on_failure must be one of {ON_FAILURE}, got {on_failure!r}")
    features = parse_schema(schema)
    limits = _missing_limits(features, max_missing_fraction)
    stamp = timestamp()
    session = gx_engine.GxSession(
        results_dir=workspace.reports / "gx" if workspace else None,
        docs_dir=workspace.data_docs if workspace else None,
    )
    key = id_column if id_column in table.columns else "index"
    frame = _keyed(table, key)
    describe = _describer(key)
    report: dict = {
        "suite": "clinical",
        "on_failure": on_failure,
        "features": [f.as_dict() for f in features],
        "row_key": key,
    }
    e = gx_engine.expectations()
    presence = session.run(
        frame,
        asset="clinical",
        suite="clinical_columns",
        checks=[
            Check(f"column_{f.name}_exists", e.ExpectColumnToExist(column=f.name), scope="table")
            for f in features
        ],
        index_columns=[],
        run_name=f"{stamp}-columns",
    )
    if not all(c.success for c in presence):
        report.update(section(presence, describe, len(frame)))
        report["skipped"] = "value checks skipped: schema columns are missing from the table"
        finish(report, pd.DataFrame(), session, workspace, "clinical-validation", stamp)
        raise ValidationFailed(summarise(report), report)

    checks = presence + _run_values(session, frame, features, limits, key, f"{stamp}-initial")
    report.update(section(checks, describe, len(frame)))
    kept = frame
    quarantined = table.iloc[0:0].assign(reason=pd.Series(dtype="string"))
    if not report["passed"] and on_failure == "quarantine":
        reasons = row_reasons(checks, ROW, _explain(frame))
        if reasons:
            positions = sorted(reasons)
            quarantined = table.iloc[positions].assign(reason=[reasons[p] for p in positions])
            quarantined = quarantined.astype({"reason": "string"})
            kept = frame[~frame[ROW].isin(positions)]
        after = presence + _run_values(session, kept, features, limits, key, f"{stamp}-after")
        report["after_quarantine"] = section(after, describe, len(kept))
    report["rows_quarantined"] = len(quarantined)
    report["rows_validated"] = len(kept)
    docs = finish(report, quarantined, session, workspace, "clinical-validation", stamp)
    if not report.get("after_quarantine", report)["passed"]:
        raise ValidationFailed(summarise(report), report)
    logger.info(
        "clinical table validated: %d rows kept, %d quarantined", len(kept), len(quarantined)
    )
    validated = typed_table(table.iloc[kept[ROW].to_numpy()], features)
    return ValidationOutcome(
        passed=bool(report["passed"]),
        validated=validated,
        quarantined=quarantined,
        report=report,
        data_docs=docs,
    )


def typed_table(table: pd.DataFrame, features: list[ClinicalFeature]) -> pd.DataFrame:
    """`table` with every feature column converted to its schema type (missing → NA)."""
    out = table.copy()
    dtypes = {"float": "float64", "int": "Int64", "bool": "boolean", "category": "object"}
    for feature in features:
        values = [None if is_missing(v) else parse_value(feature, v) for v in out[feature.name]]
        out[feature.name] = pd.Series(values, index=out.index, dtype=dtypes[feature.type])
    return out


def with_derived_columns(frame: pd.DataFrame, features: list[ClinicalFeature]) -> pd.DataFrame:
    """Add `<f>__wrong_type` (raw value if unparseable) and `<f>__value` (parsed value)."""
    derived: dict[str, pd.Series] = {}
    for feature in features:
        wrong, parsed = [], []
        for raw in frame[feature.name]:
            if is_missing(raw):
                wrong.append(None)
                parsed.append(None)
                continue
            try:
                parsed.append(parse_value(feature, raw))
                wrong.append(None)
            except ValueError:
                parsed.append(None)
                wrong.append(raw)
        dtype = "float64" if feature.numeric else "object"
        derived[f"{feature.name}__wrong_type"] = pd.Series(wrong, index=frame.index, dtype=object)
        derived[f"{feature.name}__value"] = pd.Series(parsed, index=frame.index, dtype=dtype)
        blank = frame[feature.name].map(is_missing)
        derived[feature.name] = frame[feature.name].astype(object).where(~blank, None)
    out = frame.drop(columns=[f.name for f in features])
    return pd.concat([out, pd.DataFrame(derived, index=frame.index)], axis=1)


def _run_values(
    session: gx_engine.GxSession,
    frame: pd.DataFrame,
    features: list[ClinicalFeature],
    limits: dict[str, float],
    key: str,
    run_name: str,
) -> list[CheckResult]:
    return session.run(
        with_derived_columns(frame, features),
        asset="clinical",
        suite="clinical_values",
        checks=_value_checks(features, limits),
        index_columns=[key, ROW],
        run_name=run_name,
    )


def _value_checks(features: list[ClinicalFeature], limits: dict[str, float]) -> list[Check]:
    e = gx_engine.expectations()
    checks: list[Check] = []
    for f in features:
        checks.append(
            Check(
                f"type_of_{f.name}",
                e.ExpectColumnValuesToBeNull(column=f"{f.name}__wrong_type"),
                explanation=f"values must read as {f.type}",
                column=f.name,
            )
        )
        if f.numeric and (f.min is not None or f.max is not None):
            checks.append(
                Check(
                    f"range_of_{f.name}",
                    e.ExpectColumnValuesToBeBetween(
                        column=f"{f.name}__value", min_value=f.min, max_value=f.max
                    ),
                    explanation=f"must lie in {f.describe_range()}",
                    column=f.name,
                )
            )
        if f.type == "category":
            checks.append(
                Check(
                    f"allowed_{f.name}",
                    e.ExpectColumnValuesToBeInSet(
                        column=f"{f.name}__value", value_set=list(f.allowed or ())
                    ),
                    explanation=f"must be {f.describe_range()}",
                    column=f.name,
                )
            )
        if f.required:
            checks.append(
                Check(
                    f"required_{f.name}",
                    e.ExpectColumnValuesToNotBeNull(column=f.name),
                    explanation="required: may not be missing",
                )
            )
        elif limits[f.name] < 1.0:
            checks.append(
                Check(
                    f"missing_fraction_{f.name}",
                    e.ExpectColumnValuesToNotBeNull(column=f.name, mostly=1.0 - limits[f.name]),
                    scope="table",
                    explanation=f"at most {limits[f.name]:.0%} of values may be missing",
                )
            )
    return checks


def _missing_limits(
    features: list[ClinicalFeature], limit: float | Mapping[str, float]
) -> dict[str, float]:
    names = {f.name for f in features}
    per_feature = dict(limit) if isinstance(limit, Mapping) else {}
    unknown = sorted(set(per_feature) - names)
    if unknown:
        raise ConfigError(f"max_missing_fraction names unknown features {unknown}")
    default = 0.0 if isinstance(limit, Mapping) else float(limit)
    limits = {}
    for f in features:
        value = per_feature.get(f.name, f.max_missing_fraction)
        value = default if value is None else float(value)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"max_missing_fraction for {f.name!r} must lie in [0, 1]")
        limits[f.name] = value
    return limits


def _keyed(table: pd.DataFrame, key: str) -> pd.DataFrame:
    """The table with a positional `row` column and, without an id column, an `index` column."""
    frame = table.copy()
    if key == "index":
        frame.insert(0, "index", list(table.index))
    frame[ROW] = range(len(frame))
    return frame.reset_index(drop=True)


def _describer(key: str):
    def describe(row: dict) -> dict:
        return {key: row.get(key)}

    return describe


def _explain(frame: pd.DataFrame):
    def explain(check: CheckResult, position: int, value) -> str:
        column = check.column or ""
        if check.name.startswith("required_"):
            return f"{check.name} ({column} missing)"
        return f"{check.name} ({column}={value!r})"

    return explain
