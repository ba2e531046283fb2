"""The service's published API contract (``GET /docs.json``), made to match what it answers.

BentoML writes the OpenAPI document from the endpoints' signatures, with its own idea of the
errors (400 ``{"error": string}``), no authentication, JSON-Schema ``anyOf ... null`` where
OpenAPI 3.0 says ``nullable``, and ``text/plain`` for a streamed answer. `contract` rewrites
it: one error schema ``{"error": {"type", "message"}}`` with the statuses the service really
sends (see `serving.middleware`), the bearer API-key scheme on every route but the probes,
nullable optional fields, and ``text/event-stream`` for ``/chat/stream``. `OpenApiContract` is
the middleware that serves the rewritten document.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from typing import Any

from serving.middleware import OPEN_PATHS, ASGIApp, Message, Receive, Scope, Send

DOCS_PATH = "/docs.json"
SCHEME = "ApiKey"
ERROR_SCHEMA = {
    "type": "object",
    "title": "Error",
    "description": "every error answer: `type` names the error class, `message` says what to do",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
        }
    },
}
#: Status -> meaning, for every authenticated request.
AUTH_ERRORS = {
    "401": "missing or invalid API key",
    "429": "this API key's rate limit (serving.rate_limit_per_minute) is reached; see Retry-After",
    "500": "unexpected server error (details in the server log)",
}
#: ...and for every POST endpoint, besides.
BODY_ERRORS = {
    "400": "malformed body (JSON or multipart that does not parse)",
    "404": "not available on this server (e.g. /similar without a case library)",
    "413": "body over the size limit (serving.max_request_mb; JSON endpoints: 64 KB)",
    "415": "wrong Content-Type (image endpoints: multipart/form-data; others: application/json)",
    "422": "invalid input: a field, the image or the clinical record (the message names it)",
    "429": "rate limit reached, or (explanations, reports) the most this server computes at "
    "once (serving.explain_concurrency); see Retry-After",
    "503": "overloaded (prediction queue full) or a feature that is off (chat)",
}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
STREAM_ROUTES = frozenset({"/chat/stream"})
#: One server-sent event of /chat/stream.
SSE_EVENT = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"type": "string", "enum": ["delta", "answer"]},
        "data": {
            "type": "string",
            "description": 'JSON: `{"text": ...}` (a piece of the answer) for `delta`; the '
            "whole ChatResponse for the one `answer` event that ends the stream",
        },
    },
}


def contract(
    doc: dict[str, Any],
    model: Mapping[str, Any] | None = None,
    open_paths: Iterable[str] = OPEN_PATHS,
) -> dict[str, Any]:
    """The OpenAPI document `doc` (BentoML's) rewritten to the service's real contract.

    `model` (``clinical_schema``: the served model's clinical features or None; ``methods``:
    its CAM methods) makes the ``clinical`` and ``method`` inputs say what this model takes.
    """
    doc = copy.deepcopy(doc)
    model = model or {}
    open_paths = frozenset(open_paths)
    doc["info"] = {
        "title": "oncoflow diagnosis service",
        "version": str(doc.get("info", {}).get("version", "")),
        "description": "Diagnosis, explanation, similar cases, reports and the assistant for "
        "one model. Every route but the probes needs `Authorization: Bearer <API key>`.",
    }
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in ("InvalidArgument", "NotFound", "InternalServerError"):
        schemas.pop(name, None)
    schemas["Error"] = ERROR_SCHEMA
    doc["components"]["securitySchemes"] = {
        SCHEME: {"type": "http", "scheme": "bearer", "description": "an ONCOFLOW_API_KEYS key"}
    }
    doc["security"] = [{SCHEME: []}]
    for path, operations in doc.get("paths", {}).items():
        for method, operation in operations.items():
            if not isinstance(operation, dict):
                continue
            responses = operation.setdefault("responses", {})
            if path in open_paths:
                operation["security"] = []
                if path == "/readyz":
                    responses["503"] = {"description": "not ready (the model is loading)"}
                continue
            for status in [s for s in responses if s != "200"]:
                del responses[status]  # BentoML's own error shapes, replaced below
            errors = AUTH_ERRORS | (BODY_ERRORS if method == "post" else {})
            for status, meaning in sorted(errors.items()):
                responses[status] = _error_response(meaning, retry=status == "429")
            if path in STREAM_ROUTES:
                responses["200"]["content"] = {"text/event-stream": {"schema": SSE_EVENT}}
    _to_openapi_30(doc)
    for operations in doc.get("paths", {}).values():
        for operation in operations.values():
            if isinstance(operation, dict) and "requestBody" in operation:
                operation["requestBody"]["required"] = True
                for media_type, media in operation["requestBody"].get("content", {}).items():
                    schema = _resolve(doc, media.get("schema", {}))
                    schema["additionalProperties"] = False  # unknown fields get 422
                    if media_type == "multipart/form-data":  # the image endpoints
                        _describe_inputs(schema.get("properties", {}), model)
    return doc


def _resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """`schema`, or the component schema its ``$ref`` names."""
    ref = schema.get("$ref", "")
    if ref.startswith("#/components/schemas/"):
        return doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
    return schema


def _describe_inputs(properties: dict[str, Any], model: Mapping[str, Any]) -> None:
    """The ``clinical`` and ``method`` inputs as the served model takes them."""
    if "clinical" in properties and "clinical_schema" in model:
        features = model["clinical_schema"]
        if features is None:
            del properties["clinical"]  # this model takes no clinical record
        else:
            properties["clinical"] = clinical_json_schema(features)
    if "method" in properties and model.get("methods"):
        properties["method"]["enum"] = list(model["methods"])
    if "target" in properties and model.get("classes"):
        properties["target"]["enum"] = [*model["classes"], None]  # None: the predicted class


def clinical_json_schema(features: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The JSON schema of a clinical record (`validation.clinical_schema` features)."""
    properties: dict[str, Any] = {}
    required: list[str] = []
    for feature in features:
        kind = feature.get("type")
        if kind == "category":
            schema: dict[str, Any] = {"enum": list(feature.get("allowed") or [])}
        elif kind == "bool":
            schema = {"type": "boolean"}
        else:
            schema = {"type": "integer" if kind == "int" else "number"}
            for bound, key in (("min", "minimum"), ("max", "maximum")):
                if feature.get(bound) is not None:
                    schema[key] = feature[bound]
        words = [
            str(feature.get("description") or ""),
            f"in {feature['unit']}" if feature.get("unit") else "",
        ]
        if any(words):
            schema["description"] = ", ".join(w for w in words if w)
        if feature.get("required", True):
            required.append(feature["name"])
        else:
            schema["nullable"] = True
        properties[feature["name"]] = schema
    return {
        "type": "object",
        "description": "the clinical record (the model card's clinical_schema)",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


def _error_response(meaning: str, retry: bool) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": meaning,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if retry:
        response["headers"] = RETRY_AFTER
    return response


_NULL = {"type": "null"}


def _to_openapi_30(node: Any) -> None:
    """In place: JSON-Schema null unions -> OpenAPI 3.0 ``nullable``; BentoML's ``type: file``
    -> ``string``/``binary``; a ``$ref`` with siblings -> ``allOf`` (3.0 ignores siblings)."""
    if isinstance(node, list):
        for item in node:
            _to_openapi_30(item)
        return
    if not isinstance(node, dict):
        return
    any_of = node.get("anyOf")
    if isinstance(any_of, list) and _NULL in any_of:
        rest = [schema for schema in any_of if schema != _NULL]
        del node["anyOf"]
        if len(rest) == 1:
            for key, value in rest[0].items():
                node.setdefault(key, value)
        else:
            node["anyOf"] = rest
        node["nullable"] = True
    elif "default" in node and node["default"] is None and ("type" in node or "$ref" in node):
        node["nullable"] = True  # an optional field whose absence reads as null
    if "$ref" in node and len(node) > 1:
        node["allOf"] = [{"$ref": node.pop("$ref")}]
    if node.get("type") == "file":
        node["type"] = "string"
        node["format"] = "binary"
    for value in node.values():
        _to_openapi_30(value)


class OpenApiContract:
    """Serve `contract` of the app's own ``/docs.json`` (computed at the first request, once
    `model` holds the served model's facts)."""

    def __init__(self, app: ASGIApp, model: Mapping[str, Any] | None = None) -> None:
        self.app = app
        self.model = model
        self.body: bytes | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope.get("path") != DOCS_PATH
            or scope.get("method") not in ("GET", "HEAD")
        ):
            await self.app(scope, receive, send)
            return
        if self.body is None:
            self.body = await self._fetch(scope, receive)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(self.body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": self.body})

    async def _fetch(self, scope: Scope, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        status = 0

        async def collect(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app({**scope, "method": "GET"}, receive, collect)
        if status != 200:
            raise RuntimeError(f"the framework's {DOCS_PATH} answered {status}")
        return json.dumps(contract(json.loads(b"".join(chunks)), self.model)).encode()


__all__ = ["DOCS_PATH", "OpenApiContract", "contract"]
