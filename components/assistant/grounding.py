"""Sentence-by-sentence checks on generated text, usable while it streams.

For each sentence the checker
- removes URLs and any citation marker that does not point at a retrieved passage
  (a note id in brackets is turned into that passage's number when it was retrieved);
- stops the answer (`fatal`) when the sentence states a diagnosis, contradicts the model's
  output, or repeats the system prompt;
- drops sentences whose content words are mostly absent from the passages and case facts;
- attributes an uncited grounded sentence to the passage it overlaps most.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from components.assistant.retriever import Passage
from components.assistant.safety import leaks_prompt, strip_urls, unsafe_claims
from components.assistant.text import tokens

_MARKER_RE = re.compile(r"\s*\[([^\[\]\n]{1,60})\]")
_BOUNDARY_RE = re.compile(r"[.!?](?:\s*\[[^\[\]\n]{1,60}\])*[ \t]+(?=[^\s\[])|\n")
_REPEATED_MARKER_RE = re.compile(r"( \[\d+\])(?:\1)+")
_BULLET_RE = re.compile(r"^\s*(?:[-*•]|\d{1,2}[.)])\s+")


@dataclass
class GroundingChecker:
    passages: list[Passage]
    case_facts: list[str]
    system_prompt: str
    predicted_label: str | None = None
    labels: tuple[str, ...] = ()
    min_support: float = 0.6
    fatal: str | None = None
    kept: list[str] = field(default_factory=list)
    dropped: int = 0
    _buffer: str = ""
    _separator: str = ""
    _out: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._note_numbers = {}
        for i, p in enumerate(self.passages, start=1):
            self._note_numbers.setdefault(p.note_id, i)
        self._passage_tokens = [set(tokens(p.chunk.text)) for p in self.passages]
        support = set().union(*self._passage_tokens) if self._passage_tokens else set()
        for p in self.passages:
            support |= set(tokens(f"{p.chunk.title} {p.chunk.section}"))
        self._fact_tokens = set()
        for fact in self.case_facts:
            self._fact_tokens |= set(tokens(fact))
        self._support = support | self._fact_tokens

    @property
    def text(self) -> str:
        return "".join(self._out)

    def feed(self, chunk: str) -> list[str]:
        """Add generated text; return the checked pieces ready to show (may be empty)."""
        if self.fatal:
            return []
        self._buffer += chunk
        pieces: list[str] = []
        while not self.fatal:
            match = _BOUNDARY_RE.search(self._buffer)
            if not match:
                break
            sentence = self._buffer[: match.end()]
            self._buffer = self._buffer[match.end() :]
            pieces += self._accept(sentence, paragraph_break=sentence.endswith("\n"))
        return pieces

    def close(self) -> list[str]:
        """Flush what is left; afterwards `ok()` tells whether the answer can be used."""
        rest, self._buffer = self._buffer, ""
        return self._accept(rest, paragraph_break=False) if rest.strip() else []

    def ok(self) -> tuple[bool, str | None]:
        if self.fatal:
            return False, self.fatal
        if not self.kept:
            return False, "no sentence of the generated answer was supported by the notes"
        if self.dropped > len(self.kept):
            return False, "most generated sentences were not supported by the notes"
        return True, None

    def cited_numbers(self) -> list[int]:
        numbers: list[int] = []
        for match in _MARKER_RE.finditer(self.text):
            n = int(match.group(1)) if match.group(1).isdigit() else None
            if n is not None and n not in numbers:
                numbers.append(n)
        return numbers

    def _accept(self, raw: str, paragraph_break: bool) -> list[str]:
        sentence = _BULLET_RE.sub("", strip_urls(raw).strip())
        if not sentence:
            if paragraph_break and self.kept:
                self._separator = "\n\n"  # a blank line: the next kept sentence starts anew
            return []
        next_separator = "\n\n" if paragraph_break else " "
        sentence = _MARKER_RE.sub(self._fix_marker, sentence).strip()
        sentence = _REPEATED_MARKER_RE.sub(r"\1", sentence)
        claims = unsafe_claims(sentence, self.predicted_label, self.labels)
        if claims:
            self.fatal = f"the answer went beyond the model's output ({claims[0]!r})"
            return []
        recent = " ".join([*self.kept[-1:], sentence])
        if leaks_prompt(recent, self.system_prompt):
            self.fatal = "the answer repeated the assistant's instructions"
            return []
        content = tokens(_MARKER_RE.sub(" ", sentence))
        content = [w for w in content if not w.isdigit()]
        if len(content) < 2:
            return []
        support = sum(w in self._support for w in content) / len(content)
        if support < self.min_support:
            self.dropped += 1
            return []
        if not _MARKER_RE.search(sentence):
            sentence = self._attribute(sentence, set(content))
        piece = (self._separator if self.kept else "") + sentence
        self._separator = next_separator
        self.kept.append(sentence)
        self._out.append(piece)
        return [piece]

    def _fix_marker(self, match: re.Match) -> str:
        ref = match.group(1).strip()
        if ref.isdigit() and 1 <= int(ref) <= len(self.passages):
            return f" [{int(ref)}]"
        ref = ref.removeprefix("note:").strip().lower()
        if ref in self._note_numbers:
            return f" [{self._note_numbers[ref]}]"
        return ""

    def _attribute(self, sentence: str, content: set[str]) -> str:
        """Cite the passage sharing most words, unless the case facts explain it as well."""
        best, best_overlap = None, max(1, len(content & self._fact_tokens))
        for i, passage_tokens in enumerate(self._passage_tokens, start=1):
            overlap = len(content & passage_tokens)
            if overlap > best_overlap:
                best, best_overlap = i, overlap
        return f"{sentence} [{best}]" if best else sentence
