"""Steps shared by the manifest and clinical suites: quarantine reasons and artifacts."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from components.workspace import Workspace
from validation.gx_engine import GxSession
from validation.outcome import CheckResult, write_artifacts

logger = logging.getLogger(__name__)


def row_reasons(
    checks: list[CheckResult],
    row_key: str,
    explain: Callable[[CheckResult, int, object], str],
) -> dict[int, str]:
    """Row number → "; "-joined reasons, for every row a failed row-level check names."""
    reasons: dict[int, list[str]] = {}
    for check in checks:
        if check.success or check.scope != "row":
            continue
        for row in check.unexpected_rows:
            if row.get(row_key) is None:
                continue
            position = int(row[row_key])
            reasons.setdefault(position, []).append(explain(check, position, row.get("value")))
    return {position: "; ".join(texts) for position, texts in reasons.items()}


def finish(
    report: dict,
    quarantined: pd.DataFrame,
    session: GxSession,
    workspace: Workspace | None,
    stem: str,
    stamp: str,
) -> Path | None:
    """Build Data Docs and write the report and quarantined rows into the workspace, if any."""
    if workspace is None:
        return None
    docs = None
    try:
        docs = session.build_docs()
    except Exception as exc:  # a rendering problem must not hide the validation verdict
        logger.warning("could not build GX Data Docs: %s", exc)
    report["files"] = {"data_docs": str(docs)} if docs else {}
    write_artifacts(
        report,
        quarantined,
        reports_dir=workspace.reports,
        quarantine_dir=workspace.quarantine,
        stem=stem,
        stamp=stamp,
    )
    return docs
