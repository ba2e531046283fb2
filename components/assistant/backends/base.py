"""What every generation backend receives and must provide."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from components.assistant.history import Turn
from components.assistant.retriever import Passage


@dataclass(frozen=True)
class GenerationRequest:
    """The grounded material for one answer.

    `messages` is the ready-made chat prompt for LLM backends (see prompts.build_messages);
    the structured fields serve the extractive backend. Passage i is cited as [i], from 1.
    """

    question: str
    passages: list[Passage]
    case_facts: list[str] = field(default_factory=list)
    focus: str = "general"  # general | case | gradcam | shap | privacy | probability
    history: list[Turn] = field(default_factory=list)
    messages: list[dict[str, str]] = field(default_factory=list)


@runtime_checkable
class Backend(Protocol):
    """A text generator. `stream` yields pieces of the same text `generate` returns."""

    name: str
    supports_streaming: bool

    def generate(self, request: GenerationRequest) -> str: ...

    def stream(self, request: GenerationRequest) -> Iterator[str]: ...
