"""Federation settings: parse and validate `cfg["federation"]` before anything starts.

`validate_federation(cfg)` turns the `federation` section of the run configuration into a frozen
`FederationSettings` or raises `ConfigError` with a message that says how to fix the config.
Checks that need the data (sites of a `given` split, class counts) live in `partition.py`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from components.errors import ConfigError
from components.typed_config import load

STRATEGIES = ("fedavg", "fedprox", "krum", "multikrum", "trimmed_mean", "median", "bulyan")
ROBUST = frozenset({"krum", "multikrum", "trimmed_mean", "median", "bulyan"})
PARTITIONS = ("given", "iid", "dirichlet")
ENGINES = ("simulation", "deployment", "inline")
ATTACKS = ("none", "sign_flip", "scale", "gaussian", "label_flip", "nan")


@dataclass(frozen=True)
class AttackSettings:
    """Byzantine experiments only: `sites` (a count k, or explicit site names) behave as
    `behaviour`. With a count k, the first k sites in sorted order attack.

    - sign_flip: send w_g - scale·Δ (Δ = honest local update)
    - scale:     send w_g + scale·Δ
    - gaussian:  send the honest weights plus N(0, noise_std²) noise
    - label_flip: train on labels y -> K-1-y, send the result honestly
    - nan:       send NaN weights
    """

    behaviour: str = "none"  # none | sign_flip | scale | gaussian | label_flip | nan
    sites: Any = 0  # k (the first k sites, sorted) or a list of site names
    scale: float = 10.0  # sign_flip / scale factor
    noise_std: float = 1.0  # gaussian noise σ

    def __post_init__(self) -> None:
        if isinstance(self.sites, list | tuple):
            object.__setattr__(self, "sites", tuple(str(s) for s in self.sites))

    @property
    def active(self) -> bool:
        return self.behaviour != "none"


@dataclass(frozen=True)
class HygieneSettings:
    """Server-side rejection of absurd updates (before any aggregation rule sees them).

    An update (local weights minus global weights, floating-point tensors only) is rejected
    when its L2 norm exceeds `max_norm` (absolute, null = no cap) or `max_norm_ratio` times the
    median norm of the round's updates (needs >= 3 updates; null = off). Non-finite values and
    wrong keys or shapes are always rejected.
    """

    max_norm_ratio: float | None = 50.0
    max_norm: float | None = None


@dataclass(frozen=True)
class SimulationSettings:
    """Flower simulation engine (Ray) resources on one machine."""

    cpus_per_site: float = 1.0
    total_cpus: int | None = None  # null: all cores Ray sees
    threads_per_site: int = 1  # torch threads inside each simulated site


@dataclass(frozen=True)
class SiteStatsSettings:
    """What a site publishes about its data (`oncoflow site prepare` writes it to stats.json):
    class counts, an image-size histogram and an intensity histogram, optionally with DP noise
    (each histogram changes by at most 1 in L1 when one image is added or removed)."""

    histogram_bins: int = 16  # intensity histogram bins over 0..255
    noise: str = "none"  # none | laplace | gaussian: DP noise on every released number
    epsilon: float = 1.0  # ε of the whole release (split evenly over its histograms)
    delta: float = 1e-5  # gaussian only


@dataclass(frozen=True)
class FederationSettings:
    """The `federation` config section (with training=federated): sites, rule, engine.

    This dataclass is the section's schema and the one place of its defaults; the files in
    conf/federation/ set only what differs (`oncoflow config training=federated` prints all).
    """

    strategy: str = "fedavg"  # fedavg | fedprox | krum | multikrum | trimmed_mean | median | bulyan
    # simulation (Flower + Ray, one machine) | deployment (SuperLink + one SuperNode per site,
    # TLS) | inline (the same apps in one process; tests)
    engine: str = "simulation"
    num_sites: int | None = 5  # null with partition=given: one site per manifest `site` value
    partition: str = "dirichlet"  # given (manifest site column) | iid | dirichlet (label skew)
    alpha: float = 0.5  # Dirichlet concentration: 0.1 very skewed, 100 nearly IID
    min_site_samples: int = 2  # every site keeps at least this many training images
    rounds: int = 3
    local_epochs: int = 1
    fraction_train: float = 1.0  # share of connected sites asked to train each round
    min_fit_sites: int | None = None  # a round goes on with this many (null: num_sites-1, >= 2)
    min_available_sites: int | None = None  # sites that must connect (null: min_fit_sites)
    evaluate_sites: bool = True  # sites score each global model on their own validation data
    num_malicious: int = 0  # f: Byzantine sites a robust rule must tolerate
    multikrum_select: int | None = None  # Multi-Krum averages this many updates (null: n - f)
    trim_fraction: float = 0.2  # trimmed mean: share cut from each tail (< 0.5)
    # robust rules only: nnm = average each update with its n - f nearest before the rule
    # (Allouah et al. 2023); the robust rules' own files turn it on
    mixing: str = "none"
    proximal_mu: float = 0.0  # FedProx only (> 0)
    round_timeout: float = 600.0  # seconds to wait for the sites' replies
    connect_timeout: float = 120.0  # seconds to wait for sites to connect before a round
    resume: bool = True  # resume after the last checkpointed round of the same settings
    keep_checkpoints: int = 2
    seed: int = 42  # the run's seed (conf/config.yaml sets it to ${seed})
    hygiene: HygieneSettings = field(default_factory=HygieneSettings)
    attack: AttackSettings = field(default_factory=AttackSettings)
    simulation: SimulationSettings = field(default_factory=SimulationSettings)
    site_stats: SiteStatsSettings = field(default_factory=SiteStatsSettings)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        sites = data["attack"]["sites"]
        data["attack"]["sites"] = list(sites) if isinstance(sites, tuple) else sites
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FederationSettings:
        """Rebuild validated settings from `to_dict()` output (e.g. a run spec on disk)."""
        return validate_federation({"federation": data})

    def fingerprint(self) -> str:
        """Hash of everything that changes what a round computes (not timeouts or engine)."""
        data = self.to_dict()
        for volatile in ("engine", "round_timeout", "connect_timeout", "resume", "rounds"):
            data.pop(volatile)
        data.pop("simulation")
        data.pop("site_stats")  # what a site publishes, not what a round computes
        text = json.dumps(data, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def robust(self) -> bool:
        return self.strategy in ROBUST

    def selected_by_multikrum(self, n: int) -> int:
        """Number of updates Multi-Krum averages among `n` (default n - f)."""
        return self.multikrum_select or max(1, n - self.num_malicious)


def _section(cfg: Any) -> dict[str, Any]:
    """The federation section (a mapping), with the run seed when the section has none."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(cfg):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(cfg, dict):
        raise ConfigError("the federation configuration must be a mapping")
    section = cfg.get("federation", cfg)
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ConfigError("federation must be a mapping (pick one with federation=fedavg|krum|...)")
    section = dict(section)
    if "federation" in cfg and cfg.get("seed") is not None:
        section.setdefault("seed", cfg["seed"])
    return section


