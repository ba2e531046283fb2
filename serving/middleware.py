"""ASGI middleware of the diagnosis service: request log, JSON errors, body limits, API keys.

Order (outermost first): `RequestLog` → `ErrorEnvelope` → `ApiKeyAuth` → `BodySizeLimit` →
`UploadGuard` → BentoML's app.
Every non-2xx answer leaves as ``{"error": {"type": ..., "message": ...}}``; `OncoflowError`s
map to their `http_status`, request-validation failures to 422 ``InputError``, anything
unexpected to a 500 whose details stay in the server log.
Nothing here logs request bodies, file names, header values or unknown paths: the request log
holds a request id, the route, status, sizes and latency only (no patient identifiers in logs).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import os
import re
import threading
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from components.config import ServingConf
from components.errors import ConfigError, InputError, OncoflowError
from serving.settings import current_settings, request_limit_bytes

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

API_KEYS_ENV = "ONCOFLOW_API_KEYS"
ALLOW_NO_AUTH_ENV = "ONCOFLOW_ALLOW_NO_AUTH"
#: Probes and Prometheus scraping stay open so orchestrators need no secret.
OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics"})
_BENTOML_PREFIX = "BentoService error handling API request: "
#: ASGI scope key holding the authenticated user id (set by `ApiKeyAuth`).
USER_SCOPE_KEY = "oncoflow.user"
#: ASGI scope key holding the request id (set by `RequestLog`).
REQUEST_ID_SCOPE_KEY = "oncoflow.request_id"
ANONYMOUS_USER = "anonymous"
_KEY_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")


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


def key_identity(entry: str) -> tuple[str, str]:
    """``(user_id, secret)`` of one configured key.

    ``name:secret`` (name: a letter, then up to 63 letters, digits, ``_ . -``) names the key's
    owner; any other entry is the secret itself and its owner is ``key-<sha256 prefix>`` (a
    stable pseudonym that does not reveal the key).
    """
    name, sep, secret = entry.partition(":")
    if sep and secret and _KEY_NAME.match(name):
        return name, secret
    return "key-" + hashlib.sha256(entry.encode()).hexdigest()[:12], entry


def _safe_max_bytes() -> int:
    """The body limit of this process's settings, falling back to the schema default:
    middleware must not raise (the service's __init__ loads the settings strictly and refuses
    to start)."""
    try:
        return request_limit_bytes(current_settings())
    except ConfigError:
        return request_limit_bytes(ServingConf())


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


def _envelope(status: int, body: bytes) -> tuple[int, bytes]:
    """Rewrite a framework error body (BentoML/Starlette) into the oncoflow envelope.

    BentoML answers request-validation failures with 400 and pydantic's error list; they are
    bad input like any other, so they leave as 422 ``InputError`` naming each field.
    """
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
            return status, body
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
                if status == 400:
                    status = 422
    elif isinstance(data, str):
        message = data
    elif body and data is None:
        message = body.decode("utf-8", "replace")[:500]
    message = message.removeprefix(_BENTOML_PREFIX).strip()
    if status >= 500:
        message = message or "unexpected server error; see the server log"
    return status, error_body(_status_kind(status), message or HTTPStatus(status).phrase)


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
                status, body = _envelope(held["status"], b"".join(chunks))
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
                log.error("%s in request %s: %s", type(exc).__name__, _request_id(scope), exc)
            await send_error(
                send, exc.http_status, type(exc).__name__, str(exc), getattr(exc, "headers", ())
            )
        except Exception as exc:
            if started:
                raise
            # where it failed, not the message: it may quote the request (RequestLog's line
            # with the same id names the route)
            log.error(
                "unhandled %s in request %s:\n%s",
                type(exc).__name__,
                _request_id(scope),
                "".join(traceback.format_tb(exc.__traceback__)),
            )
            await send_error(
                send, 500, "InternalError", "unexpected server error; see the server log"
            )


def _request_id(scope: Scope) -> str:
    return str(scope.get(REQUEST_ID_SCOPE_KEY, "-"))


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
    """Refuse bodies over the limit: by Content-Length, or by reading chunked bodies first.

    `max_bytes` applies everywhere; `path_limits` sets a smaller limit for some paths (JSON
    endpoints such as chat need kilobytes, not the megabytes an image upload does).
    """

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int | None = None,
        path_limits: Mapping[str, int] | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes if max_bytes is not None else _safe_max_bytes()
        self.path_limits = dict(path_limits or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = min(self.max_bytes, self.path_limits.get(scope.get("path", ""), self.max_bytes))
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError as exc:
                raise InputError("invalid Content-Length header") from exc
            if length > limit:
                raise PayloadTooLarge(f"request body exceeds the {_size(limit)} limit")
        elif _header(scope, b"transfer-encoding") is not None:
            # No declared length: read (bounded) before the app sees it, so the limit holds
            # wherever the app reads its body.
            receive = replay(await read_body(receive, limit), receive)
        await self.app(scope, receive, send)


def _size(limit: int) -> str:
    if limit >= 1024 * 1024:
        return f"{limit / (1024 * 1024):g} MB"
    return f"{limit / 1024:g} KB"


class UnsupportedMediaType(InputError):
    http_status = 415


class MalformedBody(InputError):
    """The body is not what its Content-Type says (JSON that does not parse...)."""

    http_status = 400


class TooManyRequests(OncoflowError):
    """A limit (the caller's request rate, concurrent explanations) is reached; retry later."""

    http_status = 429

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.headers = ((b"retry-after", str(max(1, math.ceil(retry_after_s))).encode()),)


def _media_type(scope: Scope) -> str:
    raw = (_header(scope, b"content-type") or b"").decode("latin-1")
    return raw.split(";")[0].strip().lower()


class JsonGuard:
    """JSON endpoints take one JSON object: refuse anything else before BentoML parses it.

    For a POST to a path of `fields` (path -> the keys its object may have): the Content-Type
    must be ``application/json`` (else 415), the body a JSON object (else 400 `MalformedBody`),
    read up to `max_bytes`, with no other keys (else 422). BentoML would otherwise hand a
    multipart or form body to its multipart parser and answer a bogus one with a 500.
    """

    def __init__(self, app: ASGIApp, fields: Mapping[str, Iterable[str]], max_bytes: int) -> None:
        self.app = app
        self.fields = {path: frozenset(names) for path, names in fields.items()}
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope.get("method") != "POST"
            or scope.get("path", "") not in self.fields
        ):
            await self.app(scope, receive, send)
            return
        media_type = _media_type(scope)
        if media_type != "application/json":
            raise UnsupportedMediaType(
                f"send a JSON object with Content-Type application/json "
                f"(got {media_type or 'no content type'})"
            )
        body = await read_body(receive, self.max_bytes)
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as exc:  # ValueError: bad JSON or bad UTF-8
            raise MalformedBody("the body is not valid JSON") from exc
        if not isinstance(data, dict):
            raise InputError("the body must be a JSON object")
        allowed = self.fields[scope["path"]]
        if extra := set(data) - allowed:
            raise InputError(
                f"{len(extra)} unexpected field(s); this endpoint takes "
                + ", ".join(repr(name) for name in sorted(allowed))
            )
        await self.app(scope, replay(body, receive), send)


