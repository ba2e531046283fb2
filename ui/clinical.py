"""Clinical input fields generated from the model's feature schema, and the record they give.

A schema entry (see validation/clinical_schema.py) is a dict with ``name``, ``type`` (float,
int, bool, category), optional ``min``/``max``, ``unit``, ``allowed``, ``required`` and
``description``. The service validates records again; this check only gives early,
field-by-field messages.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ui.errors import InvalidInput

YES, NO = "Yes", "No"


def field_label(entry: Mapping[str, Any]) -> str:
    name = str(entry["name"]).replace("_", " ")
    name = name[:1].upper() + name[1:]
    unit = entry.get("unit")
    return f"{name} ({unit})" if unit else name


def field_info(entry: Mapping[str, Any]) -> str:
    parts = []
    if entry.get("description"):
        parts.append(str(entry["description"]))
    low, high = entry.get("min"), entry.get("max")
    if low is not None and high is not None:
        parts.append(f"{low:g} to {high:g}")
    elif low is not None:
        parts.append(f"at least {low:g}")
    elif high is not None:
        parts.append(f"at most {high:g}")
    parts.append("required" if entry.get("required", True) else "optional")
    return " · ".join(parts)


def _missing(value: Any) -> bool:
    return (
        value is None
        or (isinstance(value, str) and not value.strip())
        or (isinstance(value, float) and math.isnan(value))
    )


def record_from_fields(schema: Sequence[Mapping[str, Any]], values: Sequence[Any]) -> dict:
    """The clinical record for the service from the form's values (same order as `schema`).

    Missing optional values are left out; problems are reported all at once.
    """
    if len(values) != len(schema):
        raise InvalidInput("The clinical form does not match the model's fields; reload the page.")
    record: dict[str, Any] = {}
    problems: list[str] = []
    for entry, value in zip(schema, values, strict=True):
        name, kind, label = entry["name"], entry["type"], field_label(entry)
        if _missing(value):
            if entry.get("required", True):
                problems.append(f"{label} is required")
            continue
        if kind in ("float", "int"):
            number = float(value)
            if kind == "int" and not number.is_integer():
                problems.append(f"{label} must be a whole number")
                continue
            low, high = entry.get("min"), entry.get("max")
            if (low is not None and number < low) or (high is not None and number > high):
                problems.append(f"{label} must be between {low:g} and {high:g}")
                continue
            record[name] = int(number) if kind == "int" else number
        elif kind == "bool":
            if value not in (YES, NO):
                problems.append(f"{label} must be {YES} or {NO}")
                continue
            record[name] = value == YES
        else:
            allowed = list(entry.get("allowed") or [])
            if value not in allowed:
                problems.append(f"{label} must be one of {', '.join(map(str, allowed))}")
                continue
            record[name] = value
    if problems:
        raise InvalidInput("Please check the clinical fields: " + "; ".join(problems) + ".")
    return record
