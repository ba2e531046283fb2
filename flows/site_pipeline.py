"""`site_pipeline`: what a hospital runs on its own machine against its own folder.

ingest → split → validate (GX; the full report stays in the site dir) → the site partition
(train/val/test for the ClientApp) → site statistics (stats.json, the only numbers that leave).
The steps are `components.federated.site_prepare`; tasks log counts only and publish no
artifact (a hospital's worker may report to a Prefect server it does not run). The return value
is the released statistics, nothing else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prefect import flow, get_run_logger, task

from components.config import compose, to_container
from flows.hooks import record_failure

if TYPE_CHECKING:
    import pandas as pd

    from components.federated.site_prepare import SiteContext


@task(name="site-ingest")
def site_ingest_task(ctx: SiteContext) -> pd.DataFrame:
    from components.federated.site_prepare import ingest_site

    frame = ingest_site(ctx)
    get_run_logger().info("site %s: ingested %d images", ctx.name, len(frame))
    return frame


@task(name="site-split")
def site_split_task(ctx: SiteContext, frame: pd.DataFrame) -> pd.DataFrame:
    from components.federated.site_prepare import split_site

    return split_site(ctx, frame)


@task(name="site-validate")
def site_validate_task(ctx: SiteContext, frame: pd.DataFrame) -> pd.DataFrame:
    from components.federated.site_prepare import validate_site

    validated = validate_site(ctx, frame)
    get_run_logger().info(
        "site %s: validation kept %d of %d rows (report kept at the site)",
        ctx.name,
        len(validated),
        len(frame),
    )
    return validated


@task(name="site-partition")
def site_partition_task(ctx: SiteContext, frame: pd.DataFrame) -> tuple[dict, dict[str, int]]:
    from components.federated.site_prepare import site_arrays, write_site_partition

    arrays = site_arrays(ctx, frame)
    sizes = write_site_partition(ctx, arrays)
    get_run_logger().info("site %s: partition %s", ctx.name, sizes)
    return arrays, sizes


@task(name="site-statistics")
def site_stats_task(ctx: SiteContext, frame: pd.DataFrame, arrays: dict) -> dict[str, Any]:
    from components.federated.site_prepare import compute_site_stats

    stats = compute_site_stats(ctx, frame, arrays)
    get_run_logger().info(
        "site %s: statistics released (noise: %s)", ctx.name, stats["privacy"]["noise"]
    )
    return stats


@flow(name="site_pipeline", on_failure=[record_failure], on_crashed=[record_failure])
def site_pipeline(
    data_dir: str, site: str, site_dir: str, overrides: list[str] | None = None
) -> dict[str, Any]:
    """Prepare site `site` from the hospital folder `data_dir` into `site_dir`."""
    from components.federated.site_prepare import site_context

    cfg = to_container(compose(["training=federated", *(overrides or [])]))
    ctx = site_context(cfg, data_dir, site, site_dir)
    frame = site_validate_task(ctx, site_split_task(ctx, site_ingest_task(ctx)))
    arrays, _ = site_partition_task(ctx, frame)
    stats = site_stats_task(ctx, frame, arrays)
    return {"site": site, "stats": stats}


__all__ = ["site_pipeline"]
