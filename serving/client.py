"""A typed HTTP client for the diagnosis service (used by the UI, tests and other services).

Imports only httpx and pydantic, so callers need neither BentoML nor torch::

    with DiagnosisClient("http://127.0.0.1:3000", api_key="...") as client:
        card = client.model_card()
        result = client.predict(png_bytes, "scan.png")
        why = client.explain(png_bytes, "scan.png", method="gradcam++")
        overlay = decode_png(why.overlay_png)
        pdf = client.report(png_bytes, "scan.png", case_id="case-17")
        session = new_session_id()
        answer = client.chat("Why this label?", session, case=case_from(result, why))
        for piece in client.chat_stream("What is Grad-CAM?", session):
            ...  # str pieces, then one ChatResponse

Every failure raises `ServiceError` (``status`` 0 when the service could not be reached).
File names only choose the content type; they are never sent (they may carry identifiers).
"""

from __future__ import annotations

import base64
import json
import mimetypes
import secrets
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any

import httpx

from serving.schemas import (
    CaseFeature,
    ChatCase,
    ChatHistoryResponse,
    ChatResponse,
    ChatTurn,
    ExplainResponse,
    ModelCard,
    PredictResponse,
    SimilarResponse,
)

#: The error type of `/similar` on a server without a site-local case library (404).
NO_CASE_LIBRARY = "NoCaseLibrary"


class ServiceError(Exception):
    """The service answered with an error, or could not be reached (`status` 0)."""

    def __init__(self, status: int, type: str, message: str) -> None:
        super().__init__(f"{status} {type}: {message}")
        self.status = status
        self.type = type
        self.message = message


def _raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    kind, message = "HTTPError", response.text[:500]
    try:
        error = response.json().get("error")
        if isinstance(error, dict):
            kind = str(error.get("type", kind))
            message = str(error.get("message", message))
    except (ValueError, AttributeError):
        pass
    raise ServiceError(response.status_code, kind, message)


def new_session_id() -> str:
    """A random, unguessable chat session id (one per conversation)."""
    return secrets.token_urlsafe(16)


def decode_png(data: str | None) -> bytes | None:
    """The PNG bytes of a base64 image field (overlay_png, heatmap_png, thumbnail_png...)."""
    return None if data is None else base64.b64decode(data)


def case_from(
    prediction: PredictResponse | ExplainResponse,
    explanation: ExplainResponse | None = None,
    clinical_note: str | None = None,
) -> ChatCase:
    """The chat `case` for what is on screen: a prediction and, if any, its explanation.

    The service adds the model card's facts itself. `clinical_note` is free text the user
    typed or uploaded; the assistant treats it as data, never as instructions.
    """
    explanation = explanation or (prediction if isinstance(prediction, ExplainResponse) else None)
    features: list[CaseFeature] = []
    summary = None
    if explanation is not None:
        summary = explanation.heat.text if explanation.heat else None
        features = [
            CaseFeature(name=f.feature[:80], value=f.shap)
            for f in (explanation.tabular_shap or [])[:20]
        ]
    return ChatCase(
        predicted_label=prediction.label,
        probabilities=dict(prediction.probabilities),
        gradcam_summary=summary,
        shap_features=features,
        clinical_note=clinical_note,
    )


def _content_type(filename: str) -> str:
    if filename.lower().endswith((".dcm", ".dicom")):
        return "application/dicom"
    return mimetypes.guess_type(filename)[0] or "application/octet-stream"


def _form(clinical: Mapping[str, Any] | None, **fields: Any) -> dict[str, str]:
    """Multipart text fields: the clinical record as JSON, other values as JSON scalars."""
    form: dict[str, str] = {}
    if clinical is not None:
        form["clinical"] = json.dumps(dict(clinical))
    for name, value in fields.items():
        if value is None:
            continue
        form[name] = value if isinstance(value, str) else json.dumps(value)
    return form


