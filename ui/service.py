"""The UI's view of the diagnosis service: `serving.client.DiagnosisClient` calls, turned into
what the pages show. The only module that knows the client's method signatures."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from serving.client import DiagnosisClient
from ui.errors import UiError
from ui.images import from_b64, from_png

log = logging.getLogger(__name__)


class FeatureUnavailable(UiError):
    """The connected service (or its client) does not offer this feature."""


@dataclass(frozen=True)
class Prediction:
    label: str
    probabilities: dict[str, float]
    model_name: str
    model_version: str
    model_tag: str
    latency_ms: float | None

    @property
    def confidence(self) -> float:
        return self.probabilities[self.label]


@dataclass
class Explanation:
    heatmap: Image.Image | None = None  # coloured Grad-CAM heatmap
    overlay: Image.Image | None = None  # as the service blended it (fallback)
    cam_summary: str = ""
    shap_image: Image.Image | None = None
    shap_summary: str = ""
    shap_features: list[dict[str, Any]] = field(default_factory=list)
    target_label: str = ""


@dataclass(frozen=True)
class SimilarCase:
    thumbnail: Image.Image
    label: str
    distance: float


class DiagnosisService:
    """What the UI asks of the service; every method may raise `serving.client.ServiceError`."""

    def __init__(self, client: DiagnosisClient) -> None:
        self.client = client

    def _method(self, name: str, what: str):
        method = getattr(self.client, name, None)
        if method is None:
            raise FeatureUnavailable(f"The connected diagnosis service does not offer {what} yet.")
        return method

    def ready(self) -> bool:
        return self.client.ready()

    def model_card(self):
        return self.client.model_card()

    def predict(
        self, image: bytes, clinical: Mapping[str, Any] | None = None, filename: str = "image"
    ) -> Prediction:
        answer = self.client.predict(image, filename)
        return Prediction(
            label=answer.label,
            probabilities=dict(answer.probabilities),
            model_name=answer.model.name,
            model_version=answer.model.version,
            model_tag=answer.model.tag,
            latency_ms=answer.latency_ms,
        )

    def explain(
        self, image: bytes, clinical: Mapping[str, Any] | None = None, filename: str = "image"
    ) -> Explanation:
        method = self._method("explain", "explanations")
        answer = method(image, filename)
        return _explanation(answer)

    def similar(self, image: bytes, k: int = 6, filename: str = "image") -> list[SimilarCase]:
        method = self._method("similar", "similar-case search")
        answer = method(image, filename, k=k)
        return [
            SimilarCase(from_b64(c.thumbnail_png), c.label, float(c.distance)) for c in answer.cases
        ]

    def report(self, image: bytes, case_ref: str | None, filename: str = "image") -> bytes:
        method = self._method("report", "PDF reports")
        return method(image, filename, case_id=case_ref)

    def chat(self, question: str, case: Mapping[str, Any] | None, session_id: str) -> Iterator[str]:
        method = self._method("chat", "the assistant")
        answer = method(question, case=case, session_id=session_id)
        yield answer.text


def _explanation(answer) -> Explanation:
    def image(value) -> Image.Image | None:
        if not value:
            return None
        return from_png(value) if isinstance(value, bytes) else from_b64(value)

    return Explanation(
        heatmap=image(getattr(answer, "heatmap_png", None)),
        overlay=image(getattr(answer, "overlay_png", None)),
        cam_summary=str(getattr(answer, "gradcam_summary", "") or ""),
        shap_image=image(getattr(answer, "shap_png", None)),
        shap_features=list(getattr(answer, "shap_features", None) or []),
        target_label=str(getattr(answer, "target_label", "") or ""),
    )
