"""The pipeline's flows: `train_pipeline` (ingest → split → validate → train → calibrate →
evaluate → bundle → register → package), `validate_data` and `prepare_federation`.

Each step is a task of `flows.tasks`: one component call and a record of what it did.
Splitting runs before validation so the suite can check the final splits for leakage.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow

from flows import artifacts
from flows.hooks import record_failure
from flows.tasks import (
    RunContext,
    arrays_task,
    bundle_task,
    calibrate_task,
    close_failed_run,
    compare_task,
    evaluate_task,
    federated_calibration_task,
    federated_task,
    federation_layout_task,
    ingest_task,
    package_task,
    register_task,
    split_task,
    train_task,
    validate_task,
)


@flow(name="train_pipeline", on_failure=[record_failure], on_crashed=[record_failure])
def train_pipeline(overrides: list[str] | None = None) -> dict[str, Any]:
    """Run one declarative training pipeline; returns a JSON-safe summary."""
    started = time.perf_counter()
    ctx = RunContext.create(overrides)
    cfg, run_dir = ctx.cfg, ctx.run_dir

    split = split_task(ctx, ingest_task(ctx))
    validated = validate_task(ctx, split.frame)
    arrays = arrays_task(ctx, validated.frame, validated.features)
    if cfg["training"]["mode"] == "federated":
        trained = federated_task(ctx, arrays)
    else:
        trained = train_task(ctx, arrays)
    try:  # a run opened before training is closed as FAILED if a step before register fails
        if trained.federation:  # fitted from the sites' validation sums, never pooled
            fitted = trained.federation.get("calibration")
            calibrated = federated_calibration_task(ctx, trained.model, fitted, arrays["test"])
        else:
            calibrated = calibrate_task(ctx, trained.model, arrays)
        evaluation = evaluate_task(ctx, trained.model, arrays["test"], calibrated, split)
        metrics = evaluation.metrics
        fingerprints = validated.fingerprints()
        comparison = compare_task(ctx, trained, arrays, fingerprints["data"])
        if comparison:
            metrics["comparison"] = comparison
        bundle_dir = bundle_task(
            ctx,
            trained,
            arrays["train"],
            metrics,
            fingerprints["data"],
            calibrated.calibration if calibrated else None,
            ood_stats=calibrated.ood_stats if calibrated else None,
        )
    except BaseException:
        close_failed_run(ctx, trained.mlflow_run_id)
        raise
    reports = {"split": split.report, "validation": validated.report}
    if trained.privacy:
        reports["privacy"] = trained.privacy
    if trained.selection:
        reports["selection"] = trained.selection
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
        packaged = package_task(ctx, bundle_dir, decision.version, cfg["package"]["build_bento"])
    summary = {
        "dataset": cfg["dataset"]["name"],
        "model": cfg["model"]["name"],
        "images": {s: len(a.y) for s, a in arrays.items()},
        "quarantined": validated.quarantined,
        "split_report": split.report,
        "test_metrics": {k: metrics[k] for k in _HEADLINE if k in metrics},
        "calibration": calibrated.report if calibrated else None,
        "training": cfg["training"]["mode"],
        "epochs_run": trained.epochs_run,
        "selection": trained.selection,
        "leakage": metrics.get("leakage"),
        "comparison": metrics.get("comparison"),
        "federation": trained.federation,
        "privacy": trained.privacy,
        "mlflow_run_id": registration.run_id,
        "model_version": decision.version,
        "champion": decision.promote,
        "gate_reason": decision.reason,
        "bento_model": packaged.bento_model if packaged else None,
        "bento": packaged.bento if packaged else None,
        "run_dir": str(run_dir),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    artifacts.write_json(run_dir / "summary.json", summary)
    return summary


_HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc", "dangerous_auroc", "ece")


@flow(name="validate_data", on_failure=[record_failure], on_crashed=[record_failure])
def validate_data(overrides: list[str] | None = None) -> dict[str, Any]:
    """Ingest, split and validate a dataset without training."""
    ctx = RunContext.create(overrides, "-validate")
    cfg, run_dir = ctx.cfg, ctx.run_dir
    split = split_task(ctx, ingest_task(ctx))
    validated = validate_task(ctx, split.frame)
    return {
        "dataset": cfg["dataset"]["name"],
        "rows": len(validated.frame),
        "quarantined": validated.quarantined,
        "split_report": split.report,
        "validation": validated.report,
        "run_dir": str(run_dir),
    }


@flow(name="prepare_federation", on_failure=[record_failure], on_crashed=[record_failure])
def prepare_federation_data(root: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Ingest, split and validate a dataset, then write one directory per site (what each
    hospital's SuperNode reads), the server's test split and the run spec under `root` for
    `oncoflow fl superlink|supernode|submit`."""
    ctx = RunContext.create(overrides, "-federation")
    split = split_task(ctx, ingest_task(ctx))
    validated = validate_task(ctx, split.frame)
    arrays = arrays_task(ctx, validated.frame, validated.features)
    layout = federation_layout_task(ctx, arrays, root)
    return {
        "root": str(layout.root),
        "sites": {name: str(path) for name, path in layout.sites.items()},
        "spec": str(layout.spec_path),
        "quarantined": validated.quarantined,
        "site_report": layout.report,
    }


def run_pipeline(overrides: list[str]) -> dict[str, Any]:
    """Entry point for `oncoflow run` (call `flows.runtime.prepare(overrides)` first)."""
    return train_pipeline(list(overrides))


def run_validation(overrides: list[str]) -> dict[str, Any]:
    """Entry point for `oncoflow validate` (call `flows.runtime.prepare(overrides)` first)."""
    return validate_data(list(overrides))
