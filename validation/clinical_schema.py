"""Clinical feature schemas and a fast, GX-free check of one clinical record.

A schema is a list of feature dicts::

    {"name": "age", "type": "float", "min": 18, "max": 110, "unit": "years", "required": True}
    {"name": "sex", "type": "category", "allowed": ["F", "M"], "required": False}

``type`` is one of ``float``, ``int``, ``category`` or ``bool``. ``min``/``max`` bound numeric
features (inclusive), ``allowed`` lists the values of a category, ``required`` (default True)
says whether a value may be missing, and ``max_missing_fraction`` (optional, tables only) caps
the share of missing values of an optional feature.

This module is imported by the HTTP service, so it must stay free of heavy imports.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from components.errors import ConfigError, InputError

FEATURE_TYPES = ("float", "int", "category", "bool")
_TRUE = {"true", "yes", "y", "1", "t"}
_FALSE = {"false", "no", "n", "0", "f"}
_KNOWN_KEYS = {
    "name",
    "type",
    "min",
    "max",
    "unit",
    "allowed",
    "required",
    "max_missing_fraction",
    "description",
}


@dataclass(frozen=True)
class ClinicalFeature:
    """One column of a clinical table and the values it may hold."""

    name: str
    type: str
    min: float | None = None
    max: float | None = None
    unit: str = ""
    allowed: tuple | None = None
    required: bool = True
    max_missing_fraction: float | None = None

    @property
    def numeric(self) -> bool:
        return self.type in ("float", "int")

    def describe_range(self) -> str:
        if self.type == "category":
            return f"one of {list(self.allowed or ())}"
        low = "-inf" if self.min is None else _fmt(self.min)
        high = "inf" if self.max is None else _fmt(self.max)
        unit = f" {self.unit}" if self.unit else ""
        return f"[{low}, {high}]{unit}"

    def as_dict(self) -> dict:
        out: dict[str, Any] = {"name": self.name, "type": self.type, "required": self.required}
        if self.min is not None:
            out["min"] = self.min
        if self.max is not None:
            out["max"] = self.max
        if self.unit:
            out["unit"] = self.unit
        if self.allowed is not None:
            out["allowed"] = list(self.allowed)
        if self.max_missing_fraction is not None:
            out["max_missing_fraction"] = self.max_missing_fraction
        return out


def parse_schema(schema: Iterable[Mapping | ClinicalFeature]) -> list[ClinicalFeature]:
    """Turn schema dicts into `ClinicalFeature`s, rejecting inconsistent schemas."""
    features: list[ClinicalFeature] = []
    seen: set[str] = set()
    for i, entry in enumerate(schema):
        feature = entry if isinstance(entry, ClinicalFeature) else _feature_from_dict(entry, i)
        if feature.name in seen:
            raise ConfigError(f"clinical schema lists feature {feature.name!r} twice")
        seen.add(feature.name)
        features.append(feature)
    if not features:
        raise ConfigError("clinical schema is empty; list at least one feature")
    return features


def _feature_from_dict(entry: Mapping, position: int) -> ClinicalFeature:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"clinical schema entry {position} is not a mapping: {entry!r}")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"clinical schema entry {position} has no 'name'")
    unknown = sorted(set(entry) - _KNOWN_KEYS)
    if unknown:
        raise ConfigError(f"clinical feature {name!r} has unknown keys {unknown}")
    kind = entry.get("type")
    if kind not in FEATURE_TYPES:
        raise ConfigError(
            f"clinical feature {name!r} has type {kind!r}; use one of {FEATURE_TYPES}"
        )
    low, high = entry.get("min"), entry.get("max")
    for bound in (low, high):
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int | float)):
            raise ConfigError(f"clinical feature {name!r} has a non-numeric bound {bound!r}")
    if low is not None and high is not None and low > high:
        raise ConfigError(f"clinical feature {name!r} has min {low} above max {high}")
    if (low is not None or high is not None) and kind not in ("float", "int"):
        raise ConfigError(f"clinical feature {name!r} of type {kind} cannot have min/max")
    allowed = entry.get("allowed")
    if kind == "category":
        if not allowed:
            raise ConfigError(f"category feature {name!r} needs a non-empty 'allowed' list")
        allowed = tuple(allowed)
    elif allowed is not None:
        raise ConfigError(f"feature {name!r} of type {kind} cannot have 'allowed' values")
    fraction = entry.get("max_missing_fraction")
    if fraction is not None and not 0.0 <= float(fraction) <= 1.0:
        raise ConfigError(f"feature {name!r}: max_missing_fraction must lie in [0, 1]")
    return ClinicalFeature(
        name=name,
        type=kind,
        min=None if low is None else float(low),
        max=None if high is None else float(high),
        unit=str(entry.get("unit") or ""),
        allowed=allowed,
        required=bool(entry.get("required", True)),
        max_missing_fraction=None if fraction is None else float(fraction),
    )


def is_missing(value: Any) -> bool:
    """None, NaN, pandas NA and blank strings count as missing."""
    if value is None:
        return True
    if isinstance(value, str):
        return value.strip() == ""
    if isinstance(value, float):
        return math.isnan(value)
    try:  # pandas.NA / NaT and numpy floats, without importing pandas here
        return bool(value != value)
    except (TypeError, ValueError):
        return False


def parse_value(feature: ClinicalFeature, value: Any) -> Any:
    """Convert a present raw value to the feature's type; raise ValueError if it cannot."""
    kind = feature.type
    if kind == "bool":
        return _parse_bool(value)
    if kind == "category":
        match = _match_category(feature, value)
        return value if match is _NO_MATCH else match
    number = _parse_number(value)
    if kind == "int":
        if not float(number).is_integer():
            raise ValueError(f"{value!r} is not a whole number")
        return int(number)
    return float(number)


