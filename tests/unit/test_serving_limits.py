"""The service's request limits and its published contract, in process (no server):
`RateLimit` (per API key), `ConcurrencyLimit` (explanations), `JsonGuard` (JSON bodies) and
`serving.openapi.contract`."""

from __future__ import annotations

import asyncio
import json

import pytest

from components.errors import InputError
from serving.middleware import (
    USER_SCOPE_KEY,
    ConcurrencyLimit,
    JsonGuard,
    MalformedBody,
    RateLimit,
    TooManyRequests,
    UnsupportedMediaType,
)


async def ok_app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def call(app, path="/predict", user="alice", headers=(), body=b"", method="POST") -> list:
    sent: list = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": list(headers)}
    scope[USER_SCOPE_KEY] = user
    asyncio.run(app(scope, receive, send))
    return sent


def test_rate_limit_is_per_key_with_a_burst_and_a_retry_after(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("serving.middleware.time.monotonic", lambda: clock[0])
    limit = RateLimit(ok_app, per_minute=60, burst=3)  # one a second, three at once
    for _ in range(3):
        assert call(limit)[0]["status"] == 200
    with pytest.raises(TooManyRequests) as refused:
        call(limit)
    assert refused.value.http_status == 429
    assert dict(refused.value.headers)[b"retry-after"] == b"1"
    assert call(limit, user="bob")[0]["status"] == 200  # another key has its own bucket
    assert call(limit, path="/readyz")[0]["status"] == 200  # probes are never limited
    clock[0] += 1.0
    assert call(limit)[0]["status"] == 200  # a token a second
    off = RateLimit(ok_app, per_minute=0, burst=1)
    assert all(call(off)[0]["status"] == 200 for _ in range(50))


def test_explanations_beyond_the_cap_get_429_at_once():
    async def scenario():
        release = asyncio.Event()

        async def slow_app(scope, receive, send):
            await release.wait()
            await ok_app(scope, receive, send)

        cap = ConcurrencyLimit(slow_app, paths=["/explain"], limit=2)

        async def request(path):
            sent = []

            async def receive():
                return {"type": "http.request", "body": b"", "more_body": False}

            async def send(message):
                sent.append(message)

            await cap({"type": "http", "method": "POST", "path": path}, receive, send)
            return sent[0]["status"]

        running = [asyncio.create_task(request("/explain")) for _ in range(2)]
        await asyncio.sleep(0.01)
        assert cap.running == 2
        with pytest.raises(TooManyRequests):
            await request("/explain")
        predict = asyncio.create_task(request("/predict"))  # other routes are not capped
        release.set()
        assert await asyncio.gather(*running, predict) == [200, 200, 200]
        assert cap.running == 0
        assert await request("/explain") == 200

    asyncio.run(scenario())


JSON = ((b"content-type", b"application/json"),)


def test_json_guard_refuses_what_is_not_one_json_object():
    guard = JsonGuard(ok_app, fields={"/chat": ["question", "session_id"]}, max_bytes=1024)
    body = json.dumps({"question": "q", "session_id": "s"}).encode()
    assert call(guard, "/chat", headers=JSON, body=body)[0]["status"] == 200
    for content_type in (b"multipart/form-data", b"multipart/form-data; boundary=x", b""):
        with pytest.raises(UnsupportedMediaType):
            call(guard, "/chat", headers=((b"content-type", content_type),), body=body)
    for broken in (b'{"question": ', b"\xff\xfe", b"[" * 100_000):
        with pytest.raises(MalformedBody):
            call(guard, "/chat", headers=JSON, body=broken[:1024])
    with pytest.raises(InputError, match="JSON object"):
        call(guard, "/chat", headers=JSON, body=b"[1, 2]")
    with pytest.raises(InputError, match="1 unexpected field") as extra:
        call(guard, "/chat", headers=JSON, body=b'{"question": "q", "DOE^JANE-MRN-1": 1}')
    assert "DOE" not in str(extra.value)  # the client's key is not repeated (nor logged)
    assert call(guard, "/predict", body=b"anything")[0]["status"] == 200  # other routes


BENTOML_DOC = {
    "openapi": "3.0.2",
    "info": {"title": "x", "version": "1"},
    "paths": {
        "/livez": {"get": {"responses": {"200": {"description": "ok"}}}},
        "/chat/stream": {
            "post": {
                "requestBody": {"content": {"application/json": {"schema": {"type": "object"}}}},
                "responses": {
                    "200": {"content": {"text/plain": {"schema": {"type": "string"}}}},
                    "400": {"description": "Bad Request"},
                },
            }
        },
        "/explain": {
            "post": {
                "requestBody": {
                    "content": {
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "image": {"type": "file", "format": "binary"},
                                    "clinical": {"anyOf": [{"type": "object"}, {"type": "null"}]},
                                    "method": {"type": "string", "default": "gradcam"},
                                    "target": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                                },
                            }
                        }
                    }
                },
                "responses": {"200": {"content": {"application/json": {"schema": {}}}}},
            }
        },
    },
    "components": {
        "schemas": {
            "Out": {
                "type": "object",
                "properties": {
                    "heat": {"anyOf": [{"$ref": "#/components/schemas/H"}, {"type": "null"}]},
                    "reason": {"type": "string", "default": None},
                },
            },
            "InvalidArgument": {"type": "object"},
        }
    },
}


