"""The baseline for bench/serve_throughput.py: plain FastAPI + torch, one request at a time.

Serves the same model bundle the same way the BentoML service does (safe decode, the bundle's
preprocessing and test-time views, softmax), but without batching: a process-wide lock lets one
request at a time decode and run the model (uvicorn still reads the next upload meanwhile). No
auth.

    ONCOFLOW_BASELINE_BUNDLE=/path/to/bundle ONCOFLOW_TORCH_THREADS=1 \\
        uvicorn --factory --app-dir bench baseline_fastapi:create_app --port 3001
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

from fastapi import FastAPI, File, HTTPException, UploadFile

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BUNDLE_ENV = "ONCOFLOW_BASELINE_BUNDLE"


def create_app():
    import torch

    from components.bundle import ModelBundle
    from components.data.images import decode_bytes
    from components.errors import InputError
    from components.evaluation.predict import mean_over_views

    threads = os.environ.get("ONCOFLOW_TORCH_THREADS", "").strip()
    if threads:
        torch.set_num_threads(int(threads))
    bundle = ModelBundle.load(os.environ[BUNDLE_ENV])
    model = bundle.build_model()
    classes = list(bundle.class_names)
    lock = threading.Lock()
    app = FastAPI(title="baseline", docs_url=None, redoc_url=None)

    @app.get("/readyz")
    def readyz() -> dict:
        return {"ready": True}

    @app.post("/predict")
    def predict(image: UploadFile = File(...)) -> dict:  # noqa: B008 - FastAPI's idiom
        started = time.perf_counter()
        data = image.file.read()
        with lock:  # one request at a time: no batching, no concurrent model calls
            try:
                picture = decode_bytes(data)
            except InputError as exc:
                raise HTTPException(422, str(exc)) from exc
            x = bundle.preprocessing.to_tensor(picture).unsqueeze(0)
            with torch.inference_mode():
                logits = mean_over_views(model, (x,), bundle.preprocessing)
                probs = torch.softmax(logits, dim=1)[0].tolist()
        best = max(range(len(probs)), key=probs.__getitem__)
        return {
            "label": classes[best],
            "probabilities": dict(zip(classes, probs, strict=True)),
            "latency_ms": (time.perf_counter() - started) * 1000.0,
        }

    return app
