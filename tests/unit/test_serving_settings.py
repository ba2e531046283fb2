"""The service's settings: the composed `serving` config, overridden by ONCOFLOW_* variables."""

from __future__ import annotations

import dataclasses

import pytest

from components.config import ServingConf
from components.errors import ConfigError
from serving.settings import ENV_OVERRIDES, load_settings, request_limit_bytes, with_environment


def test_the_composed_serving_config_is_the_schema_default():
    assert load_settings({}) == ServingConf()


def test_every_override_names_a_serving_key():
    keys = {f.name for f in dataclasses.fields(ServingConf)}
    assert set(ENV_OVERRIDES.values()) <= keys
    assert all(name.startswith("ONCOFLOW_") for name in ENV_OVERRIDES)


def test_environment_variables_override_with_the_key_type():
    env = {
        "ONCOFLOW_MODEL_TAG": "oncoflow-model:abc",
        "ONCOFLOW_MAX_REQUEST_MB": "1.5",
        "ONCOFLOW_MAX_BATCH": "8",
        "ONCOFLOW_TORCH_THREADS": "2",
        "ONCOFLOW_OPTIMISE_MODEL": "0",
        "ONCOFLOW_CHAT": "false",
        "ONCOFLOW_CASE_LIBRARY": "/srv/oncoflow/case-library",
        "ONCOFLOW_MAX_QUEUE": "  ",  # empty: not set
        "ONCOFLOW_SHAP_NSAMPLES": "32",
    }
    settings = with_environment(ServingConf(), env)
    assert settings.model_tag == "oncoflow-model:abc"
    assert settings.max_batch == 8 and settings.torch_threads == 2
    assert settings.optimise_model is False and settings.chat is False
    assert settings.case_library == "/srv/oncoflow/case-library"
    assert ServingConf().case_library is None  # no library unless the site builds one
    assert settings.max_queue == ServingConf().max_queue
    assert settings.shap_nsamples == 32
    assert request_limit_bytes(settings) == int(1.5 * 1024 * 1024)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ONCOFLOW_MAX_BATCH": "many"}, "ONCOFLOW_MAX_BATCH='many' is not an integer"),
        ({"ONCOFLOW_MAX_QUEUE": "0"}, "ONCOFLOW_MAX_QUEUE must be at least 1"),
        ({"ONCOFLOW_EXPLAIN_THREADS": "0"}, "ONCOFLOW_EXPLAIN_THREADS must be at least 1"),
        ({"ONCOFLOW_EXPLAIN_SHARE": "0"}, r"ONCOFLOW_EXPLAIN_SHARE must lie in \(0, 1\]"),
        ({"ONCOFLOW_EXPLAIN_SHARE": "1.5"}, r"ONCOFLOW_EXPLAIN_SHARE must lie in \(0, 1\]"),
        ({"ONCOFLOW_SHAP_NSAMPLES": "0"}, "ONCOFLOW_SHAP_NSAMPLES must be at least 1"),
        ({"ONCOFLOW_SHAP_NSAMPLES": "201"}, "ONCOFLOW_SHAP_NSAMPLES must be at most 200"),
        ({"ONCOFLOW_OPTIMISE_MODEL": "2"}, "ONCOFLOW_OPTIMISE_MODEL='2': use 1 or 0"),
        ({"ONCOFLOW_MAX_REQUEST_MB": "-1"}, "ONCOFLOW_MAX_REQUEST_MB must be positive"),
        ({"ONCOFLOW_MAX_REQUEST_MB": "lots"}, "ONCOFLOW_MAX_REQUEST_MB='lots' is not a number"),
    ],
)
def test_a_bad_variable_is_refused_by_name(env, message):
    with pytest.raises(ConfigError, match=message):
        with_environment(ServingConf(), env)


def test_a_bad_config_value_is_refused_by_key():
    with pytest.raises(ConfigError, match=r"serving\.max_pixels must be at least 1"):
        with_environment(ServingConf(max_pixels=0), {})


def test_api_keys_are_never_a_config_key():
    keys = {f.name for f in dataclasses.fields(ServingConf)}
    assert not any("key" in k or "auth" in k for k in keys)
    assert "ONCOFLOW_API_KEYS" not in ENV_OVERRIDES
