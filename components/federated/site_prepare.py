"""A hospital prepares its own site from its own folder (`oncoflow site prepare`).

The same ingest, split and Great Expectations validation as the pipeline, run against the
hospital's folder with the hospital's own workspace inside the site directory, then the site
partition the ClientApp reads and the statistics that may leave the site:

    <site_dir>/            mode 0700: only the site's user reads it
      site.json            name, sizes, class names, approval_required=true
      train.npz val.npz    what local training reads (images and, with a clinical table, the
                           records encoded by the configured schema)
      test.npz             the held-out test split: only the final federated evaluation reads it
      stats.json           the released statistics (site_stats), what the coordinator may see
      approval.json        the site's decisions and maximum ε (approval), written by `site approve`
      manifest.parquet     the validated manifest (paths of the hospital's files: stays here)
      validation_report.json, split_report.json, workspace/ (decode cache, GX data docs),
      clinical_validation_report.json (with a clinical table)

A site whose data fails validation stops with the report in validation_report.json and no
partition (an earlier one is withdrawn): its SuperNode cannot start, so the coordinator's
preflight lists it as not connected.

Nothing here logs a path or an image identifier.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.errors import ConfigError
from components.workspace import Workspace

if TYPE_CHECKING:
    import pandas as pd

    from components.data.cache import SplitArrays

log = logging.getLogger(__name__)

SITE_MODE = 0o700
MANIFEST_FILE = "manifest.parquet"
VALIDATION_REPORT = "validation_report.json"
CLINICAL_REPORT = "clinical_validation_report.json"
SPLIT_REPORT = "split_report.json"


@dataclass(frozen=True)
class SiteContext:
    """One hospital's preparation: its config (dataset.root = its folder), name and directory."""

    cfg: dict[str, Any]
    name: str
    site_dir: Path

    @property
    def workspace(self) -> Workspace:
        return Workspace(self.site_dir / "workspace")

    @property
    def class_names(self) -> list[str]:
        return list(self.cfg["dataset"]["classes"])


def site_context(cfg: Mapping[str, Any], data_dir: str | Path, name: str, site_dir: str | Path):
    """Check the inputs, create the site directory (mode 0700) and point the dataset at
    `data_dir`."""
    from components.federated.partition import safe_site_name

    if not name or safe_site_name(name) != name:
        raise ConfigError(f"site name {name!r}: use letters, digits, '-' and '_' only")
    data = Path(data_dir).expanduser().resolve()
    if not data.is_dir():
        raise ConfigError(f"the site's data folder {data} does not exist")
    directory = Path(site_dir).expanduser().resolve()
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, SITE_MODE)
    config = copy.deepcopy(dict(cfg))
    config["dataset"]["root"] = str(data)
    return SiteContext(config, name, directory)


def ingest_site(ctx: SiteContext) -> pd.DataFrame:
    from components.data.ingest import ingest

    ds = ctx.cfg["dataset"]
    return ingest(
        ds["adapter"],
        ds["root"],
        classes=list(ds["classes"]),
        workspace=ctx.workspace,
        max_per_class=ds["max_per_class"],
        seed=ctx.cfg["seed"],
        options=ds["synthetic"],
        clinical=ds["clinical"],
        patient_from_name=ds["patient_from_name"],
    )


def split_site(ctx: SiteContext, frame: pd.DataFrame) -> pd.DataFrame:
    from components.data.splits import split_by_config

    frame, report = split_by_config(frame, ctx.cfg["dataset"]["split"], ctx.cfg["seed"])
    _write_json(ctx.site_dir / SPLIT_REPORT, report.to_dict())
    return frame


def validate_site(ctx: SiteContext, frame: pd.DataFrame) -> pd.DataFrame:
    """The pipeline's GX suites (the clinical one too, with a clinical table); the full
    reports (and any quarantine) stay in the site dir."""
    from components.data import manifest as manifest_io
    from components.errors import ValidationFailed
    from validation import validate_manifest

    ds = ctx.cfg["dataset"]
    images = not (ds["clinical"]["table"] and ds["clinical"]["key"] is None)
    report_file = VALIDATION_REPORT
    try:
        outcome = validate_manifest(
            frame,
            list(ds["classes"]),
            min_side=ds["limits"]["min_side"],
            max_side=ds["limits"]["max_side"],
            min_per_class=ctx.cfg["validation"]["min_per_class"],
            on_failure=ctx.cfg["validation"]["on_failure"],
            workspace=ctx.workspace,
            near_similarity=(
                ds["split"]["near_similarity"]
                if ds["split"]["near_duplicates"] and images
                else None
            ),
            images=images,
        )
        _write_json(ctx.site_dir / VALIDATION_REPORT, outcome.report)
        validated = outcome.validated
        if ds["clinical"]["table"]:
            report_file = CLINICAL_REPORT
            validated = _validate_clinical(ctx, validated)
    except ValidationFailed as exc:  # the site is not ready: report here, nothing to train on
        _write_json(ctx.site_dir / report_file, exc.report)
        # `from None`: the suite's own message (offending rows, report paths) stays out of the
        # flow's traceback, which a hospital's Prefect worker may send to the coordinator
        withdrawn = withdraw_partition(ctx.site_dir)
        raise site_not_ready(ctx, exc.report, withdrawn, report_file) from None
    manifest_io.save(validated, ctx.site_dir / MANIFEST_FILE)
    return validated


