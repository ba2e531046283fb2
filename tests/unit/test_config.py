"""The Hydra config tree composes, validates and rejects bad overrides with clear errors."""

from __future__ import annotations

from dataclasses import asdict, fields

import pytest
import yaml
from omegaconf import OmegaConf

from components.config import (
    CONF_DIR,
    DatasetConf,
    ModelConf,
    PathsConf,
    RunConf,
    ServingConf,
    TrainerConf,
    TrainingConf,
    compose,
    flatten,
    to_container,
)
from components.errors import ConfigError
from components.federated.settings import FederationSettings, validate_federation
from components.privacy.settings import PrivacySettings, validate_privacy


def test_defaults_compose_to_a_valid_run():
    cfg = compose([])
    assert cfg.dataset.name == "synthetic"
    assert cfg.model.name == "small_cnn"
    assert cfg.training.mode == "central"
    assert cfg.registry.model_name == "oncoflow-synthetic"


@pytest.mark.parametrize(
    "dataset", ["brain_tumor_mri", "busi", "chest_xray", "breastmnist", "cric_pap_smear"]
)
def test_every_dataset_composes(dataset):
    cfg = compose([f"dataset={dataset}"])
    assert cfg.dataset.name == dataset
    assert len(cfg.dataset.classes) >= 2
    assert cfg.registry.model_name == f"oncoflow-{dataset}"


def test_the_model_s_shap_samples_travel_in_its_bundle_config(tmp_path):
    """Brain MRI's recipe raises the SHAP samples its 4 test-time views pay for; the bundle
    carries the run's count (bundles made before it: 8), and the server names none."""
    from components.bundle import ModelBundle
    from components.bundle_builder import shareable_config
    from components.config import to_container

    brain = to_container(compose(["dataset=brain_tumor_mri"]))
    assert brain["package"]["shap_nsamples"] == 24 and brain["dataset"]["tta"]
    assert compose(["dataset=busi"]).package.shap_nsamples == 8
    assert compose([]).serving.shap_nsamples is None

    def bundle(config):
        return ModelBundle("small_cnn", {}, ["a", "b"], None, {}, config=config)

    assert bundle(shareable_config(brain)).shap_nsamples == 24
    assert bundle({}).shap_nsamples == 8


def test_overrides_reach_nested_keys_and_keep_types():
    cfg = compose(["dataset=busi", "model=resnet18", "trainer.max_epochs=3", "trainer.lr=0.01"])
    assert cfg.model.name == "resnet18"
    assert cfg.trainer.max_epochs == 3
    assert cfg.trainer.lr == pytest.approx(0.01)


def test_data_root_comes_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ONCOFLOW_DATA", str(tmp_path))
    cfg = compose(["dataset=busi"])
    assert cfg.dataset.root == f"{tmp_path}/busi"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("dataset=nope", "invalid configuration"),
        ("trainer.max_epochs=three", "invalid configuration"),
        ("trainer.not_a_key=1", "invalid configuration"),
        ("trainer.imbalance=magic", "trainer.imbalance"),
        ("model.norm=layer", "model.norm"),
        ("validation.on_failure=ignore", "validation.on_failure"),
        ("dataset.split.test_fraction=0.9", "split fractions"),
        ("dataset.channels=2", "channels"),
        ("trainer.lr=0", "positive"),
        ("package.shap_nsamples=0", r"package.shap_nsamples must lie in 1\.\.200"),
        ("package.shap_nsamples=201", r"package.shap_nsamples must lie in 1\.\.200"),
    ],
)
def test_bad_overrides_fail_with_a_clear_message(override, message):
    with pytest.raises(ConfigError, match=message):
        compose([override])


def test_flatten_nested_dicts():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": "x"}) == {
        "a.b": 1,
        "a.c.d": [1, 2],
        "e": "x",
    }


# ---------------------------------------------------------------- every config group composes

GROUPS = {
    group: sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    for group in ("dataset", "model", "training", "federation", "privacy", "serving", "paths")
}
# what a group's option needs beside it to be a valid run
CONTEXT = {
    ("privacy", "dp_eps8"): ["trainer.imbalance=none"],
    ("privacy", "dp_eps3"): ["trainer.imbalance=none"],
    ("privacy", "central_dp"): ["training=federated"],
    ("privacy", "secagg"): ["training=federated"],
    ("privacy", "secagg_dp"): ["training=federated", "trainer.imbalance=none"],
    ("federation", None): ["training=federated"],
    ("dataset", "csv"): ["dataset.classes=[benign,malignant]"],
}


@pytest.mark.parametrize(
    ("group", "option"), [(g, o) for g, options in GROUPS.items() for o in options]
)
def test_every_option_of_every_group_composes_and_validates(group, option):
    context = CONTEXT.get((group, option), CONTEXT.get((group, None), []))
    cfg = compose([*context, f"{group}={option}"])
    section = to_container(cfg)[group]
    assert isinstance(section, dict) and section
    if group == "privacy":
        settings = validate_privacy(cfg.privacy, to_container(cfg)["federation"], cfg.trainer)
        assert settings.mode == section["mode"]
        assert settings.mode == "none" or settings.enabled
    if group == "federation":
        assert validate_federation(cfg).strategy == option


