"""The chat endpoint's side of the service: the grounded assistant behind an HTTP contract.

The assistant (`components.assistant`) answers from the packaged knowledge notes and the case
on screen. Here: load it with the prebuilt index that packaging stored next to the model, add
the model card's facts to the case (from the service, never from the request), keep history
per (authenticated user, session), and write the streaming variant as server-sent events.
Chat text is never logged.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from components.errors import ConfigError, InputError
from serving.schemas import (
    ChatCase,
    ChatHistoryResponse,
    ChatRequest,
    ChatResponse,
    ChatTurn,
    Citation,
)

log = logging.getLogger(__name__)

ASSISTANT_INDEX_DIR = "assistant-index"  # inside the Bento model directory (see packaging)


def assistant_settings(
    model_dir: str | os.PathLike | None,
    torch_threads: int | None,
    config_file: str | os.PathLike | None = None,
) -> dict:
    """The assistant configuration: `config_file` (JSON; ``serving.assistant_config``) if
    given, with the packaged index as `index_path` unless the file names one."""
    settings: dict[str, Any] = {}
    if config_file:
        try:
            settings = json.loads(Path(config_file).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"assistant config {config_file}: cannot read JSON: {exc}") from exc
        if not isinstance(settings, dict):
            raise ConfigError(f"assistant config {config_file} must hold a JSON object")
    packaged = Path(model_dir) / ASSISTANT_INDEX_DIR if model_dir else None
    if not settings.get("index_path") and packaged is not None and packaged.is_dir():
        settings["index_path"] = str(packaged)
    if torch_threads and not settings.get("torch_threads"):
        settings["torch_threads"] = torch_threads
    return settings


def card_facts(card) -> dict[str, Any]:
    """What the assistant may say about the model, taken from the service's own model card."""
    metrics = {
        k: float(v)
        for k, v in (card.metrics or {}).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    return {
        "name": card.model.name,
        "version": card.model.version or "unregistered",
        "metrics": metrics,
        "privacy": card.privacy if card.privacy else {"mode": "none"},
    }


class ChatService:
    """Answers chat requests for authenticated users; one `Assistant`, many sessions."""

    def __init__(self, assistant, facts: dict[str, Any]) -> None:
        self.assistant = assistant
        self.facts = dict(facts)

    @classmethod
    def load(
        cls,
        model_dir,
        facts: dict[str, Any],
        torch_threads: int | None = None,
        config_file: str | os.PathLike | None = None,
    ):
        from components.assistant import build_assistant

        settings = assistant_settings(model_dir, torch_threads, config_file)
        if not settings.get("index_path"):
            log.warning(
                "no prebuilt assistant index next to the model: building it from the notes "
                "now (package the model with serving.packaging.import_bundle to avoid this)"
            )
        assistant = build_assistant(settings)
        log.info(
            "assistant ready: %s backend, %s retrieval",
            assistant.backend.name,
            assistant.retriever.mode,
        )
        return cls(assistant, facts)

    def case(self, case: ChatCase | None):
        """The assistant's CaseContext: the request's case plus the service's model facts."""
        if case is None:
            return None
        from components.assistant import CaseContext

        data = case.model_dump()
        data["shap_features"] = [{"name": f.name, "value": f.value} for f in case.shap_features]
        data["model_card"] = self.facts
        return CaseContext.from_dict(data)

    def answer(self, request: ChatRequest, user_id: str) -> ChatResponse:
        answer = self.assistant.answer(
            request.question, request.session_id, self.case(request.case), user_id=user_id
        )
        return _response(answer, request.session_id)

    def stream(self, request: ChatRequest, user_id: str) -> Iterator[bytes]:
        """Server-sent events: ``delta`` {text} pieces, then one ``answer`` (a ChatResponse).

        The request is checked before this returns (an `InputError` here becomes a 4xx
        answer, not a broken stream): the first piece is computed eagerly.
        """
        pieces = self.assistant.stream(
            request.question, request.session_id, self.case(request.case), user_id=user_id
        )
        first = next(pieces)  # runs the checks and retrieval; raises InputError for bad input
        return _events(first, pieces, request.session_id)

    def history(self, session_id: str, user_id: str) -> ChatHistoryResponse:
        turns = self.assistant.history.get(user_id, session_id)
        return ChatHistoryResponse(
            session_id=session_id, turns=[ChatTurn(role=t.role, text=t.text) for t in turns]
        )

    def reset(self, session_id: str, user_id: str) -> None:
        self.assistant.history.clear(user_id, session_id)


def _events(first, pieces, session_id: str) -> Iterator[bytes]:
    from components.assistant import Answer

    try:
        for item in _chain(first, pieces):
            if isinstance(item, Answer):
                payload = _response(item, session_id).model_dump(mode="json")
                yield sse("answer", payload)
            else:
                yield sse("delta", {"text": item})
    except InputError as exc:  # cannot happen after the first piece, but never crash a stream
        yield sse("error", {"error": {"type": "InputError", "message": str(exc)}})
    except Exception:
        log.exception("chat stream failed")
        message = "unexpected server error; see the server log"
        yield sse("error", {"error": {"type": "InternalError", "message": message}})


def _chain(first, rest):
    yield first
    yield from rest


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One server-sent event (JSON data on one line)."""
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def _response(answer, session_id: str) -> ChatResponse:
    return ChatResponse(
        text=answer.text,
        citations=[
            Citation(n=c.n, note_id=c.note_id, title=c.title, section=c.section, sources=c.sources)
            for c in answer.citations
        ],
        refused=answer.refused,
        disclaimer=answer.disclaimer,
        backend=answer.backend,
        session_id=session_id,
        fallback_reason=answer.fallback_reason,
        injection_detected=answer.injection_detected,
        retrieval_mode=answer.retrieval_mode,
        replaces_stream=answer.replaces_stream,
    )


__all__ = ["ASSISTANT_INDEX_DIR", "ChatService", "card_facts", "sse"]
