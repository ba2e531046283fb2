"""What a validation run returns: kept rows, quarantined rows, a JSON-safe report, a summary."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

logger = logging.getLogger(__name__)

MAX_OFFENDERS = 20
SUMMARY_OFFENDERS = 3


@dataclass
class CheckResult:
    """The outcome of one named expectation, reduced to what reports and quarantine need."""

    name: str
    expectation: str
    scope: str  # "row": failures belong to rows and can be quarantined; "table": they cannot
    success: bool
    column: str | None = None
    unexpected_count: int = 0
    unexpected_rows: list[dict] = field(default_factory=list)  # index columns + offending value
    observed_value: Any = None
    details: dict | None = None
    error: str | None = None
    explanation: str = ""

    def offending_keys(self, key: str) -> list:
        return [row[key] for row in self.unexpected_rows if key in row]


@dataclass
class ValidationOutcome:
    """Rows kept, rows quarantined (with a `reason` column), the report and the Data Docs path.

    `passed` is True when the input met every expectation as given; after quarantining it is
    False, while `validated` holds only rows that meet every expectation.
    """

    passed: bool
    validated: pd.DataFrame
    quarantined: pd.DataFrame
    report: dict
    data_docs: Path | None = None
    # the clinical suite: the features kept (leaking ones dropped with on_leakage=drop)
    features: list[str] | None = None

    def summary(self) -> str:
        return summarise(self.report)


def check_entry(check: CheckResult, describe_row) -> dict:
    """The JSON-safe report entry of one check; `describe_row` turns an index dict into an
    offender dict (ids, file names) without the offending value."""
    entry: dict[str, Any] = {
        "expectation": check.expectation,
        "scope": check.scope,
        "success": bool(check.success),
        "unexpected_count": int(check.unexpected_count),
    }
    if check.column:
        entry["column"] = check.column
    if check.explanation:
        entry["explanation"] = check.explanation
    if check.unexpected_rows:
        offenders = []
        for row in check.unexpected_rows[:MAX_OFFENDERS]:
            offender = describe_row(row)
            if "value" in row:
                offender["value"] = row["value"]
            offenders.append(jsonable(offender))
        entry["offenders"] = offenders
    if check.observed_value is not None:
        entry["observed_value"] = jsonable(check.observed_value)
    if check.details:
        entry["details"] = jsonable(check.details)
    if check.error:
        entry["error"] = check.error
    return entry


def section(checks: list[CheckResult], describe_row, rows: int) -> dict:
    """Report section for one validation pass."""
    return {
        "passed": all(c.success for c in checks),
        "rows": int(rows),
        "failed": [c.name for c in checks if not c.success],
        "expectations": {c.name: check_entry(c, describe_row) for c in checks},
    }


def summarise(report: dict) -> str:
    """Readable multi-line text: which expectations failed, how many rows, first offenders."""
    suite = report.get("suite", "data")
    lines = []
    first = report
    verdict = "passed" if first.get("passed") else "FAILED"
    failed = first.get("failed", [])
    total = len(first.get("expectations", {}))
    head = f"{suite} validation {verdict}: {total - len(failed)}/{total} expectations met"
    lines.append(f"{head} on {first.get('rows', 0)} rows")
    lines.extend(_failure_lines(first))
    for dropped in report.get("features_dropped", []):
        lines.append(f"dropped feature {dropped['feature']}: {dropped['reason']}")
    for warning in (report.get("leakage") or {}).get("warnings", []):
        lines.append(f"warning: {warning}")
    if report.get("rows_quarantined"):
        lines.append(
            f"quarantined {report['rows_quarantined']} rows; "
            f"{report.get('rows_validated', 0)} rows kept"
        )
    after = report.get("after_quarantine")
    if after is not None:
        if after.get("passed"):
            what = "quarantine" if report.get("rows_quarantined") else ""
            if report.get("features_dropped"):
                what = f"{what} and dropping features" if what else "dropping features"
            lines.append(f"after {what or 'quarantine'}: every expectation met")
        else:
            lines.append("after quarantine still failing (cannot be fixed by dropping rows):")
            lines.extend(_failure_lines(after))
    files = report.get("files") or {}
    for label, path in files.items():
        lines.append(f"{label}: {path}")
    return "\n".join(lines)


def _failure_lines(part: dict) -> list[str]:
    lines = []
    for name in part.get("failed", []):
        entry = part["expectations"][name]
        where = f" [{entry['column']}]" if entry.get("column") else ""
        if entry.get("error"):
            lines.append(f"  - {name}{where}: could not be evaluated: {entry['error']}")
            continue
        if entry.get("scope") == "row" or entry.get("offenders"):
            count = entry.get("unexpected_count", 0)
            first = (entry.get("offenders") or [{}])[0]
            noun = next((k for k in ("class", "feature") if k in first), "row")
            plural = ("es" if noun == "class" else "s") if count != 1 else ""
            text = f"  - {name}{where}: {count} offending {noun}{plural}"
            examples = [_offender_text(o) for o in entry.get("offenders", [])[:SUMMARY_OFFENDERS]]
            if examples:
                more = ", …" if count > len(examples) else ""
                text += ", e.g. " + ", ".join(examples) + more
        elif entry.get("details"):
            text = f"  - {name}{where}: {json.dumps(entry['details'], default=str)}"
        elif entry.get("observed_value") is not None:
            text = f"  - {name}{where}: observed {entry['observed_value']!r}"
        else:
            text = f"  - {name}{where}: failed"
        if entry.get("explanation"):
            text += f" ({entry['explanation']})"
        lines.append(text)
    return lines


def _offender_text(offender: dict) -> str:
    keys = [f"{k}={offender[k]}" for k in offender if k != "value"]
    value = f" value={offender['value']!r}" if "value" in offender else ""
    return "(" + " ".join(keys) + value + ")"


def timestamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")


def write_artifacts(
    report: dict,
    quarantined: pd.DataFrame,
    *,
    reports_dir: Path,
    quarantine_dir: Path,
    stem: str,
    stamp: str,
) -> dict:
    """Write the quarantined rows (CSV, if any) and the report (JSON); return their paths."""
    files: dict[str, str] = {}
    if len(quarantined):
        quarantine_dir.mkdir(parents=True, exist_ok=True)
        path = quarantine_dir / f"{stamp}.csv"
        quarantined.to_csv(path, index=False)
        files["quarantine"] = str(path)
    reports_dir.mkdir(parents=True, exist_ok=True)
    report_path = reports_dir / f"{stem}-{stamp}.json"
    files["report"] = str(report_path)
    report.setdefault("files", {}).update(files)
    report_path.write_text(json.dumps(jsonable(report), indent=2))
    logger.info("validation report written to %s", report_path)
    return files


def jsonable(value: Any) -> Any:
    """Convert numpy/pandas scalars and containers into plain JSON types."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, bool | str) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if hasattr(value, "item"):  # numpy scalar
        return jsonable(value.item())
    if pd.isna(value) if not hasattr(value, "__len__") else False:
        return None
    return str(value)
