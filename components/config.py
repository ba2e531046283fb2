"""Compose and validate the Hydra run configuration (conf/).

`compose(["dataset=busi", "trainer.max_epochs=3"])` returns an OmegaConf DictConfig merged
onto the dataclass schema below, so a typo or a wrong type fails before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = PROJECT_ROOT / "conf"


@dataclass
class PathsConf:
    workspace: str = ".oncoflow"
    data_root: str = "../shared/data"


@dataclass
class SplitConf:
    keep_given: bool = True
    val_fraction: float = 0.15
    test_fraction: float = 0.15


@dataclass
class LimitsConf:
    min_side: int = 16
    max_side: int = 4096


@dataclass
class DatasetConf:
    name: str = "synthetic"
    adapter: str = "synthetic"  # folder | csv | npz | dicom | synthetic
    root: str = ""
    classes: list[str] = field(default_factory=list)
    image_size: int = 64
    channels: int = 3
    split: SplitConf = field(default_factory=SplitConf)
    limits: LimitsConf = field(default_factory=LimitsConf)
    max_per_class: int | None = None
    hflip: bool = True  # may training flip images left-right? (off when laterality matters)
    synthetic: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConf:
    name: str = "small_cnn"
    norm: str = "batch"
    pretrained: bool = False
    small_input: bool = True
    width: int = 16


@dataclass
class TrainerConf:
    max_epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    early_stopping_patience: int = 3
    imbalance: str = "weighted_loss"
    augment: bool = True
    num_workers: int = 0
    deterministic: bool = True


@dataclass
class ValidationConf:
    on_failure: str = "stop"
    min_per_class: int = 5


@dataclass
class RegistryConf:
    tracking_uri: str | None = None
    model_name: str = "oncoflow"
    gate_metric: str = "macro_f1"
    gate_mode: str = "max"
    min_delta: float = 0.0


@dataclass
class PackageConf:
    build_bento: bool = True


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


@dataclass
class RunConf:
    paths: PathsConf = field(default_factory=PathsConf)
    dataset: DatasetConf = field(default_factory=DatasetConf)
    model: ModelConf = field(default_factory=ModelConf)
    training: dict[str, Any] = field(default_factory=lambda: {"mode": "central"})
    federation: dict[str, Any] = field(default_factory=dict)
    privacy: dict[str, Any] = field(default_factory=lambda: {"mode": "none"})
    serving: ServingConf = field(default_factory=ServingConf)
    seed: int = 42
    run_name: str | None = None
    trainer: TrainerConf = field(default_factory=TrainerConf)
    validation: ValidationConf = field(default_factory=ValidationConf)
    registry: RegistryConf = field(default_factory=RegistryConf)
    package: PackageConf = field(default_factory=PackageConf)


_CHOICES = {
    "dataset.adapter": {"folder", "csv", "npz", "dicom", "synthetic"},
    "model.norm": {"batch", "group"},
    "trainer.imbalance": {"none", "weighted_loss", "weighted_sampler"},
    "validation.on_failure": {"stop", "quarantine"},
    "registry.gate_mode": {"max", "min"},
}


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("oncoflow_root"):
        OmegaConf.register_new_resolver("oncoflow_root", lambda: str(PROJECT_ROOT))


def compose(overrides: list[str] | tuple[str, ...] = (), config_name: str = "config"):
    """Compose conf/ with Hydra-style overrides; return a resolved, schema-checked DictConfig."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    _register_resolvers()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            raw = hydra_compose(config_name=config_name, overrides=list(overrides))
        schema = OmegaConf.structured(RunConf)
        cfg = OmegaConf.merge(schema, raw)
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(f"invalid configuration: {str(exc).splitlines()[0]}") from exc
    check(cfg)
    return cfg


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
    fractions = ds.split.val_fraction + ds.split.test_fraction
    if not (0 < ds.split.val_fraction < 1 and 0 < ds.split.test_fraction < 1 and fractions < 1):
        raise ConfigError("split fractions must be in (0, 1) and sum to less than 1")
    if cfg.trainer.max_epochs < 1 or cfg.trainer.batch_size < 1 or cfg.trainer.lr <= 0:
        raise ConfigError("trainer.max_epochs, trainer.batch_size and trainer.lr must be positive")


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