class DiagnosisClient:
    """``DiagnosisClient("http://127.0.0.1:3000", api_key="...").predict(png_bytes, "x.png")``."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """`transport`: an httpx transport to use instead of the network (tests)."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"), headers=headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> DiagnosisClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise ServiceError(0, "Timeout", f"{method} {path} timed out") from exc
        except httpx.TransportError as exc:
            raise ServiceError(0, "Unreachable", f"cannot reach the service: {exc}") from exc
        _raise_for(response)
        return response

    def _upload(self, path: str, image: bytes, filename: str, data: dict[str, str]):
        # The file name is not sent: it may carry patient identifiers.
        files = {"image": ("upload", image, _content_type(filename))}
        return self._request("POST", path, files=files, data=data)

    # -- images --------------------------------------------------------------------------
    def predict(
        self,
        image_bytes: bytes,
        filename: str = "image",
        clinical: Mapping[str, Any] | None = None,
    ) -> PredictResponse:
        """Classify one image (PNG, JPEG, DICOM...); `clinical` when the model card has a
        clinical_schema. `filename` only sets the content type."""
        response = self._upload("/predict", image_bytes, filename, _form(clinical))
        return PredictResponse.model_validate(response.json())

    def explain(
        self,
        image_bytes: bytes,
        filename: str = "image",
        *,
        clinical: Mapping[str, Any] | None = None,
        method: str = "gradcam",
        target: str | None = None,
        opacity: float = 0.45,
        shap: bool = True,
        nsamples: int | None = None,
    ) -> ExplainResponse:
        """Grad-CAM overlay/heatmap (base64 PNGs; see `decode_png`), heat summary, image SHAP
        map and, with a clinical record, its top SHAP features. `method`: one of the model
        card's explain_methods; `target`: a class name (default the predicted class)."""
        data = _form(
            clinical, method=method, target=target, opacity=opacity, shap=shap, nsamples=nsamples
        )
        response = self._upload("/explain", image_bytes, filename, data)
        return ExplainResponse.model_validate(response.json())

    def similar(
        self,
        image_bytes: bytes,
        filename: str = "image",
        *,
        clinical: Mapping[str, Any] | None = None,
        k: int = 5,
    ) -> SimilarResponse:
        """The `k` most similar cases of the server's site-local case library (label,
        distance, base64 thumbnail; `source` names the library). A server without a library
        raises `ServiceError` 404 of type `NO_CASE_LIBRARY`."""
        response = self._upload("/similar", image_bytes, filename, _form(clinical, k=k))
        return SimilarResponse.model_validate(response.json())

    def report(
        self,
        image_bytes: bytes,
        filename: str = "image",
        *,
        clinical: Mapping[str, Any] | None = None,
        method: str = "gradcam",
        target: str | None = None,
        case_id: str | None = None,
    ) -> bytes:
        """The PDF report (bytes). `case_id`: optional pseudonymous code (letters, digits,
        '-' and '_'; never a name)."""
        data = _form(clinical, method=method, target=target, case_id=case_id)
        response = self._upload("/report", image_bytes, filename, data)
        if not response.headers.get("content-type", "").startswith("application/pdf"):
            raise ServiceError(response.status_code, "BadResponse", "the report is not a PDF")
        return response.content

    # -- clinical records only (tabular models) -------------------------------------------
    def predict_tabular(self, clinical: Mapping[str, Any]) -> PredictResponse:
        response = self._request("POST", "/predict_tabular", json={"clinical": dict(clinical)})
        return PredictResponse.model_validate(response.json())

    def explain_tabular(
        self, clinical: Mapping[str, Any], target: str | None = None
    ) -> ExplainResponse:
        body: dict[str, Any] = {"clinical": dict(clinical)}
        if target is not None:
            body["target"] = target
        response = self._request("POST", "/explain_tabular", json=body)
        return ExplainResponse.model_validate(response.json())

    # -- chat -----------------------------------------------------------------------------
    @staticmethod
    def _chat_body(question: str, session_id: str, case: ChatCase | Mapping | None) -> dict:
        body: dict[str, Any] = {"question": question, "session_id": session_id}
        if case is not None:
            if not isinstance(case, ChatCase):
                case = ChatCase.model_validate(dict(case))
            body["case"] = case.model_dump(mode="json", exclude_none=True)
        return body

    def chat(
        self, question: str, session_id: str, case: ChatCase | Mapping | None = None
    ) -> ChatResponse:
        """One answer with citations (`session_id`: see `new_session_id`). The service keeps
        the history of this API key's user and session."""
        body = self._chat_body(question, session_id, case)
        return ChatResponse.model_validate(self._request("POST", "/chat", json=body).json())

    def chat_stream(
        self, question: str, session_id: str, case: ChatCase | Mapping | None = None
    ) -> Iterator[str | ChatResponse]:
        """Yield answer pieces (str) as the service sends them, then the final ChatResponse.

        If the final response has ``replaces_stream``, show its ``text`` instead of the
        pieces. Errors before the stream starts, and error events, raise `ServiceError`.
        """
        body = self._chat_body(question, session_id, case)
        try:
            with self._http.stream("POST", "/chat/stream", json=body) as response:
                if not response.is_success:
                    response.read()
                    _raise_for(response)
                for event, data in _sse_events(response.iter_lines()):
                    if event == "delta":
                        yield str(data.get("text", ""))
                    elif event == "answer":
                        yield ChatResponse.model_validate(data)
                    elif event == "error":
                        error = data.get("error") or {}
                        raise ServiceError(
                            500, str(error.get("type", "Error")), str(error.get("message", ""))
                        )
        except httpx.TimeoutException as exc:
            raise ServiceError(0, "Timeout", "POST /chat/stream timed out") from exc
        except httpx.TransportError as exc:
            raise ServiceError(0, "Unreachable", f"cannot reach the service: {exc}") from exc

    def chat_history(self, session_id: str) -> list[ChatTurn]:
        """This API key's user's turns in `session_id`, oldest first."""
        response = self._request("POST", "/chat/history", json={"session_id": session_id})
        return ChatHistoryResponse.model_validate(response.json()).turns

    def chat_reset(self, session_id: str) -> None:
        """Forget the conversation `session_id` of this API key's user."""
        self._request("POST", "/chat/reset", json={"session_id": session_id})

    # -- service --------------------------------------------------------------------------
    def model_card(self) -> ModelCard:
        return ModelCard.model_validate(self._request("GET", "/model_card").json())

    def openapi(self) -> dict[str, Any]:
        """The service's OpenAPI document."""
        return self._request("GET", "/docs.json").json()

    def ready(self) -> bool:
        """True when the service answers /readyz with 200 (False while starting or down)."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False


def _sse_events(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event, JSON data) pairs of a server-sent-event stream."""
    event, data = "message", []
    for line in lines:
        if not line:
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield event, json.loads("\n".join(data))


__all__ = [
    "NO_CASE_LIBRARY",
    "DiagnosisClient",
    "ServiceError",
    "case_from",
    "decode_png",
    "new_session_id",
]
