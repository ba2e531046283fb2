"""A thin layer over Great Expectations 1.x: run named expectations on a pandas frame.

Great Expectations is imported lazily (it takes seconds) and only once per process. Each
`GxSession` uses its own ephemeral (in-memory) data context, which costs milliseconds; when a
workspace is given, validation results are kept as JSON under ``<workspace>/reports/gx`` and
Data Docs are built into ``<workspace>/data_docs``, so the docs show every run in that
workspace. Nothing is written to the repository or the current directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pandas as pd

from validation.outcome import CheckResult

_GX: ModuleType | None = None
DOCS_SITE = "oncoflow"


def gx() -> ModuleType:
    """The `great_expectations` module, imported on first use with analytics switched off."""
    global _GX
    if _GX is None:
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
        import great_expectations

        _GX = great_expectations
    return _GX


def expectations() -> ModuleType:
    return gx().expectations


@dataclass
class Check:
    """A named GX expectation; `scope` "row" means failing rows can be quarantined."""

    name: str
    expectation: Any
    scope: str = "row"
    explanation: str = ""
    column: str | None = None  # the column to name in reports, if not the checked one


class GxSession:
    """One ephemeral GX context for one validation call (several suites, one docs build)."""

    def __init__(self, results_dir: Path | None = None, docs_dir: Path | None = None) -> None:
        from great_expectations.data_context.types.base import (
            DataContextConfig,
            InMemoryStoreBackendDefaults,
            ProgressBarsConfig,
        )

        gx()
        config = DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
            progress_bars=ProgressBarsConfig(globally=False),
            analytics_enabled=False,
        )
        if results_dir is not None:
            results_dir.mkdir(parents=True, exist_ok=True)
            config.stores["validation_results_store"] = {
                "class_name": "ValidationResultsStore",
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(results_dir),
                },
            }
        self.docs_dir = docs_dir
        if docs_dir is not None:
            config.data_docs_sites = {
                DOCS_SITE: {
                    "class_name": "SiteBuilder",
                    "show_how_to_buttons": False,
                    "store_backend": {
                        "class_name": "TupleFilesystemStoreBackend",
                        "base_directory": str(docs_dir),
                    },
                    "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                }
            }
        self.context = gx().get_context(project_config=config)
        self._source = self.context.data_sources.add_pandas("oncoflow")
        self._definitions: dict[str, Any] = {}
        self._assets: dict[str, Any] = {}
        self._run_names: set[str] = set()

    def run(
        self,
        frame: pd.DataFrame,
        *,
        asset: str,
        suite: str,
        checks: list[Check],
        index_columns: list[str],
        run_name: str,
    ) -> list[CheckResult]:
        """Validate `frame` against `checks` as suite `suite`; return one result per check."""
        from great_expectations.core.run_identifier import RunIdentifier

        definition = self._definition(asset, suite, checks)
        result = definition.run(
            batch_parameters={"dataframe": frame},
            result_format={
                "result_format": "COMPLETE",
                "unexpected_index_column_names": index_columns,
                "return_unexpected_index_query": False,
            },
            run_id=RunIdentifier(run_name=run_name),
        )
        self._run_names.add(run_name)
        by_name = {c.name: c for c in checks}
        return [_check_result(r, by_name, index_columns) for r in result.results]

    def build_docs(self) -> Path | None:
        """Build Data Docs for the results of this session; return the index.html path."""
        if self.docs_dir is None:
            return None
        from great_expectations.data_context.types.resource_identifiers import (
            ExpectationSuiteIdentifier,
        )

        store = self.context.validation_results_store
        fresh = [k for k in store.list_keys() if k.run_id.run_name in self._run_names]
        suites = [ExpectationSuiteIdentifier(name=d.suite.name) for d in self._definitions.values()]
        self.context.build_data_docs(site_names=[DOCS_SITE], resource_identifiers=fresh + suites)
        index = self.docs_dir / "index.html"
        return index if index.exists() else None

    def _definition(self, asset: str, suite: str, checks: list[Check]):
        key = f"{asset}/{suite}"
        if key in self._definitions:  # a re-validation with the same checks
            return self._definitions[key]
        if asset not in self._assets:
            self._assets[asset] = self._source.add_dataframe_asset(asset)
        batch = self._assets[asset].add_batch_definition_whole_dataframe(suite)
        expectation_suite = self.context.suites.add(
            gx().ExpectationSuite(name=suite, expectations=[_tagged(c) for c in checks])
        )
        definition = self.context.validation_definitions.add(
            gx().ValidationDefinition(name=key, data=batch, suite=expectation_suite)
        )
        self._definitions[key] = definition
        return definition


def _tagged(check: Check):
    expectation = check.expectation
    expectation.meta = {**(expectation.meta or {}), "check": check.name, "scope": check.scope}
    return expectation


def _check_result(result, by_name: dict[str, Check], index_columns: list[str]) -> CheckResult:
    config = result.expectation_config
    name = (config.meta or {}).get("check", config.type)
    check = by_name.get(name)
    body = result.result or {}
    error = _exception_message(result.exception_info)
    rows: list[dict] = []
    index_list = body.get("unexpected_index_list") or []
    values = body.get("unexpected_list") or []
    for position, index in enumerate(index_list):
        row = {c: index.get(c) for c in index_columns if c in index}
        if position < len(values):
            row["value"] = values[position]
        rows.append(row)
    details = None
    if "element_count" not in body:  # aggregate expectations report extra keys, not rows
        extra = {k: v for k, v in body.items() if k != "observed_value"}
        details = extra.get("details", extra) or None
    count = body.get("unexpected_count")
    if count is None:
        count = len(rows)
    return CheckResult(
        name=name,
        expectation=config.type,
        scope=check.scope if check else "table",
        success=bool(result.success),
        column=(check.column if check and check.column else None) or config.kwargs.get("column"),
        unexpected_count=int(count),
        unexpected_rows=rows,
        observed_value=body.get("observed_value"),
        details=details,
        error=error,
        explanation=check.explanation if check else "",
    )


def _exception_message(info: Any) -> str | None:
    if not isinstance(info, dict):
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message") or "raised an exception")
    for value in info.values():  # multi-metric form: {metric_id: {...}}
        if isinstance(value, dict) and value.get("raised_exception"):
            return str(value.get("exception_message") or "raised an exception")
    return None
