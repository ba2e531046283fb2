"""A typed HTTP client for the diagnosis service (used by the UI, tests and other services).

Imports only httpx and pydantic, so callers need neither BentoML nor torch.
"""

from __future__ import annotations

import mimetypes
from types import TracebackType
from typing import Any

import httpx

from serving.schemas import ModelCard, PredictResponse


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


class DiagnosisClient:
    """``DiagnosisClient("http://127.0.0.1:3000", api_key="...").predict(png_bytes, "x.png")``."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

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

    def predict(self, image_bytes: bytes, filename: str = "image") -> PredictResponse:
        """Classify one image (PNG, JPEG, DICOM...). `filename` only sets the content type."""
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        if filename.lower().endswith((".dcm", ".dicom")):
            content_type = "application/dicom"
        # The file name is not sent: it may carry patient identifiers.
        files = {"image": ("upload", image_bytes, content_type)}
        return PredictResponse.model_validate(self._request("POST", "/predict", files=files).json())

    def model_card(self) -> ModelCard:
        return ModelCard.model_validate(self._request("GET", "/model_card").json())

    def ready(self) -> bool:
        """True when the service answers /readyz with 200 (False while starting or down)."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False