def _with_quorum(s: FederationSettings) -> FederationSettings:
    """min_* default to tolerating one missing site (never below 2, never above num_sites)."""
    fit, available = s.min_fit_sites, s.min_available_sites
    if fit is None and isinstance(s.num_sites, int) and s.num_sites >= 1:
        fit = max(min(2, s.num_sites), s.num_sites - 1)
    if fit is None:
        fit = 2
    if available is None:
        available = fit
    return replace(s, min_fit_sites=fit, min_available_sites=available)


def validate_federation(cfg: Any) -> FederationSettings:
    """Validate the federation config (full run config or its `federation` section).

    Raises `ConfigError` naming the offending key and the fix; nothing is started.
    """
    settings = _with_quorum(load(FederationSettings, _section(cfg), "federation"))
    _check(settings)
    return settings


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(s: FederationSettings) -> None:
    if s.strategy not in STRATEGIES:
        raise ConfigError(
            f"unknown federation.strategy {s.strategy!r}; choose one of {', '.join(STRATEGIES)} "
            "(e.g. federation=krum or federation.strategy=median)"
        )
    if s.engine not in ENGINES:
        raise ConfigError(f"federation.engine={s.engine!r}; choose one of {', '.join(ENGINES)}")
    if s.partition not in PARTITIONS:
        raise ConfigError(
            f"federation.partition={s.partition!r}; choose one of {', '.join(PARTITIONS)}"
        )
    if s.num_sites is None:
        if s.partition != "given":
            raise ConfigError(
                f"federation.num_sites is required for partition={s.partition} (e.g. 5)"
            )
    elif not _is_int(s.num_sites) or s.num_sites < 2:
        raise ConfigError(f"federation.num_sites must be an integer >= 2, got {s.num_sites!r}")
    if s.partition == "dirichlet" and not (
        isinstance(s.alpha, int | float) and math.isfinite(s.alpha) and s.alpha > 0
    ):
        raise ConfigError(
            f"federation.alpha must be > 0 for a Dirichlet split, got {s.alpha!r} "
            "(small values like 0.1 give strongly skewed sites, 100 is nearly IID)"
        )
    if not _is_int(s.min_site_samples) or s.min_site_samples < 1:
        raise ConfigError("federation.min_site_samples must be an integer >= 1")
    for key in ("rounds", "local_epochs"):
        value = getattr(s, key)
        if not _is_int(value) or value < 1:
            raise ConfigError(f"federation.{key} must be an integer >= 1, got {value!r}")
    if not 0 < s.fraction_train <= 1:
        raise ConfigError(f"federation.fraction_train must be in (0, 1], got {s.fraction_train}")
    _check_minimums(s)
    if not _is_int(s.num_malicious) or s.num_malicious < 0:
        raise ConfigError("federation.num_malicious (f) must be an integer >= 0")
    _check_strategy(s)
    _check_mixing(s)
    if s.proximal_mu < 0:
        raise ConfigError("federation.proximal_mu must be >= 0")
    if s.strategy == "fedprox" and s.proximal_mu <= 0:
        raise ConfigError(
            "strategy=fedprox needs federation.proximal_mu > 0 (e.g. 0.01); 0 is plain FedAvg"
        )
    if s.strategy != "fedprox" and s.proximal_mu > 0:
        raise ConfigError(
            f"federation.proximal_mu={s.proximal_mu} is only used by strategy=fedprox; "
            "set federation=fedprox or proximal_mu=0"
        )
    if s.round_timeout <= 0 or s.connect_timeout <= 0:
        raise ConfigError("federation.round_timeout and connect_timeout must be positive seconds")
    if not _is_int(s.keep_checkpoints) or s.keep_checkpoints < 1:
        raise ConfigError("federation.keep_checkpoints must be an integer >= 1")
    _check_hygiene(s.hygiene)
    _check_attack(s)
    _check_site_stats(s.site_stats)
    sim = s.simulation
    if sim.cpus_per_site <= 0 or sim.threads_per_site < 1:
        raise ConfigError("federation.simulation.cpus_per_site and threads_per_site must be > 0")
    if sim.total_cpus is not None and (not _is_int(sim.total_cpus) or sim.total_cpus < 1):
        raise ConfigError("federation.simulation.total_cpus must be null or an integer >= 1")