def test_every_group_has_options():
    assert all(GROUPS.values()), GROUPS


SCHEMAS = {
    "dataset": DatasetConf,
    "model": ModelConf,
    "training": TrainingConf,
    "federation": FederationSettings,
    "privacy": PrivacySettings,
    "serving": ServingConf,
    "paths": PathsConf,
}
IDENTITY_KEYS = {"name", "mode", "strategy"}  # an option may name itself, default or not


def _leaves(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out |= _leaves(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize(
    ("group", "option"), [(g, o) for g, options in GROUPS.items() for o in options]
)
def test_yaml_sets_only_what_differs_from_the_schema(group, option):
    """One place for each default: the schema dataclass. A YAML value equal to it is a second
    copy that would drift (it did: trainer.lr was 1e-3 in code and 0.003 in YAML)."""
    raw = yaml.safe_load((CONF_DIR / group / f"{option}.yaml").read_text()) or {}
    raw.pop("defaults", None)
    defaults = _leaves(asdict(SCHEMAS[group]()))
    restated = {
        key: value
        for key, value in _leaves(raw).items()
        if key.split(".")[-1] not in IDENTITY_KEYS and key in defaults and defaults[key] == value
    }
    assert not restated, f"conf/{group}/{option}.yaml restates schema defaults: {restated}"


def test_the_schema_is_what_a_run_is_composed_of():
    cfg = to_container(compose([]))
    assert set(cfg) == {f.name for f in fields(RunConf)}
    assert cfg["trainer"] == asdict(TrainerConf())
    assert cfg["federation"]["seed"] == cfg["seed"]  # one seed for the whole run


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["training=federated"], "training=federated"),
        (["privacy=dp_eps8", "trainer.imbalance=none"], "privacy=dp_sgd"),
        (["training=federated", "privacy=central_dp"], "training=federated"),
    ],
)
def test_training_images_in_a_bundle_are_refused_for_federated_or_private_runs(overrides, message):
    assert compose(overrides).package.training_images is False  # the default
    with pytest.raises(ConfigError, match=message) as info:
        compose([*overrides, "package.training_images=true"])
    assert "package.training_images" in str(info.value)


def test_a_central_run_without_privacy_may_keep_training_images_when_it_says_so():
    assert compose(["package.training_images=true"]).package.training_images is True


# ---------------------------------------------------------------- per-dataset recipes

RECIPES = sorted(p.stem for p in (CONF_DIR / "recipe").glob("*.yaml"))


@pytest.mark.parametrize("dataset", RECIPES)
def test_dataset_alone_brings_its_recipe_and_the_command_line_still_wins(dataset):
    recipe = yaml.safe_load((CONF_DIR / "recipe" / f"{dataset}.yaml").read_text())
    own = yaml.safe_load((CONF_DIR / "dataset" / f"{dataset}.yaml").read_text())
    assert {"/recipe": dataset} in own["defaults"]  # one recipe per dataset, named after it
    model = next(d["override /model"] for d in recipe["defaults"] if "override /model" in d)

    cfg = compose([f"dataset={dataset}"])
    chosen = compose([f"model={model}"]).model  # the recipe's model option, as it composes
    assert cfg.model.name == chosen.name and cfg.model.pretrained == chosen.pretrained
    for key, value in _leaves({k: v for k, v in recipe.items() if k != "defaults"}).items():
        assert OmegaConf.select(cfg, key) == value, key

    mine = compose([f"dataset={dataset}", "model=resnet18", "trainer.max_epochs=2"])
    assert mine.model.name == "resnet18" and not mine.model.pretrained
    assert mine.trainer.max_epochs == 2
    assert mine.trainer.lr == cfg.trainer.lr  # the rest of the recipe stays


@pytest.mark.parametrize("dataset", RECIPES)
def test_recipes_set_only_what_differs_from_the_schema(dataset):
    raw = yaml.safe_load((CONF_DIR / "recipe" / f"{dataset}.yaml").read_text())
    raw.pop("defaults", None)
    defaults = _leaves(asdict(RunConf()))
    restated = {k: v for k, v in _leaves(raw).items() if k in defaults and defaults[k] == v}
    assert not restated, f"conf/recipe/{dataset}.yaml restates schema defaults: {restated}"
    assert set(raw) <= {f.name for f in fields(RunConf)} - {"model", "dataset"}


def test_cric_classes_are_its_published_folder_names():
    cfg = compose(["dataset=cric_pap_smear"])
    assert cfg.dataset.classes[0] == "Negative for intraepithelial lesion"
    assert set(cfg.dataset.dangerous) == {"ASC-H", "HSIL", "SCC"}
