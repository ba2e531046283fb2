"""Deterministic answers composed from the case facts and the best sentences of the retrieved
passages. Fast, needs no model, and cannot say anything the notes and case do not say; it is
the default backend and the fallback whenever a generative answer fails the checks."""

from __future__ import annotations

import re
from collections.abc import Iterator

from components.assistant.backends.base import GenerationRequest
from components.assistant.safety import unsafe_claims
from components.assistant.text import sentences, tokens

# Which case facts (by their opening words) each focus shows after the output fact.
_FOCUS_FACTS = {
    "gradcam": ("Grad-CAM",),
    "shap": ("The features with the largest SHAP",),
    "privacy": ("Model card",),
    "probability": ("The scores for", "The top two scores"),
    "case": ("The scores for", "The top two scores", "Grad-CAM", "The features with"),
    "general": ("The top two scores",),
}

_DANGLING = frozenset({"It", "They", "This", "These", "That", "Those", "Such", "Its", "Their"})


class ExtractiveBackend:
    """Picks sentences; never generates new wording beyond fixed connecting phrases."""

    name = "extractive"
    supports_streaming = True

    def __init__(self, max_passages: int = 3, first_passage_sentences: int = 2) -> None:
        self.max_passages = max_passages
        self.first_passage_sentences = first_passage_sentences

    def generate(self, request: GenerationRequest) -> str:
        paragraphs = []
        facts = self._case_facts(request)
        if facts:
            paragraphs.append(" ".join(facts))
        picked = []
        for i, passage in enumerate(request.passages[: self.max_passages], start=1):
            n = self.first_passage_sentences if i == 1 else 1
            chosen = self._best_sentences(passage.chunk.text, request.question, n)
            if chosen:
                picked.append(f"{' '.join(chosen)} [{i}]")
        if picked:
            lead = "From the oncoflow notes: " if facts else ""
            paragraphs.append(lead + " ".join(picked))
        if not paragraphs:
            return "The oncoflow notes do not cover this question."
        return "\n\n".join(paragraphs)

    def stream(self, request: GenerationRequest) -> Iterator[str]:
        pieces = re.split(r"(?<=[.!?\]])(\s+)", self.generate(request))
        for i in range(0, len(pieces), 2):
            yield pieces[i] + (pieces[i + 1] if i + 1 < len(pieces) else "")

    @staticmethod
    def _case_facts(request: GenerationRequest) -> list[str]:
        if not request.case_facts:
            return []
        prefixes = _FOCUS_FACTS.get(request.focus, _FOCUS_FACTS["general"])
        first = [] if request.focus == "privacy" else [request.case_facts[0]]
        rest = [f for f in request.case_facts[1:] if f.startswith(prefixes)]
        return first + rest

    @staticmethod
    def _best_sentences(text: str, question: str, n: int) -> list[str]:
        """The `n` sentences sharing most words with the question, in their original order;
        the opening sentence wins ties because notes lead with their main point."""
        query = set(tokens(question))
        candidates = [s for s in sentences(text) if not unsafe_claims(s)]

        def rank(i: int) -> tuple[int, int, int]:
            # A sentence opening with a pronoun needs its predecessor to make sense.
            dangling = i > 0 and candidates[i].split(" ", 1)[0] in _DANGLING
            return (-len(query & set(tokens(candidates[i]))), int(dangling), i)

        scored = sorted(range(len(candidates)), key=rank)
        return [candidates[i] for i in sorted(scored[:n])]
