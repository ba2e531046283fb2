"""`oncoflow demo`: the main job — train on real data, register, package and serve."""

from __future__ import annotations

import json
import os
import secrets
import sys

# A CPU-friendly run on real data: brain MRI, pretrained EfficientNet-Lite0, small images.
DEMO_OVERRIDES = [
    "dataset=brain_tumor_mri",
    "model=efficientnet_lite0",
    "dataset.image_size=96",
    "trainer.max_epochs=4",
    "trainer.batch_size=64",
    "trainer.lr=0.001",
]


def demo(overrides: list[str], serve: bool = True) -> int:
    """Run the pipeline with the demo defaults (user overrides win), then start the service."""
    from flows.runtime import prepare

    prepare([*DEMO_OVERRIDES, *overrides])
    from flows.pipeline import run_pipeline

    summary = run_pipeline([*DEMO_OVERRIDES, *overrides])
    print(json.dumps(summary, indent=2, default=str))
    tag = summary.get("bento_model")
    if not tag:
        print(
            "oncoflow: the new model did not become champion; serving the current champion.",
            file=sys.stderr,
        )
    if not serve:
        return 0
    from serving.launch import serve as serve_model

    key = os.environ.get("ONCOFLOW_API_KEYS")
    if not key:
        key = secrets.token_urlsafe(24)
        os.environ["ONCOFLOW_API_KEYS"] = key
    port = int(os.environ.get("ONCOFLOW_PORT", "3000"))
    print(
        "\n".join(
            [
                "",
                f"Service:   http://127.0.0.1:{port}   (API docs: http://127.0.0.1:{port}/docs)",
                f"API key:   {key}   (send as 'Authorization: Bearer <key>')",
                f"Try:       curl -H 'Authorization: Bearer {key}' -F image=@<file.jpg> "
                f"http://127.0.0.1:{port}/predict",
                f"MLflow UI: .venv/bin/mlflow ui --backend-store-uri sqlite:///"
                f"{os.path.abspath(summary['run_dir'].split('/runs/')[0])}/mlflow.db",
                f"Run files: {summary['run_dir']}",
                "",
            ]
        ),
        flush=True,
    )
    return serve_model(model_tag=tag, host="127.0.0.1", port=port)
