"""Privacy settings: parse and validate `cfg["privacy"]` against the training and federation setup.

`validate_privacy(privacy_cfg, federation_cfg, trainer_cfg)` returns a frozen `PrivacySettings`
or raises `ConfigError` saying what to change. Modes:

- `none`       no formal privacy.
- `dp_sgd`     DP-SGD (Opacus) inside the training loop: central training, or each site's local
               training in a federation (sample-level (ε, δ)-DP per site, over all rounds).
- `central_dp` federated only: the server clips each site's update and adds Gaussian noise to
               the aggregate (Flower's DP strategy wrappers, fixed or adaptive clipping).
- `secagg`     federated only: SecAgg+ (the server sees only the sum of updates); each site bounds
               the L2 norm of its update before masking.
- `secagg_dp`  `secagg` plus DP-SGD at each site (`dp_sgd` accounting per site).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from components.errors import ConfigError
from components.typed_config import load

log = logging.getLogger(__name__)

MODES = ("none", "dp_sgd", "central_dp", "secagg", "secagg_dp")
ACCOUNTANTS = ("rdp", "prv")
CENTRAL_CLIPPING = ("fixed", "adaptive")
GRAD_SAMPLE_MODES = ("hooks", "functorch")
# Rules that must see every individual update; SecAgg+ only reveals their sum.
PER_UPDATE_RULES = frozenset({"krum", "multikrum", "bulyan", "trimmed_mean", "median"})
MEAN_RULES = frozenset({"fedavg", "fedprox"})
FEDERATED_ONLY = frozenset({"central_dp", "secagg", "secagg_dp"})
SECAGG_MODES = frozenset({"secagg", "secagg_dp"})
DP_SGD_MODES = frozenset({"dp_sgd", "secagg_dp"})


@dataclass(frozen=True)
class CentralDPSettings:
    """Server-side DP (Flower `DifferentialPrivacyServerSide{Fixed,Adaptive}Clipping`)."""

    clipping: str = "fixed"  # fixed | adaptive
    noise_multiplier: float | None = None  # null: calibrate to epsilon over federation.rounds
    clipping_norm: float = 1.0  # fixed clipping: the bound; adaptive: the initial bound
    target_clipped_quantile: float = 0.5
    clip_norm_lr: float = 0.2
    clipped_count_stddev: float | None = None


@dataclass(frozen=True)
class SecAggSettings:
    """Flower SecAgg+ parameters (see `flwr.server.workflow.SecAggPlusWorkflow`)."""

    num_shares: Any = 1.0  # a float: share of the sampled sites; an int > 2: a count
    # a float: share of the shares (or an int count): more = safer, fewer dropouts tolerated
    reconstruction_threshold: Any = 0.67
    clipping_range: float = 8.0  # every coordinate clipped to +-range before quantisation
    quantization_range: int = 2**22  # levels (more: finer, needs a larger modulus)
    modulus_range: int = 2**32  # a power of two > quantization_range * sites
    # >= the largest site's example count (larger: coarser quantisation); a site with more
    # examples refuses to train
    max_weight: float = 1e4
    timeout: float | None = None  # seconds per protocol stage; null: federation.round_timeout


@dataclass(frozen=True)
class PrivacySettings:
    """The `privacy` config section: its schema and the one place of its defaults.

    The presets in conf/privacy/ set only what differs from these defaults.
    """

    mode: str = "none"  # none | dp_sgd | central_dp | secagg | secagg_dp
    epsilon: float | None = None  # target / budget; null: no budget (noise_multiplier given)
    delta: float = 1e-5
    noise_multiplier: float | None = None  # DP-SGD σ; null: calibrated to epsilon over the plan
    max_grad_norm: float = 1.0  # per-sample clipping bound C of DP-SGD
    accountant: str = "rdp"  # rdp | prv
    grad_sample_mode: str = "hooks"  # hooks | functorch
    secure_mode: bool = False
    update_norm_bound: float | None = None  # client-side L2 bound of a site's update (SecAgg+)
    central: CentralDPSettings = field(default_factory=CentralDPSettings)
    secagg: SecAggSettings = field(default_factory=SecAggSettings)

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def dp_sgd(self) -> bool:
        """DP-SGD runs inside (central or local) training."""
        return self.mode in DP_SGD_MODES

    @property
    def central_dp(self) -> bool:
        return self.mode == "central_dp"

    @property
    def secure_aggregation(self) -> bool:
        return self.mode in SECAGG_MODES

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> PrivacySettings:
        """Typed settings from a mapping (a config section or `to_dict()` read back)."""
        return load(cls, data if data is not None else {}, "privacy")


def _positive(where: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{where} must be a positive finite number, got {value}")


def _choice(where: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"{where}={value!r}; choose one of {', '.join(options)}")


def _check_central(c: CentralDPSettings) -> None:
    _choice("privacy.central.clipping", c.clipping, CENTRAL_CLIPPING)
    for key in ("noise_multiplier", "clipping_norm", "target_clipped_quantile", "clip_norm_lr"):
        _positive(f"privacy.central.{key}", getattr(c, key))
    _positive("privacy.central.clipped_count_stddev", c.clipped_count_stddev)
    if c.target_clipped_quantile >= 1:
        raise ConfigError("privacy.central.target_clipped_quantile must be in (0, 1)")


def _check_secagg(a: SecAggSettings) -> None:
    for key in ("num_shares", "reconstruction_threshold"):
        value = getattr(a, key)
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"privacy.secagg.{key} must be a positive count or fraction")
        if isinstance(value, float) and value > 1:
            raise ConfigError(f"privacy.secagg.{key} as a fraction must be in (0, 1]")
    modulus, quantization = a.modulus_range, a.quantization_range
    if modulus > 2**32 or modulus & (modulus - 1) or modulus <= quantization:
        raise ConfigError(
            "privacy.secagg.modulus_range must be a power of two, at most 2**32 and larger than "
            "quantization_range"
        )
    _positive("privacy.secagg.clipping_range", a.clipping_range)
    _positive("privacy.secagg.max_weight", a.max_weight)


def _check_federation(mode: str, federation: Mapping[str, Any] | None) -> None:
    federated = bool(federation)
    if mode in FEDERATED_ONLY and not federated:
        raise ConfigError(
            f"privacy={mode} protects a federation and needs training=federated; for central "
            "training use privacy=dp_eps8 / dp_eps3 (DP-SGD)"
        )
    if not federated:
        return
    strategy = str(federation.get("strategy", "fedavg"))
    if mode == "central_dp" and strategy not in MEAN_RULES:
        raise ConfigError(
            f"federation={strategy} cannot run with privacy=central_dp: the server's noise is "
            "calibrated to the sensitivity of an unweighted mean of clipped updates (C / number "
            "of sites); use federation=fedavg or fedprox"
        )
    if mode in DP_SGD_MODES and strategy == "fedprox":
        raise ConfigError(
            f"federation=fedprox cannot run with privacy={mode}: DP-SGD uses Opacus' "
            "per-sample gradients, which do not include FedProx's proximal term (it would be "
            "silently dropped); use federation=fedavg"
        )
    if mode not in SECAGG_MODES:
        return
    if strategy in PER_UPDATE_RULES:
        raise ConfigError(
            f"federation={strategy} cannot run with privacy={mode}: under SecAgg+ the server only "
            "learns the sum of the sites' updates, never an individual update, so a rule that "
            f"compares or sorts individual updates ({', '.join(sorted(PER_UPDATE_RULES))}) has "
            "nothing to work on. Supported: federation=fedavg or fedprox with SecAgg+; each site "
            "bounds its own update norm (privacy.update_norm_bound) before masking, which limits "
            "what a single faulty or malicious site can do to the sum; add DP with "
            "privacy=secagg_dp"
        )


def check_trainer(settings: PrivacySettings, trainer: Mapping[str, Any] | None) -> None:
    """DP-SGD needs Poisson sampling and per-sample losses that do not depend on each other.

    `trainer.imbalance=weighted_sampler` replaces Poisson sampling, and `weighted_loss`
    normalises the batch loss by the batch's total class weight, which couples the samples'
    gradients (the sensitivity is then no longer the clipping bound): both are refused.
    """
    if not settings.dp_sgd or not trainer:
        return
    imbalance = str(trainer.get("imbalance", "none"))
    if imbalance != "none":
        raise ConfigError(
            f"trainer.imbalance={imbalance} is incompatible with DP-SGD (it needs Poisson "
            "sampling and independent per-sample losses for its guarantee); set "
            "trainer.imbalance=none"
        )


def validate_privacy(
    privacy: Any,
    federation: Mapping[str, Any] | None = None,
    trainer: Mapping[str, Any] | None = None,
) -> PrivacySettings:
    """Validate the `privacy` config section (a mapping, DictConfig or `PrivacySettings`).

    `federation` is the `federation` section when training is federated (None/empty for central
    training); `trainer` the `trainer` section (checked for DP-SGD compatibility).
    """
    settings = PrivacySettings.from_dict(privacy if privacy is not None else {"mode": "none"})
    mode = settings.mode
    _choice("privacy.mode", mode, MODES)
    if mode == "none":
        return PrivacySettings()
    _choice("privacy.accountant", settings.accountant, ACCOUNTANTS)
    _choice("privacy.grad_sample_mode", settings.grad_sample_mode, GRAD_SAMPLE_MODES)
    for key in ("epsilon", "delta", "noise_multiplier", "max_grad_norm", "update_norm_bound"):
        _positive(f"privacy.{key}", getattr(settings, key))
    if settings.delta >= 1:
        raise ConfigError("privacy.delta must be in (0, 1); use about 1/N or smaller")
    _check_central(settings.central)
    _check_secagg(settings.secagg)
    needs_noise = settings.dp_sgd or settings.central_dp
    sigma = settings.central.noise_multiplier if settings.central_dp else settings.noise_multiplier
    if needs_noise and sigma is None and settings.epsilon is None:
        raise ConfigError(
            f"privacy={mode} needs privacy.epsilon (noise calibrated to it over the whole "
            "training) or an explicit noise multiplier"
        )
    if settings.secure_aggregation:
        if settings.update_norm_bound is None:
            raise ConfigError(
                f"privacy={mode} needs privacy.update_norm_bound: each site clips its update "
                "to this L2 norm before SecAgg+ masks it"
            )
        if settings.update_norm_bound > settings.secagg.clipping_range:
            raise ConfigError(
                "privacy.update_norm_bound must not exceed privacy.secagg.clipping_range "
                "(SecAgg+ clips every coordinate to ±clipping_range before quantising)"
            )
    _check_federation(mode, federation)
    check_trainer(settings, trainer)
    if settings.secure_aggregation and federation:
        hygiene = dict(federation.get("hygiene") or {})
        if hygiene.get("max_norm_ratio") is not None or hygiene.get("max_norm") is not None:
            log.info(
                "privacy=%s: server-side update hygiene cannot see individual updates and is "
                "replaced by the sites' update_norm_bound",
                mode,
            )
    return settings


__all__ = [
    "MODES",
    "PER_UPDATE_RULES",
    "CentralDPSettings",
    "PrivacySettings",
    "SecAggSettings",
    "check_trainer",
    "validate_privacy",
]