@dataclass(frozen=True)
class UploadSpec:
    """The multipart form one upload endpoint accepts: one file field, some text fields."""

    file: str
    fields: frozenset[str] = frozenset()

    @classmethod
    def of(cls, file: str, fields: Iterable[str] = ()) -> UploadSpec:
        return cls(file, frozenset(fields))


class UploadGuard:
    """Check file-upload endpoints before BentoML parses them.

    For each ``path -> UploadSpec`` in `uploads`, a POST must be ``multipart/form-data`` with
    exactly one file part named `spec.file`, and otherwise only single text fields named in
    `spec.fields`. BentoML would otherwise answer odd forms with 500s, and would fetch a URL
    given as a text value for a file field (server-side request forgery).
    """

    def __init__(
        self,
        app: ASGIApp,
        uploads: Mapping[str, UploadSpec | str],
        max_bytes: int | None = None,
    ):
        self.app = app
        self.uploads = {
            path: spec if isinstance(spec, UploadSpec) else UploadSpec.of(spec)
            for path, spec in uploads.items()
        }
        self.max_bytes = max_bytes if max_bytes is not None else _safe_max_bytes()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        spec = self.uploads.get(scope.get("path", "")) if scope["type"] == "http" else None
        if spec is None or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        media_type = _media_type(scope)
        if media_type != "multipart/form-data":
            raise UnsupportedMediaType(
                f"send the image as a multipart/form-data file field {spec.file!r} "
                f"(got {media_type or 'no content type'})"
            )
        body = await read_body(receive, self.max_bytes)
        await self._check_form(scope, body, spec)
        await self.app(scope, replay(body, receive), send)

    @staticmethod
    async def _check_form(scope: Scope, body: bytes, spec: UploadSpec) -> None:
        from starlette.datastructures import UploadFile
        from starlette.exceptions import HTTPException
        from starlette.formparsers import MultiPartException
        from starlette.requests import Request

        async def once() -> Message:
            return {"type": "http.request", "body": body, "more_body": False}

        field = spec.file
        request = Request({**scope, "app": None}, once)
        try:
            form = await request.form(max_files=2, max_fields=len(spec.fields) + 10)
        except (MultiPartException, HTTPException, ValueError) as exc:  # ValueError: parser's
            detail = getattr(exc, "message", None) or getattr(exc, "detail", None) or str(exc)
            raise InputError(f"malformed multipart body: {detail}") from exc
        try:
            names = list(form.keys())
            if field not in names:
                raise InputError(f"missing multipart file field {field!r}")
            extra = sorted(set(names) - {field} - spec.fields)
            if extra or len(form.getlist(field)) != 1:
                allowed = ", ".join(repr(f) for f in sorted(spec.fields))
                also = f" plus optional text fields {allowed}" if allowed else " and nothing else"
                unknown = f" (unexpected: {', '.join(map(repr, extra))})" if extra else ""
                raise InputError(f"send exactly one file field {field!r}{also}{unknown}")
            if not isinstance(form[field], UploadFile):
                raise InputError(f"field {field!r} must be a file upload, not a text value")
            for name in spec.fields & set(names):
                values = form.getlist(name)
                if len(values) != 1 or isinstance(values[0], UploadFile):
                    raise InputError(f"field {name!r} must be a single text value, not a file")
        finally:
            await form.close()


