"""`tiny_cfg(*overrides, **sections)`: the real conf/ tree, composed with tiny overrides.

Tests build their run configuration the way `oncoflow run` does (Hydra compose onto the typed
schema, every cross-field check), never as hand-written dicts, so YAML/code drift shows up.
A keyword section is spelled as a mapping and turned into dotted overrides:

    tiny_cfg("training=federated", federation={"engine": "inline", "rounds": 1},
             privacy={"mode": "dp_sgd", "epsilon": None})
"""

from __future__ import annotations

from typing import Any

from components.config import compose, to_container

# Small and quick unless a test says otherwise (a 4-channel small CNN, one epoch, no augmentation).
TINY = ("model=small_cnn", "model.width=4", "trainer.max_epochs=1", "trainer.augment=false")


def _value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "[" + ",".join(_value(v) for v in value) + "]"
    return str(value)


def _dotted(prefix: str, section: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for key, value in section.items():
        if isinstance(value, dict):
            out.extend(_dotted(f"{prefix}.{key}", value))
        else:
            out.append(f"{prefix}.{key}={_value(value)}")
    return out


def tiny_overrides(*overrides: str, **sections: dict[str, Any]) -> list[str]:
    """The override list `tiny_cfg` composes (TINY first, then the caller's)."""
    out = [*TINY, *overrides]
    for name, section in sections.items():
        out.extend(_dotted(name, section))
    return out


def tiny_cfg(*overrides: str, **sections: dict[str, Any]) -> dict[str, Any]:
    """The composed, validated run configuration as a plain dict (what flows pass to tasks)."""
    return to_container(compose(tiny_overrides(*overrides, **sections)))
