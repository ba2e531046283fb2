"""Typed config sections: a dataclass is the schema (keys, types, defaults) of one section.

`schema(cls)` is the OmegaConf node the composed config is merged onto; `load(cls, data, where)`
turns a plain mapping (a config section, or a spec read back from JSON) into a `cls` instance
the same way; `config_error(exc)` rewrites an OmegaConf/Hydra error as a `ConfigError` that
names the key. Cross-field rules stay explicit checks next to each schema.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from typing import Any, TypeVar

from components.errors import ConfigError

T = TypeVar("T")


def schema(cls: type) -> Any:
    """An editable OmegaConf node for dataclass `cls` (frozen dataclasses included)."""
    from omegaconf import OmegaConf

    node = OmegaConf.structured(cls)
    _unfreeze(node)
    return node


def _unfreeze(node: Any) -> None:
    from omegaconf import OmegaConf

    node._set_flag("readonly", None)
    if not OmegaConf.is_dict(node):
        return
    for key in node:
        child = node._get_node(key)
        if OmegaConf.is_config(child) and not child._is_missing() and not child._is_none():
            _unfreeze(child)


def load(cls: type[T], data: Mapping[str, Any] | Any, where: str) -> T:
    """`cls` from a mapping or DictConfig: unknown keys and wrong types raise `ConfigError`."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(data, cls):
        return data
    if not (isinstance(data, Mapping) or OmegaConf.is_dict(data)):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    try:
        node = OmegaConf.merge(schema(cls), data)
        return OmegaConf.to_object(node)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise config_error(exc, where) from exc


def allowed_keys(cls: type) -> list[str]:
    return sorted(f.name for f in fields(cls))


_HYDRA_MISSING_KEY = re.compile(r"Could not override '([^']+)'")


def config_error(exc: Exception, where: str = "") -> ConfigError:
    """A `ConfigError` naming the offending key, from an OmegaConf or Hydra exception."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    unknown_key = isinstance(exc, ConfigKeyError | ConfigAttributeError)

    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    full_key = getattr(exc, "full_key", None) or ""
    key = ".".join(k for k in (where, full_key) if k)
    if unknown_key and full_key:
        parent, _, leaf = key.rpartition(".")
        owner = getattr(exc, "object_type", None)
        hint = f"allowed: {', '.join(allowed_keys(owner))}" if is_dataclass(owner) else first
        return ConfigError(
            f"invalid configuration: unknown key(s) {leaf} in {parent or 'the run'}; {hint}"
        )
    if isinstance(exc, ValidationError) and full_key:
        return ConfigError(f"invalid configuration: {key}: {first}")
    override = _HYDRA_MISSING_KEY.search(str(exc))
    if override:
        return ConfigError(
            f"invalid configuration: unknown key {override.group(1)} (no such option; "
            "`oncoflow config` prints every key)"
        )
    return ConfigError(f"invalid configuration: {first}")


__all__ = ["allowed_keys", "config_error", "load", "schema"]