class ApiKeyAuth:
    """Require ``Authorization: Bearer <key>`` on every path except `OPEN_PATHS`.

    The key's owner (see `key_identity`) is put in the ASGI scope under `USER_SCOPE_KEY`, so
    endpoints take the user from the credential and never from the request body. Without
    authentication (the explicit opt-out) every caller is `ANONYMOUS_USER`.
    """

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
        self.keys: tuple[tuple[bytes, str], ...] | None = None
        if keys is not None:
            pairs = [key_identity(k) for k in keys]
            self.keys = tuple((secret.encode(), user) for user, secret in pairs)

    def _user(self, scope: Scope) -> str | None:
        header = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                header = value
                break
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return None
        token = token.strip()
        user = None
        for secret, owner in self.keys or ():
            if hmac.compare_digest(token, secret) and user is None:  # constant work per key
                user = owner
        return user

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.misconfigured:
            raise Unauthorized("authentication is misconfigured on the server; no key is valid")
        if self.keys is None:
            scope[USER_SCOPE_KEY] = ANONYMOUS_USER
        elif scope.get("path", "") not in OPEN_PATHS:
            user = self._user(scope)
            if user is None:
                raise Unauthorized("missing or invalid API key: send 'Authorization: Bearer <key>'")
            scope[USER_SCOPE_KEY] = user
        await self.app(scope, receive, send)


def _safe_settings() -> ServingConf:
    """This process's settings, or the schema defaults when they do not load (the service's
    __init__ refuses to start on the same error; middleware must not raise)."""
    try:
        return current_settings()
    except ConfigError:
        return ServingConf()


