"""The `train_pipeline` flow: ingest → split → validate → train → evaluate → register → package.

Each task calls one component function and records what it did (logs + Prefect artifacts).
Splitting runs before validation so the suite can check the final splits for leakage.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from components.config import PROJECT_ROOT, compose, to_container
from components.workspace import Workspace
from flows import artifacts
from flows.hooks import IO_RETRIES, record_failure

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """What every task needs: the resolved config (as a plain dict) and where to write."""

    cfg: dict[str, Any]
    workspace: Workspace
    run_dir: Path

    @classmethod
    def create(cls, overrides: list[str] | None, suffix: str = "") -> RunContext:
        """Compose the config and make a fresh `runs/<stamp>-<dataset><suffix>/` directory."""
        cfg = to_container(compose(overrides or []))
        workspace = Workspace.from_env(cfg["paths"]["workspace"])
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        run_dir = workspace.root / "runs" / f"{stamp}-{cfg['dataset']['name']}{suffix}"
        run_dir.mkdir(parents=True, exist_ok=True)
        return cls(cfg=cfg, workspace=workspace, run_dir=run_dir)


@task(name="ingest", **IO_RETRIES)
def ingest_task(ctx: RunContext):
    from components.data import manifest as manifest_io
    from components.data.ingest import ingest

    ds = ctx.cfg["dataset"]
    frame = ingest(
        ds["adapter"],
        ds["root"],
        classes=list(ds["classes"]),
        workspace=ctx.workspace,
        max_per_class=ds.get("max_per_class"),
        seed=ctx.cfg["seed"],
        options=ds.get("synthetic") or {},
    )
    manifest_io.save(frame, ctx.run_dir / "manifest_raw.parquet")
    get_run_logger().info("ingested %d images from %s (%s)", len(frame), ds["name"], ds["adapter"])
    return frame


@task(name="split")
def split_task(ctx: RunContext, frame):
    from components.data.splits import assign_splits

    split = ctx.cfg["dataset"]["split"]
    frame, report = assign_splits(
        frame,
        keep_given=split["keep_given"],
        val_fraction=split["val_fraction"],
        test_fraction=split["test_fraction"],
        seed=ctx.cfg["seed"],
    )
    summary = report.summary()
    get_run_logger().info("split report: %s", summary)
    artifacts.write_json(ctx.run_dir / "split_report.json", report.to_dict())
    artifacts.markdown("split-report", f"# Split report\n\n{summary}")
    return frame, report.to_dict()


@task(name="validate")
def validate_task(ctx: RunContext, frame):
    from components.data import manifest as manifest_io
    from validation import validate_manifest

    ds = ctx.cfg["dataset"]
    outcome = validate_manifest(
        frame,
        list(ds["classes"]),
        min_side=ds["limits"]["min_side"],
        max_side=ds["limits"]["max_side"],
        min_per_class=ctx.cfg["validation"]["min_per_class"],
        on_failure=ctx.cfg["validation"]["on_failure"],
        workspace=ctx.workspace,
    )
    manifest_io.save(outcome.validated, ctx.run_dir / "manifest.parquet")
    artifacts.write_json(ctx.run_dir / "validation_report.json", outcome.report)
    artifacts.markdown("validation-report", f"# Validation\n\n```\n{outcome.summary()}\n```")
    get_run_logger().info(
        "validation passed=%s, kept %d rows, quarantined %d",
        outcome.passed,
        len(outcome.validated),
        len(outcome.quarantined),
    )
    return outcome.validated, outcome.report, len(outcome.quarantined)


@task(name="load-arrays")
def arrays_task(ctx: RunContext, frame):
    from components.data.cache import load_split_arrays

    return load_split_arrays(
        frame, list(ctx.cfg["dataset"]["classes"]), _preprocessing(ctx.cfg), ctx.workspace.cache
    )


@task(name="train")
def train_task(ctx: RunContext, arrays):
    """Central training (Lightning), with DP-SGD when the privacy config asks for it."""
    from components.models import build_model
    from components.privacy.settings import validate_privacy
    from components.training.central import train_classifier

    cfg, tr = ctx.cfg, ctx.cfg["trainer"]
    privacy = validate_privacy(cfg["privacy"], None, tr)
    architecture = _architecture(cfg)
    dp = None
    if privacy.dp_sgd:
        architecture["norm"] = "group"  # Opacus needs per-sample-safe normalisation
        model, dp = _private_model(build_model(**architecture), privacy, arrays, tr)
    else:
        model = build_model(**architecture)
    hooks = {"optimizer_hook": dp.optimizer_hook, "loader_hook": dp.loader_hook} if dp else {}
    try:
        result = train_classifier(
            model,
            (arrays["train"].x, arrays["train"].y),
            (arrays["val"].x, arrays["val"].y),
            _preprocessing(cfg),
            max_epochs=tr["max_epochs"],
            batch_size=tr["batch_size"],
            lr=tr["lr"],
            weight_decay=tr["weight_decay"],
            early_stopping_patience=tr["early_stopping_patience"],
            imbalance=tr["imbalance"],
            augment=_augmentation(cfg),
            seed=cfg["seed"],
            out_dir=ctx.run_dir / "training",
            deterministic=tr["deterministic"],
            num_workers=tr["num_workers"],
            **hooks,
        )
    finally:
        if dp:
            dp.close()
    report = dp.report() | {"mode": privacy.mode} if dp else None
    log = get_run_logger()
    log.info(
        "trained %d epochs (best %d) in %.1fs, %.0f img/s",
        result.epochs_run,
        result.best_epoch,
        result.wall_seconds,
        result.images_per_second,
    )
    if report:
        log.info("DP-SGD: epsilon=%.3f at delta=%g", report["epsilon"], report["delta"])
    return result, architecture, report


def _private_model(model, privacy, arrays, trainer):
    """Validate the model for Opacus and plan σ over the whole training (all epochs)."""
    from components.privacy.dp import DPSGD, PrivacyLedger, make_private_compatible, plan_noise

    model, _ = make_private_compatible(model)
    sigma, _, _ = plan_noise(
        privacy,
        num_examples=len(arrays["train"].y),
        batch_size=trainer["batch_size"],
        epochs_total=trainer["max_epochs"],
    )
    ledger = PrivacyLedger(privacy.accountant, privacy.delta, privacy.epsilon)
    dp = DPSGD(
        sigma,
        privacy.max_grad_norm,
        ledger,
        grad_sample_mode=privacy.grad_sample_mode,
        secure_mode=privacy.secure_mode,
    )
    return model, dp


@task(name="train-federated")
def federated_task(ctx: RunContext, arrays):
    """Federated training (Flower): sites from the train split, the same local training loop."""
    from components.federated.engines import run_federated
    from components.federated.partition import site_report_markdown

    cfg = ctx.cfg
    result = run_federated(
        cfg,
        arrays,
        list(cfg["dataset"]["classes"]),
        _preprocessing(cfg),
        ctx.run_dir / "federation",
    )
    artifacts.write_json(ctx.run_dir / "site_report.json", result.site_report)
    artifacts.markdown("site-report", site_report_markdown(result.site_report))
    summary = result.summary()
    get_run_logger().info(
        "federated %s: %d rounds, %.1fs/round, %d updates rejected",
        summary["strategy"],
        summary["rounds"],
        summary["mean_round_seconds"],
        summary["rejected_updates"],
    )
    if summary["status"] != "completed":
        get_run_logger().warning("federated run %s", summary["status"])
    if result.privacy:
        get_run_logger().info(
            "privacy (%s): epsilon=%.3f at delta=%g",
            result.privacy["mode"],
            result.privacy.get("epsilon", float("nan")),
            result.privacy["delta"],
        )
    return result.model, result.mlflow_history(), summary, result.architecture, result.privacy


@task(name="evaluate")
def evaluate_task(ctx: RunContext, model, test):
    from components.evaluation.metrics import evaluate
    from components.evaluation.plots import confusion_matrix_png
    from components.evaluation.predict import predict_proba

    classes = list(ctx.cfg["dataset"]["classes"])
    probs = predict_proba(model, test.x, _preprocessing(ctx.cfg))
    metrics = evaluate(test.y, probs, classes)
    png = confusion_matrix_png(metrics["confusion_matrix"], classes, ctx.run_dir / "confusion.png")
    artifacts.write_json(ctx.run_dir / "test_metrics.json", metrics)
    artifacts.metrics_table("test-metrics", metrics)
    return metrics, png


@task(name="register")
def register_task(ctx: RunContext, bundle_dir: Path, metrics, history, reports, fingerprints):
    from components.registry import GateConfig, RegistryClient, TrainingRecord

    reg = ctx.cfg["registry"]
    client = RegistryClient(
        reg["tracking_uri"] or ctx.workspace.mlflow_uri, ctx.workspace.mlflow_artifacts
    )
    record = TrainingRecord(
        config=ctx.cfg,
        bundle_dir=bundle_dir,
        test_metrics=metrics,
        history=history,
        manifest_fingerprint=fingerprints["data"],
        test_fingerprint=fingerprints["test"],
        reports=reports,
        figures={"confusion_matrix": ctx.run_dir / "confusion.png"},
        run_name=ctx.cfg.get("run_name") or ctx.run_dir.name,
        tags={f"privacy.{k}": str(v) for k, v in (reports.get("privacy") or {}).items()},
    )
    run_id = client.log_training_run(record)
    gate = GateConfig(metric=reg["gate_metric"], mode=reg["gate_mode"], min_delta=reg["min_delta"])
    decision = _with_retries(
        lambda: client.register_candidate(
            run_id, reg["model_name"], metrics, gate, test_fingerprint=fingerprints["test"]
        )
    )
    get_run_logger().info("registry: %s", decision.reason)
    return run_id, decision


def _with_retries(call, attempts: int = 3, delay_s: float = 2.0):
    """Retry a registry call on transient failures (the run itself is logged only once)."""
    from components.errors import RegistryError

    for attempt in range(1, attempts + 1):
        try:
            return call()
        except RegistryError:
            if attempt == attempts:
                raise
            time.sleep(delay_s * attempt)
    raise AssertionError("unreachable")


@task(name="package", retries=1)
def package_task(ctx: RunContext, bundle_dir: Path, model_version: str, build: bool):
    from serving.packaging import build_bento, import_bundle

    tag = import_bundle(
        bundle_dir,
        labels={"registered_model": ctx.cfg["registry"]["model_name"], "version": model_version},
    )
    bento = build_bento(PROJECT_ROOT) if build else None
    get_run_logger().info("packaged model %s, bento %s", tag, bento)
    return tag, bento


def _preprocessing(cfg: dict[str, Any]):
    from components.data.preprocess import Preprocessing

    channels = cfg["dataset"]["channels"]
    return Preprocessing(size=cfg["dataset"]["image_size"], channels=channels)


def _augmentation(cfg: dict[str, Any]):
    from components.training.datamodule import Augmentation

    return Augmentation(hflip=cfg["dataset"]["hflip"]) if cfg["trainer"]["augment"] else False


def _architecture(cfg: dict[str, Any]) -> dict[str, Any]:
    m = cfg["model"]
    return {
        "name": m["name"],
        "num_classes": len(cfg["dataset"]["classes"]),
        "in_channels": cfg["dataset"]["channels"],
        "norm": m["norm"],
        "pretrained": m["pretrained"],
        "small_input": m["small_input"],
        "width": m["width"],
    }


@flow(name="train_pipeline", on_failure=[record_failure], on_crashed=[record_failure])
def train_pipeline(overrides: list[str] | None = None) -> dict[str, Any]:
    """Run one declarative training pipeline; returns a JSON-safe summary."""
    from components.data.manifest import fingerprint
    from components.packaging import make_bundle

    started = time.perf_counter()
    ctx = RunContext.create(overrides)
    cfg, run_dir = ctx.cfg, ctx.run_dir

    raw = ingest_task(ctx)
    split_frame, split_report = split_task(ctx, raw)
    frame, validation_report, quarantined = validate_task(ctx, split_frame)
    arrays = arrays_task(ctx, frame)
    federation = None
    if cfg["training"]["mode"] == "federated":
        model, history, federation, architecture, privacy = federated_task(ctx, arrays)
        epochs_run = federation["rounds"]
    else:
        result, architecture, privacy = train_task(ctx, arrays)
        model, history, epochs_run = result.model, result.history, result.epochs_run
    metrics, _ = evaluate_task(ctx, model, arrays["test"])
    fingerprints = {
        "data": fingerprint(frame),
        "test": fingerprint(frame[frame["split"] == "test"]),
    }
    bundle_dir = make_bundle(
        model,
        architecture=architecture,
        privacy=privacy,
        class_names=list(cfg["dataset"]["classes"]),
        preprocessing=_preprocessing(cfg),
        train_x=arrays["train"].x,
        train_y=arrays["train"].y,
        metrics=metrics,
        data_fingerprint=fingerprints["data"],
        config=cfg,
        background_size=cfg["serving"]["background_size"],
        out_dir=run_dir / "bundle",
    )
    reports = {"split": split_report, "validation": validation_report}
    if privacy:
        reports["privacy"] = privacy
    run_id, decision = register_task(ctx, bundle_dir, metrics, history, reports, fingerprints)
    packaged = None
    if decision.promote:
        packaged = package_task(ctx, bundle_dir, decision.version, cfg["package"]["build_bento"])
    summary = {
        "dataset": cfg["dataset"]["name"],
        "model": cfg["model"]["name"],
        "images": {s: len(arrays[s].y) for s in ("train", "val", "test")},
        "quarantined": quarantined,
        "split_report": split_report,
        "test_metrics": {k: metrics[k] for k in _HEADLINE if k in metrics},
        "training": cfg["training"]["mode"],
        "epochs_run": epochs_run,
        "federation": federation,
        "privacy": privacy,
        "mlflow_run_id": run_id,
        "model_version": decision.version,
        "champion": decision.promote,
        "gate_reason": decision.reason,
        "bento_model": packaged[0] if packaged else None,
        "bento": packaged[1] if packaged else None,
        "run_dir": str(run_dir),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    artifacts.write_json(run_dir / "summary.json", summary)
    return summary


_HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc", "ece")


@flow(name="validate_data", on_failure=[record_failure], on_crashed=[record_failure])
def validate_data(overrides: list[str] | None = None) -> dict[str, Any]:
    """Ingest, split and validate a dataset without training."""
    ctx = RunContext.create(overrides, "-validate")
    cfg, run_dir = ctx.cfg, ctx.run_dir
    raw = ingest_task(ctx)
    split_frame, split_report = split_task(ctx, raw)
    frame, report, quarantined = validate_task(ctx, split_frame)
    return {
        "dataset": cfg["dataset"]["name"],
        "rows": len(frame),
        "quarantined": quarantined,
        "split_report": split_report,
        "validation": report,
        "run_dir": str(run_dir),
    }


@flow(name="prepare_federation", on_failure=[record_failure], on_crashed=[record_failure])
def prepare_federation_data(root: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Ingest, split and validate a dataset, then write one directory per site (what each
    hospital's SuperNode reads), the server's test split and the run spec under `root` for
    `oncoflow fl superlink|supernode|submit`."""
    from components.federated.layout import prepare_federation

    ctx = RunContext.create(overrides, "-federation")
    cfg = ctx.cfg
    raw = ingest_task(ctx)
    split_frame, _ = split_task(ctx, raw)
    frame, _, quarantined = validate_task(ctx, split_frame)
    arrays = arrays_task(ctx, frame)
    layout = prepare_federation(
        cfg, arrays, list(cfg["dataset"]["classes"]), _preprocessing(cfg), root
    )
    artifacts.markdown("site-report", layout.report_markdown)
    return {
        "root": str(layout.root),
        "sites": {name: str(path) for name, path in layout.sites.items()},
        "spec": str(layout.spec_path),
        "quarantined": quarantined,
        "site_report": layout.report,
    }


def run_pipeline(overrides: list[str]) -> dict[str, Any]:
    """Entry point for `oncoflow run` (call `flows.runtime.prepare(overrides)` first)."""
    return train_pipeline(list(overrides))


def run_validation(overrides: list[str]) -> dict[str, Any]:
    """Entry point for `oncoflow validate` (call `flows.runtime.prepare(overrides)` first)."""
    return validate_data(list(overrides))
