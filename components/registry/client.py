"""MLflow tracking and model registry: log a training run, register it, gate the champion.

Works against any MLflow tracking URI that has a model registry: a SQLite database (the
workspace default) or an MLflow server (``http://...``). The file store is refused, because
it has no model registry worth the name and is deprecated.

Registered versions point at the run's ``bundle/`` artifacts, the model bundle directory
(`components.bundle`), so `download_bundle` gives back exactly what training saved.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from components.errors import ConfigError, NotFound, OncoflowError, RegistryError
from components.registry.gate import GateConfig, GateDecision, decide

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_EXPERIMENT = "oncoflow"
BUNDLE_ARTIFACT = "bundle"
CHAMPION = "champion"
CHALLENGER = "challenger"
METRIC_PREFIX = "test_"
TAG_TEST_FINGERPRINT = "test_set_fingerprint"
TAG_MANIFEST_FINGERPRINT = "manifest_fingerprint"
TAG_RUN_ID = "run_id"
TAG_GATE_DECISION = "gate_decision"
TAG_GATE_REASON = "gate_reason"
TAG_GATE_METRIC = "gate_metric"
TAG_INPUTS = "inputs"  # image | clinical | image+clinical: the gate compares like with like
TAG_GIT_COMMIT = "mlflow.source.git.commit"

# MLflow's limits (mlflow.utils.validation); used when that module does not expose them.
_MAX_PARAM_VALUE = 6000
_MAX_KEY = 250
_MAX_TAG_VALUE = 8000
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_\-. /:]")


@dataclass
class TrainingRecord:
    """What one training run logs to MLflow.

    config:        the run configuration (nested dict), logged as flattened params
    bundle_dir:    the saved model bundle directory, logged under ``bundle/``
    test_metrics:  held-out test metrics, nested allowed (``per_class.<name>.sensitivity``);
                   non-scalars such as the confusion matrix go to ``test_metrics.json``
    history:       one dict of metrics per epoch (or round); ``epoch``/``step`` key = step
    reports:       name -> JSON file path or dict (data, split, validation reports)
    figures:       name -> image path (e.g. the confusion-matrix PNG)
    """

    config: dict[str, Any]
    bundle_dir: Path
    test_metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    manifest_fingerprint: str = ""
    test_fingerprint: str = ""
    reports: dict[str, Path | dict[str, Any]] = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)
    run_name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


def flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested metrics -> ``{"a.b": float}``, keeping only real numbers (bools and lists dropped)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_metrics(value, f"{name}."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = float(value)
        elif hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy/torch scalar
            out[name] = float(value.item())
    return out


def _flatten_params(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten_params(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value, default=str)
    return out


def _safe_name(name: str) -> str:
    return _UNSAFE_NAME.sub("_", name)[:_MAX_KEY]


def _truncate(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _git_commit() -> tuple[str, bool] | None:
    """(commit, dirty) of the code this process runs from, or None outside a git checkout."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit, bool(status)) if commit else None


def _is_version(ref: str | int) -> bool:
    return isinstance(ref, int) or str(ref).isdigit()


@contextlib.contextmanager
def _mlflow_errors(action: str) -> Iterator[None]:
    """Turn MLflow's exceptions into oncoflow's (NotFound for missing things)."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except OncoflowError:
        raise
    except MlflowException as exc:
        code = getattr(exc, "error_code", "")
        message = str(exc.message if hasattr(exc, "message") else exc).splitlines()[0]
        if code == "RESOURCE_DOES_NOT_EXIST":
            raise NotFound(f"{action}: {message}") from exc
        raise RegistryError(f"{action}: {message}") from exc


def check_tracking_uri(tracking_uri: str) -> str:
    """Accept ``sqlite:///...``, ``http(s)://...`` and other database URIs; refuse file stores."""
    uri = str(tracking_uri).strip()
    if not uri:
        raise ConfigError("registry.tracking_uri is empty")
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if scheme in ("", "file"):
        raise ConfigError(
            f"MLflow tracking URI {uri!r} is a file store, which oncoflow does not support; "
            "use a database (sqlite:///path/to/mlflow.db) or a server (http://host:5000)"
        )
    return uri


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :])