def range_problem(feature: ClinicalFeature, value: Any) -> str | None:
    """Why a parsed value breaks the feature's range or category list, or None if it does not."""
    if feature.type == "category" and _match_category(feature, value) is _NO_MATCH:
        return f"{value!r} is not one of {list(feature.allowed or ())}"
    if feature.numeric:
        if feature.min is not None and value < feature.min:
            return f"{_fmt(value)} below minimum {_fmt(feature.min)} {feature.unit}".rstrip()
        if feature.max is not None and value > feature.max:
            return f"{_fmt(value)} above maximum {_fmt(feature.max)} {feature.unit}".rstrip()
    return None


def check_clinical_record(record: Mapping, schema: Iterable[Mapping | ClinicalFeature]) -> dict:
    """Validate one clinical record and return it cleaned and typed.

    Missing optional features come back as None. Raises `InputError` naming every field that
    is missing, unknown, of the wrong type or out of range (the error's ``fields`` attribute
    maps each field to its problem).
    """
    if not isinstance(record, Mapping):
        raise InputError(f"clinical record must be a JSON object, got {type(record).__name__}")
    features = parse_schema(schema)
    problems: dict[str, str] = {}
    cleaned: dict[str, Any] = {}
    names = {f.name for f in features}
    for key in record:
        if key not in names:
            problems[str(key)] = "unknown field (not in the clinical schema)"
    for feature in features:
        raw = record.get(feature.name)
        if is_missing(raw):
            if feature.required:
                problems[feature.name] = "missing (required)"
            cleaned[feature.name] = None
            continue
        try:
            value = parse_value(feature, raw)
        except ValueError as exc:
            problems[feature.name] = f"wrong type: {exc}"
            continue
        issue = range_problem(feature, value)
        if issue:
            kind = "not allowed" if feature.type == "category" else "out of range"
            problems[feature.name] = f"{kind}: {issue}"
            continue
        cleaned[feature.name] = value
    if problems:
        detail = "; ".join(f"{name}: {why}" for name, why in problems.items())
        error = InputError(f"invalid clinical record — {detail}")
        error.fields = problems  # type: ignore[attr-defined]
        raise error
    return cleaned


def _parse_number(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is a boolean, expected a number")
    if isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:  # an integer beyond any float, e.g. 10**400
            raise ValueError("the number is too large") from None
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise ValueError(f"{value!r} is not a number") from None
    else:
        try:  # numpy scalars
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"a {type(value).__name__} value is not a number") from None
        if type(value).__name__.startswith("bool"):
            raise ValueError(f"{value!r} is a boolean, expected a number")
    if not math.isfinite(number):
        raise ValueError(f"{value!r} is not a finite number")
    return number


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool) or type(value).__name__ in ("bool", "bool_"):
        return bool(value)
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        if text in ("1.0", "0.0"):  # a 0/1 column written as floats (pandas does)
            return text == "1.0"
    raise ValueError(f"{value!r} is not a boolean (true/false, yes/no, 1/0)")


_NO_MATCH = object()


def _match_category(feature: ClinicalFeature, value: Any) -> Any:
    """The allowed option equal to `value` (or to its text), else `_NO_MATCH`."""
    text = str(value).strip()
    for option in feature.allowed or ():
        if option == value or str(option) == text:
            return option
    return _NO_MATCH


def _fmt(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return f"{value:g}" if isinstance(value, float) else str(value)
