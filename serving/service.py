"""The diagnosis HTTP service (BentoML, class-based), one process.

Start it with ``oncoflow serve`` or ``bentoml serve serving.service:DiagnosisService``.

`DiagnosisService` checks every request, decodes and preprocesses it, and answers predict,
explain, similar, report, chat and the model card. Predictions are micro-batched in process
(`serving.batching.MicroBatcher`): whenever the model is free, every prediction waiting (up to
``serving.max_batch``) goes into one forward pass on a dedicated thread, so a lone request is
never held back and concurrent ones share the model call. They run on a copy of the model
rewritten for inference (`serving.inference`: BatchNorm folded, channels-last); neighbours use
the model as trained. Explanations and reports run in a child process that loads the same
bundle (`serving.explainer`), so they never hold this process's GIL. A bad upload is refused
before batching, so it never fails anyone else's request. (An internal BentoML runner service
did the batching before: its extra HTTP hop cost 3-5 ms of CPU per prediction, about what
batching saved on two cores; see bench/serve_throughput.py.)

Settings: the ``serving`` section of the run config (`components.config.ServingConf`), which
``ONCOFLOW_*`` variables override (the table: `serving.settings`). The other modules it wires
together: `serving.process` (logging, thread switch interval, torch threads), `serving.metrics`,
`serving.api_errors` (an endpoint's `OncoflowError` -> its JSON answer), `serving.model_store`
(the served model) and `serving.middleware`.

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
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import anyio
import bentoml
from fastapi import FastAPI
from pydantic import BeforeValidator, Field
from starlette.responses import Response, StreamingResponse

from components.config import SHAP_NSAMPLES_LIMIT
from components.errors import NotFound
from serving.api_errors import Overloaded, answers_errors
from serving.batching import MicroBatcher
from serving.chat import ChatService, card_facts
from serving.explainer import ExplainerSpec, ExplanationProcess
from serving.metrics import batch_size_recorder
from serving.middleware import (
    ANONYMOUS_USER,
    USER_SCOPE_KEY,
    ApiKeyAuth,
    BodySizeLimit,
    ConcurrencyLimit,
    ErrorEnvelope,
    JsonGuard,
    RateLimit,
    RequestLog,
    UploadGuard,
    UploadSpec,
    load_api_keys,
)
from serving.openapi import OpenApiContract
from serving.prediction_load import PredictionLoad
from serving.process import configure_process, release_free_memory_every
from serving.schemas import (
    ChatCase,
    ChatHistoryResponse,
    ChatRequest,
    ChatResetResponse,
    ChatResponse,
    ChatSessionRequest,
    ExplainResponse,
    ModelCard,
    PredictResponse,
    SimilarResponse,
)
from serving.settings import current_settings
from serving.uploads import Upload

log = logging.getLogger(__name__)

JSON_BODY_LIMIT = 64 * 1024
UPLOADS = {
    "/predict": UploadSpec.of("image", ["clinical"]),
    "/explain": UploadSpec.of(
        "image", ["clinical", "method", "target", "opacity", "shap", "nsamples"]
    ),
    "/similar": UploadSpec.of("image", ["clinical", "k"]),
    "/report": UploadSpec.of("image", ["clinical", "method", "target", "case_id"]),
}
#: JSON endpoint -> the keys its body object may have.
JSON_FIELDS = {
    "/predict_tabular": ["clinical"],
    "/explain_tabular": ["clinical", "target"],
    "/chat": ["question", "session_id", "case"],
    "/chat/stream": ["question", "session_id", "case"],
    "/chat/history": ["session_id"],
    "/chat/reset": ["session_id"],
}
JSON_ROUTES = tuple(JSON_FIELDS)
ROUTES = (*UPLOADS, *JSON_ROUTES, "/model_card", "/docs.json", "/")
#: The expensive endpoints: at most serving.explain_concurrency of them at once, then 429.
EXPLANATIONS = ("/explain", "/explain_tabular", "/report")
#: What the published contract (serving.openapi) says about the served model; set at start-up.
SERVED_MODEL: dict[str, Any] = {}
#: Seconds between the worker's hand-backs of freed heap memory (`release_free_memory`).
TRIM_EVERY_S = 5.0
#: The process that started this one, read at import: a BentoML worker dies with it.
_PARENT = os.getppid()


def _is_bentoml_worker() -> bool:
    main = sys.modules.get("__main__")
    return getattr(getattr(main, "__spec__", None), "name", "") == "_bentoml_impl.worker.service"


if _is_bentoml_worker():  # as early as possible: a worker must never outlive its arbiter
    from serving.lifeline import die_with_parent

    die_with_parent(_PARENT)

#: The GET routes BentoML's POST-only APIs cannot express; FastAPI, so that BentoML's OpenAPI
#: document (/docs.json) lists them with their schema. Its routes are methods of the service
#: (BentoML passes the loaded instance as `self`).
get_routes = FastAPI(title="oncoflow", docs_url=None, redoc_url=None, openapi_url=None)


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

#: A pseudonymous case code for the report (never a name: letters, digits, '_' and '-').
CaseId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


def _startup_line(marks: list[float]) -> str:
    """Where this worker's start-up went (wall seconds): its process start to the service class
    (Python, BentoML and the service module's imports), the settings (torch when they set its
    threads), the model (torch, the bundle, the engine and its prediction copy), the warm-up."""
    import psutil

    created = psutil.Process().create_time()
    phases = ("imports", "settings", "model", "warm-up")
    steps = zip(phases, [created, *marks[:-1]], marks, strict=True)
    parts = ", ".join(f"{name} {end - start:.1f}" for name, start, end in steps)
    return f"worker start-up {marks[-1] - created:.1f} s ({parts})"


def _user(ctx: bentoml.Context) -> str:
    """The authenticated caller (set by ApiKeyAuth from the API key; never from the body)."""
    return str(ctx.request.scope.get(USER_SCOPE_KEY) or ANONYMOUS_USER)


@bentoml.asgi_app(get_routes, path="/", name="oncoflow-extra")
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
        try:
            self._start()
        except Exception as exc:  # `oncoflow serve` stops with the reason, no crash loop
            from serving.launch import report_startup_failure

            report_startup_failure(exc)
            raise

    def _start(self) -> None:
        # Settings the middleware reads lazily (at the first request) are checked here, at
        # start-up, so a misconfigured service never starts instead of failing per request.
        began = [time.time()]
        self.settings = current_settings()
        configure_process(self.settings)
        load_api_keys()
        from serving.model_store import load_engine  # torch: only in the worker

        began.append(time.time())
        self.engine = load_engine(self.settings)
        began.append(time.time())
        self.engine.warm_up()  # the model answers: ready from here
        began.append(time.time())
        release_free_memory_every(TRIM_EVERY_S)
        # Explanations and reports run in their own process, off this one's GIL; it loads
        # the same bundle behind the ready model (they wait for it, or get 503).
        # predictions in flight, counted by the batcher: the explanation process paces by it
        self.prediction_load = PredictionLoad()
        self.explainer = ExplanationProcess(
            ExplainerSpec.of(self.engine, self.settings), load=self.prediction_load
        ).start()
        self.chat_service: ChatService | None = None
        self.chat_error: str | None = None
        self.chat_loading = self.settings.chat
        # The assistant loads behind the ready model (/chat answers 503 until it is there).
        threading.Thread(target=self._load_extras, name="oncoflow-extras", daemon=True).start()
        self.ref = self.engine.ref
        card = self.engine.card()
        SERVED_MODEL.update(
            kind=self.engine.kind,
            clinical_schema=[f.model_dump() for f in card.clinical_schema or []] or None,
            methods=card.explain_methods,
            classes=list(self.engine.classes),
        )
        self.classes = self.engine.classes
        self.batcher = MicroBatcher(
            self.engine.infer_rows,
            self.settings.max_batch,
            self.settings.max_queue,
            on_batch=batch_size_recorder(),
            load=self.prediction_load,
        )
        log.info(
            "serving %s (%s %s, %d classes, registry version %s, chat %s)",
            self.ref.tag,
            self.engine.kind,
            self.engine.bundle.architecture,
            len(self.classes),
            self.ref.version or "-",
            "loading" if self.chat_loading else "off",
        )
        log.info("%s", _startup_line(began))

    def _load_extras(self) -> None:
        try:
            if self.settings.chat:
                self.chat_service = ChatService.load(
                    self.engine.model_dir,
                    card_facts(self.engine.card()),
                    torch_threads=self.settings.torch_threads,
                    config_file=self.settings.assistant_config,
                )
        except Exception:  # the predictions go on; /chat says why it is off
            log.exception("loading the assistant failed; /chat answers 503")
            self.chat_error = "the assistant failed to load on this server (see its log)"
        finally:
            self.chat_loading = False

    def __is_ready__(self) -> bool:
        """BentoML's /readyz hook: ready only with a loaded model."""
        return self.engine is not None

    def card(self) -> ModelCard:
        return self.engine.card(chat=self.chat_service is not None)

    @get_routes.get("/model_card", response_model=ModelCard, tags=["Service APIs"])
    async def model_card(self) -> ModelCard:
        """Version, classes, held-out test metrics, privacy (epsilon, delta), data
        fingerprint, intended use, limitations, the clinical schema of the served model, what
        its bundle contains and where similar cases come from."""
        return self.card()

    def _images(self) -> None:
        if self.engine.kind == "tabular":
            raise NotFound(
                "this model reads a clinical record only: use /predict_tabular or "
                "/explain_tabular (JSON)"
            )

    def _records(self) -> None:
        if self.engine.kind != "tabular":
            raise NotFound(
                f"this {self.engine.kind} model needs an image: use /predict, /explain, /similar "
                "or /report with a multipart 'image' field"
            )

    def _image_row(self, image: Upload, clinical: Any):
        """The packed model input of one upload (blocking: read, decode, check, preprocess)."""
        return self.engine.pack(self.engine.prepare(image.read_bytes(), clinical, display=False))

    # -- image endpoints -------------------------------------------------------------------
    @bentoml.api(route="/predict")
    @answers_errors
    async def predict(self, image: Upload, clinical: Clinical = None) -> PredictResponse:
        """Classify one image (PNG, JPEG, DICOM...; multipart file `image`), with the clinical
        record as text field `clinical` when the model takes one."""
        self._images()
        started = time.perf_counter()
        row = await anyio.to_thread.run_sync(self._image_row, image, clinical)
        probabilities = await self.batcher.submit(row)  # in a batch with concurrent calls
        return self.engine.predict_response(probabilities, started)

    @bentoml.api(route="/explain")
    @answers_errors
    async def explain(
        self,
        image: Upload,
        clinical: Clinical = None,
        method: Text = "gradcam",
        target: Annotated[str | None, BeforeValidator(_as_text)] = None,
        opacity: Annotated[float, Field(ge=0.0, le=1.0, strict=True)] = 0.45,
        shap: Annotated[bool, Field(strict=True)] = True,
        nsamples: Annotated[
            int | None,
            Field(
                ge=1,
                le=SHAP_NSAMPLES_LIMIT,
                strict=True,
                description=(
                    "null: the server's default (serving.shap_nsamples), else the model's "
                    "(its run's package.shap_nsamples)"
                ),
            ),
        ] = None,
    ) -> ExplainResponse:
        """Grad-CAM overlay and heatmap (`method`: gradcam, gradcam++, ...; `target`: a class
        name, default the predicted one), the image SHAP map and, with a clinical record, its
        top SHAP features. PNGs are base64."""
        self._images()
        chosen = {} if nsamples is None else {"nsamples": nsamples}
        return await self.explainer.call(
            "explain",
            image=image.read_bytes(),
            clinical=clinical,
            method=method,
            target=target,
            opacity=opacity,
            shap=shap,
            **chosen,
        )

    @bentoml.api(route="/similar")
    @answers_errors
    def similar(
        self,
        image: Upload,
        clinical: Clinical = None,
        k: Annotated[int, Field(ge=1, le=50, strict=True)] = 5,
    ) -> SimilarResponse:
        """The `k` most similar cases of this site's own case library (`oncoflow serve
        --case-library`): label, distance and a thumbnail (no identifiers); `source` says where
        the cases come from. Without a library: 404 `NoCaseLibrary` (a model bundle carries
        no training images unless a central non-DP run put them in)."""
        self._images()
        self.engine.check_similar()
        return self.engine.similar(
            self.engine.prepare(image.read_bytes(), clinical, display=False), k
        )

    @bentoml.api(route="/report")
    @answers_errors
    async def report(
        self,
        image: Upload,
        clinical: Clinical = None,
        method: Text = "gradcam",
        target: Annotated[str | None, BeforeValidator(_as_text)] = None,
        case_id: Annotated[CaseId | None, BeforeValidator(_as_text)] = None,
    ) -> Annotated[Path, bentoml.validators.ContentType("application/pdf")]:
        """A one-case PDF report (application/pdf): prediction, Grad-CAM overlay, clinical SHAP,
        model facts, privacy and the disclaimer. `case_id`: an optional pseudonymous code."""
        self._images()
        pdf = await self.explainer.call(
            "report",
            image=image.read_bytes(),
            clinical=clinical,
            method=method,
            target=target,
            case_id=case_id,
        )
        return Response(
            pdf,
            media_type="application/pdf",
            headers={"content-disposition": 'attachment; filename="oncoflow-report.pdf"'},
        )

    # -- tabular-only models ---------------------------------------------------------------
    @bentoml.api(route="/predict_tabular")
    @answers_errors
    async def predict_tabular(self, clinical: dict[str, Any]) -> PredictResponse:
        """Classify one clinical record (JSON `{"clinical": {...}}`; tabular-only models)."""
        self._records()
        started = time.perf_counter()
        row = self.engine.pack(self.engine.prepare_record(clinical))
        probabilities = await self.batcher.submit(row)
        return self.engine.predict_response(probabilities, started)

    @bentoml.api(route="/explain_tabular")
    @answers_errors
    async def explain_tabular(
        self,
        clinical: dict[str, Any],
        target: Annotated[str | None, BeforeValidator(_as_text)] = None,
    ) -> ExplainResponse:
        """SHAP value of each clinical feature (tabular-only models)."""
        self._records()
        return await self.explainer.call("explain_tabular", clinical=clinical, target=target)

    # -- chat ------------------------------------------------------------------------------
    def _chat(self):
        if self.chat_service is None:
            if self.chat_loading:
                raise Overloaded("the assistant is still loading; retry in a few seconds")
            raise Overloaded(
                self.chat_error or "chat is disabled on this server (serving.chat, ONCOFLOW_CHAT)"
            )
        return self.chat_service

    @bentoml.api(route="/chat", input_spec=ChatRequest)
    @answers_errors
    def chat(
        self, question: str, session_id: str, ctx: bentoml.Context, case: ChatCase | None = None
    ) -> ChatResponse:
        """Ask the assistant about the case on screen or the notes; answers cite the notes.
        History is kept per authenticated user (from the API key) and `session_id`."""
        request = ChatRequest(question=question, session_id=session_id, case=case)
        return self._chat().answer(request, _user(ctx))

    @bentoml.api(route="/chat/stream", input_spec=ChatRequest)
    @answers_errors
    def chat_stream(
        self, question: str, session_id: str, ctx: bentoml.Context, case: ChatCase | None = None
    ) -> str:
        """The chat answer as server-sent events (text/event-stream): `delta` events with
        {text} pieces, then one `answer` event holding the ChatResponse."""
        request = ChatRequest(question=question, session_id=session_id, case=case)
        events = self._chat().stream(request, _user(ctx))
        return StreamingResponse(
            events,
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )

    @bentoml.api(route="/chat/history", input_spec=ChatSessionRequest)
    @answers_errors
    def chat_history(self, ctx: bentoml.Context, session_id: str) -> ChatHistoryResponse:
        """This user's conversation `session_id`, oldest turn first (another user's sessions
        are never visible, whatever their id)."""
        return self._chat().history(session_id, _user(ctx))

    @bentoml.api(route="/chat/reset", input_spec=ChatSessionRequest)
    @answers_errors
    def chat_reset(self, ctx: bentoml.Context, session_id: str) -> ChatResetResponse:
        """Forget this user's conversation `session_id`."""
        self._chat().reset(session_id, _user(ctx))
        return ChatResetResponse(session_id=session_id)


# Outermost first: request log, error envelope, authentication (headers only), the published
# contract, rate limit, body limits, body shape, the cap on concurrent explanations.
DiagnosisService.add_asgi_middleware(RequestLog, routes=ROUTES)
DiagnosisService.add_asgi_middleware(ErrorEnvelope)
DiagnosisService.add_asgi_middleware(ApiKeyAuth)
DiagnosisService.add_asgi_middleware(OpenApiContract, model=SERVED_MODEL)
DiagnosisService.add_asgi_middleware(RateLimit)
DiagnosisService.add_asgi_middleware(
    BodySizeLimit, path_limits=dict.fromkeys(JSON_ROUTES, JSON_BODY_LIMIT)
)
DiagnosisService.add_asgi_middleware(JsonGuard, fields=JSON_FIELDS, max_bytes=JSON_BODY_LIMIT)
DiagnosisService.add_asgi_middleware(UploadGuard, uploads=UPLOADS)
DiagnosisService.add_asgi_middleware(ConcurrencyLimit, paths=EXPLANATIONS)

__all__ = ["DiagnosisService"]
