"""The service's settings: the composed ``serving`` config, then environment overrides.

One source: `components.config.ServingConf` holds each key's type, default and meaning;
``conf/serving/*.yaml`` sets only what differs; an ``ONCOFLOW_*`` variable, when set and not
empty, overrides its key:

    ==============================  ========================  ====================================
    variable                        key (``serving.``)        example
    ==============================  ========================  ====================================
    ONCOFLOW_MODEL_TAG              model_tag                 ``oncoflow-model:abc123``
    ONCOFLOW_MAX_REQUEST_MB         max_request_mb            ``20`` (chat bodies: always 64 KB)
    ONCOFLOW_MAX_PIXELS             max_pixels                ``50000000``
    ONCOFLOW_MAX_BATCH              max_batch                 ``32``
    ONCOFLOW_MAX_QUEUE              max_queue                 ``1024`` (then /predict answers 503)
    ONCOFLOW_OPTIMISE_MODEL         optimise_model            ``0``: the model exactly as trained
    ONCOFLOW_GIL_SWITCH_US          gil_switch_us             ``500`` (Python's own: 5000)
    ONCOFLOW_TORCH_THREADS          torch_threads             ``2`` (unset: torch's choice)
    ONCOFLOW_CHAT                   chat                      ``0``: serve without the assistant
    ONCOFLOW_ASSISTANT_CONFIG       assistant_config          a JSON file (backend, ...)
    ONCOFLOW_CASE_LIBRARY           case_library              the site's case library directory
    ONCOFLOW_EXPLAIN_CONCURRENCY    explain_concurrency       ``2`` (then /explain answers 429)
    ONCOFLOW_EXPLAIN_THREADS        explain_threads           ``1`` (unset: every core)
    ONCOFLOW_EXPLAIN_SHARE          explain_share_under_load  ``0.05`` (``1``: no pacing)
    ONCOFLOW_SHAP_NSAMPLES          shap_nsamples             ``24`` (unset: each model's own)
    ONCOFLOW_RATE_LIMIT_PER_MINUTE  rate_limit_per_minute     ``1200`` per API key (``0``: off)
    ONCOFLOW_RATE_LIMIT_BURST       rate_limit_burst          ``100``
    ONCOFLOW_AUDIT_DB               audit_db                  the service's audit log (SQLite)
    ==============================  ========================  ====================================

Booleans take 1/0, true/false or yes/no. Two variables have no config key, on purpose: the
secrets ``ONCOFLOW_API_KEYS`` (comma-separated keys, each ``secret`` or ``name:secret``) and
the opt-out ``ONCOFLOW_ALLOW_NO_AUTH=1`` (local development only), so that no config file can
hold a key or switch authentication off (`serving.middleware.load_api_keys` reads them).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

from components.config import SHAP_NSAMPLES_LIMIT, ServingConf
from components.errors import ConfigError

_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")
#: Integer keys and their smallest allowed value.
_AT_LEAST = {
    "port": 1,
    "max_pixels": 1,
    "max_batch": 1,
    "max_queue": 1,
    "gil_switch_us": 1,
    "torch_threads": 1,
    "background_size": 1,
    "explain_concurrency": 1,
    "explain_threads": 1,
    "shap_nsamples": 1,
    "rate_limit_per_minute": 0,
    "rate_limit_burst": 1,
}


def load_settings(
    environ: Mapping[str, str] | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> ServingConf:
    """Compose the run config (Hydra `overrides`), take ``serving``, apply the environment and
    check the result; a bad value raises ConfigError naming the variable or key it came from."""
    from omegaconf import OmegaConf

    from components.config import compose

    conf = OmegaConf.to_object(compose(overrides).serving)
    return with_environment(conf, os.environ if environ is None else environ)


@functools.cache
def current_settings() -> ServingConf:
    """This process's settings, composed once (the service and its middleware share them)."""
    return load_settings()


def with_environment(conf: ServingConf, environ: Mapping[str, str]) -> ServingConf:
    """`conf` with the environment's overrides applied, checked."""
    changes: dict[str, Any] = {}
    sources = {f.name: f"serving.{f.name}" for f in dataclasses.fields(conf)}
    for variable, key in ENV_OVERRIDES.items():
        raw = environ.get(variable, "").strip()
        if raw:
            changes[key] = _PARSERS[key](variable, raw)
            sources[key] = variable
    conf = dataclasses.replace(conf, **changes)
    check(conf, sources)
    return conf


