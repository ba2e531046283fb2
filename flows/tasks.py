"""The pipeline's Prefect tasks. Each calls one component function and records what it did
(logs, JSON files in the run directory, Prefect artifacts); each returns a small dataclass.
The flows that chain them are in `flows.pipeline`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import get_run_logger, task

from components.config import PROJECT_ROOT, compose, to_container
from components.training.assembly import preprocessing_from_config
from components.workspace import Workspace
from flows import artifacts
from flows.hooks import IO_RETRIES

if TYPE_CHECKING:
    import pandas as pd

    from components.data.cache import SplitArrays
    from components.federated.layout import FederationLayout
    from components.registry.gate import GateDecision


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

    @property
    def class_names(self) -> list[str]:
        return list(self.cfg["dataset"]["classes"])


# ----------------------------------------------------------------------------- results


@dataclass
class SplitResult:
    frame: pd.DataFrame  # the manifest with a `split` column
    report: dict[str, Any]  # JSON-safe split report
    # row ids of held-out images with a near-match in training (`match_similarity`; kept in
    # the run) and the leakage certificate (`SplitReport.certificate`)
    near_matched: frozenset[str] = frozenset()
    certificate: dict[str, Any] | None = None


@dataclass
class ValidationResult:
    frame: pd.DataFrame  # the rows that passed (quarantined rows removed)
    report: dict[str, Any]  # the manifest suite's; the clinical suite's under "clinical"
    quarantined: int
    # the clinical schema the run uses (`dataset.clinical.features` less any leaking feature
    # on_leakage=drop removed); None without a clinical table
    features: list[dict[str, Any]] | None = None

    def fingerprints(self) -> dict[str, str]:
        """Hashes of what the model saw: every split ("data") and the test split ("test")."""
        from components.data.manifest import fingerprint

        test = self.frame[self.frame["split"] == "test"]
        return {"data": fingerprint(self.frame), "test": fingerprint(test)}


@dataclass
class TrainedModel:
    """A trained model, central or federated, with what the bundle and registry need."""

    model: Any
    history: list[dict[str, Any]]  # rows for the MLflow run
    epochs_run: int  # epochs (central) or rounds (federated)
    architecture: dict[str, Any]  # `build_model` kwargs
    privacy: dict[str, Any] | None = None  # privacy report (mode, ε, δ...), or None
    federation: dict[str, Any] | None = None  # FederatedResult.summary() when federated
    mlflow_run_id: str | None = None  # the MLflow run opened before training, if any
    logged_steps: tuple[int, ...] = ()  # history steps already logged to that run, live
    selection: dict[str, Any] | None = None  # central: the kept epoch and why (`Selection`)

    def history_to_log(self) -> list[dict[str, Any]]:
        """The history rows not yet in the MLflow run (all of them without a live run)."""
        done = set(self.logged_steps)
        return [row for row in self.history if int(row.get("step", -1)) not in done]


@dataclass
class Calibrated:
    """Calibration fitted after training: the bundle's block and its effect on the test split."""

    calibration: dict[str, Any] | None  # Calibration.to_dict(); None: not fitted (see report)
    report: dict[str, Any]  # calibration_report on the test split, or why it was not fitted
    figure: Path | None = None  # reliability diagram before/after on the test split
    ood_stats: dict[str, Any] | None = None  # the OOD check's arrays for the bundle's ood.npz


@dataclass
class Evaluation:
    metrics: dict[str, Any]  # test metrics (components.evaluation.metrics.evaluate)
    confusion_png: Path


@dataclass
class Registration:
    run_id: str  # the MLflow run
    decision: GateDecision  # the gate's verdict and the registered version


@dataclass
class Packaged:
    bento_model: str  # tag in the Bento model store
    bento: str | None  # the built Bento, when package.build_bento


# ----------------------------------------------------------------------------- tasks