def test_the_contract_says_what_the_service_answers():
    from serving.openapi import contract

    model = {"clinical_schema": None, "methods": ["gradcam"], "classes": ["a", "b"]}
    doc = contract(BENTOML_DOC, model)
    assert doc["security"] == [{"ApiKey": []}]
    assert doc["components"]["securitySchemes"]["ApiKey"]["scheme"] == "bearer"
    assert doc["paths"]["/livez"]["get"]["security"] == []
    explain = doc["paths"]["/explain"]["post"]
    assert set(explain["responses"]) == {
        "200", "400", "401", "404", "413", "415", "422", "429", "500", "503"
    }  # fmt: skip
    assert "Retry-After" in explain["responses"]["429"]["headers"]
    inputs = explain["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert explain["requestBody"]["required"] and inputs["additionalProperties"] is False
    assert "clinical" not in inputs["properties"]  # this model takes no clinical record
    assert inputs["properties"]["image"] == {"type": "string", "format": "binary"}
    assert inputs["properties"]["method"]["enum"] == ["gradcam"]
    assert inputs["properties"]["target"]["nullable"] is True
    stream = doc["paths"]["/chat/stream"]["post"]["responses"]
    assert list(stream["200"]["content"]) == ["text/event-stream"]
    assert "400" in stream and stream["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Error"
    }
    out = doc["components"]["schemas"]["Out"]["properties"]
    assert out["heat"] == {"allOf": [{"$ref": "#/components/schemas/H"}], "nullable": True}
    assert out["reason"]["nullable"] is True
    assert "InvalidArgument" not in doc["components"]["schemas"]
    assert BENTOML_DOC["paths"]["/livez"]["get"].get("security") is None  # input untouched


def test_a_clinical_schema_becomes_the_json_schema_of_the_record():
    from serving.openapi import clinical_json_schema

    schema = clinical_json_schema(
        [
            {"name": "age", "type": "float", "min": 18, "max": 110, "unit": "years"},
            {"name": "sex", "type": "category", "allowed": ["F", "M"], "required": False},
            {"name": "smoker", "type": "bool"},
            {"name": "fitspatrick", "type": "int", "description": "Fitzpatrick skin type"},
            {"name": "diameter_1", "type": "float", "unit": "mm", "description": "longest axis"},
        ]
    )
    assert (
        schema["required"] == ["age", "smoker", "fitspatrick", "diameter_1"]
        and schema["additionalProperties"] is False
    )
    age, sex, smoker = (schema["properties"][n] for n in ("age", "sex", "smoker"))
    assert age == {"type": "number", "minimum": 18, "maximum": 110, "description": "in years"}
    assert sex == {"enum": ["F", "M"], "nullable": True}
    assert smoker == {"type": "boolean"}
    assert schema["properties"]["fitspatrick"]["description"] == "Fitzpatrick skin type"
    assert schema["properties"]["diameter_1"]["description"] == "longest axis, in mm"
