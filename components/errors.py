"""One exception hierarchy whose messages tell the user what to do next."""

from __future__ import annotations


class OncoflowError(Exception):
    """Base of every error oncoflow raises on purpose; the CLI prints it as one line."""

    http_status: int = 500


class ConfigError(OncoflowError):
    """The run configuration is invalid or inconsistent."""

    http_status = 400


class DataError(OncoflowError):
    """Input data is missing, unreadable or of an unexpected layout."""

    http_status = 400


class ValidationFailed(DataError):
    """Data failed its expectation suite; `report` names the offending rows."""

    def __init__(self, message: str, report: dict | None = None) -> None:
        super().__init__(message)
        self.report = report or {}


class InputError(OncoflowError):
    """A request carried input the model cannot use (bad image, bad clinical record...)."""

    http_status = 422


class ModelError(OncoflowError):
    """A model or model bundle cannot be built, loaded or used."""

    http_status = 500


class RegistryError(OncoflowError):
    """The model registry (MLflow) refused or could not answer."""

    http_status = 503


class NotFound(OncoflowError):
    """A requested thing (model version, case, user) does not exist."""

    http_status = 404
