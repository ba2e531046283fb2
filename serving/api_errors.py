"""The one path from an `OncoflowError` raised in an endpoint to its HTTP answer.

BentoML turns any exception an API method raises into an opaque 500, so every endpoint is
wrapped in `answers_errors`: an `OncoflowError` becomes the JSON envelope
``{"error": {"type": ..., "message": ...}}`` with the error's `http_status`. (Errors raised
outside the endpoints, in middleware or the mounted app, take the same shape in
`serving.middleware.ErrorEnvelope`.)
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from starlette.responses import JSONResponse

from components.errors import OncoflowError

log = logging.getLogger(__name__)

Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])


class Overloaded(OncoflowError):
    """The service cannot take this request now (503)."""

    http_status = 503


def error_response(exc: OncoflowError) -> JSONResponse:
    """The JSON error envelope for an `OncoflowError`, with its HTTP status."""
    if exc.http_status >= 500:
        log.error("%s: %s", type(exc).__name__, exc)
    return JSONResponse(
        {"error": {"type": type(exc).__name__, "message": str(exc)}},
        status_code=exc.http_status,
    )


def _answer(exc: OncoflowError, kwargs: dict[str, Any]) -> JSONResponse:
    ctx = kwargs.get("ctx")
    if ctx is not None:  # BentoML copies the context's status onto whatever the API returns
        ctx.response.status_code = exc.http_status
    return error_response(exc)


def answers_errors(endpoint: Endpoint) -> Endpoint:
    """Wrap a BentoML API method (sync or async) so its `OncoflowError`s become error answers.

    The wrapper keeps the method's signature (BentoML reads its parameters and return type).
    """
    if inspect.iscoroutinefunction(endpoint):

        @functools.wraps(endpoint)
        async def guarded_async(*args: Any, **kwargs: Any) -> Any:
            try:
                return await endpoint(*args, **kwargs)
            except OncoflowError as exc:
                return _answer(exc, kwargs)

        return guarded_async  # type: ignore[return-value]

    @functools.wraps(endpoint)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return endpoint(*args, **kwargs)
        except OncoflowError as exc:
            return _answer(exc, kwargs)

    return guarded  # type: ignore[return-value]


__all__ = ["Overloaded", "answers_errors", "error_response"]
