"""Any server speaking the OpenAI chat-completions API (vLLM, Ollama, llama.cpp server...).

POST {base_url}/v1/chat/completions with temperature 0; with `stream` the server's
server-sent events ("data: {...}" lines ending with "data: [DONE]") are relayed piece by piece.
The API key, if any, is read from the environment variable named in the configuration.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator

from components.assistant.backends.base import GenerationRequest
from components.errors import ConfigError, ModelError

logger = logging.getLogger(__name__)


def chat_url(base_url: str) -> str:
    base = base_url.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise ConfigError(f"assistant.openai.base_url must start with http:// or https://: {base}")
    return f"{base}/chat/completions" if base.endswith("/v1") else f"{base}/v1/chat/completions"


class OpenAICompatibleBackend:
    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "ONCOFLOW_LLM_API_KEY",
        timeout_s: float = 60.0,
        max_tokens: int = 400,
        stream: bool = True,
        transport=None,
    ) -> None:
        if not model:
            raise ConfigError("assistant.openai.model must name the served model")
        self.url = chat_url(base_url)
        self.model = model
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.max_tokens = max_tokens
        self.supports_streaming = stream
        self._transport = transport  # an httpx transport, for tests

    def _client(self):
        import httpx

        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return httpx.Client(timeout=self.timeout_s, headers=headers, transport=self._transport)

    def _payload(self, request: GenerationRequest, stream: bool) -> dict:
        if not request.messages:
            raise ModelError("the LLM backend needs chat messages in the generation request")
        return {
            "model": self.model,
            "messages": request.messages,
            "temperature": 0,
            "max_tokens": self.max_tokens,
            "stream": stream,
        }

    def generate(self, request: GenerationRequest) -> str:
        import httpx

        try:
            with self._client() as client:
                response = client.post(self.url, json=self._payload(request, stream=False))
                response.raise_for_status()
                data = response.json()
        except httpx.HTTPStatusError as exc:
            raise ModelError(
                f"the LLM server at {self.url} answered HTTP {exc.response.status_code}; "
                "check assistant.openai.model and the API key"
            ) from exc
        except (httpx.HTTPError, ValueError) as exc:
            raise ModelError(f"cannot reach the LLM server at {self.url}: {exc}") from exc
        try:
            return str(data["choices"][0]["message"]["content"] or "").strip()
        except (KeyError, IndexError, TypeError) as exc:
            raise ModelError(f"the LLM server at {self.url} sent an unexpected reply") from exc

    def stream(self, request: GenerationRequest) -> Iterator[str]:
        import httpx

        if not self.supports_streaming:
            yield self.generate(request)
            return
        try:
            with (
                self._client() as client,
                client.stream("POST", self.url, json=self._payload(request, stream=True)) as resp,
            ):
                if resp.status_code >= 400:
                    raise ModelError(
                        f"the LLM server at {self.url} answered HTTP {resp.status_code}; "
                        "check assistant.openai.model and the API key"
                    )
                for line in resp.iter_lines():
                    piece = _sse_piece(line)
                    if piece is None:
                        break
                    if piece:
                        yield piece
        except httpx.HTTPError as exc:
            raise ModelError(f"cannot reach the LLM server at {self.url}: {exc}") from exc


def _sse_piece(line: str) -> str | None:
    """Text carried by one SSE line; "" for lines without text; None at the end marker."""
    line = line.strip()
    if not line.startswith("data:"):
        return ""
    body = line[5:].strip()
    if body == "[DONE]":
        return None
    try:
        choice = json.loads(body)["choices"][0]
    except (ValueError, KeyError, IndexError, TypeError):
        logger.warning("ignoring a malformed streaming event from the LLM server")
        return ""
    delta = choice.get("delta") or {}
    return str(delta.get("content") or "")
