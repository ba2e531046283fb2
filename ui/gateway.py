"""The UI's view of the diagnosis service: `serving.client.DiagnosisClient` calls, turned into
what the pages show. The only module that knows the client's method signatures.

Every method may raise `serving.client.ServiceError`; `ui.messages.friendly` words it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from serving.client import (
    NO_CASE_LIBRARY,
    DiagnosisClient,
    ServiceError,
    case_from,
    decode_png,
)
from serving.schemas import ChatResponse, ExplainResponse, ModelCard, PredictResponse
from ui.errors import UiError
from ui.images import from_png

log = logging.getLogger(__name__)

KINDS_WITH_IMAGES = ("image", "fusion")


class FeatureUnavailable(UiError):
    """The connected model does not offer this feature (e.g. a report without an image)."""


class NoCaseLibrary(FeatureUnavailable):
    """The service has no site-local case library, so it shows no similar cases."""


NO_CASE_LIBRARY_TEXT = (
    "Similar cases are shown from this hospital's own case library, and none has been set up "
    "for this model yet (IT: `oncoflow case-library build`, then `oncoflow serve "
    "--case-library`). The model itself carries no patient images."
)
#: How the Diagnose page names each source of similar cases the service reports.
SOURCE_NAMES = {
    "site-local case library": "this hospital's own case library",
    "model bundle (training images)": "the model's training images",
}


@dataclass(frozen=True)
class ModelInfo:
    """What the Diagnose page needs to know about the served model."""

    kind: str  # image | fusion | tabular
    classes: list[str]
    clinical_schema: list[dict[str, Any]]
    explain_methods: list[str]
    similar_cases: int
    chat: bool
    similar_source: str | None = None  # where /similar's cases come from; None: no cases
    dangerous: list[str] = field(default_factory=list)  # the classes the worklist ranks by

    @property
    def takes_image(self) -> bool:
        return self.kind in KINDS_WITH_IMAGES


@dataclass(frozen=True)
class Prediction:
    label: str | None  # None: out of distribution (no diagnosis)
    probabilities: dict[str, float]  # empty when out of distribution
    model_name: str
    model_version: str
    model_tag: str
    latency_ms: float | None
    raw: PredictResponse | None = None
    # the service's conformal prediction set and referral (None: the model is not calibrated)
    prediction_set: list[str] | None = None
    refer: bool | None = None
    referral_reason: str | None = None
    # ok | out_of_distribution (the image is unlike the training images: no diagnosis)
    status: str = "ok"
    # P(any dangerous class) and the operating point (None: the model has none)
    danger_probability: float | None = None
    danger_threshold: float | None = None

    @property
    def out_of_distribution(self) -> bool:
        return self.status == "out_of_distribution"

    @property
    def confidence(self) -> float:
        return self.probabilities[self.label] if self.label is not None else 0.0


@dataclass
class Explanation:
    target: str
    method: str | None = None
    heatmap: Image.Image | None = None  # coloured Grad-CAM heatmap
    overlay: Image.Image | None = None  # as the service blended it (fallback)
    cam_summary: str = ""
    shap_image: Image.Image | None = None
    shap_summary: str = ""
    shap_features: list[dict[str, Any]] = field(default_factory=list)  # feature, value, unit, shap
    warnings: list[str] = field(default_factory=list)
    raw: ExplainResponse | None = None


@dataclass(frozen=True)
class SimilarCase:
    thumbnail: Image.Image
    label: str
    distance: float


@dataclass(frozen=True)
class SimilarCases:
    """The neighbours of one case and where they come from."""

    cases: list[SimilarCase]
    source: str  # as the service names it (SOURCE_NAMES)
    size: int  # cases searched

    @property
    def caption(self) -> str:
        where = SOURCE_NAMES.get(self.source, self.source or "the service's case index")
        return f"From {where} ({self.size} cases)."


@dataclass(frozen=True)
class ChatAnswer:
    text: str
    sources: list[str]
    refused: bool


def _png(data: str | None) -> Image.Image | None:
    raw = decode_png(data)
    return from_png(raw) if raw else None


def _prediction(answer: PredictResponse) -> Prediction:
    return Prediction(
        label=answer.label,
        probabilities=dict(answer.probabilities or {}),
        model_name=answer.model.name,
        model_version=answer.model.version,
        model_tag=answer.model.tag,
        latency_ms=answer.latency_ms,
        raw=answer,
        prediction_set=list(answer.prediction_set) if answer.prediction_set else None,
        refer=answer.refer,
        referral_reason=answer.referral_reason,
        status=answer.status,
        danger_probability=answer.danger_probability,
        danger_threshold=answer.danger_threshold,
    )


def _shap_summary(answer: ExplainResponse) -> str:
    s = answer.shap_image
    if s is None:
        return ""
    return (
        f"Reference images score {100 * s.expected:.1f}% on average for this class; this image "
        f"scores {100 * s.probability:.1f}%. The map shows which pixels account for the "
        f"difference ({s.nsamples} samples, {s.background_size} reference images)."
    )


def _explanation(answer: ExplainResponse) -> Explanation:
    return Explanation(
        target=answer.target,
        method=answer.method,
        heatmap=_png(answer.heatmap_png),
        overlay=_png(answer.overlay_png),
        cam_summary=answer.heat.text if answer.heat else "",
        shap_image=_png(answer.shap_png),
        shap_summary=_shap_summary(answer),
        shap_features=[f.model_dump() for f in answer.tabular_shap or []],
        warnings=list(answer.warnings),
        raw=answer,
    )


def model_info(card: ModelCard) -> ModelInfo:
    return ModelInfo(
        kind=card.kind,
        classes=list(card.classes),
        clinical_schema=[f.model_dump() for f in card.clinical_schema or []],
        explain_methods=list(card.explain_methods),
        similar_cases=card.similar_cases,
        chat=card.chat,
        similar_source=card.similar_source,
        dangerous=list(card.calibration.dangerous) if card.calibration else [],
    )


class ServiceGateway:
    """The diagnosis service as the pages need it, over HTTP (a `DiagnosisClient`)."""

    def __init__(self, client: DiagnosisClient) -> None:
        self.client = client

    def ready(self) -> bool:
        return self.client.ready()

    def model_card(self) -> ModelCard:
        return self.client.model_card()

    def model_info(self) -> ModelInfo:
        return model_info(self.client.model_card())

    def predict(
        self, image: bytes | None, clinical: Mapping[str, Any] | None, filename: str = "image"
    ) -> Prediction:
        if image is None:
            if not clinical:
                raise FeatureUnavailable("Please fill in the clinical fields.")
            return _prediction(self.client.predict_tabular(clinical))
        return _prediction(self.client.predict(image, filename, clinical=clinical))

    def explain(
        self,
        image: bytes | None,
        clinical: Mapping[str, Any] | None,
        filename: str = "image",
        method: str = "gradcam",
        target: str | None = None,
    ) -> Explanation:
        if image is None:
            return _explanation(self.client.explain_tabular(clinical or {}, target=target))
        answer = self.client.explain(
            image, filename, clinical=clinical, method=method or "gradcam", target=target
        )
        return _explanation(answer)

    def similar(
        self,
        image: bytes | None,
        clinical: Mapping[str, Any] | None,
        k: int,
        filename: str = "image",
    ) -> SimilarCases:
        if image is None:
            raise FeatureUnavailable("Similar cases need an image.")
        try:
            answer = self.client.similar(image, filename, clinical=clinical, k=k)
        except ServiceError as exc:
            if exc.type == NO_CASE_LIBRARY:
                raise NoCaseLibrary(NO_CASE_LIBRARY_TEXT) from exc
            raise
        cases = [
            SimilarCase(from_png(decode_png(n.thumbnail_png)), n.label, n.distance)
            for n in sorted(answer.neighbours, key=lambda n: n.rank)
        ]
        return SimilarCases(cases, answer.source, answer.index_size)

    def report(
        self,
        image: bytes | None,
        clinical: Mapping[str, Any] | None,
        case_id: str,
        filename: str = "image",
        method: str = "gradcam",
        target: str | None = None,
    ) -> bytes:
        if image is None:
            raise FeatureUnavailable("The PDF report needs an image.")
        return self.client.report(
            image,
            filename,
            clinical=clinical,
            method=method or "gradcam",
            target=target,
            case_id=case_id,
        )

    def chat_reset(self, session_id: str) -> None:
        self.client.chat_reset(session_id)

    def chat(
        self,
        question: str,
        session_id: str,
        prediction: Prediction | None = None,
        explanation: Explanation | None = None,
    ) -> Iterator[str | ChatAnswer]:
        """Yield the answer text so far as it streams, then the final `ChatAnswer`."""
        case = None
        if prediction is not None and prediction.raw is not None:
            case = case_from(prediction.raw, explanation.raw if explanation else None)
        text = ""
        for piece in self.client.chat_stream(question, session_id, case=case):
            if isinstance(piece, ChatResponse):
                yield _answer(piece, text)
                return
            text += piece
            yield text


def _answer(response: ChatResponse, streamed: str) -> ChatAnswer:
    # The final text is the whole answer (with the disclaimer); it also replaces a stream the
    # service discarded (`replaces_stream`).
    text = response.text or streamed
    sources = [
        f"[{c.n}] {c.title}" + (f" — {c.section}" if c.section else "") for c in response.citations
    ]
    return ChatAnswer(text=text, sources=sources, refused=response.refused)