def check(conf: ServingConf, sources: Mapping[str, str] | None = None) -> None:
    """Range checks; `sources` names where each key's value came from (for the message)."""
    sources = sources or {}
    for key, low in _AT_LEAST.items():
        value = getattr(conf, key)
        if value is not None and value < low:
            raise ConfigError(f"{sources.get(key, key)} must be at least {low}, not {value}")
    if not conf.max_request_mb > 0:
        where = sources.get("max_request_mb", "max_request_mb")
        raise ConfigError(f"{where} must be positive, not {conf.max_request_mb}")
    if not 0.0 < conf.explain_share_under_load <= 1.0:
        where = sources.get("explain_share_under_load", "explain_share_under_load")
        raise ConfigError(f"{where} must lie in (0, 1], not {conf.explain_share_under_load}")
    if conf.shap_nsamples is not None and conf.shap_nsamples > SHAP_NSAMPLES_LIMIT:
        where = sources.get("shap_nsamples", "shap_nsamples")
        limit = SHAP_NSAMPLES_LIMIT
        raise ConfigError(f"{where} must be at most {limit}, not {conf.shap_nsamples}")
    if not conf.model_tag.strip():
        raise ConfigError(f"{sources.get('model_tag', 'model_tag')} is empty")


def request_limit_bytes(conf: ServingConf) -> int:
    """The request body limit in bytes."""
    return int(conf.max_request_mb * 1024 * 1024)


def _flag(variable: str, raw: str) -> bool:
    if raw.lower() not in _TRUE + _FALSE:
        raise ConfigError(f"{variable}={raw!r}: use 1 or 0")
    return raw.lower() in _TRUE


def _integer(variable: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigError(f"{variable}={raw!r} is not an integer") from exc


def _number(variable: str, raw: str) -> float:
    try:
        return float(raw)
    except ValueError as exc:
        raise ConfigError(f"{variable}={raw!r} is not a number") from exc


def _text(variable: str, raw: str) -> str:
    return raw


#: Environment variable -> the ServingConf key it overrides.
ENV_OVERRIDES: dict[str, str] = {
    "ONCOFLOW_MODEL_TAG": "model_tag",
    "ONCOFLOW_MAX_REQUEST_MB": "max_request_mb",
    "ONCOFLOW_MAX_PIXELS": "max_pixels",
    "ONCOFLOW_MAX_BATCH": "max_batch",
    "ONCOFLOW_MAX_QUEUE": "max_queue",
    "ONCOFLOW_OPTIMISE_MODEL": "optimise_model",
    "ONCOFLOW_GIL_SWITCH_US": "gil_switch_us",
    "ONCOFLOW_TORCH_THREADS": "torch_threads",
    "ONCOFLOW_CHAT": "chat",
    "ONCOFLOW_ASSISTANT_CONFIG": "assistant_config",
    "ONCOFLOW_CASE_LIBRARY": "case_library",
    "ONCOFLOW_EXPLAIN_CONCURRENCY": "explain_concurrency",
    "ONCOFLOW_EXPLAIN_THREADS": "explain_threads",
    "ONCOFLOW_EXPLAIN_SHARE": "explain_share_under_load",
    "ONCOFLOW_SHAP_NSAMPLES": "shap_nsamples",
    "ONCOFLOW_RATE_LIMIT_PER_MINUTE": "rate_limit_per_minute",
    "ONCOFLOW_RATE_LIMIT_BURST": "rate_limit_burst",
    "ONCOFLOW_AUDIT_DB": "audit_db",
}
_PARSERS: dict[str, Callable[[str, str], Any]] = {
    "model_tag": _text,
    "max_request_mb": _number,
    "max_pixels": _integer,
    "max_batch": _integer,
    "max_queue": _integer,
    "optimise_model": _flag,
    "gil_switch_us": _integer,
    "torch_threads": _integer,
    "chat": _flag,
    "assistant_config": _text,
    "case_library": _text,
    "explain_concurrency": _integer,
    "explain_threads": _integer,
    "explain_share_under_load": _number,
    "shap_nsamples": _integer,
    "rate_limit_per_minute": _integer,
    "rate_limit_burst": _integer,
    "audit_db": _text,
}


__all__ = [
    "ENV_OVERRIDES",
    "check",
    "current_settings",
    "load_settings",
    "request_limit_bytes",
    "with_environment",
]
