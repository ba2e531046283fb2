"""The clinical-table expectation suite: columns, types, ranges, categories, missing values.

Two GX batches are validated: the table as given (every schema column exists) and the table
plus derived columns computed with the schema's own parsers (`validation.clinical_schema`),
so the table suite and the single-record check used by the HTTP service agree:

* ``<f>__wrong_type`` holds the raw value where it cannot be read as the feature's type
  (expected null everywhere);
* ``<f>__value`` holds the parsed value, checked against ``min``/``max`` or ``allowed``.

With `leakage` settings a third batch, one row per feature (`validation.leakage`), holds each
feature's label-leakage score, expected at most `max_score`: a feature above it stops the
run, or with `on_leakage="drop"` is removed from the schema (`features_dropped` in the
report; the value checks and the typed table then cover the kept features only).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping

import pandas as pd

from components.data.manifest import CLINICAL_PREFIX
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
from validation.leakage import (
    ON_LEAKAGE,
    LeakageSettings,
    development_rows,
    leakage_frame,
    leakage_scores,
)
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
    leakage: LeakageSettings | None = None,
) -> ValidationOutcome:
    """Validate a clinical table against its feature schema with Great Expectations.

    Offending rows are named by `id_column` when the table has it, else by the table index.
    Required features may not be missing; an optional feature may miss at most its
    ``max_missing_fraction`` (per feature: the mapping argument, then the schema entry, then
    the float argument). `validated` holds the kept rows with typed feature values (float,
    nullable Int64, boolean, category values) and the table's own index.
    Stop/quarantine semantics are those of `validate_manifest`. With `leakage`, the table
    also holds the label (and split) column it names, and each feature's leakage score is
    checked (see the module text); `features` of the outcome are the features kept.
    """
    if on_failure not in ON_FAILURE:
        raise ConfigError(f"on_failure must be one of {ON_FAILURE}, got {on_failure!r}")
    if leakage is not None and leakage.on_leakage not in ON_LEAKAGE:
        raise ConfigError(f"on_leakage must be one of {ON_LEAKAGE}, got {leakage.on_leakage!r}")
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

    leaks, leaks_after = [], []
    if leakage is not None:
        features, leaks, leaks_after = _check_leakage(session, table, features, leakage, report)
        if not all(c.success for c in leaks) and not leaks_after:
            report.update(section(presence + leaks, describe, len(frame)))
            report["skipped"] = "value checks skipped: a feature gives the label away"
            finish(report, pd.DataFrame(), session, workspace, "clinical-validation", stamp)
            raise ValidationFailed(summarise(report), report)
    values = _run_values(session, frame, features, limits, key, f"{stamp}-initial")
    checks = presence + leaks + values
    report.update(section(checks, describe, len(frame)))
    kept = frame
    quarantined = table.iloc[0:0].assign(reason=pd.Series(dtype="string"))
    after = presence + leaks_after + values if leaks_after else None
    if not all(c.success for c in values) and on_failure == "quarantine":
        reasons = row_reasons(values, ROW, _explain(frame))
        if reasons:
            positions = sorted(reasons)
            quarantined = table.iloc[positions].assign(reason=[reasons[p] for p in positions])
            quarantined = quarantined.astype({"reason": "string"})
            kept = frame[~frame[ROW].isin(positions)]
        values = _run_values(session, kept, features, limits, key, f"{stamp}-after")
        after = presence + (leaks_after or leaks) + values
    if after is not None:  # rows quarantined or leaking features dropped
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
        features=[f.name for f in features],
    )


def _check_leakage(
    session: gx_engine.GxSession,
    table: pd.DataFrame,
    features: list[ClinicalFeature],
    settings: LeakageSettings,
    report: dict,
) -> tuple[list[ClinicalFeature], list[CheckResult], list[CheckResult]]:
    """Score every feature for label leakage and check the scores with GX; returns (features
    kept, the check's results, its results after dropping leaking features — empty unless
    `on_leakage="drop"` dropped some)."""
    if settings.label_column not in table.columns:
        raise ConfigError(f"the leakage check needs the label column {settings.label_column!r}")
    rows = development_rows(table, settings)
    names = [f.name for f in features]
    scores = leakage_scores(rows[names], rows[settings.label_column], features, settings.dangerous)
    leaking = {s.feature: s for s in scores if s.score > settings.max_score}
    report["leakage"] = {
        "max_score": settings.max_score,
        "on_leakage": settings.on_leakage,
        "rows_scored": len(rows),
        "rows_held_out": len(table) - len(rows),
        "scores": [s.to_dict() for s in sorted(scores, key=lambda s: -s.score)],
        "warnings": _missingness_warnings(scores, settings.max_score),
    }
    for warning in report["leakage"]["warnings"]:
        logger.warning("clinical table: %s", warning)
    reasons = "; ".join(f"{s.feature} (score {s.score:.4f}): {s.reason}" for s in leaking.values())
    check = Check(
        "no_label_leakage",
        gx_engine.expectations().ExpectColumnValuesToBeBetween(
            column="leakage_score", max_value=settings.max_score
        ),
        scope="feature",
        explanation=(
            f"no feature may give the label away on its own (leakage score at most "
            f"{settings.max_score})" + (f": {reasons}" if reasons else "")
        ),
    )

    def run(part: list, name: str) -> list[CheckResult]:
        return session.run(
            leakage_frame(part),
            asset="clinical_leakage",
            suite="clinical_leakage",
            checks=[check],
            index_columns=["feature"],
            run_name=name,
        )

    stamp = timestamp()
    results = run(scores, f"{stamp}-leakage")
    if not leaking or settings.on_leakage == "stop":
        return features, results, []
    kept = [f for f in features if f.name not in leaking]
    if not kept:
        return features, results, []  # nothing left to drop to: stop
    report["features_dropped"] = [
        {"feature": s.feature, "score": round(s.score, 4), "reason": s.reason}
        for s in leaking.values()
    ]
    logger.warning("dropped leaking clinical features: %s", ", ".join(leaking))
    after = run([s for s in scores if s.feature not in leaking], f"{stamp}-leakage-after-drop")
    return kept, results, after


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
        if "feature" in row:  # the leakage check: one row per feature
            return {"feature": row["feature"]}
        return {key: row.get(key)}

    return describe


def _explain(frame: pd.DataFrame):
    def explain(check: CheckResult, position: int, value) -> str:
        column = check.column or ""
        if check.name.startswith("required_"):
            return f"{check.name} ({column} missing)"
        return f"{check.name} ({column}={value!r})"

    return explain


def _missingness_warnings(scores: list, max_score: float) -> list[str]:
    """One warning per pattern of missing values tied to the label (features missing
    together, as in a collection that did not record them, share one)."""
    by_reason: dict[str, list] = {}
    for s in scores:
        if s.missingness > max_score:
            by_reason.setdefault(s.missingness_reason, []).append(s)
    return [
        f"whether {', '.join(s.feature for s in group)} "
        f"{'is' if len(group) == 1 else 'are'} missing is tied to the label (score "
        f"{group[0].missingness:.3f}): {reason}; a model may learn how the data were collected"
        for reason, group in by_reason.items()
    ]


def validate_clinical_manifest(
    manifest: pd.DataFrame,
    features: list[Mapping],
    *,
    dangerous: Iterable[str] = (),
    max_score: float = 0.95,
    on_leakage: str = "stop",
    on_failure: str = "stop",
    workspace: Workspace | None = None,
) -> ValidationOutcome:
    """The clinical suite on a split manifest's `clin__<feature>` columns, with the leakage
    check scored on its development rows (not test or calibration). `validated` is the
    manifest's kept rows with typed values (None = missing) and without the columns of
    dropped features; `features` names the features kept."""
    names = [str(f["name"]) for f in features]
    columns = {f"{CLINICAL_PREFIX}{n}": n for n in names}
    absent = sorted(set(columns) - set(manifest.columns))
    if absent:
        raise ConfigError(f"the manifest has no clinical columns {absent}; ingest it again")
    table = manifest[["id", "label", "split", *columns]].rename(columns=columns)
    settings = LeakageSettings(max_score, on_leakage, tuple(dangerous))
    outcome = validate_clinical(
        table.reset_index(drop=True),
        features,
        on_failure=on_failure,
        workspace=workspace,
        leakage=settings,
    )
    typed = outcome.validated.set_index("id")
    rows = manifest[manifest["id"].isin(typed.index)].copy()
    for column, name in columns.items():
        if name in (outcome.features or []):
            values = typed[name].reindex(rows["id"]).astype(object)
            rows[column] = values.where(values.notna(), None).to_numpy()
        else:
            rows = rows.drop(columns=column)
    return dataclasses.replace(outcome, validated=rows.reset_index(drop=True))