STATS_NOISE = ("none", "laplace", "gaussian")


def _check_site_stats(st: SiteStatsSettings) -> None:
    if st.noise not in STATS_NOISE:
        raise ConfigError(
            f"federation.site_stats.noise={st.noise!r}; choose one of {', '.join(STATS_NOISE)}"
        )
    if not _is_int(st.histogram_bins) or not 2 <= st.histogram_bins <= 256:
        raise ConfigError("federation.site_stats.histogram_bins must be an integer in [2, 256]")
    if not (math.isfinite(st.epsilon) and st.epsilon > 0):
        raise ConfigError("federation.site_stats.epsilon must be a positive finite number")
    if not 0 < st.delta < 1:
        raise ConfigError("federation.site_stats.delta must be in (0, 1)")


def _check_minimums(s: FederationSettings) -> None:
    for key in ("min_fit_sites", "min_available_sites"):
        value = getattr(s, key)
        if not _is_int(value) or value < 1:
            raise ConfigError(f"federation.{key} must be an integer >= 1, got {value!r}")
        if s.num_sites is not None and value > s.num_sites:
            raise ConfigError(
                f"federation.{key}={value} exceeds num_sites={s.num_sites}; a round could never "
                f"start. Set {key} <= {s.num_sites}"
            )
    if s.min_available_sites < s.min_fit_sites:
        raise ConfigError(
            f"federation.min_available_sites={s.min_available_sites} is below "
            f"min_fit_sites={s.min_fit_sites}; set min_available_sites >= min_fit_sites"
        )


def required_sites(strategy: str, f: int) -> int:
    """Smallest number of sites a robust rule needs to tolerate `f` Byzantine sites."""
    if strategy in ("krum", "multikrum"):
        return 2 * f + 3
    if strategy == "bulyan":
        return 4 * f + 3
    if strategy == "median":
        return 2 * f + 1
    if strategy == "trimmed_mean":
        return 2 * f + 1
    return 1


