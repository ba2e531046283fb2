"""`federated_pipeline`: the coordinator's flow of a real federation (no site data here).

run spec from the config (+ the approval request for the sites) → preflight through the
SuperLink (which sites are up, approved, their statistics; refuse below
`federation.min_available_sites` with the reason per site) → the Flower run → federated
evaluation (each site scores the final model on its own test split; per-site and pooled
metrics) → bundle → MLflow (site statistics, per-site and pooled metrics, privacy report) and
the champion gate on the pooled metric → BentoML packaging.

The sites are reached through a SuperLink (`superlink` + `root_cert`, or the `flwr_home` of a
`LocalDeployment`), or, in tests, on the inline engine over `site_dirs`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from components.errors import DataError
from flows import artifacts
from flows.hooks import record_failure
from flows.tasks import (
    RunContext,
    TrainedModel,
    bundle_task,
    close_failed_run,
    package_task,
    register_task,
)


@task(name="federation-spec")
def spec_task(ctx: RunContext, sites: list[str], site_dirs: dict[str, str] | None):
    from components.federated.coordinator import coordinator_layout

    layout = coordinator_layout(ctx.cfg, sites, ctx.run_dir / "federation", site_dirs=site_dirs)
    get_run_logger().info(
        "run spec for %d sites written; sites approve %s",
        len(sites),
        layout.root / "server" / "site_request.json",
    )
    return layout


@task(name="preflight")
def preflight_task(ctx: RunContext, layout, connection) -> dict[str, Any]:
    from components.federated.preflight import FederationRefused, read_preflight

    connection.run(layout, "preflight")
    report = read_preflight(layout.out_dir)
    if report is None:
        raise FederationRefused("the preflight left no report; see the SuperLink's log")
    artifacts.write_json(ctx.run_dir / "preflight.json", report)
    artifacts.markdown("preflight", _preflight_markdown(report))
    get_run_logger().info("preflight: %s", report["reason"])
    if not report["ok"]:
        raise FederationRefused(f"the federated run does not start: {report['reason']}")
    return report


def _preflight_markdown(report: dict[str, Any]) -> str:
    rows = ["| site | status | reason | images (train/val/test) |", "|---|---|---|---|"]
    for site, row in sorted(report["sites"].items()):
        sizes = (row.get("stats") or {}).get("num_images") or {}
        shown = "/".join(str(sizes.get(s, "-")) for s in ("train", "val", "test"))
        rows.append(f"| {site} | {row['status']} | {row['reason']} | {shown} |")
    return f"# Preflight\n\n{report['reason']}\n\n" + "\n".join(rows)


@task(name="federated-training")
def federate_task(ctx: RunContext, layout, connection) -> TrainedModel:
    """The Flower run through the SuperLink. The MLflow run is opened first and each round
    reaches it (and a Prefect artifact) as it ends (`flows.live_rounds`); a failed federation
    fails this task with the round driver's sanitised reason."""
    import json

    from components.federated.preflight import FederationRefused, read_preflight
    from components.federated.result import load_result
    from components.federated.server_app import RESULT_FILE
    from flows.live_rounds import TAG_STATUS, live_federation
    from flows.tasks import federation_failure, registry_client

    client = registry_client(ctx)
    run_id = client.start_training_run(
        ctx.cfg["run_name"] or ctx.run_dir.name,
        ctx.cfg,
        {"training": "federated", "federation.sites": "real", TAG_STATUS: "starting"},
    )
    try:
        with live_federation(client, run_id, layout.out_dir) as watcher:
            connection.run(layout, "federate")
        report = read_preflight(layout.out_dir)
        if report is not None and not report["ok"]:
            raise FederationRefused(f"the federated run did not start: {report['reason']}")
        result = load_result(layout)
    except Exception as exc:
        close_failed_run(ctx, run_id)
        if isinstance(exc, FederationRefused):
            raise
        raise federation_failure(Path(layout.out_dir), exc) from exc
    raw = json.loads((Path(layout.out_dir) / RESULT_FILE).read_text())
    summary = result.summary() | {
        "preflight": raw.get("preflight"),
        "federated_evaluation": raw.get("federated_evaluation"),
    }
    log = get_run_logger()
    log.info("federated run %s after %d round(s)", result.status, len(result.history))
    for site, why in summary.get("last_round_failures", {}).items():
        log.warning("site %s did not contribute to the last round: %s", site, why)
    return TrainedModel(
        model=result.model,
        history=result.mlflow_history(),
        epochs_run=len(result.history),
        architecture=result.architecture,
        privacy=result.privacy,
        federation=summary,
        mlflow_run_id=run_id,
        logged_steps=tuple(watcher.logged),
    )