class RateLimit:
    """A token bucket per API key: `per_minute` requests a minute, bursts of up to `burst`.

    Runs after `ApiKeyAuth` (the key's owner is the bucket); probes are never limited; a
    caller over the limit gets 429 with ``Retry-After``. ``per_minute=0`` switches it off.
    """

    def __init__(
        self, app: ASGIApp, per_minute: int | None = None, burst: int | None = None
    ) -> None:
        settings = _safe_settings()
        self.app = app
        self.rate = (settings.rate_limit_per_minute if per_minute is None else per_minute) / 60
        self.burst = float(settings.rate_limit_burst if burst is None else burst)
        self.buckets: dict[str, tuple[float, float]] = {}  # user -> (tokens, at)

    def _take(self, user: str) -> float:
        """0 if `user` may go now (one token taken), else the seconds until a token is due."""
        now = time.monotonic()
        tokens, at = self.buckets.get(user, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            self.buckets[user] = (tokens - 1.0, now)
            return 0.0
        self.buckets[user] = (tokens, now)
        return (1.0 - tokens) / self.rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.rate > 0 and scope.get("path") not in OPEN_PATHS:
            wait = self._take(str(scope.get(USER_SCOPE_KEY) or ANONYMOUS_USER))
            if wait > 0:
                raise TooManyRequests(
                    f"rate limit of {self.rate * 60:g} requests a minute per API key reached",
                    wait,
                )
        await self.app(scope, receive, send)


class ConcurrencyLimit:
    """At most `limit` requests to `paths` (together) in progress; the next one gets 429.

    For the expensive endpoints (explanations, reports): a queue of them would only grow while
    each waits on the same cores, so a full house answers at once and the client retries.
    """

    def __init__(self, app: ASGIApp, paths: Iterable[str], limit: int | None = None) -> None:
        self.app = app
        self.paths = frozenset(paths)
        self.limit = _safe_settings().explain_concurrency if limit is None else limit
        self.running = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") not in self.paths:
            await self.app(scope, receive, send)
            return
        if self.running >= self.limit:
            raise TooManyRequests(
                f"{self.running} explanations are being computed, the most this server runs "
                "at once; retry in a moment",
                2.0,
            )
        self.running += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.running -= 1


#: The API calls the service's audit log records, and the action name of each.
AUDITED = {
    "/predict": "service.predict",
    "/predict_tabular": "service.predict",
    "/explain": "service.explain",
    "/explain_tabular": "service.explain",
    "/similar": "service.similar",
    "/report": "service.report",
    "/chat": "service.chat",
    "/chat/stream": "service.chat",
    "/chat/history": "service.chat_history",
    "/chat/reset": "service.chat_reset",
    "/model_card": "service.model_card",
}


class ServiceAudit:
    """Appends one hash-chained entry per API call (`components.audit`): the action, the
    caller's key id (`key_identity`: a name or ``key-<sha256 prefix>``, never the key;
    ``unauthenticated`` for a refused call), the status and the request id. No body, file
    name, header or path beyond the route goes in."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self._log = None
        self._lock = threading.Lock()

    def _open(self):
        if self._log is None:
            from components.audit import open_log
            from components.workspace import Workspace

            chosen = self.path or current_settings().audit_db
            self._log = open_log(chosen or Workspace.from_env().service_audit_db)
        return self._log

    def record(self, route: str, user: str | None, status: int, request_id: str) -> None:
        details = {"key": user or "unauthenticated", "status": status, "request": request_id}
        with self._lock:
            self._open().record(API_CLIENT, AUDITED[route], details=details)


@dataclass(frozen=True)
class _ApiClient:
    id: None = None
    role: str = "api-client"


API_CLIENT = _ApiClient()


class RequestLog:
    """Outermost middleware: a request id (``X-Request-ID``), one log line per request and one
    audit entry per API call (`ServiceAudit`).

    The line holds the id, method, route, status, body sizes and latency. Only paths in
    `routes` are written out (anything else shows as ``-``: a path could carry a name), and no
    header, body or file name is ever logged.
    """

    def __init__(
        self, app: ASGIApp, routes: Iterable[str] = (), audit: ServiceAudit | None = None
    ) -> None:
        self.app = app
        self.routes = frozenset(routes) | OPEN_PATHS
        self.audit = audit if audit is not None else ServiceAudit()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex[:16]
        scope[REQUEST_ID_SCOPE_KEY] = request_id
        started = time.perf_counter()
        received = 0
        sent = 0
        status = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            return message

        async def tagging_send(message: Message) -> None:
            nonlocal sent, status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, tagging_send)
        finally:
            path = scope.get("path", "")
            if path not in OPEN_PATHS or status >= 400:
                log.info(
                    "request %s %s %s -> %s in=%dB out=%dB %.1fms",
                    request_id,
                    scope.get("method", "-"),
                    path if path in self.routes else "-",
                    status or "aborted",
                    received,
                    sent,
                    (time.perf_counter() - started) * 1000.0,
                )
            if path in AUDITED and scope.get("method") in ("GET", "POST"):
                try:
                    user = scope.get(USER_SCOPE_KEY)
                    await asyncio.to_thread(
                        self.audit.record, path, user, status or 499, request_id
                    )
                except Exception:  # an unwritable audit log is an operator's alarm
                    log.exception("could not append to the service's audit log")


class DropRecords(logging.Filter):
    """A logging filter that drops every record (silences a logger we replace)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return False


class RedactValidationErrors(logging.Filter):
    """Strip request values from logged pydantic validation errors.

    BentoML logs the full traceback of a request that fails validation, and pydantic's message
    quotes the offending input (a clinical value, a chat question). The record keeps the
    fields and reasons, never the values.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and type(exc).__name__ == "ValidationError" and hasattr(exc, "errors"):
            try:  # error kinds only: field names may be the client's own keys
                errors = exc.errors(include_input=False, include_context=False, include_url=False)
                where = ", ".join(sorted({str(e.get("type", "?")) for e in errors}))
            except Exception:  # never let logging fail
                where = "details withheld"
            record.msg = f"{record.getMessage()}: request validation failed ({where})"
            if record.levelno > logging.WARNING:  # bad input, not a server fault
                record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
        return True