def _validate_clinical(ctx: SiteContext, frame: pd.DataFrame) -> pd.DataFrame:
    """The clinical suite on the site's records (typed values out). A leaking feature stops
    the site: every site and the coordinator encode records by one schema (the config's
    features), so a site never drops a feature on its own."""
    from validation.clinical_suite import validate_clinical_manifest

    ds = ctx.cfg["dataset"]
    outcome = validate_clinical_manifest(
        frame,
        ds["clinical"]["features"],
        dangerous=ds["dangerous"],
        max_score=ds["clinical"]["leakage_max_score"],
        on_leakage="stop",
        on_failure=ctx.cfg["validation"]["on_failure"],
        workspace=ctx.workspace,
    )
    _write_json(ctx.site_dir / CLINICAL_REPORT, outcome.report)
    return outcome.validated


def site_not_ready(
    ctx: SiteContext, report: dict, withdrawn: list[str], report_file: str = VALIDATION_REPORT
):
    """The error a failed validation ends the site's flow with. Its message names the failed
    expectations only: no offending row, path or image id (a hospital's Prefect worker may
    report the flow's state to the coordinator's API); the full report stays at the site."""
    from components.errors import ValidationFailed

    failed = list(
        report.get("failed") or (report.get("after_quarantine") or {}).get("failed") or []
    )
    names = ", ".join(failed) or "see the report"
    note = f"; the earlier partition was withdrawn ({', '.join(withdrawn)})" if withdrawn else ""
    return ValidationFailed(
        f"site {ctx.name} is not ready: its data failed validation ({names}); nothing was "
        f"written to train on{note}. The full report stays at the site: {report_file} in "
        "the site directory",
        report,
    )


def withdraw_partition(site_dir: Path) -> list[str]:
    """Remove what a SuperNode would train on or release (a site whose data no longer validates
    must not serve an earlier partition); returns the names removed. Approvals stay."""
    from components.federated.site_stats import STATS_FILE
    from components.federated.task import SITE_META, TEST_FILE, TRAIN_FILE, VAL_FILE

    removed = []
    for name in (SITE_META, TRAIN_FILE, VAL_FILE, TEST_FILE, STATS_FILE, MANIFEST_FILE):
        path = site_dir / name
        if path.is_file():
            path.unlink()
            removed.append(name)
    return removed


def site_arrays(ctx: SiteContext, frame: pd.DataFrame) -> dict[str, SplitArrays]:
    from components.data.cache import load_split_arrays
    from components.training.assembly import preprocessing_from_config

    clinical = ctx.cfg["dataset"]["clinical"]
    return load_split_arrays(
        frame,
        ctx.class_names,
        preprocessing_from_config(ctx.cfg),
        ctx.workspace.cache,
        schema=clinical["features"] if clinical["table"] else None,
    )


def write_site_partition(ctx: SiteContext, arrays: Mapping[str, SplitArrays]) -> dict[str, int]:
    """train/val/test for the ClientApp (images and any encoded records); the site asks for
    approval before every run."""
    from components.federated.task import write_site

    write_site(
        ctx.site_dir,
        ctx.name,
        arrays["train"],
        arrays["val"],
        {"class_names": ctx.class_names, "approval_required": True},
        test=arrays["test"],
    )
    for path in ctx.site_dir.glob("*.npz"):
        path.chmod(0o600)
    return {split: len(arrays[split].y) for split in ("train", "val", "test")}


def compute_site_stats(
    ctx: SiteContext, frame: pd.DataFrame, arrays: Mapping[str, SplitArrays]
) -> dict[str, Any]:
    """The released statistics (`site_stats.site_statistics`) written to stats.json."""
    from components.federated.settings import validate_federation
    from components.federated.site_stats import site_statistics, write_stats

    settings = validate_federation({"federation": ctx.cfg["federation"]}).site_stats
    used = frame[frame["split"].isin(["train", "val", "test"])]
    stats = site_statistics(
        ctx.class_names,
        {split: arrays[split].y for split in ("train", "val", "test")},
        used["width"].to_numpy(),
        used["height"].to_numpy(),
        [arrays[s].x for s in ("train", "val", "test") if arrays[s].x is not None],
        settings,
    )
    write_stats(ctx.site_dir, stats)
    return stats


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, default=str))
    path.chmod(0o600)


__all__ = [
    "SiteContext",
    "compute_site_stats",
    "ingest_site",
    "site_arrays",
    "site_context",
    "site_not_ready",
    "split_site",
    "validate_site",
    "withdraw_partition",
    "write_site_partition",
]