class RegistryClient:
    """One experiment and its registered models on one MLflow tracking server or database.

    `artifact_location` (a local directory) is used when creating the experiment for database
    URIs (default for SQLite: ``mlartifacts/`` next to the database) and ignored for tracking
    servers, which store artifacts where they are configured to.
    """

    def __init__(
        self,
        tracking_uri: str,
        artifact_location: Path | None = None,
        experiment: str = DEFAULT_EXPERIMENT,
    ) -> None:
        from mlflow.tracking import MlflowClient

        self.tracking_uri = check_tracking_uri(tracking_uri)
        db = _sqlite_path(self.tracking_uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
            artifact_location = artifact_location or db.parent / "mlartifacts"
        elif self.tracking_uri.startswith(("http://", "https://", "databricks")):
            # A tracking server decides where artifacts go; a local path would be wrong there.
            artifact_location = None
        self.artifact_location = Path(artifact_location).resolve() if artifact_location else None
        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        self.experiment_name = experiment
        self.experiment_id = self._ensure_experiment(experiment)

    @classmethod
    def for_workspace(cls, workspace, tracking_uri: str | None = None) -> RegistryClient:
        """The workspace's SQLite registry, or `tracking_uri` when the config sets one."""
        if tracking_uri:
            return cls(tracking_uri)
        return cls(workspace.mlflow_uri, workspace.mlflow_artifacts)

    def _ensure_experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        with _mlflow_errors(f"cannot open MLflow experiment {name!r} at {self.tracking_uri}"):
            existing = self.client.get_experiment_by_name(name)
            if existing is not None:
                return existing.experiment_id
            location = self.artifact_location.as_uri() if self.artifact_location else None
            try:
                return self.client.create_experiment(name, artifact_location=location)
            except MlflowException as exc:  # created concurrently by another process
                existing = self.client.get_experiment_by_name(name)
                if existing is None:
                    raise exc from None
                return existing.experiment_id

    # ---------------------------------------------------------------- tracking

    def _create_run(self, run_name: str | None, tags: dict[str, str]) -> str:
        """A new RUNNING run tagged with `tags` and the code's git commit; returns its id."""
        tags = dict(tags)
        git = _git_commit()
        if git:
            tags[TAG_GIT_COMMIT] = git[0]
            tags["git_dirty"] = str(git[1]).lower()
        with _mlflow_errors("cannot create MLflow run"):
            run = self.client.create_run(
                self.experiment_id,
                run_name=run_name,
                tags={k: _truncate(str(v), _MAX_TAG_VALUE) for k, v in tags.items() if v != ""},
            )
        return run.info.run_id

    def start_training_run(
        self, run_name: str | None, config: dict[str, Any], tags: dict[str, str] | None = None
    ) -> str:
        """Open a RUNNING run before training starts (its params are the config), so metrics
        can be logged as they come (`log_round`); `log_training_run(record, run_id=...)`
        completes and closes it."""
        run_id = self._create_run(run_name, tags or {})
        with _mlflow_errors(f"cannot log the config of run {run_id}"):
            self.client.log_batch(run_id, params=_params(config))  # MLflow splits the batch
        return run_id

    def log_round(
        self,
        run_id: str,
        metrics: dict[str, Any],
        *,
        step: int,
        timestamp: float | None = None,
        tags: dict[str, str] | None = None,
    ) -> int:
        """Log one round (or epoch) as it ends: `metrics` (nested allowed, flattened to
        `a.b`) at `step`, stamped with `timestamp` (Unix seconds; now when None), and `tags`.
        Returns the number of metrics logged."""
        from mlflow.entities import Metric

        stamp = int((time.time() if timestamp is None else float(timestamp)) * 1000)
        entries = [
            Metric(_safe_name(k), v, stamp, int(step))
            for k, v in flatten_metrics(metrics).items()
            if k not in ("epoch", "step")
        ]
        with _mlflow_errors(f"cannot log step {step} of run {run_id}"):
            self.client.log_batch(run_id, metrics=entries, tags=_run_tags(tags or {}))
        return len(entries)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        """Set run tags (values truncated to MLflow's limit)."""
        with _mlflow_errors(f"cannot tag run {run_id}"):
            self.client.log_batch(run_id, tags=_run_tags(tags))

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """Close a run opened by `start_training_run` (FINISHED, FAILED or KILLED)."""
        with _mlflow_errors(f"cannot close run {run_id}"):
            self.client.set_terminated(run_id, status)

    def log_training_run(self, record: TrainingRecord, run_id: str | None = None) -> str:
        """Log `record` as one finished MLflow run and return its run id.

        With `run_id` (a run opened by `start_training_run`), the record goes into that run:
        its params are already there, and its history rows are expected to have been logged
        as they came (`record.history` is logged as well, so pass only what is missing)."""
        from mlflow.entities import Metric

        bundle_dir = Path(record.bundle_dir)
        if not (bundle_dir / "bundle.json").is_file():
            raise ConfigError(f"{bundle_dir} is not a saved model bundle (no bundle.json)")
        tags = {
            TAG_MANIFEST_FINGERPRINT: record.manifest_fingerprint,
            TAG_TEST_FINGERPRINT: record.test_fingerprint,
        } | dict(record.tags)
        if run_id is None:
            run_id = self._create_run(record.run_name, tags)
            params, extra_tags = _params(record.config), []
        else:  # opened by start_training_run: params are there (MLflow refuses to rewrite them)
            params, extra_tags = [], _run_tags({k: v for k, v in tags.items() if v != ""})
        try:
            now = int(time.time() * 1000)
            metrics = [
                Metric(_safe_name(f"{METRIC_PREFIX}{k}"), v, now, 0)
                for k, v in flatten_metrics(record.test_metrics).items()
            ]
            for index, epoch in enumerate(record.history):
                step = int(epoch.get("epoch", epoch.get("step", index)))
                metrics += [
                    Metric(_safe_name(k), v, now, step)
                    for k, v in flatten_metrics(epoch).items()
                    if k not in ("epoch", "step")
                ]
            with _mlflow_errors(f"cannot log run {run_id}"):
                self.client.log_batch(run_id, metrics=metrics, params=params, tags=extra_tags)
                self.client.log_dict(run_id, _json_safe(record.test_metrics), "test_metrics.json")
                self.client.log_dict(run_id, _json_safe(record.config), "config.json")
                for name, report in record.reports.items():
                    if isinstance(report, dict):
                        self.client.log_dict(run_id, _json_safe(report), f"reports/{name}.json")
                    else:
                        self.client.log_artifact(run_id, str(report), "reports")
                for _name, figure in record.figures.items():
                    self.client.log_artifact(run_id, str(figure), "figures")
                self.client.log_artifacts(run_id, str(bundle_dir), BUNDLE_ARTIFACT)
        except BaseException:
            with contextlib.suppress(Exception):
                self.client.set_terminated(run_id, "FAILED")
            raise
        self.client.set_terminated(run_id, "FINISHED")
        log.info("logged MLflow run %s (%d params, %d metrics)", run_id, len(params), len(metrics))
        return run_id

    # ---------------------------------------------------------------- registry

    def register_candidate(
        self,
        run_id: str,
        model_name: str,
        test_metrics: dict[str, Any],
        gate: GateConfig,
        test_fingerprint: str | None = None,
        inputs: str | None = None,
    ) -> GateDecision:
        """Register the run's bundle as a new version of `model_name` and apply the gate.

        The test-set fingerprint defaults to the run's ``test_set_fingerprint`` tag. The
        version gets alias ``champion`` if the gate promotes it, else ``challenger``.
        `inputs` ("image", "clinical", "image+clinical") is recorded on the version; the gate
        compares only versions reading the same inputs.
        """
        metrics = flatten_metrics(test_metrics)
        with _mlflow_errors(f"cannot register run {run_id} as {model_name!r}"):
            run = self.client.get_run(run_id)
            bundle_files = {f.path for f in self.client.list_artifacts(run_id, BUNDLE_ARTIFACT)}
            if f"{BUNDLE_ARTIFACT}/bundle.json" not in bundle_files:
                raise RegistryError(f"run {run_id} has no model bundle under {BUNDLE_ARTIFACT}/")
            fingerprint = test_fingerprint or run.data.tags.get(TAG_TEST_FINGERPRINT, "")
            self._ensure_registered_model(model_name)
            champion = self._champion_version(model_name)
        # Decide before registering: a misconfigured gate (ConfigError) leaves no version behind.
        champion_metrics = _tag_metrics(champion.tags) if champion else None
        same = champion is None or (
            bool(fingerprint) and champion.tags.get(TAG_TEST_FINGERPRINT) == fingerprint
        )
        champion_inputs = champion.tags.get(TAG_INPUTS) if champion else None
        decision = decide(
            metrics,
            champion_metrics,
            gate.metric,
            gate.mode,
            gate.min_delta,
            same,
            inputs=(inputs, champion_inputs),
        )
        if decision.status == "not_comparable" and not fingerprint:
            decision = replace(
                decision, reason=decision.reason + " (candidate has no test-set fingerprint)"
            )
        tags = self._version_tags(metrics, fingerprint, run_id, gate) | {
            **({TAG_INPUTS: inputs} if inputs else {}),
            TAG_GATE_DECISION: decision.status,
            TAG_GATE_REASON: _truncate(decision.reason, _MAX_TAG_VALUE),
        }
        if champion is not None:
            tags["compared_with"] = str(champion.version)
        alias = CHAMPION if decision.promote else CHALLENGER
        with _mlflow_errors(f"cannot register run {run_id} as {model_name!r}"):
            version = self.client.create_model_version(
                model_name,
                source=f"{run.info.artifact_uri}/{BUNDLE_ARTIFACT}",
                run_id=run_id,
                tags=tags,
            ).version
            self.client.set_registered_model_alias(model_name, alias, version)
            if decision.promote and champion is not None:
                self.client.set_model_version_tag(
                    model_name, champion.version, "superseded_by", str(version)
                )
        log.info("%s v%s -> %s: %s", model_name, version, alias, decision.reason)
        return replace(
            decision,
            version=str(version),
            previous_champion=str(champion.version) if champion else None,
            alias=alias,
        )

    def promote(self, model_name: str, version: str | int, reason: str) -> None:
        """Move the champion alias by hand (e.g. after a test-set change); `reason` is kept."""
        if not reason.strip():
            raise ConfigError("a manual promotion needs a reason")
        with _mlflow_errors(f"cannot promote {model_name} v{version}"):
            self.client.get_model_version(model_name, str(version))
            self.client.set_model_version_tag(
                model_name, str(version), TAG_GATE_DECISION, "promoted_manually"
            )
            self.client.set_model_version_tag(
                model_name, str(version), TAG_GATE_REASON, _truncate(reason, _MAX_TAG_VALUE)
            )
            self.client.set_registered_model_alias(model_name, CHAMPION, str(version))

    def _ensure_registered_model(self, name: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
        except MlflowException as exc:
            if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                raise
            try:
                self.client.create_registered_model(name, description="oncoflow diagnosis model")
            except MlflowException:  # created concurrently
                self.client.get_registered_model(name)

    def _version_tags(
        self, metrics: dict[str, float], fingerprint: str, run_id: str, gate: GateConfig
    ) -> dict[str, str]:
        tags = {_safe_name(f"{METRIC_PREFIX}{k}"): repr(v) for k, v in metrics.items()}
        tags |= {
            TAG_TEST_FINGERPRINT: fingerprint,
            TAG_RUN_ID: run_id,
            TAG_GATE_METRIC: f"{gate.metric} ({gate.mode}, min_delta={gate.min_delta:g})",
        }
        return tags

    def _champion_version(self, model_name: str):
        try:
            return self._resolve(model_name, CHAMPION)
        except NotFound:
            return None

    def _resolve(self, model_name: str, ref: str | int):
        from mlflow.exceptions import MlflowException

        action = f"no version {ref!r} of registered model {model_name!r}"
        with _mlflow_errors(action):
            if _is_version(ref):
                return self.client.get_model_version(model_name, str(ref))
            try:
                return self.client.get_model_version_by_alias(model_name, str(ref))
            except MlflowException as exc:  # MLflow reports a missing alias as a bad parameter
                if getattr(exc, "error_code", "") == "INVALID_PARAMETER_VALUE":
                    raise NotFound(f"{action}: alias {ref!r} is not set") from exc
                raise

    # ---------------------------------------------------------------- read side

    def download_bundle(self, model_name: str, dst: Path, ref: str | int = CHAMPION) -> Path:
        """Download the bundle of version/alias `ref` into `dst` (created; must be empty)."""
        import mlflow.artifacts

        dst = Path(dst)
        if dst.exists() and any(dst.iterdir()):
            raise ConfigError(f"{dst} already exists and is not empty")
        version = self._resolve(model_name, ref)
        dst.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".download-") as tmp:
            with _mlflow_errors(f"cannot download {model_name} v{version.version}"):
                local = mlflow.artifacts.download_artifacts(
                    artifact_uri=version.source, dst_path=tmp, tracking_uri=self.tracking_uri
                )
            if not (Path(local) / "bundle.json").is_file():
                raise RegistryError(
                    f"{model_name} v{version.version} holds no model bundle at {version.source}"
                )
            if dst.exists():
                dst.rmdir()
            shutil.move(local, dst)
        return dst

    def version_info(self, model_name: str, ref: str | int = CHAMPION) -> dict[str, Any]:
        """Metadata of one version: number, aliases, run, metrics, fingerprint, gate outcome."""
        version = self._resolve(model_name, ref)
        return _describe(model_name, version)

    def champion_info(self, model_name: str) -> dict[str, Any] | None:
        """The champion's metadata, or None when the model or its champion does not exist."""
        try:
            return self.version_info(model_name, CHAMPION)
        except NotFound:
            return None


def _params(config: dict[str, Any]) -> list:
    from mlflow.entities import Param

    return [
        Param(_safe_name(k), _truncate(v, _MAX_PARAM_VALUE))
        for k, v in _flatten_params(config).items()
    ]


def _run_tags(tags: dict[str, Any]) -> list:
    from mlflow.entities import RunTag

    return [RunTag(_safe_name(k), _truncate(str(v), _MAX_TAG_VALUE)) for k, v in tags.items()]


def _tag_metrics(tags: dict[str, str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in tags.items():
        if key.startswith(METRIC_PREFIX) and key != TAG_TEST_FINGERPRINT:
            try:
                out[key[len(METRIC_PREFIX) :]] = float(value)
            except ValueError:
                continue
    return out


def _describe(model_name: str, version) -> dict[str, Any]:
    tags = dict(version.tags)
    return {
        "name": model_name,
        "version": str(version.version),
        "aliases": list(getattr(version, "aliases", []) or []),
        "run_id": version.run_id,
        "source": version.source,
        "metrics": _tag_metrics(tags),
        "test_set_fingerprint": tags.get(TAG_TEST_FINGERPRINT, ""),
        "gate_decision": tags.get(TAG_GATE_DECISION, ""),
        "gate_reason": tags.get(TAG_GATE_REASON, ""),
        "created": version.creation_timestamp,
    }


def _json_safe(data: Any) -> Any:
    """Round-trip through JSON with NaN/inf as strings, so MLflow's JSON artifacts are valid."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    return clean(json.loads(json.dumps(data, default=lambda o: getattr(o, "tolist", str)(o))))
