"""The diagnosis HTTP service (BentoML, class-based), one process.

Start it with ``oncoflow serve`` or ``bentoml serve serving.service:DiagnosisService``.

`DiagnosisService` checks every request, decodes and preprocesses it, and answers predict,
explain, similar, report, chat and the model card. Predictions are micro-batched in process
(`serving.batching.MicroBatcher`): whenever the model is free, every prediction waiting (up to
``ONCOFLOW_MAX_BATCH``) goes into one forward pass on a dedicated thread, so a lone request is
never held back and concurrent ones share the model call. They run on a copy of the model
rewritten for inference (`serving.inference`: BatchNorm folded, channels-last); explanations,
neighbours and reports use the model as trained. A bad upload is refused before batching, so it
never fails anyone else's request. (An internal BentoML runner service did the batching before:
its extra HTTP hop cost 3-5 ms of CPU per prediction, about what batching saved on two cores;
see bench/serve_throughput.py.)

Environment:

    ONCOFLOW_MODEL_TAG        Bento model-store tag to serve (default ``oncoflow-model:latest``)
    ONCOFLOW_API_KEYS         comma-separated keys, each ``secret`` or ``name:secret`` (required
                              unless the opt-out below); the key's owner is the chat user
    ONCOFLOW_ALLOW_NO_AUTH=1  run without authentication (local development only)
    ONCOFLOW_MAX_REQUEST_MB   request body limit in MB (default 20; chat bodies: 64 KB)
    ONCOFLOW_MAX_PIXELS       decoded image size limit (default 50 000 000 pixels)
    ONCOFLOW_TORCH_THREADS    torch intra-op threads (default: torch's choice)
    ONCOFLOW_MAX_BATCH        most predictions in one model call (default 32)
    ONCOFLOW_MAX_QUEUE        most predictions waiting for the model; beyond it /predict answers
                              503 (default 1024)
    ONCOFLOW_OPTIMISE_MODEL=0 predict with the model exactly as trained (default 1: the
                              rewritten copy, checked at start-up to give the same outputs)
    ONCOFLOW_GIL_SWITCH_US    Python's thread switch interval in microseconds (default 500;
                              Python's own is 5000): the model thread gets the interpreter
                              back sooner after each operator while the event loop is busy
    ONCOFLOW_CHAT=0           serve without the chat assistant
    ONCOFLOW_ASSISTANT_CONFIG JSON file with the assistant settings (backend, ...)

Endpoints (all but the probes need ``Authorization: Bearer <key>``):
``POST /predict`` ``/explain`` ``/similar`` ``/report`` (multipart: file ``image`` + optional
text ``clinical`` JSON and parameters), ``POST /predict_tabular`` ``/explain_tabular`` (JSON,
tabular-only models), ``POST /chat`` ``/chat/stream`` (SSE) ``/chat/history`` ``/chat/reset``
(JSON), ``GET /model_card``, BentoML's ``/docs.json`` (OpenAPI) and ``/livez`` ``/readyz``
``/metrics``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import anyio
import bentoml
import numpy as np
from pydantic import BeforeValidator, Field
from starlette.responses import JSONResponse, Response, StreamingResponse

from components.errors import ConfigError, ModelError, OncoflowError
from serving.batching import MicroBatcher
from serving.chat import ChatService, card_facts, chat_enabled
from serving.engine import DEFAULT_SHAP_NSAMPLES, DiagnosisEngine
from serving.middleware import (
    ANONYMOUS_USER,
    USER_SCOPE_KEY,
    ApiKeyAuth,
    BodySizeLimit,
    DropRecords,
    ErrorEnvelope,
    RedactValidationErrors,
    RequestLog,
    UploadGuard,
    UploadSpec,
    load_api_keys,
    max_request_bytes,
)
from serving.schemas import (
    ChatCase,
    ChatHistoryResponse,
    ChatRequest,
    ChatResetResponse,
    ChatResponse,
    ChatSessionRequest,
    ExplainResponse,
    ModelCard,
    ModelRef,
    PredictResponse,
    SimilarResponse,
)

log = logging.getLogger(__name__)

MODEL_TAG_ENV = "ONCOFLOW_MODEL_TAG"
DEFAULT_MODEL_TAG = "oncoflow-model:latest"
MAX_PIXELS_ENV = "ONCOFLOW_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 50_000_000
TORCH_THREADS_ENV = "ONCOFLOW_TORCH_THREADS"
MAX_BATCH_ENV = "ONCOFLOW_MAX_BATCH"
JSON_BODY_LIMIT = 64 * 1024
MAX_QUEUE_ENV = "ONCOFLOW_MAX_QUEUE"
OPTIMISE_ENV = "ONCOFLOW_OPTIMISE_MODEL"
SWITCH_ENV = "ONCOFLOW_GIL_SWITCH_US"
DEFAULT_SWITCH_US = 500
UPLOADS = {
    "/predict": UploadSpec.of("image", ["clinical"]),
    "/explain": UploadSpec.of(
        "image", ["clinical", "method", "target", "opacity", "shap", "nsamples"]
    ),
    "/similar": UploadSpec.of("image", ["clinical", "k"]),
    "/report": UploadSpec.of("image", ["clinical", "method", "target", "case_id"]),
}
JSON_ROUTES = (
    "/predict_tabular",
    "/explain_tabular",
    "/chat",
    "/chat/stream",
    "/chat/history",
    "/chat/reset",
)
ROUTES = (*UPLOADS, *JSON_ROUTES, "/model_card", "/docs.json", "/")

_instance: DiagnosisService | None = None  # the loaded service of this worker process


def _env_int(name: str, default: int | None, low: int = 1) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is not an integer") from exc
    if value < low:
        raise ConfigError(f"{name} must be at least {low}, not {value}")
    return value


def _max_pixels() -> int:
    return _env_int(MAX_PIXELS_ENV, DEFAULT_MAX_PIXELS)


def _max_batch() -> int:
    return _env_int(MAX_BATCH_ENV, 32)


def _max_queue() -> int:
    return _env_int(MAX_QUEUE_ENV, 1024)


def _optimise() -> bool:
    raw = os.environ.get(OPTIMISE_ENV, "").strip()
    if raw not in ("", "0", "1"):
        raise ConfigError(f"{OPTIMISE_ENV} must be 0 or 1, not {raw!r}")
    return raw != "0"


_batch_histogram = None  # one per process: prometheus_client refuses a second registration


def _batch_metric():
    """Record each predict batch size in ``oncoflow_predict_batch_size`` (on /metrics)."""
    global _batch_histogram
    if _batch_histogram is None:
        import prometheus_client  # after BentoML has set up multi-process metrics

        _batch_histogram = prometheus_client.Histogram(
            "oncoflow_predict_batch_size",
            "Rows per model call of POST /predict and /predict_tabular (micro-batching)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        )
    return _batch_histogram.observe


def _configure_process() -> int | None:
    """Logging (our lines in, BentoML's path-bearing access log out), the thread switch
    interval and torch threads."""
    logging.getLogger("serving").setLevel(logging.INFO)
    logging.getLogger("components").setLevel(logging.INFO)
    access = logging.getLogger("bentoml.access")
    if not any(isinstance(f, DropRecords) for f in access.filters):
        access.addFilter(DropRecords())  # RequestLog writes the access log, without paths
    for name in ("bentoml._internal.server.http_app", "_bentoml_impl.server.app", "bentoml"):
        target = logging.getLogger(name)
        if not any(isinstance(f, RedactValidationErrors) for f in target.filters):
            target.addFilter(RedactValidationErrors())
    # The model thread releases the GIL inside each torch operator and must win it back
    # between operators; with Python's default 5 ms switch interval a busy event loop can keep
    # it waiting that long each time. Compare with
    # `ONCOFLOW_GIL_SWITCH_US=5000 python bench/serve_throughput.py`.
    sys.setswitchinterval(_env_int(SWITCH_ENV, DEFAULT_SWITCH_US) / 1e6)
    threads = _env_int(TORCH_THREADS_ENV, None)
    if threads:
        import torch

        torch.set_num_threads(threads)
    return threads


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


def load_engine(tag: str | None = None) -> DiagnosisEngine:
    """The engine for the model `tag` (default: ``$ONCOFLOW_MODEL_TAG`` or latest)."""
    tag = tag or os.environ.get(MODEL_TAG_ENV, "").strip() or DEFAULT_MODEL_TAG
    ref = load_model_ref(tag)
    meta = ref.info.metadata or {}
    model_ref = ModelRef(
        name=str(meta.get("registered_model") or ref.tag.name),
        version=str(meta.get("model_version") or ""),
        tag=str(ref.tag),
    )
    return DiagnosisEngine.from_dir(ref.path, model_ref, _max_pixels(), _optimise())


def error_response(exc: OncoflowError) -> JSONResponse:
    """The JSON error envelope for an `OncoflowError`, with its HTTP status."""
    if exc.http_status >= 500:
        log.error("%s: %s", type(exc).__name__, exc)
    return JSONResponse(
        {"error": {"type": type(exc).__name__, "message": str(exc)}},
        status_code=exc.http_status,
    )


class Overloaded(OncoflowError):
    """The service cannot take this request now (503)."""

    http_status = 503


def _as_text(value: Any) -> Any:
    """Multipart text values arrive JSON-decoded ("3" -> 3); names are text whatever they look
    like."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return str(value)
    return value


Text = Annotated[str, BeforeValidator(_as_text)]
#: The clinical record: a JSON object (multipart text, decoded by BentoML) or its raw text.
Clinical = Annotated[
    dict[str, Any] | str | None,
    Field(
        description="clinical record as a JSON object (required iff the model card has a "
        "clinical_schema)"
    ),
]


def _failed(ctx: bentoml.Context, exc: OncoflowError) -> JSONResponse:
    """The error answer of an endpoint taking `ctx` (BentoML copies ctx's status onto it)."""
    ctx.response.status_code = exc.http_status
    return error_response(exc)


def _user(ctx: bentoml.Context) -> str:
    """The authenticated caller (set by ApiKeyAuth from the API key; never from the body)."""
    return str(ctx.request.scope.get(USER_SCOPE_KEY) or ANONYMOUS_USER)


@bentoml.service(
    name="oncoflow",
    traffic={"timeout": 120},
    workers=1,
    threads=4,
    logging={"access": {"enabled": False}},  # RequestLog writes the access log (no paths)
)
class DiagnosisService:
    """Loads ONE model bundle at start-up and answers every endpoint with it."""

    def __init__(self) -> None:
        global _instance
        threads = _configure_process()
        # Settings the middleware reads lazily (at the first request) are checked here, at
        # start-up, so a misconfigured service never starts instead of failing per request.
        load_api_keys()
        max_request_bytes()
        self.engine = load_engine()
        self.engine.warm_up(explainers=True)
        self.chat_service: ChatService | None = None
        if chat_enabled():
            facts = card_facts(self.engine.card())
            self.chat_service = ChatService.load(
                self.engine.model_dir, facts, torch_threads=threads
            )
        self.ref = self.engine.ref
        self.classes = self.engine.classes
        self.batcher = MicroBatcher(
            self.engine.infer_rows, _max_batch(), _max_queue(), on_batch=_batch_metric()
        )
        _instance = self
        log.info(
            "serving %s (%s %s, %d classes, registry version %s, chat %s)",
            self.ref.tag,
            self.engine.kind,
            self.engine.bundle.architecture,
            len(self.classes),
            self.ref.version or "-",
            "on" if self.chat_service else "off",
        )

    def __is_ready__(self) -> bool:
        """BentoML's /readyz hook: ready only with a loaded model."""
        return self.engine is not None

    def card(self):
        return self.engine.card(chat=self.chat_service is not None)

    def _image_row(self, image: Path, clinical: Any) -> np.ndarray:
        """The packed model input of one upload (blocking: read, decode, check, preprocess)."""
        return self.engine.pack(self.engine.prepare(image.read_bytes(), clinical, display=False))

    # -- image endpoints -------------------------------------------------------------------
    @bentoml.api(route="/predict")
    async def predict(self, image: Path, clinical: Clinical = None) -> PredictResponse:
        """Classify one image (PNG, JPEG, DICOM...; multipart file `image`), with the clinical
        record as text field `clinical` when the model takes one."""
        started = time.perf_counter()
        try:
            row = await anyio.to_thread.run_sync(self._image_row, image, clinical)
            probabilities = await self.batcher.submit(row)  # in a batch with concurrent calls
            return self.engine.predict_response(probabilities, started)
        except OncoflowError as exc:  # BentoML would turn these into opaque 500s
            return error_response(exc)

    @bentoml.api(route="/explain")
    def explain(
        self,
        image: Path,
        clinical: Clinical = None,
        method: Text = "gradcam",
        target: Annotated[str | None, BeforeValidator(_as_text)] = None,
        opacity: Annotated[float, Field(ge=0.0, le=1.0)] = 0.45,
        shap: bool = True,
        nsamples: Annotated[int, Field(ge=1, le=200)] = DEFAULT_SHAP_NSAMPLES,
    ) -> ExplainResponse:
        """Grad-CAM overlay and heatmap (`method`: gradcam, gradcam++, ...; `target`: a class
        name, default the predicted one), the image SHAP map and, with a clinical record, its
        top SHAP features. PNGs are base64."""
        try:
            case = self.engine.prepare(image.read_bytes(), clinical)
            return self.engine.explain(
                case, method=method, target=target, opacity=opacity, shap=shap, nsamples=nsamples
            )
        except OncoflowError as exc:
            return error_response(exc)

    @bentoml.api(route="/similar")
    def similar(
        self, image: Path, clinical: Clinical = None, k: Annotated[int, Field(ge=1, le=50)] = 5
    ) -> SimilarResponse:
        """The `k` most similar training cases: label, distance and a thumbnail (no
        identifiers)."""
        try:
            return self.engine.similar(
                self.engine.prepare(image.read_bytes(), clinical, display=False), k
            )
        except OncoflowError as exc:
            return error_response(exc)

    @bentoml.api(route="/report")
    def report(
        self,
        image: Path,
        clinical: Clinical = None,
        method: Text = "gradcam",
        target: Annotated[str | None, BeforeValidator(_as_text)] = None,
        case_id: Annotated[
            str | None, BeforeValidator(_as_text), Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
        ] = None,
    ) -> Annotated[Path, bentoml.validators.ContentType("application/pdf")]:
        """A one-case PDF report (application/pdf): prediction, Grad-CAM overlay, clinical SHAP,
        model facts, privacy and the disclaimer. `case_id`: an optional pseudonymous code."""
        try:
            case = self.engine.prepare(image.read_bytes(), clinical)
            pdf = self.engine.report(case, method=method, target=target, case_id=case_id)
        except OncoflowError as exc:
            return error_response(exc)
        return Response(
            pdf,
            media_type="application/pdf",
            headers={"content-disposition": 'attachment; filename="oncoflow-report.pdf"'},
        )

    # -- tabular-only models ---------------------------------------------------------------
    @bentoml.api(route="/predict_tabular")
    async def predict_tabular(self, clinical: dict[str, Any]) -> PredictResponse:
        """Classify one clinical record (JSON `{"clinical": {...}}`; tabular-only models)."""
        started = time.perf_counter()
        try:
            row = self.engine.pack(self.engine.prepare_record(clinical))
            probabilities = await self.batcher.submit(row)
            return self.engine.predict_response(probabilities, started)
        except OncoflowError as exc:
            return error_response(exc)

    @bentoml.api(route="/explain_tabular")
    def explain_tabular(
        self,
        clinical: dict[str, Any],
        target: Annotated[str | None, BeforeValidator(_as_text)] = None,
    ) -> ExplainResponse:
        """SHAP value of each clinical feature (tabular-only models)."""
        try:
            return self.engine.explain(self.engine.prepare_record(clinical), target=target)
        except OncoflowError as exc:
            return error_response(exc)

    # -- chat ------------------------------------------------------------------------------
    def _chat(self):
        if self.chat_service is None:
            raise Overloaded("chat is disabled on this server (ONCOFLOW_CHAT=0)")
        return self.chat_service

    @bentoml.api(route="/chat", input_spec=ChatRequest)
    def chat(
        self, question: str, session_id: str, ctx: bentoml.Context, case: ChatCase | None = None
    ) -> ChatResponse:
        """Ask the assistant about the case on screen or the notes; answers cite the notes.
        History is kept per authenticated user (from the API key) and `session_id`."""
        try:
            request = ChatRequest(question=question, session_id=session_id, case=case)
            return self._chat().answer(request, _user(ctx))
        except OncoflowError as exc:
            return _failed(ctx, exc)

    @bentoml.api(route="/chat/stream", input_spec=ChatRequest)
    def chat_stream(
        self, question: str, session_id: str, ctx: bentoml.Context, case: ChatCase | None = None
    ) -> str:
        """The chat answer as server-sent events (text/event-stream): `delta` events with
        {text} pieces, then one `answer` event holding the ChatResponse."""
        try:
            request = ChatRequest(question=question, session_id=session_id, case=case)
            events = self._chat().stream(request, _user(ctx))
        except OncoflowError as exc:
            return _failed(ctx, exc)
        return StreamingResponse(
            events,
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )

    @bentoml.api(route="/chat/history", input_spec=ChatSessionRequest)
    def chat_history(self, ctx: bentoml.Context, session_id: str) -> ChatHistoryResponse:
        """This user's conversation `session_id`, oldest turn first (another user's sessions
        are never visible, whatever their id)."""
        try:
            return self._chat().history(session_id, _user(ctx))
        except OncoflowError as exc:
            return _failed(ctx, exc)

    @bentoml.api(route="/chat/reset", input_spec=ChatSessionRequest)
    def chat_reset(self, ctx: bentoml.Context, session_id: str) -> ChatResetResponse:
        """Forget this user's conversation `session_id`."""
        try:
            self._chat().reset(session_id, _user(ctx))
            return ChatResetResponse(session_id=session_id)
        except OncoflowError as exc:
            return _failed(ctx, exc)


def _extra_app():
    """The GET routes BentoML's POST-only APIs cannot express; FastAPI, so that BentoML's
    OpenAPI document (/docs.json) lists them with their schema."""
    from fastapi import FastAPI

    app = FastAPI(title="oncoflow", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/model_card", response_model=ModelCard, tags=["Service APIs"])
    async def model_card() -> ModelCard:
        """Version, classes, held-out test metrics, privacy (epsilon, delta), data
        fingerprint, intended use, limitations and the clinical schema of the served model."""
        if _instance is None:
            raise ModelError("the model is not loaded yet")
        return _instance.card()

    return app


# Outermost first: request log, error envelope, authentication (headers only), body limits,
# upload shape.
DiagnosisService.add_asgi_middleware(RequestLog, routes=ROUTES)
DiagnosisService.add_asgi_middleware(ErrorEnvelope)
DiagnosisService.add_asgi_middleware(ApiKeyAuth)
DiagnosisService.add_asgi_middleware(
    BodySizeLimit, path_limits=dict.fromkeys(JSON_ROUTES, JSON_BODY_LIMIT)
)
DiagnosisService.add_asgi_middleware(UploadGuard, uploads=UPLOADS)
DiagnosisService.mount_asgi_app(_extra_app(), path="/", name="oncoflow-extra")

__all__ = ["DiagnosisService", "error_response", "load_engine", "load_model_ref"]
