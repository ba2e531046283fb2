"""Backends: extractive streaming, the OpenAI-compatible HTTP client, configuration, and the
local SmolLM2 model (slow)."""

from __future__ import annotations

import json

import httpx
import pytest

from components.assistant import (
    DISCLAIMER,
    Answer,
    Assistant,
    AssistantConfig,
    build_assistant,
)
from components.assistant.backends import ExtractiveBackend, make_backend
from components.assistant.backends.base import GenerationRequest
from components.assistant.backends.local_llm import LocalLLMBackend, find_gguf
from components.assistant.backends.openai_compat import OpenAICompatibleBackend, chat_url
from components.assistant.index import build_index
from components.assistant.knowledge import KNOWLEDGE_DIR
from components.assistant.retriever import Retriever
from components.assistant.text import sentences
from components.errors import ConfigError, ModelError


@pytest.fixture(scope="module")
def index():
    return build_index(KNOWLEDGE_DIR, dense=False)


@pytest.fixture(scope="module")
def retriever(index):
    return Retriever(index)


def collect(stream):
    pieces, final = [], None
    for item in stream:
        if isinstance(item, Answer):
            final = item
        else:
            pieces.append(item)
    return pieces, final


def sse(*pieces: str) -> bytes:
    events = [
        "data: " + json.dumps({"choices": [{"delta": {"content": p}, "index": 0}]}) for p in pieces
    ]
    return ("\n\n".join([*events, "data: [DONE]"]) + "\n\n").encode()


def test_extractive_stream_matches_the_final_answer(retriever):
    assistant = Assistant(retriever, ExtractiveBackend())
    pieces, final = collect(assistant.stream("What is a meningioma?", "s"))
    assert len(pieces) >= 3
    assert "".join(pieces) == final.text
    assert final.text.endswith(DISCLAIMER) and final.backend == "extractive"
    assert not final.replaces_stream


def test_openai_backend_request_and_reply(monkeypatch):
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["url"] = str(request.url)
        seen["auth"] = request.headers.get("authorization")
        seen["body"] = json.loads(request.content)
        return httpx.Response(200, json={"choices": [{"message": {"content": " Hello. "}}]})

    monkeypatch.setenv("TEST_LLM_KEY", "sekrit")
    backend = OpenAICompatibleBackend(
        "http://llm.local:8000",
        "qwen",
        api_key_env="TEST_LLM_KEY",
        transport=httpx.MockTransport(handler),
    )
    request = GenerationRequest("q", [], messages=[{"role": "user", "content": "hi"}])
    assert backend.generate(request) == "Hello."
    assert seen["url"] == "http://llm.local:8000/v1/chat/completions"
    assert seen["auth"] == "Bearer sekrit"
    assert seen["body"]["model"] == "qwen" and seen["body"]["temperature"] == 0
    assert seen["body"]["stream"] is False
    assert chat_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"


def test_openai_backend_errors_are_model_errors():
    def failing(request):
        return httpx.Response(500, text="boom")

    backend = OpenAICompatibleBackend(
        "http://llm.local", "m", api_key_env=None, transport=httpx.MockTransport(failing)
    )
    request = GenerationRequest("q", [], messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(ModelError, match="HTTP 500"):
        backend.generate(request)
    with pytest.raises(ModelError, match="HTTP 500"):
        list(backend.stream(request))
    with pytest.raises(ConfigError):
        OpenAICompatibleBackend("llm.local", "m")


def test_streaming_through_the_assistant_with_an_openai_server(retriever):
    passage = retriever.search("What is a meningioma?", k=1)[0]
    first, second = sentences(passage.chunk.text)[:2]
    words = f"{first} [1] {second} [1]".split(" ")
    chunks = [w + " " for w in words[:-1]] + [words[-1]]

    def handler(request):
        body = json.loads(request.content)
        assert body["stream"] is True
        assert body["messages"][0]["role"] == "system"
        return httpx.Response(200, content=sse(*chunks))

    backend = OpenAICompatibleBackend(
        "http://llm.local", "m", api_key_env=None, transport=httpx.MockTransport(handler)
    )
    pieces, final = collect(Assistant(retriever, backend).stream("What is a meningioma?", "s"))
    assert final.backend == "openai" and final.fallback_reason is None
    assert pieces[0].startswith(first)
    assert "".join(pieces) == final.text
    assert [c.note_id for c in final.citations] == ["meningioma"]


def test_unsafe_sentence_mid_stream_replaces_the_answer(retriever):
    passage = retriever.search("What is a meningioma?", k=1)[0]
    first = sentences(passage.chunk.text)[0]

    def handler(request):
        return httpx.Response(200, content=sse(f"{first} [1] ", "You have meningioma. ", "Ok."))

    backend = OpenAICompatibleBackend(
        "http://llm.local", "m", api_key_env=None, transport=httpx.MockTransport(handler)
    )
    pieces, final = collect(Assistant(retriever, backend).stream("What is a meningioma?", "s"))
    assert pieces[0].startswith(first)
    assert final.replaces_stream and final.backend == "extractive"
    assert "beyond the model's output" in final.fallback_reason
    assert "You have meningioma" not in final.text


def test_backend_failure_falls_back_to_extractive(retriever):
    def down(request):
        raise httpx.ConnectError("connection refused")

    backend = OpenAICompatibleBackend(
        "http://llm.local", "m", api_key_env=None, transport=httpx.MockTransport(down)
    )
    answer = Assistant(retriever, backend).answer("What is a meningioma?", "s")
    assert answer.backend == "extractive" and "failed" in answer.fallback_reason
    assert answer.citations and answer.text.endswith(DISCLAIMER)


def test_configuration_selects_the_backend(tmp_path):
    assert isinstance(make_backend(AssistantConfig()), ExtractiveBackend)
    openai = make_backend(
        AssistantConfig.from_mapping({"backend": "openai", "openai": {"model": "m"}})
    )
    assert isinstance(openai, OpenAICompatibleBackend)
    local = make_backend(AssistantConfig(backend="local"))
    assert isinstance(local, LocalLLMBackend) and local._model is None  # loads on first use
    with pytest.raises(ConfigError):
        AssistantConfig(backend="gpt")
    with pytest.raises(ConfigError):
        AssistantConfig(backend="openai")
    with pytest.raises(ConfigError, match="colour"):
        AssistantConfig.from_mapping({"colour": "red"})
    build_index(KNOWLEDGE_DIR, tmp_path / "idx", dense=False)
    assistant = build_assistant({"index_path": str(tmp_path / "idx"), "top_k": 3})
    assert assistant.top_k == 3 and assistant.retriever.mode == "bm25"
    assert not assistant.answer("What is pneumonia?", "s").refused


def test_the_local_model_file_ships_with_the_package():
    path = find_gguf()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000


@pytest.mark.slow
def test_local_llm_answers_through_the_checks(retriever, tmp_path):
    backend = LocalLLMBackend(max_new_tokens=24, cache_dir=tmp_path / "smollm2")
    assistant = Assistant(retriever, backend)
    _pieces, final = collect(assistant.stream("What is a meningioma?", "s"))
    assert backend.load_seconds is not None
    assert final.text.endswith(DISCLAIMER) and not final.refused
    assert final.backend in ("local", "extractive")
    if final.backend == "extractive":
        assert final.fallback_reason
    reloaded = LocalLLMBackend(max_new_tokens=4, cache_dir=tmp_path / "smollm2").load()
    request = assistant._plan("What is a meningioma?", "s2", None, "u").request
    assert isinstance(reloaded.generate(request), str)