@task(name="ingest", **IO_RETRIES)
def ingest_task(ctx: RunContext) -> pd.DataFrame:
    from components.data import manifest as manifest_io
    from components.data.ingest import ingest

    ds = ctx.cfg["dataset"]
    if ds["clinical"]["table"]:  # a wrong schema fails before any image is read
        from validation.clinical_schema import parse_schema

        parse_schema(ds["clinical"]["features"])
    frame = ingest(
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
    manifest_io.save(frame, ctx.run_dir / "manifest_raw.parquet")
    get_run_logger().info("ingested %d rows from %s (%s)", len(frame), ds["name"], ds["adapter"])
    return frame


@task(name="split")
def split_task(ctx: RunContext, frame: pd.DataFrame) -> SplitResult:
    from components.data.near_duplicates import example_montage
    from components.data.splits import split_by_config

    calibration = ctx.cfg["calibration"]
    held_out = calibration["fit_on"] == "held_out"
    frame, report = split_by_config(
        frame,
        ctx.cfg["dataset"]["split"],
        ctx.cfg["seed"],
        calibration_fraction=calibration["held_out_fraction"] if held_out else 0.0,
    )
    summary = report.summary()
    log = get_run_logger()
    log.info("split report: %s", summary)
    if report.proximity.get("warning"):
        log.warning("split: %s", report.proximity["warning"])
    artifacts.write_json(ctx.run_dir / "split_report.json", report.to_dict())
    artifacts.markdown("split-report", f"# Split report\n\n{summary}")
    montage = example_montage(report.example_pairs, ctx.run_dir / "near_duplicates.png")
    if montage is not None:
        artifacts.image("near-duplicates", montage, "example near-duplicate pairs (pHash)")
    return SplitResult(
        frame=frame,
        report=report.to_dict(),
        near_matched=frozenset(report.near_matched_ids),
        certificate=report.certificate(),
    )


@task(name="validate")
def validate_task(ctx: RunContext, frame: pd.DataFrame) -> ValidationResult:
    from components.data import manifest as manifest_io
    from validation import validate_manifest

    ds = ctx.cfg["dataset"]
    clinical = ds["clinical"]
    images = not (clinical["table"] and clinical["key"] is None)  # tabular-only: no images
    near = ds["split"]["near_duplicates"] and images
    outcome = validate_manifest(
        frame,
        list(ds["classes"]),
        min_side=ds["limits"]["min_side"],
        max_side=ds["limits"]["max_side"],
        min_per_class=ctx.cfg["validation"]["min_per_class"],
        on_failure=ctx.cfg["validation"]["on_failure"],
        workspace=ctx.workspace,
        near_similarity=ds["split"]["near_similarity"] if near else None,
        images=images,
    )
    artifacts.write_json(ctx.run_dir / "validation_report.json", outcome.report)
    artifacts.markdown("validation-report", f"# Validation\n\n```\n{outcome.summary()}\n```")
    log = get_run_logger()
    log.info(
        "validation passed=%s, kept %d rows, quarantined %d",
        outcome.passed,
        len(outcome.validated),
        len(outcome.quarantined),
    )
    result = ValidationResult(
        frame=outcome.validated, report=outcome.report, quarantined=len(outcome.quarantined)
    )
    if clinical["table"]:
        result = _validate_clinical(ctx, result)
    manifest_io.save(result.frame, ctx.run_dir / "manifest.parquet")
    return result


def _validate_clinical(ctx: RunContext, manifest: ValidationResult) -> ValidationResult:
    """The clinical suite (types, ranges, categories, missing values, label leakage) on the
    manifest's clinical columns; its report goes beside validation_report.json."""
    from components.errors import ValidationFailed
    from validation.clinical_suite import validate_clinical_manifest

    ds = ctx.cfg["dataset"]
    clinical = ds["clinical"]
    path = ctx.run_dir / "clinical_validation_report.json"
    try:
        outcome = validate_clinical_manifest(
            manifest.frame,
            clinical["features"],
            dangerous=ds["dangerous"],
            max_score=clinical["leakage_max_score"],
            on_leakage=clinical["on_leakage"],
            on_failure=ctx.cfg["validation"]["on_failure"],
            workspace=ctx.workspace,
        )
    except ValidationFailed as exc:
        artifacts.write_json(path, exc.report)
        raise
    artifacts.write_json(path, outcome.report)
    summary = outcome.summary()
    artifacts.markdown(
        "clinical-validation-report", f"# Clinical validation\n\n```\n{summary}\n```"
    )
    kept = set(outcome.features or [])
    get_run_logger().info(
        "clinical validation passed=%s, kept %d rows and %d of %d features, quarantined %d",
        outcome.passed,
        len(outcome.validated),
        len(kept),
        len(clinical["features"]),
        len(outcome.quarantined),
    )
    return ValidationResult(
        frame=outcome.validated,
        report={**manifest.report, "clinical": outcome.report},
        quarantined=manifest.quarantined + len(outcome.quarantined),
        features=[dict(f) for f in clinical["features"] if f["name"] in kept],
    )


@task(name="load-arrays")
def arrays_task(
    ctx: RunContext, frame: pd.DataFrame, schema: list[dict] | None = None
) -> dict[str, SplitArrays]:
    """Each split's images (decoded once, cached) and labels; with a clinical `schema` (the
    features validation kept), each split's records encoded by it."""
    from components.data.cache import load_split_arrays

    return load_split_arrays(
        frame,
        ctx.class_names,
        preprocessing_from_config(ctx.cfg),
        ctx.workspace.cache,
        schema=schema or None,
    )


@task(name="train")
def train_task(ctx: RunContext, arrays: dict[str, SplitArrays]) -> TrainedModel:
    """Central training (Lightning), with DP-SGD when the privacy config asks for it."""
    from components.training.central import train_central

    result = train_central(ctx.cfg, arrays, ctx.run_dir / "training")
    log = get_run_logger()
    log.info(
        "trained %d epochs in %.1fs, %.0f img/s; kept %s",
        result.training.epochs_run,
        result.training.wall_seconds,
        result.training.images_per_second,
        result.training.selection.get("reason", f"epoch {result.training.best_epoch}"),
    )
    if result.privacy:
        log.info(
            "DP-SGD: epsilon=%.3f at delta=%g", result.privacy["epsilon"], result.privacy["delta"]
        )
    return TrainedModel(
        model=result.model,
        history=result.history,
        epochs_run=result.epochs_run,
        architecture=result.architecture,
        privacy=result.privacy,
        selection=result.training.selection,
    )


@task(name="train-federated")
def federated_task(ctx: RunContext, arrays: dict[str, SplitArrays]) -> TrainedModel:
    """Federated training (Flower): sites from the train split, the same local training loop.

    The MLflow run is opened first; each round's metrics, ε and failing sites reach it (and a
    Prefect artifact) as the round ends (`flows.live_rounds`). A failed federation fails this
    task with the round driver's sanitised reason and closes the run as FAILED."""
    from components.federated.engines import run_federated
    from components.federated.partition import site_report_markdown
    from components.federated.status import out_dir_of
    from flows.live_rounds import TAG_STATUS, live_federation

    cfg = ctx.cfg
    root = ctx.run_dir / "federation"
    client = registry_client(ctx)
    run_id = client.start_training_run(
        cfg["run_name"] or ctx.run_dir.name, cfg, {"training": "federated", TAG_STATUS: "starting"}
    )
    try:
        with live_federation(client, run_id, out_dir_of(root)) as watcher:
            result = run_federated(
                cfg,
                arrays,
                ctx.class_names,
                preprocessing_from_config(cfg),
                root,
                site_groups=_site_groups(ctx, arrays),
            )
    except Exception as exc:
        raise federation_failure(out_dir_of(root), exc) from exc
    artifacts.write_json(ctx.run_dir / "site_report.json", result.site_report)
    artifacts.markdown("site-report", site_report_markdown(result.site_report))
    summary = result.summary()
    log = get_run_logger()
    log.info(
        "federated %s: %d rounds, %.1fs/round, %d updates rejected",
        summary["strategy"],
        summary["rounds"],
        summary["mean_round_seconds"],
        summary["rejected_updates"],
    )
    if summary["status"] != "completed":
        log.warning("federated run %s", summary["status"])
    if result.privacy:
        log.info(
            "privacy (%s): epsilon=%.3f at delta=%g",
            result.privacy["mode"],
            result.privacy.get("epsilon", float("nan")),
            result.privacy["delta"],
        )
    for site, why in summary["last_round_failures"].items():
        log.warning("site %s did not contribute to the last round: %s", site, why)
    return TrainedModel(
        model=result.model,
        history=result.mlflow_history(),
        epochs_run=summary["rounds"],
        architecture=result.architecture,
        privacy=result.privacy,
        federation=summary,
        mlflow_run_id=run_id,
        logged_steps=tuple(watcher.logged),
    )


def _site_groups(ctx: RunContext, arrays: dict[str, SplitArrays]) -> dict[str, Any] | None:
    """federation.partition=given: each train/val row's site, the validated manifest's `site`
    column (a clinical column's value with `dataset.clinical.site`, e.g. PAD's region)."""
    from components.data import manifest as manifest_io
    from components.federated.partition import site_column

    if ctx.cfg["federation"]["partition"] != "given":
        return None
    frame = manifest_io.load(ctx.run_dir / "manifest.parquet")
    return {split: site_column(frame, arrays[split].ids) for split in ("train", "val")}


def federation_failure(out_dir: Path, exc: Exception) -> Exception:
    """The exception a failed federation ends the task with: the round driver's sanitised
    reason when it recorded one, the original error when it is oncoflow's own."""
    from components.errors import ModelError, OncoflowError
    from components.federated.reasons import server_error
    from flows.live_rounds import failure_reason

    reason = failure_reason(out_dir)
    if reason:
        return ModelError(f"federated training failed: {reason}")
    if isinstance(exc, OncoflowError):
        return exc
    return ModelError(f"federated training failed: {server_error(exc).message}")


@task(name="prepare-federation")
def federation_layout_task(
    ctx: RunContext, arrays: dict[str, SplitArrays], root: str | Path
) -> FederationLayout:
    """Write one directory per site, the server's test split and the run spec under `root`."""
    from components.federated.layout import prepare_federation

    layout = prepare_federation(
        ctx.cfg,
        arrays,
        ctx.class_names,
        preprocessing_from_config(ctx.cfg),
        root,
        site_groups=_site_groups(ctx, arrays),
    )
    artifacts.markdown("site-report", layout.report_markdown)
    get_run_logger().info("prepared %d sites under %s", len(layout.sites), layout.root)
    return layout


@task(name="calibrate")
def calibrate_task(ctx: RunContext, model: Any, arrays: dict[str, SplitArrays]) -> Calibrated:
    """Fit temperature scaling, the conformal threshold, the dangerous-class operating point
    and the out-of-distribution check's threshold on `calibration.fit_on` (`val`: the
    validation split; `held_out`: the `calibration` split, a held-out share of the test split's
    distribution; the OOD statistics come from the training split); measure them on the test
    split. A split too small or one-class to fit on leaves the model uncalibrated, with a
    warning and the reason in the report; a part that cannot be fitted (no dangerous class in
    the data, ...) is left out with its reason in the block's `notes`."""
    import dataclasses

    from components.calibration.fit import calibration_report, fit_calibration
    from components.calibration.temperature import softmax
    from components.errors import DataError
    from components.evaluation.plots import reliability_comparison_png
    from components.evaluation.predict import predict_logits

    conf, pre = ctx.cfg["calibration"], preprocessing_from_config(ctx.cfg)
    held_out, fitted_on = calibration_data(conf, arrays)
    test = arrays["test"]
    log = get_run_logger()
    try:
        calibration = fit_calibration(
            predict_logits(model, held_out, pre),
            held_out.y,
            ctx.class_names,
            method=conf["method"],
            coverage=conf["coverage"],
            dangerous=ctx.cfg["dataset"]["dangerous"],
            fitted_on=fitted_on,
            target_sensitivity=conf["target_sensitivity"],
        )
    except DataError as exc:
        log.warning("model left uncalibrated: %s", exc)
        return Calibrated(None, {"fitted": False, "reason": str(exc)})
    for note in calibration.notes:
        log.warning("calibration: %s", note)
    test_logits = predict_logits(model, test, pre)
    detector, ood_report = _fit_ood(ctx, model, arrays, test_logits)
    if detector is not None:
        calibration = dataclasses.replace(
            calibration,
            ood=detector.meta(),
            sources={**calibration.sources, "ood": detector.fitted_on},
        )
    elif ood_report.get("reason"):
        calibration = dataclasses.replace(
            calibration, notes=[*calibration.notes, f"no OOD check: {ood_report['reason']}"]
        )
    report = calibration_report(calibration, test_logits, test.y)
    report["ood"] = ood_report
    figure = reliability_comparison_png(
        test.y,
        {
            "uncalibrated": softmax(test_logits),
            "calibrated": calibration.probabilities(test_logits),
        },
        ctx.run_dir / "reliability.png",
    )
    artifacts.write_json(ctx.run_dir / "calibration.json", report)
    sets = report["conformal"]
    log.info(
        "calibration on %s: T=%.3f, test ECE %.3f -> %.3f, NLL %.3f -> %.3f; %.0f%% sets: "
        "coverage %.3f, mean size %.2f, referred %.1f%%",
        conf["fit_on"],
        calibration.temperature,
        report["ece_before"],
        report["ece_after"],
        report["nll_before"],
        report["nll_after"],
        100 * calibration.coverage,
        sets["coverage"],
        sets["mean_set_size"],
        100 * sets["referral_rate"],
    )
    point = report.get("operating_point")
    if point:
        at = point["test"]
        log.info(
            "operating point P(dangerous) >= %.3f: test sensitivity %s (%d positives), "
            "specificity %s (%d negatives)",
            at["threshold"],
            _rate(at["sensitivity"]),
            at["n_positive"],
            _rate(at["specificity"]),
            at["n_negative"],
        )
    stats = detector.arrays() if detector is not None else None
    return Calibrated(calibration.to_dict(), report, figure, ood_stats=stats or None)


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def calibration_data(conf: dict[str, Any], arrays: dict[str, SplitArrays]):
    """The split T, the conformal threshold and the operating point are fitted on, and what it
    is in words (with its size). `DataError` when `fit_on=held_out` finds no calibration split."""
    from components.data.cache import CALIBRATION_SPLIT
    from components.errors import DataError

    if conf["fit_on"] == "held_out":
        held_out = arrays.get(CALIBRATION_SPLIT)
        if held_out is None or not len(held_out.y):
            raise DataError(
                "calibration.fit_on=held_out but the run has no held-out `calibration` split "
                "(the split step moves a share of the test split there)"
            )
        return held_out, (
            f"held-out calibration split ({len(held_out.y)} cases: a seeded, label-stratified "
            f"{conf['held_out_fraction']:.0%} share of the de-duplicated test split, from the "
            "deployment's own distribution; never used for training, model selection or the "
            "test metrics)"
        )
    held_out = arrays["val"]
    return held_out, (
        f"validation split ({len(held_out.y)} cases: never trained on, also used for early "
        "stopping)"
    )


def _fit_ood(ctx: RunContext, model: Any, arrays: dict[str, SplitArrays], test_logits):
    """The OOD check (`calibration.ood`): statistics from the training split's features,
    threshold on the validation split (`fit_on=val`) or on the held-out calibration split
    (`fit_on=held_out`: the deployment's own images are the in-distribution reference); with
    its share of test images flagged (in-distribution false alarms). (None, report with the
    reason) when off or not fittable."""
    import numpy as np

    from components.calibration.ood import fit_detector
    from components.errors import DataError, ModelError
    from components.evaluation.predict import embed_arrays, predict_logits

    conf, pre = ctx.cfg["calibration"], preprocessing_from_config(ctx.cfg)
    kind = conf["ood"]
    if kind == "none":
        return None, {"fitted": False, "reason": "calibration.ood=none"}
    private = str((ctx.cfg.get("privacy") or {}).get("mode", "none")) != "none"
    note = None
    if kind == "mahalanobis" and private:
        # class means and covariance of training features would leave in the bundle without
        # the privacy mode's noise: the energy score needs nothing from the training data
        kind = "energy"
        note = (
            "energy score instead of mahalanobis: the training-feature statistics would be "
            "released without differential-privacy noise"
        )
        get_run_logger().warning("OOD check: %s", note)
    train, test = arrays["train"], arrays["test"]
    reference, _ = calibration_data(conf, arrays)
    where = "held-out calibration split" if conf["fit_on"] == "held_out" else "validation split"
    features = kind == "mahalanobis"
    try:
        detector = fit_detector(
            kind,
            val_logits=predict_logits(model, reference, pre),
            val_features=embed_arrays(model, reference, pre) if features else None,
            false_alarm=conf["ood_false_alarm"],
            train_features=embed_arrays(model, train, pre) if features else None,
            train_labels=train.y,
            n_classes=len(ctx.class_names),
            threshold_on=where,
        )
    except (DataError, ModelError) as exc:
        get_run_logger().warning("no out-of-distribution check: %s", exc)
        return None, {"fitted": False, "reason": str(exc)}
    scores = detector.scores(test_logits, embed_arrays(model, test, pre) if features else None)
    flagged = float(np.mean(detector.is_out(scores))) if len(scores) else None
    get_run_logger().info(
        "OOD check (%s): threshold %.4g; %s of in-distribution test images flagged",
        kind,
        detector.threshold,
        _rate(flagged),
    )
    return detector, {
        "fitted": True,
        **({"note": note} if note else {}),
        **detector.meta(),
        "test_flagged_rate": flagged,
        "n_test": len(scores),
    }


@task(name="calibrate-federated")
def federated_calibration_task(
    ctx: RunContext, model: Any, fitted: dict[str, Any] | None, test: SplitArrays | None
) -> Calibrated:
    """The calibration the sites' validation sums fitted (`calibration_exchange`), measured on
    the coordinator's test split when it holds one (a simulated federation); a real
    federation's report comes from the sites' pooled test sums (`federated_pipeline`)."""
    from components.calibration.fit import calibration_report
    from components.calibration.record import Calibration
    from components.calibration.temperature import softmax
    from components.evaluation.plots import reliability_comparison_png
    from components.evaluation.predict import predict_logits

    log = get_run_logger()
    if not fitted or not fitted.get("fitted"):
        reason = (fitted or {}).get("reason", "the federation returned no calibration")
        log.warning("federated model left uncalibrated: %s", reason)
        return Calibrated(None, {"fitted": False, "reason": reason})
    calibration = Calibration.from_dict(fitted["calibration"])
    if test is None or not len(test.y):
        return Calibrated(
            calibration.to_dict(), {"fitted": True, "fitted_on": calibration.fitted_on}
        )
    logits = predict_logits(model, test, preprocessing_from_config(ctx.cfg))
    report = calibration_report(calibration, logits, test.y)
    figure = reliability_comparison_png(
        test.y,
        {"uncalibrated": softmax(logits), "calibrated": calibration.probabilities(logits)},
        ctx.run_dir / "reliability.png",
    )
    artifacts.write_json(ctx.run_dir / "calibration.json", report)
    log.info(
        "federated calibration: T=%.3f from %d site validation cases, test ECE %.3f -> %.3f, "
        "conformal coverage %.3f",
        calibration.temperature,
        calibration.n_fit,
        report["ece_before"],
        report["ece_after"],
        report["conformal"]["coverage"],
    )
    return Calibrated(calibration.to_dict(), report, figure)


@task(name="evaluate")
def evaluate_task(
    ctx: RunContext,
    model: Any,
    test: SplitArrays,
    calibrated: Calibrated | None = None,
    split: SplitResult | None = None,
) -> Evaluation:
    """Test metrics of the probabilities the model is served with: calibrated ones when a
    calibration was fitted (`metrics["calibration"]`: ECE/NLL before and after, coverage,
    set size, referral rate); with the split's result, the leakage certificate and the score
    on the test images without a near-match in training (`metrics["leakage"]`)."""
    from components.calibration.record import Calibration
    from components.evaluation.leakage import clean_subset_metrics
    from components.evaluation.metrics import evaluate
    from components.evaluation.plots import confusion_matrix_png
    from components.evaluation.predict import predict_proba

    classes = ctx.class_names
    probs = predict_proba(model, test, preprocessing_from_config(ctx.cfg))
    calibration = Calibration.from_dict(calibrated.calibration if calibrated else None)
    if calibration is not None:
        probs = calibration.recalibrate(probs)
    metrics = evaluate(test.y, probs, classes, dangerous=ctx.cfg["dataset"]["dangerous"])
    if calibrated is not None:
        metrics["calibration"] = calibrated.report
    if split is not None and split.certificate is not None:
        metrics["leakage"] = clean_subset_metrics(
            test.ids, test.y, probs, classes, split.near_matched, metrics, split.certificate
        )
    png = confusion_matrix_png(metrics["confusion_matrix"], classes, ctx.run_dir / "confusion.png")
    artifacts.write_json(ctx.run_dir / "test_metrics.json", metrics)
    artifacts.metrics_table("test-metrics", metrics)
    return Evaluation(metrics=metrics, confusion_png=png)


@task(name="compare-baselines")
def compare_task(
    ctx: RunContext,
    trained: TrainedModel,
    arrays: dict[str, SplitArrays],
    data_fingerprint: str = "",
) -> dict[str, Any] | None:
    """For a model reading clinical records: the same test split scored by a clinical-only
    logistic regression and, for fusion, an image-only model of the same backbone trained by
    the same recipe (`components.evaluation.comparison`). None for an image model or with
    `evaluation.baselines=false`; a federated run reports why it has no baselines."""
    from components.data.inputs import CLINICAL, IMAGE, input_kinds
    from components.evaluation.comparison import (
        CLINICAL_ONLY,
        IMAGE_ONLY,
        compare,
        logistic_regression_probabilities,
    )
    from components.evaluation.predict import predict_proba
    from components.training.assembly import image_only
    from components.training.central import train_central

    cfg = ctx.cfg
    kinds = input_kinds(trained.architecture["name"])
    if CLINICAL not in kinds or not cfg["evaluation"]["baselines"]:
        return None
    log = get_run_logger()
    if trained.federation:
        reason = "no baselines: fitting them would pool the sites' records"
        log.info("comparison: %s", reason)
        return {"skipped": reason}
    train, test, pre = arrays["train"], arrays["test"], preprocessing_from_config(cfg)
    name = trained.architecture["name"]
    probabilities = {name: predict_proba(trained.model, test, pre)}
    if IMAGE in kinds:
        log.info("comparison: training the image-only baseline (%s)", kinds)
        out = ctx.run_dir / "baseline_image_only"
        baseline = train_central(cfg, arrays, out, image_only(trained.architecture))
        probabilities[IMAGE_ONLY] = predict_proba(baseline.model, test, pre)
        _baseline_bundle(ctx, baseline, out / "bundle", data_fingerprint)
    probabilities[CLINICAL_ONLY] = logistic_regression_probabilities(
        train.clinical, train.y, test.clinical, len(ctx.class_names), seed=cfg["seed"]
    )
    result = compare(
        test.y, probabilities, ctx.class_names, name, dangerous=cfg["dataset"]["dangerous"]
    )
    artifacts.write_json(ctx.run_dir / "comparison.json", result)
    artifacts.markdown("baseline-comparison", f"# Baselines\n\n{result['verdict']}")
    (log.info if result["beats_all_baselines"] else log.warning)(
        "comparison: %s", result["verdict"]
    )
    return result


def _baseline_bundle(ctx: RunContext, baseline: Any, out_dir: Path, data_fingerprint: str) -> None:
    """The image-only baseline as a model bundle beside the run (never registered): what
    `bench/lesion_localisation.py` and other inspections load."""
    from components.bundle_builder import bundle_settings, make_bundle

    make_bundle(
        baseline.model,
        architecture=baseline.architecture,
        privacy=baseline.privacy,
        class_names=ctx.class_names,
        preprocessing=preprocessing_from_config(ctx.cfg),
        metrics={},
        data_fingerprint=data_fingerprint,
        config=ctx.cfg,
        out_dir=out_dir,
        **bundle_settings(ctx.cfg),
    )


@task(name="bundle")
def bundle_task(
    ctx: RunContext,
    trained: TrainedModel,
    train: SplitArrays,
    metrics: dict[str, Any],
    data_fingerprint: str,
    calibration: dict[str, Any] | None = None,
    ood_stats: dict[str, Any] | None = None,
) -> Path:
    """Write the model bundle: weights, metadata, the calibration serving applies (if any),
    the OOD check's aggregate training-feature statistics (if any) and a SHAP background of
    constant grey levels; training images (background sample, case index) only with
    `package.training_images` (central runs without DP)."""
    from components.bundle_builder import bundle_settings, make_bundle

    bundle_dir = make_bundle(
        trained.model,
        architecture=trained.architecture,
        privacy=trained.privacy,
        class_names=ctx.class_names,
        preprocessing=preprocessing_from_config(ctx.cfg),
        train_x=train.x,
        train_y=train.y,
        metrics=metrics,
        data_fingerprint=data_fingerprint,
        config=ctx.cfg,
        out_dir=ctx.run_dir / "bundle",
        calibration=calibration,
        ood_stats=ood_stats,
        tabular_schema=train.schema,
        **bundle_settings(ctx.cfg),
    )
    get_run_logger().info("model bundle written to %s", bundle_dir)
    return bundle_dir


def registry_client(ctx: RunContext):
    """The run's MLflow registry (`registry.tracking_uri`, else the workspace's SQLite)."""
    from components.registry import RegistryClient

    uri = ctx.cfg["registry"]["tracking_uri"] or ctx.workspace.mlflow_uri
    return RegistryClient(uri, ctx.workspace.mlflow_artifacts)


def close_failed_run(ctx: RunContext, run_id: str | None) -> None:
    """Close a run opened before training as FAILED (a later step of the flow failed)."""
    import contextlib

    if run_id:
        with contextlib.suppress(Exception):
            registry_client(ctx).end_run(run_id, "FAILED")


@task(name="register")
def register_task(
    ctx: RunContext,
    bundle_dir: Path,
    metrics: dict[str, Any],
    history: list[dict[str, Any]],
    reports: dict[str, Any],
    fingerprints: dict[str, str],
    run_id: str | None = None,
) -> Registration:
    """Log the run to MLflow (into `run_id` when training opened it; `history` is then only
    what was not logged live), register the bundle and apply the champion gate."""
    from components.registry import GateConfig, TrainingRecord

    reg = ctx.cfg["registry"]
    client = registry_client(ctx)
    record = TrainingRecord(
        config=ctx.cfg,
        bundle_dir=bundle_dir,
        test_metrics=metrics,
        history=history,
        manifest_fingerprint=fingerprints["data"],
        test_fingerprint=fingerprints["test"],
        reports=reports,
        figures=_figures(ctx.run_dir),
        run_name=ctx.cfg["run_name"] or ctx.run_dir.name,
        tags={f"privacy.{k}": str(v) for k, v in (reports.get("privacy") or {}).items()}
        | _selection_tags(reports.get("selection")),
    )
    run_id = client.log_training_run(record, run_id=run_id)
    gate = GateConfig(metric=reg["gate_metric"], mode=reg["gate_mode"], min_delta=reg["min_delta"])
    decision = _with_retries(
        lambda: client.register_candidate(
            run_id,
            reg["model_name"],
            metrics,
            gate,
            test_fingerprint=fingerprints["test"],
            inputs=_inputs_tag(ctx.cfg["model"]["name"]),
        )
    )
    get_run_logger().info("registry: %s", decision.reason)
    return Registration(run_id=run_id, decision=decision)


def _inputs_tag(architecture: str) -> str:
    """What the model reads, as the registry records it: image, clinical or image+clinical."""
    from components.data.inputs import input_kinds

    return "+".join(input_kinds(architecture))


def _selection_tags(selection: dict[str, Any] | None) -> dict[str, str]:
    """The kept epoch and why, as MLflow tags (`selection.epoch`, `.monitor`, `.reason`)."""
    if not selection:
        return {}
    return {f"selection.{k}": str(selection[k]) for k in ("epoch", "monitor", "reason")}


def _figures(run_dir: Path) -> dict[str, Path]:
    """The run's evaluation figures that exist (the reliability diagram only when calibrated)."""
    names = {"confusion_matrix": "confusion.png", "reliability": "reliability.png"}
    return {k: run_dir / f for k, f in names.items() if (run_dir / f).is_file()}


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
def package_task(ctx: RunContext, bundle_dir: Path, model_version: str, build: bool) -> Packaged:
    from serving.packaging import build_bento, import_bundle

    tag = import_bundle(
        bundle_dir,
        labels={"registered_model": ctx.cfg["registry"]["model_name"], "version": model_version},
    )
    bento = build_bento(PROJECT_ROOT) if build else None
    get_run_logger().info("packaged model %s, bento %s", tag, bento)
    return Packaged(bento_model=tag, bento=bento)
