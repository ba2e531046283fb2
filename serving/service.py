"""The diagnosis HTTP service (BentoML, class-based).

Start it with ``oncoflow serve`` or ``bentoml serve serving.service:DiagnosisService``.
Environment:

    ONCOFLOW_MODEL_TAG        Bento model-store tag to serve (default ``oncoflow-model:latest``)
    ONCOFLOW_API_KEYS         comma-separated API keys (required unless the opt-out below)
    ONCOFLOW_ALLOW_NO_AUTH=1  run without authentication (local development only)
    ONCOFLOW_MAX_REQUEST_MB   request body limit in MB (default 20)
    ONCOFLOW_MAX_PIXELS       decoded image size limit (default 50 000 000 pixels)

Endpoints: ``POST /predict`` (multipart field ``image``), ``GET /model_card``, and BentoML's
``/livez``, ``/readyz`` (200 only once the model is loaded) and ``/metrics``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import bentoml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from components.errors import ConfigError, ModelError, OncoflowError
from serving.middleware import (
    ApiKeyAuth,
    BodySizeLimit,
    ErrorEnvelope,
    UploadGuard,
    load_api_keys,
    max_request_bytes,
)
from serving.schemas import ModelCard, ModelRef, PredictResponse

log = logging.getLogger(__name__)

MODEL_TAG_ENV = "ONCOFLOW_MODEL_TAG"
DEFAULT_MODEL_TAG = "oncoflow-model:latest"
MAX_PIXELS_ENV = "ONCOFLOW_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 50_000_000
INTENDED_USE = (
    "Decision support for trained clinicians on images like the training data; "
    "not a diagnosis and not validated for clinical use."
)

_instance: DiagnosisService | None = None  # the loaded service of this worker process


def _max_pixels() -> int:
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    try:
        value = int(raw) if raw else DEFAULT_MAX_PIXELS
    except ValueError as exc:
        raise ConfigError(f"{MAX_PIXELS_ENV}={raw!r} is not an integer") from exc
    if value <= 0:
        raise ConfigError(f"{MAX_PIXELS_ENV} must be positive")
    return value


def load_model_ref(tag: str) -> bentoml.Model:
    """The Bento model-store entry for `tag`, or a ModelError saying how to create one."""
    from bentoml.exceptions import BentoMLException

    try:
        return bentoml.models.get(tag)
    except (BentoMLException, ValueError) as exc:
        home = os.environ.get("BENTOML_HOME", "~/bentoml")
        raise ModelError(
            f"no model {tag!r} in the Bento model store under {home}: train and package one "
            "first (`oncoflow run`), or import a bundle with serving.packaging.import_bundle, "
            f"or point {MODEL_TAG_ENV} at an existing tag. The service never serves an "
            "untrained model."
        ) from exc


def error_response(exc: OncoflowError) -> JSONResponse:
    """The JSON error envelope for an `OncoflowError`, with its HTTP status."""
    if exc.http_status >= 500:
        log.error("%s: %s", type(exc).__name__, exc)
    return JSONResponse(
        {"error": {"type": type(exc).__name__, "message": str(exc)}},
        status_code=exc.http_status,
    )


async def _model_card(_: Request) -> JSONResponse:
    if _instance is None:
        raise ModelError("the model is not loaded yet")
    return JSONResponse(_instance.card().model_dump(mode="json"))


_extra_routes = Starlette(routes=[Route("/model_card", _model_card, methods=["GET"])])


@bentoml.service(name="oncoflow", traffic={"timeout": 60}, workers=1)
class DiagnosisService:
    """Loads ONE model bundle at start-up and answers predictions with it."""

    def __init__(self) -> None:
        import torch

        from components.bundle import ModelBundle

        global _instance
        # Settings the middleware reads lazily (at the first request) are checked here, at
        # start-up, so a misconfigured service never starts instead of failing per request.
        load_api_keys()
        max_request_bytes()
        tag = os.environ.get(MODEL_TAG_ENV, "").strip() or DEFAULT_MODEL_TAG
        ref = load_model_ref(tag)
        self.bundle = ModelBundle.load(ref.path)
        self.model = self.bundle.build_model()
        self.classes = list(self.bundle.class_names)
        self.max_pixels = _max_pixels()
        meta = ref.info.metadata or {}
        self.ref = ModelRef(
            name=str(meta.get("registered_model") or ref.tag.name),
            version=str(meta.get("model_version") or ""),
            tag=str(ref.tag),
        )
        with torch.inference_mode():  # warm-up, so the first request is not the slow one
            size, channels = self.bundle.preprocessing.size, self.bundle.preprocessing.channels
            self.model(torch.zeros(1, channels, size, size))
        _instance = self
        log.info(
            "serving %s (%s, %d classes, registry version %s)",
            self.ref.tag,
            self.bundle.architecture,
            len(self.classes),
            self.ref.version or "-",
        )

    def __is_ready__(self) -> bool:
        """BentoML's /readyz hook: ready only with a loaded model."""
        return self.model is not None

    def _probabilities(self, batch) -> Any:
        import torch

        with torch.inference_mode():
            return torch.softmax(self.model(batch).float(), dim=1)

    @bentoml.api(route="/predict")
    def predict(self, image: Path) -> PredictResponse:
        """Classify one uploaded image (PNG, JPEG, DICOM, ...) sent as multipart field `image`."""
        try:
            return self._predict(image.read_bytes())
        except OncoflowError as exc:  # BentoML would turn these into opaque 500s
            return error_response(exc)

    def _predict(self, data: bytes) -> PredictResponse:
        from components.data.images import decode_bytes

        started = time.perf_counter()
        picture = decode_bytes(data, max_pixels=self.max_pixels)
        tensor = self.bundle.preprocessing.to_tensor(picture).unsqueeze(0)
        probs = self._probabilities(tensor)[0].tolist()
        best = max(range(len(probs)), key=probs.__getitem__)
        return PredictResponse(
            label=self.classes[best],
            probabilities=dict(zip(self.classes, probs, strict=True)),
            model=self.ref,
            latency_ms=(time.perf_counter() - started) * 1000.0,
        )

    def card(self) -> ModelCard:
        from components.bundle import bundle_summary

        summary = bundle_summary(self.bundle)
        return ModelCard(
            model=self.ref,
            architecture=self.bundle.architecture,
            architecture_kwargs=summary.get("architecture_kwargs") or {},
            classes=self.classes,
            preprocessing=summary["preprocessing"],
            metrics=summary.get("metrics") or {},
            data_fingerprint=self.bundle.data_fingerprint,
            privacy=summary.get("privacy"),
            intended_use=INTENDED_USE,
        )


# Outermost first: error envelope, authentication (headers only), body limit, upload shape.
DiagnosisService.add_asgi_middleware(ErrorEnvelope)
DiagnosisService.add_asgi_middleware(ApiKeyAuth)
DiagnosisService.add_asgi_middleware(BodySizeLimit)
DiagnosisService.add_asgi_middleware(UploadGuard, uploads={"/predict": "image"})
DiagnosisService.mount_asgi_app(_extra_routes, path="/", name="oncoflow-extra")

__all__ = ["DiagnosisService", "error_response", "load_model_ref"]
