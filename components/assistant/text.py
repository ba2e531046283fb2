"""Small text helpers shared by retrieval, answer composition and the safety checks."""

from __future__ import annotations

import re

_WORD_RE = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")
_SENTENCE_RE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\"'])")

# British spellings mapped to one form so "tumour" and "tumor" match.
_SPELLING = {
    "tumour": "tumor",
    "tumours": "tumors",
    "paediatric": "pediatric",
    "haemorrhage": "hemorrhage",
    "oedema": "edema",
    "oestrogen": "estrogen",
    "centre": "center",
    "centres": "centers",
    "generalisation": "generalization",
    "normalisation": "normalization",
    "colour": "color",
    "colours": "colors",
    "eps": "epsilon",
    "ε": "epsilon",
    "δ": "delta",
}

_STOPWORDS_TEXT = """a about above after again against all am an and any are as at be because
    been before being below between both but by can could did do does doing down during each
    few for from
    further had has have having he her here hers herself him himself his how i if in into is it
    its itself just me more most my myself no nor not now of off on once only or other our ours
    ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up very was we were
    what when where which while who whom why will with would you your yours yourself
    yourselves tell explain mean means meaning say said says please know want like also get
    got give us one ok okay hi hello thanks thank really well much many lot would could"""
STOPWORDS = frozenset(_STOPWORDS_TEXT.split())


def normalise_word(word: str) -> str:
    """Lower-case word with British spellings unified and a plain plural 's' removed."""
    word = _SPELLING.get(word, word)
    if len(word) > 4 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    return word


def tokens(text: str, drop_stopwords: bool = True) -> list[str]:
    """Lexical tokens for BM25 and overlap scores."""
    text = text.lower().replace("ε", " epsilon ").replace("δ", " delta ")
    text = re.sub(r"['’]s\b", "", text)
    words = (normalise_word(w) for w in _WORD_RE.findall(text))
    if drop_stopwords:
        return [w for w in words if w not in STOPWORDS]
    return list(words)


def sentences(text: str) -> list[str]:
    """Split prose into sentences (good enough for the notes' plain style)."""
    return [s.strip() for s in _SENTENCE_RE.split(text.strip()) if s.strip()]


def clean_user_text(text: str) -> str:
    """Drop control characters and collapse whitespace in untrusted text."""
    text = "".join(ch if ch.isprintable() or ch in "\n\t" else " " for ch in text)
    return re.sub(r"[ \t]+", " ", text).strip()
