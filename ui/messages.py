"""Plain-language messages for service failures (what the clinician sees, never a traceback)."""

from __future__ import annotations

import logging

from serving.client import ServiceError
from ui.errors import UiError

log = logging.getLogger(__name__)

UNREACHABLE = (
    "The diagnosis service is not reachable right now. Please try again in a minute or contact IT."
)
TIMEOUT = (
    "The diagnosis service is taking too long to answer. Please try again; if this keeps "
    "happening, contact IT."
)
NOT_AUTHORISED = (
    "This application is not authorised to use the diagnosis service (its access key was "
    "refused). Please contact IT."
)
STARTING = "The diagnosis service is starting up. Please try again in a minute."
INTERNAL = (
    "The diagnosis service ran into a problem with this request. Please try again; if this "
    "keeps happening, contact IT."
)
TOO_LARGE = "The file is too large for the diagnosis service. Please upload a smaller image."
NOT_OFFERED = "The connected diagnosis service does not offer {what}. Please contact IT."
UNEXPECTED = "Something went wrong in this application. Please try again or contact IT."


def friendly(exc: BaseException, what: str = "this") -> str:
    """A message for the screen for any exception raised while serving a click."""
    if isinstance(exc, UiError):
        return str(exc)
    if isinstance(exc, ServiceError):
        return _service_message(exc, what)
    log.exception("unexpected error while handling %s", what, exc_info=exc)
    return UNEXPECTED


def _service_message(exc: ServiceError, what: str) -> str:
    status, kind = exc.status, exc.type
    if status == 0:
        return TIMEOUT if kind == "Timeout" else UNREACHABLE
    if status in (401, 403):
        return NOT_AUTHORISED
    if status == 404 and kind in ("HTTPError", "NotFound", "Not Found"):
        return NOT_OFFERED.format(what=what)
    if status == 413:
        return TOO_LARGE
    if status in (400, 409, 415, 422):
        # The service's own message is written for users (e.g. "not an image").
        detail = exc.message.strip().rstrip(".")
        return f"The service could not use this input: {detail}."
    if status == 503:
        return STARTING
    if status == 504:
        return TIMEOUT
    log.warning("service error %s %s while handling %s", status, kind, what)
    return INTERNAL