def _check_strategy(s: FederationSettings) -> None:
    f, n = s.num_malicious, s.num_sites
    if s.strategy in ("krum", "multikrum", "bulyan") and n is not None:
        need = required_sites(s.strategy, f)
        if n < need:
            bound = "4f+3" if s.strategy == "bulyan" else "2f+3"
            max_f = (n - 3) // (4 if s.strategy == "bulyan" else 2)
            fix = f"lower federation.num_malicious to {max_f} or " if max_f >= 0 else ""
            raise ConfigError(
                f"{s.strategy} with num_malicious f={f} needs n >= {bound} = {need} sites but "
                f"num_sites={n}; {fix}raise federation.num_sites to >= {need}"
            )
    if s.strategy == "median" and n is not None and f > 0 and n < 2 * f + 1:
        raise ConfigError(
            f"median tolerates f < n/2; f={f} with num_sites={n}. Lower federation.num_malicious"
        )
    if s.strategy == "trimmed_mean":
        if not 0 <= s.trim_fraction < 0.5:
            raise ConfigError(
                f"federation.trim_fraction must be in [0, 0.5), got {s.trim_fraction}; it is the "
                "fraction of updates cut from each tail"
            )
        if n is not None and f > 0 and int(s.trim_fraction * n) < f:
            need = f / n
            raise ConfigError(
                f"trimmed mean with trim_fraction={s.trim_fraction} over {n} sites cuts "
                f"{int(s.trim_fraction * n)} update(s) per tail, fewer than num_malicious={f}; "
                f"raise trim_fraction to >= {need:.2f} (and < 0.5)"
            )
    if s.strategy == "multikrum" and s.multikrum_select is not None:
        m = s.multikrum_select
        upper = (n - f) if n is not None else None
        if not _is_int(m) or m < 1 or (upper is not None and m > upper):
            raise ConfigError(
                f"federation.multikrum_select={m!r} must be an integer in [1, n-f]"
                + (f" = [1, {upper}]" if upper is not None else "")
            )


def _check_mixing(s: FederationSettings) -> None:
    from components.federated.mixing import MIXING

    if s.mixing not in MIXING:
        raise ConfigError(
            f"federation.mixing={s.mixing!r}; choose one of {', '.join(MIXING)} "
            "(nnm: nearest-neighbour mixing before a robust rule)"
        )
    if s.mixing == "nnm" and not s.robust:
        raise ConfigError(
            f"federation.mixing=nnm only makes sense before a robust rule (krum, multikrum, "
            f"trimmed_mean, median, bulyan), not {s.strategy}; set federation.mixing=none"
        )


def _check_hygiene(h: HygieneSettings) -> None:
    if h.max_norm_ratio is not None and not h.max_norm_ratio > 1:
        raise ConfigError("federation.hygiene.max_norm_ratio must be > 1 or null (off)")
    if h.max_norm is not None and not h.max_norm > 0:
        raise ConfigError("federation.hygiene.max_norm must be > 0 or null (no cap)")


def _check_attack(s: FederationSettings) -> None:
    a = s.attack
    if a.behaviour not in ATTACKS:
        raise ConfigError(
            f"federation.attack.behaviour={a.behaviour!r}; choose one of {', '.join(ATTACKS)}"
        )
    count = len(a.sites) if isinstance(a.sites, tuple) else a.sites
    if not _is_int(count) or count < 0:
        raise ConfigError("federation.attack.sites must be a count >= 0 or a list of site names")
    if a.active and count == 0:
        raise ConfigError(
            f"federation.attack.behaviour={a.behaviour} but attack.sites is 0; "
            "set attack.sites=k (the first k sites attack) or a list of site names"
        )
    if not a.active and count:
        raise ConfigError(
            "federation.attack.sites is set but attack.behaviour=none; "
            "pick a behaviour (sign_flip, scale, gaussian, label_flip, nan)"
        )
    if s.num_sites is not None and count >= s.num_sites:
        raise ConfigError(
            f"federation.attack.sites={count} leaves no honest site among {s.num_sites}"
        )
    if not (a.scale > 0 and math.isfinite(a.scale)):
        raise ConfigError("federation.attack.scale must be a finite number > 0")
    if not (a.noise_std > 0 and math.isfinite(a.noise_std)):
        raise ConfigError("federation.attack.noise_std must be a finite number > 0")


__all__ = [
    "ATTACKS",
    "ENGINES",
    "PARTITIONS",
    "STRATEGIES",
    "AttackSettings",
    "FederationSettings",
    "HygieneSettings",
    "SimulationSettings",
    "SiteStatsSettings",
    "required_sites",
    "validate_federation",
]
