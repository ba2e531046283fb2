"""Assistant settings (the `assistant:` block a serving config may carry).

assistant:
  backend: extractive        # extractive | local | openai
  index_path: null           # prebuilt index dir; null -> built from knowledge_dir at start
  top_k: 4
  max_question_chars: 2000
  history_turns: 20
  local: {max_new_tokens: 160, gguf_path: null, threads: null, cache_dir: null}
  openai: {base_url: http://127.0.0.1:8000, model: "", api_key_env: ONCOFLOW_LLM_API_KEY,
           timeout_s: 60, max_tokens: 400, stream: true}
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from components.errors import ConfigError

BACKENDS = ("extractive", "local", "openai")


@dataclass
class LocalLLMConf:
    max_new_tokens: int = 160
    gguf_path: str | None = None
    threads: int | None = None
    cache_dir: str | None = None  # where the dequantised model is kept for fast reloads


@dataclass
class OpenAIConf:
    base_url: str = "http://127.0.0.1:8000"
    model: str = ""
    api_key_env: str | None = "ONCOFLOW_LLM_API_KEY"
    timeout_s: float = 60.0
    max_tokens: int = 400
    stream: bool = True


@dataclass
class AssistantConfig:
    backend: str = "extractive"
    index_path: str | None = None
    knowledge_dir: str | None = None
    top_k: int = 4
    max_question_chars: int = 2000
    history_turns: int = 20
    torch_threads: int | None = None  # set torch's intra-op threads (process-wide) if given
    local: LocalLLMConf = field(default_factory=LocalLLMConf)
    openai: OpenAIConf = field(default_factory=OpenAIConf)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"assistant.backend={self.backend!r} is not one of {list(BACKENDS)}")
        if not 1 <= self.top_k <= 10:
            raise ConfigError("assistant.top_k must be between 1 and 10")
        if not 1 <= self.max_question_chars <= 20_000:
            raise ConfigError("assistant.max_question_chars must be between 1 and 20000")
        if self.history_turns < 1:
            raise ConfigError("assistant.history_turns must be positive")
        if self.backend == "openai" and not self.openai.model:
            raise ConfigError("assistant.backend=openai needs assistant.openai.model")

    @classmethod
    def from_mapping(cls, data: dict[str, Any] | None) -> AssistantConfig:
        """Build from a plain dict (e.g. OmegaConf.to_container(cfg.assistant))."""
        data = dict(data or {})
        try:
            local = LocalLLMConf(**_known(LocalLLMConf, data.pop("local", None) or {}))
            openai = OpenAIConf(**_known(OpenAIConf, data.pop("openai", None) or {}))
            return cls(**_known(cls, data), local=local, openai=openai)
        except TypeError as exc:
            raise ConfigError(f"invalid assistant configuration: {exc}") from exc


def _known(klass, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(klass)} - {"local", "openai"}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown assistant setting(s): {', '.join(sorted(unknown))}")
    return data
