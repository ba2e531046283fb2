"""Generation backends: extractive (default fallback), local SmolLM2, OpenAI-compatible HTTP."""

from components.assistant.backends.base import Backend, GenerationRequest
from components.assistant.backends.extractive import ExtractiveBackend
from components.assistant.backends.factory import make_backend

__all__ = ["Backend", "ExtractiveBackend", "GenerationRequest", "make_backend"]
