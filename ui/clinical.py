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
#: the choice an optional yes/no or category input offers for a value nobody knows (sent as missing)
NOT_KNOWN = "Not known"


def readable_name(name: str) -> str:
    """A feature's column name in words: 'diameter_1' -> 'Diameter 1',
    'background_father' -> 'Background father'."""
    words = " ".join(str(name).replace("_", " ").split())
    return words[:1].upper() + words[1:]


def field_label(entry: Mapping[str, Any]) -> str:
    """The input's label: the name in words, with its unit ('Diameter 1 (mm)')."""
    name = readable_name(entry["name"])
    unit = entry.get("unit")
    return f"{name} ({unit})" if unit else name


def _range_text(entry: Mapping[str, Any]) -> str | None:
    low, high = entry.get("min"), entry.get("max")
    if low is not None and high is not None:
        return f"{low:g} to {high:g}"
    if low is not None:
        return f"at least {low:g}"
    if high is not None:
        return f"at most {high:g}"
    return None


def field_info(entry: Mapping[str, Any]) -> str:
    """The line under the input: the schema's description, the range, required or optional."""
    parts = []
    if entry.get("description"):
        parts.append(str(entry["description"]))
    if _range_text(entry):
        parts.append(str(_range_text(entry)))
    parts.append("required" if entry.get("required", True) else "optional")
    return " · ".join(parts)


def clinical_input(entry: Mapping[str, Any]):
    """The Gradio input for one schema feature: a number box bounded by the feature's range
    (whole numbers for int), Yes/No for a bool, a dropdown of the allowed values for a
    category (optional ones also offer `NOT_KNOWN`); labelled by `field_label`, described by
    `field_info`."""
    import gradio as gr

    label, info, key = field_label(entry), field_info(entry), f"clin-{entry['name']}"
    kind = entry.get("type")
    if kind in ("float", "int"):
        return gr.Number(
            label=label,
            info=info,
            minimum=entry.get("min"),
            maximum=entry.get("max"),
            precision=0 if kind == "int" else None,
            key=key,
        )
    unknown = [] if entry.get("required", True) else [NOT_KNOWN]  # a choice can be taken back
    if kind == "bool":
        return gr.Radio([YES, NO, *unknown], label=label, info=info, key=key)
    return gr.Dropdown(
        choices=[*(entry.get("allowed") or []), *unknown],
        value=None,
        label=label,
        info=info,
        key=key,
    )


def _missing(value: Any) -> bool:
    return (
        value is None
        or (isinstance(value, str) and (not value.strip() or value == NOT_KNOWN))
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
                bounds = (
                    f"between {low:g} and {high:g}"
                    if low is not None and high is not None
                    else _range_text(entry)
                )
                problems.append(f"{label} must be {bounds}")
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
