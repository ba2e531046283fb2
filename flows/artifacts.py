"""Small helpers that record what a task did: JSON files and Prefect artifacts."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def markdown(key: str, text: str) -> None:
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(key=key, markdown=text)


def image(key: str, path: Path, description: str = "") -> None:
    """A PNG from the run directory as a Prefect image artifact (inlined as a data URL, so
    the picture stays with the run's own records and needs no file server)."""
    import base64

    from prefect.artifacts import create_image_artifact

    encoded = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    create_image_artifact(
        image_url=f"data:image/png;base64,{encoded}", key=key, description=description
    )


def metrics_table(key: str, metrics: dict[str, Any]) -> None:
    """Headline metrics plus per-class sensitivity/specificity as a Prefect table artifact."""
    from prefect.artifacts import create_table_artifact

    rows = [
        {"metric": name, "value": _fmt(value)}
        for name, value in metrics.items()
        if isinstance(value, int | float) or value is None
    ]
    for name, stats in metrics.get("per_class", {}).items():
        for stat in ("sensitivity", "specificity"):
            rows.append({"metric": f"{name} {stat}", "value": _fmt(stats.get(stat))})
    create_table_artifact(key=key, table=rows)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)
