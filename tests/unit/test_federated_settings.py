"""Federation config: every conf/federation/*.yaml composes and validates; bad configs fail
fast with a message that names the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_config import tiny_cfg

from components.config import CONF_DIR, compose, to_container
from components.errors import ConfigError
from components.federated.settings import (
    STRATEGIES,
    FederationSettings,
    required_sites,
    validate_federation,
)
from components.federated.strategies import build_strategy

FEDERATION_CONFS = sorted(p.stem for p in (Path(CONF_DIR) / "federation").glob("*.yaml"))


def fed(**overrides) -> dict:
    """Federation overrides: fedavg over 5 Dirichlet sites, plus `overrides`."""
    return {
        "strategy": "fedavg",
        "num_sites": 5,
        "partition": "dirichlet",
        "alpha": 0.5,
    } | overrides


def settings(section: dict):
    """Compose the real config with `section` as federation overrides, then validate it."""
    return validate_federation(tiny_cfg("training=federated", "seed=0", federation=section))


def test_every_strategy_has_a_config_file():
    assert set(FEDERATION_CONFS) == set(STRATEGIES)


@pytest.mark.parametrize("name", FEDERATION_CONFS)
def test_conf_files_compose_validate_and_build_flower_strategies(name):
    cfg = to_container(compose(["training=federated", f"federation={name}"]))
    settings = validate_federation(cfg)
    assert settings.strategy == name
    assert settings.seed == cfg["seed"]
    strategy = build_strategy(settings)
    assert type(strategy).__module__.startswith("flwr.serverapp.strategy")
    assert strategy.min_train_nodes == settings.min_fit_sites
    if name in ("krum", "multikrum", "bulyan"):
        assert strategy.num_malicious_nodes == settings.num_malicious == 1
        assert settings.num_sites >= required_sites(name, 1)


def test_cli_style_overrides_reach_the_settings():
    cfg = to_container(
        compose(["federation=median", "federation.num_sites=3", "federation.alpha=0.1"])
    )
    settings = validate_federation(cfg)
    assert (settings.num_sites, settings.alpha) == (3, 0.1)
    # min_fit/min_available default to tolerating one missing site, never below 2
    assert settings.min_fit_sites == settings.min_available_sites == 2


def test_a_composed_dictconfig_is_accepted_as_is():
    cfg = compose(["federation=krum"])
    assert validate_federation(cfg) == validate_federation(to_container(cfg))


def test_defaults_tolerate_one_site_dropping_out():
    five = settings(fed(num_sites=5))
    assert five.min_fit_sites == 4 and five.min_available_sites == 4


@pytest.mark.parametrize(
    ("section", "fragment"),
    [
        (fed(strategy="fedsgd"), "unknown federation.strategy 'fedsgd'"),
        (fed(strategy="krum", num_malicious=2), "needs n >= 2f+3 = 7 sites but num_sites=5"),
        (
            fed(strategy="multikrum", num_malicious=1, num_sites=4),
            "raise federation.num_sites to >= 5",
        ),
        (fed(strategy="bulyan", num_malicious=1, num_sites=6), "4f+3 = 7"),
        (fed(strategy="trimmed_mean", trim_fraction=0.5), "trim_fraction must be in [0, 0.5)"),
        (fed(strategy="trimmed_mean", trim_fraction=0.1, num_malicious=1), "raise trim_fraction"),
        (fed(strategy="median", num_malicious=3), "median tolerates f < n/2"),
        (fed(alpha=0), "alpha must be > 0"),
        (fed(alpha=-1.0), "alpha must be > 0"),
        (fed(num_sites=1), "num_sites must be an integer >= 2"),
        (fed(partition="random"), "federation.partition='random'"),
        (fed(partition="iid", num_sites=None), "num_sites is required"),
        (fed(rounds=0), "federation.rounds must be an integer >= 1"),
        (fed(min_fit_sites=6), "min_fit_sites=6 exceeds num_sites=5"),
        (fed(min_fit_sites=4, min_available_sites=3), "set min_available_sites >= min_fit_sites"),
        (fed(strategy="fedprox"), "needs federation.proximal_mu > 0"),
        (fed(proximal_mu=0.1), "only used by strategy=fedprox"),
        (fed(attack={"behaviour": "sign_flip"}), "attack.sites is 0"),
        (fed(attack={"behaviour": "bogus", "sites": 1}), "attack.behaviour='bogus'"),
        (fed(attack={"behaviour": "nan", "sites": 5}), "leaves no honest site"),
        (fed(hygiene={"max_norm_ratio": 0.5}), "max_norm_ratio must be > 1"),
        (fed(engine="cloud"), "federation.engine='cloud'"),
        (fed(rounds=2, round=3), "unknown key(s) round in federation"),
        (fed(attack={"behaviour": "nan", "sites": 1, "who": 1}), "unknown key(s) who"),
    ],
)
def test_bad_configuration_fails_fast_with_the_fix(section, fragment):
    with pytest.raises(ConfigError) as info:
        settings(section)
    assert fragment in str(info.value)
    # the same section handed over as a mapping (e.g. a run spec read back) fails the same way
    with pytest.raises(ConfigError) as info:
        validate_federation({"federation": section, "seed": 0})
    assert fragment in str(info.value)


def test_settings_round_trip_and_fingerprint():
    krum = settings(
        fed(strategy="krum", num_malicious=1, attack={"behaviour": "sign_flip", "sites": ["a"]})
    )
    assert krum.attack.sites == ("a",)
    again = FederationSettings.from_dict(krum.to_dict())
    assert again == krum
    assert again.fingerprint() == krum.fingerprint()
    # rounds and timeouts do not change what a round computes; the rule does
    longer = settings(
        fed(
            strategy="krum",
            num_malicious=1,
            rounds=9,
            attack={"behaviour": "sign_flip", "sites": ["a"]},
        )
    )
    assert longer.fingerprint() == krum.fingerprint()
    assert settings(fed()).fingerprint() != krum.fingerprint()
