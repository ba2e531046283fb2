"""Grounded, case-aware assistant: answers from oncoflow's cited knowledge notes.

Public API (see the modules for details):
    build_assistant(config) -> Assistant      one call for serving
    Assistant.answer / Assistant.stream       per (user_id, session_id) conversations
    CaseContext, Answer, Citation             request and response types
    build_index / load_index, Retriever       the retrieval index
"""

from __future__ import annotations

from components.assistant.assistant import DISCLAIMER, Answer, Assistant, Citation
from components.assistant.case import CaseContext, ShapFeature
from components.assistant.history import HistoryStore, Turn
from components.assistant.index import Index, build_index, load_index
from components.assistant.retriever import Passage, RetrievalSettings, Retriever
from components.assistant.settings import AssistantConfig

__all__ = [
    "DISCLAIMER",
    "Answer",
    "Assistant",
    "AssistantConfig",
    "CaseContext",
    "Citation",
    "HistoryStore",
    "Index",
    "Passage",
    "RetrievalSettings",
    "Retriever",
    "ShapFeature",
    "Turn",
    "build_assistant",
    "build_index",
    "load_index",
]


def build_assistant(config: AssistantConfig | dict | None = None) -> Assistant:
    """Load the prebuilt index (or build one from the notes), the retriever and the backend
    named by the configuration. Loading the local LLM is left to its first use; call
    `assistant.backend.load()` at start-up to pay that cost early."""
    import logging

    from components.assistant.backends.factory import make_backend
    from components.assistant.index import is_stale
    from components.assistant.knowledge import KNOWLEDGE_DIR

    if not isinstance(config, AssistantConfig):
        config = AssistantConfig.from_mapping(config)
    knowledge_dir = config.knowledge_dir or KNOWLEDGE_DIR
    if config.torch_threads:
        import torch

        torch.set_num_threads(config.torch_threads)
    if config.index_path:
        index = load_index(config.index_path)
        if is_stale(index, knowledge_dir):
            logging.getLogger(__name__).warning(
                "assistant index at %s is older than the notes in %s; rebuild it",
                config.index_path,
                knowledge_dir,
            )
    else:
        index = build_index(knowledge_dir)
    retriever = Retriever(index)
    return Assistant(
        retriever,
        make_backend(config),
        HistoryStore(max_turns=config.history_turns),
        top_k=config.top_k,
        max_question_chars=config.max_question_chars,
    )
