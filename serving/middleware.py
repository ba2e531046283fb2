"""ASGI middleware of the diagnosis service: JSON error envelope, body-size limit, API keys.

Order (outermost first): `ErrorEnvelope` → `ApiKeyAuth` → `BodySizeLimit` → `UploadGuard` →
BentoML's app.
Every non-2xx answer leaves as ``{"error": {"type": ..., "message": ...}}``; `OncoflowError`s
map to their `http_status`, anything unexpected to a 500 whose details stay in the server log.
Nothing here logs request bodies, file names or headers (no patient identifiers in logs).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import Any

from components.errors import ConfigError, InputError, OncoflowError

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

API_KEYS_ENV = "ONCOFLOW_API_KEYS"
ALLOW_NO_AUTH_ENV = "ONCOFLOW_ALLOW_NO_AUTH"
MAX_REQUEST_MB_ENV = "ONCOFLOW_MAX_REQUEST_MB"
DEFAULT_MAX_REQUEST_MB = 20.0
#: Probes and Prometheus scraping stay open so orchestrators need no secret.
OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics"})
_BENTOML_PREFIX = "BentoService error handling API request: "


class Unauthorized(OncoflowError):
    """No or a wrong API key."""

    http_status = 401
    headers = ((b"www-authenticate", b"Bearer"),)


class PayloadTooLarge(InputError):
    """The request body exceeds the configured limit."""

    http_status = 413


def load_api_keys(
    environ: MutableMapping[str, str] | None = None, warn: bool = True
) -> tuple[str, ...] | None:
    """Keys from ``ONCOFLOW_API_KEYS`` (comma-separated); None only with the explicit opt-out.

    Raises ConfigError when no key is configured and ``ONCOFLOW_ALLOW_NO_AUTH=1`` is not set.
    """
    env = os.environ if environ is None else environ
    keys = tuple(k.strip() for k in env.get(API_KEYS_ENV, "").split(",") if k.strip())
    if keys:
        return keys
    if env.get(ALLOW_NO_AUTH_ENV, "").strip() == "1":
        if not warn:
            return None
        log.warning(
            "API-key authentication is DISABLED (%s=1): anyone who can reach this port can "
            "query the model; use this for local development only",
            ALLOW_NO_AUTH_ENV,
        )
        return None
    raise ConfigError(
        f"no API keys configured: set {API_KEYS_ENV}=key1[,key2...] (or {ALLOW_NO_AUTH_ENV}=1 "
        "to run without authentication, for local development only)"
    )


def max_request_bytes(environ: MutableMapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    raw = env.get(MAX_REQUEST_MB_ENV, "").strip()
    try:
        megabytes = float(raw) if raw else DEFAULT_MAX_REQUEST_MB
    except ValueError as exc:
        raise ConfigError(f"{MAX_REQUEST_MB_ENV}={raw!r} is not a number of megabytes") from exc
    if not megabytes > 0:
        raise ConfigError(f"{MAX_REQUEST_MB_ENV} must be positive, not {raw!r}")
    return int(megabytes * 1024 * 1024)


def _safe_max_bytes() -> int:
    """`max_request_bytes`, falling back to the default: middleware must not raise (the
    service's __init__ performs the strict check and refuses to start)."""
    try:
        return max_request_bytes()
    except ConfigError:
        return int(DEFAULT_MAX_REQUEST_MB * 1024 * 1024)


def error_body(kind: str, message: str) -> bytes:
    return json.dumps({"error": {"type": kind, "message": message}}).encode()


async def send_error(send: Send, status: int, kind: str, message: str, headers: tuple = ()) -> None:
    body = error_body(kind, message)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _status_kind(status: int) -> str:
    if status == 422:
        return "InputError"
    try:
        return HTTPStatus(status).phrase.replace(" ", "").replace("-", "")
    except ValueError:
        return "Error"


def _envelope(status: int, body: bytes) -> bytes:
    """Rewrite a framework error body (BentoML/Starlette) into the oncoflow envelope."""
    message = ""
    try:
        data = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        data = None
    if isinstance(data, list) and data and isinstance(data[0], dict):
        data = data[0]  # BentoML wraps some 4xx bodies in a one-element list
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and {"type", "message"} <= error.keys():
            return body
        message = str(error or data.get("detail") or "")
        details = data.get("detail")
        if isinstance(details, list):
            parts = [
                f"{'.'.join(str(p) for p in d.get('loc', ()))}: {d.get('msg', '')}"
                for d in details
                if isinstance(d, dict)
            ]
            if parts:
                message = "invalid request: " + "; ".join(parts)
    elif isinstance(data, str):
        message = data
    elif body and data is None:
        message = body.decode("utf-8", "replace")[:500]
    message = message.removeprefix(_BENTOML_PREFIX).strip()
    if status >= 500:
        message = message or "unexpected server error; see the server log"
    return error_body(_status_kind(status), message or HTTPStatus(status).phrase)


class ErrorEnvelope:
    """Outermost middleware: every error becomes a JSON envelope with the right status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        held: dict[str, Any] | None = None  # an error response start being rewritten
        chunks: list[bytes] = []

        async def rewrite(message: Message) -> None:
            nonlocal started, held
            if message["type"] == "http.response.start":
                if message["status"] >= 400:
                    held = dict(message)
                    return
                started = True
                await send(message)
                return
            if message["type"] == "http.response.body" and held is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                status = held["status"]
                body = _envelope(status, b"".join(chunks))
                keep = [
                    (k, v)
                    for k, v in held.get("headers", [])
                    if k.lower() not in (b"content-type", b"content-length")
                ]
                started = True
                held = None
                await send(
                    {
                        "type": "http.response.start",
                        "status": status,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            *keep,
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        try:
            await self.app(scope, receive, rewrite)
        except OncoflowError as exc:
            if started:
                raise
            if exc.http_status >= 500:
                log.error("%s on %s: %s", type(exc).__name__, scope.get("path"), exc)
            await send_error(
                send, exc.http_status, type(exc).__name__, str(exc), getattr(exc, "headers", ())
            )
        except Exception:
            if started:
                raise
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            await send_error(
                send, 500, "InternalError", "unexpected server error; see the server log"
            )


async def read_body(receive: Receive, limit: int) -> bytes:
    """Read a whole request body, refusing it as soon as it exceeds `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise InputError("client disconnected before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the {limit / (1024 * 1024):g} MB limit")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that yields `body` once, then defers to the real one (disconnects)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value
    return None


class BodySizeLimit:
    """Refuse bodies over `max_bytes`: by Content-Length, or by reading chunked bodies first."""

    def __init__(self, app: ASGIApp, max_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes if max_bytes is not None else _safe_max_bytes()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError as exc:
                raise InputError("invalid Content-Length header") from exc
            if length > self.max_bytes:
                limit_mb = self.max_bytes / (1024 * 1024)
                raise PayloadTooLarge(f"request body exceeds the {limit_mb:g} MB limit")
        elif _header(scope, b"transfer-encoding") is not None:
            # No declared length: read (bounded) before the app sees it, so the limit holds
            # wherever the app reads its body.
            receive = replay(await read_body(receive, self.max_bytes), receive)
        await self.app(scope, receive, send)


class UnsupportedMediaType(InputError):
    http_status = 415


class UploadGuard:
    """Check file-upload endpoints before BentoML parses them.

    For each ``path -> field`` in `uploads`, a POST must be ``multipart/form-data`` with exactly
    one file part named `field` and nothing else. BentoML would otherwise answer odd forms with
    500s, and would fetch a URL given as a text field (server-side request forgery).
    """

    def __init__(self, app: ASGIApp, uploads: dict[str, str], max_bytes: int | None = None):
        self.app = app
        self.uploads = dict(uploads)
        self.max_bytes = max_bytes if max_bytes is not None else _safe_max_bytes()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        field = self.uploads.get(scope.get("path", "")) if scope["type"] == "http" else None
        if field is None or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        content_type = (_header(scope, b"content-type") or b"").decode("latin-1")
        if content_type.split(";")[0].strip().lower() != "multipart/form-data":
            raise UnsupportedMediaType(
                f"send the image as a multipart/form-data file field {field!r} "
                f"(got {content_type.split(';')[0] or 'no content type'})"
            )
        body = await read_body(receive, self.max_bytes)
        await self._check_form(scope, body, field)
        await self.app(scope, replay(body, receive), send)

    @staticmethod
    async def _check_form(scope: Scope, body: bytes, field: str) -> None:
        from starlette.datastructures import UploadFile
        from starlette.exceptions import HTTPException
        from starlette.formparsers import MultiPartException
        from starlette.requests import Request

        async def once() -> Message:
            return {"type": "http.request", "body": body, "more_body": False}

        request = Request({**scope, "app": None}, once)
        try:
            form = await request.form(max_files=2, max_fields=10)
        except (MultiPartException, HTTPException, ValueError) as exc:  # ValueError: parser's
            detail = getattr(exc, "message", None) or getattr(exc, "detail", None) or str(exc)
            raise InputError(f"malformed multipart body: {detail}") from exc
        try:
            names = list(form.keys())
            if field not in names:
                raise InputError(f"missing multipart file field {field!r}")
            extra = sorted(set(names) - {field})
            if extra or len(form.getlist(field)) != 1:
                raise InputError(f"send exactly one file field {field!r} and nothing else")
            if not isinstance(form[field], UploadFile):
                raise InputError(f"field {field!r} must be a file upload, not a text value")
        finally:
            await form.close()


class ApiKeyAuth:
    """Require ``Authorization: Bearer <key>`` on every path except `OPEN_PATHS`."""

    def __init__(self, app: ASGIApp, keys: tuple[str, ...] | bool | None = False) -> None:
        self.app = app
        self.misconfigured = False
        if keys is False:  # read the environment now: at server start, not at import or build
            try:
                keys = load_api_keys(warn=False)
            except ConfigError:
                # Never raise here: Starlette builds middleware lazily and uvicorn would then
                # run the app without its start-up hooks. The service's __init__ refuses to
                # start on the same check; should a request still arrive, it is refused.
                self.misconfigured = True
                keys = ()
        self.keys = tuple(k.encode() for k in keys) if keys is not None else None

    def _authorised(self, scope: Scope) -> bool:
        header = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                header = value
                break
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return False
        token = token.strip()
        matched = False
        for key in self.keys or ():
            matched |= hmac.compare_digest(token, key)  # no early exit: constant work per key
        return matched

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.misconfigured:
            raise Unauthorized("authentication is misconfigured on the server; no key is valid")
        if (
            scope["type"] == "http"
            and self.keys is not None
            and scope.get("path", "") not in OPEN_PATHS
            and not self._authorised(scope)
        ):
            raise Unauthorized("missing or invalid API key: send 'Authorization: Bearer <key>'")
        await self.app(scope, receive, send)
