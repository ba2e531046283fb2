"""Pick the generation backend named by `assistant.backend`."""

from __future__ import annotations

from components.assistant.settings import AssistantConfig


def make_backend(config: AssistantConfig):
    """extractive -> ExtractiveBackend, local -> LocalLLMBackend, openai -> OpenAI-compatible."""
    if config.backend == "local":
        from components.assistant.backends.local_llm import LocalLLMBackend

        c = config.local
        return LocalLLMBackend(
            c.gguf_path, max_new_tokens=c.max_new_tokens, threads=c.threads, cache_dir=c.cache_dir
        )
    if config.backend == "openai":
        from components.assistant.backends.openai_compat import OpenAICompatibleBackend

        c = config.openai
        return OpenAICompatibleBackend(
            c.base_url,
            c.model,
            api_key_env=c.api_key_env,
            timeout_s=c.timeout_s,
            max_tokens=c.max_tokens,
            stream=c.stream,
        )
    from components.assistant.backends.extractive import ExtractiveBackend

    return ExtractiveBackend()