@task(name="federated-evaluation")
def federated_evaluation_task(ctx: RunContext, trained: TrainedModel) -> dict[str, Any]:
    """The pooled and per-site metrics of the sites' test splits (confusion matrix figure,
    test_metrics.json, a metrics artifact)."""
    from components.evaluation.plots import confusion_matrix_png

    metrics = federated_metrics(trained)
    confusion_matrix_png(
        metrics["confusion_matrix"], ctx.class_names, ctx.run_dir / "confusion.png"
    )
    artifacts.write_json(ctx.run_dir / "test_metrics.json", metrics)
    if metrics.get("calibration"):
        artifacts.write_json(ctx.run_dir / "calibration.json", metrics["calibration"])
    artifacts.metrics_table("federated-test-metrics", metrics)
    get_run_logger().info(
        "federated evaluation: pooled macro-F1 %s over %d site(s)",
        metrics.get("macro_f1"),
        len(trained.federation["federated_evaluation"]["sites"]),
    )
    return metrics


def federated_metrics(trained: TrainedModel) -> dict[str, Any]:
    """The pooled federated metrics (what the gate compares) plus per-site headline metrics."""
    evaluation = (trained.federation or {}).get("federated_evaluation") or {}
    pooled = dict(evaluation.get("pooled") or {})
    if not pooled:
        why = "; ".join(f"{s}: {r}" for s, r in sorted((evaluation.get("missing") or {}).items()))
        raise DataError(f"the federated evaluation returned no metrics from any site ({why})")
    fitted = (trained.federation or {}).get("calibration") or {}
    if evaluation.get("calibration"):  # the served (calibrated) probabilities were scored
        pooled["calibration"] = evaluation["calibration"]
    elif fitted and not fitted.get("fitted"):
        pooled["calibration"] = {"fitted": False, "reason": fitted.get("reason")}
    for site, metrics in (evaluation.get("sites") or {}).items():
        for key in ("macro_f1", "macro_auroc", "accuracy", "ece"):
            if metrics.get(key) is not None:
                pooled[f"site.{site}.{key}"] = metrics[key]
    return pooled


@flow(name="federated_pipeline", on_failure=[record_failure], on_crashed=[record_failure])
def federated_pipeline(
    overrides: list[str] | None = None,
    sites: list[str] | None = None,
    superlink: str | None = None,
    root_cert: str | None = None,
    flwr_home: str | None = None,
    site_dirs: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Coordinate one federated run over `sites` (names); returns a JSON-safe summary."""
    from components.federated.coordinator import connect, federated_test_fingerprint

    started = time.perf_counter()
    ctx = RunContext.create(["training=federated", *(overrides or [])], "-federated")
    names = list(sites or (site_dirs or {}).keys())
    layout = spec_task(ctx, names, site_dirs)
    connection = connect(
        layout, superlink=superlink, root_cert=root_cert, flwr_home=flwr_home, site_dirs=site_dirs
    )
    preflight = preflight_task(ctx, layout, connection)
    trained = federate_task(ctx, layout, connection)
    try:  # the run opened before training is closed as FAILED if a step before register fails
        metrics = federated_evaluation_task(ctx, trained)
        stats = {s: row.get("stats") for s, row in preflight["sites"].items()}
        test_fp = federated_test_fingerprint({s: stats[s] for s in preflight["approved"]})
        fingerprints = {"data": layout.spec.fingerprint(), "test": test_fp}
        fitted = trained.federation.get("calibration") or {}
        bundle_dir = bundle_task(
            ctx,
            trained,
            _NoTrainingImages(layout.spec.model.schema),
            metrics,
            fingerprints["data"],
            fitted.get("calibration") if fitted.get("fitted") else None,
        )
    except BaseException:
        close_failed_run(ctx, trained.mlflow_run_id)
        raise
    reports = {
        "site_statistics": stats,
        "preflight": preflight,
        "federated_evaluation": trained.federation["federated_evaluation"],
    }
    if trained.privacy:
        reports["privacy"] = trained.privacy
    registration = register_task(
        ctx,
        bundle_dir,
        metrics,
        trained.history_to_log(),
        reports,
        fingerprints,
        run_id=trained.mlflow_run_id,
    )
    decision = registration.decision
    packaged = None
    if decision.promote:
        packaged = package_task(
            ctx, bundle_dir, decision.version, ctx.cfg["package"]["build_bento"]
        )
    summary = {
        "sites": names,
        "approved": preflight["approved"],
        "preflight": preflight["reason"],
        "pooled_metrics": {k: v for k, v in metrics.items() if not isinstance(v, dict | list)},
        "rounds": trained.epochs_run,
        "privacy": trained.privacy,
        "mlflow_run_id": registration.run_id,
        "model_version": decision.version,
        "champion": decision.promote,
        "gate_reason": decision.reason,
        "bento_model": packaged.bento_model if packaged else None,
        "bento": packaged.bento if packaged else None,
        "run_dir": str(ctx.run_dir),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    artifacts.write_json(ctx.run_dir / "summary.json", summary)
    return summary


@dataclass(frozen=True)
class _NoTrainingImages:
    """The coordinator holds no training images: the bundle gets none (`bundle_task`), only
    the clinical schema the spec carries (a model reading records needs it)."""

    schema: list[dict] | None = None
    x = None
    y = None


__all__ = ["federated_metrics", "federated_pipeline"]
