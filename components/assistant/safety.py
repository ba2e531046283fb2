"""Input limits, scope and prompt-injection detection, and the output guards.

The guards apply to every answer whatever backend wrote it:
- `unsafe_claims` finds statements that go beyond the model's output as a diagnosis
  ("you have glioma", "the patient is healthy", "the model predicts <another class>");
- `leaks_prompt` finds verbatim pieces of the system prompt;
- URLs are removed from generated text (sources are given by the citations instead).
"""

from __future__ import annotations

import re

from components.assistant.text import clean_user_text, tokens
from components.errors import InputError

MAX_QUESTION_CHARS = 2000
_ID_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")

_CONDITIONS = (
    r"(?:a |an |any |the )?(?:brain |breast |lung |cervical |pituitary )?"
    r"(?:glioma|glioblastoma|astrocytoma|oligodendroglioma|meningioma|pituitary|adenoma|"
    r"pitnet|tumou?r|cancer|carcinoma|malignan\w*|pneumonia|lesion|mass|disease|"
    r"infection|hsil|lsil|precancer\w*)"
)
_SUBJECT = (
    r"(?:you|the patient|this patient|the person|he|she|they|"
    r"your (?:child|mother|father|wife|husband))"
)
_UNSAFE_PATTERNS = [
    re.compile(
        rf"\b{_SUBJECT}\s+(?:definitely\s+|certainly\s+|clearly\s+|probably\s+|likely\s+)?"
        rf"(?:has|have|had|is suffering from|are suffering from|(?:has|have) been diagnosed with|"
        rf"(?:is|are) diagnosed with)\s+{_CONDITIONS}\b",
        re.IGNORECASE,
    ),
    re.compile(
        rf"\b{_SUBJECT}\s+(?:is|are)\s+(?:completely\s+|perfectly\s+)?"
        r"(?:healthy|cancer[- ]free|tumou?r[- ]free|disease[- ]free|fine|not sick|clear)\b",
        re.IGNORECASE,
    ),
    re.compile(
        rf"\b{_SUBJECT}\s+(?:does not|do not|doesn't|don't|did not|didn't)\s+have\s+"
        rf"{_CONDITIONS}\b",
        re.IGNORECASE,
    ),
    re.compile(
        r"\b(?:the|your|a|my)\s+(?:final\s+)?diagnosis\s+(?:is|was|of)\b"
        r"|\bthis (?:is|confirms) (?:definitely |certainly )?(?:a |an )?"
        r"(?:diagnosis|cancer|glioma|meningioma|tumou?r|pneumonia)\b"
        r"|\b(?:confirms|confirmed) (?:the |a )?diagnosis\b",
        re.IGNORECASE,
    ),
]
_MODEL_SAYS = re.compile(
    r"(?:model(?:'s)?\s+(?:output|prediction|result)\s+(?:is|was|suggests|indicates|shows)"
    r"|model\s+(?:predicts|predicted|suggests|suggested|says|said|outputs|output)"
    r"|(?:classified|labelled|labeled)\s+(?:it|this|the image|this image)?\s*as"
    r"|predicted\s+(?:class|label)\s+(?:is|was))\s+(?:a |an |the )?",
    re.IGNORECASE,
)

_INJECTION_PATTERNS = [
    re.compile(p, re.IGNORECASE)
    for p in (
        r"\b(?:ignore|disregard|forget|override|bypass)\b[^.?!\n]{0,40}\b(?:instruction|rule|"
        r"prompt|guideline|polic|restriction|direction|guardrail)",
        r"\b(?:system|developer|hidden|initial|original)\s+(?:prompt|message|instruction)",
        r"\b(?:reveal|print|show|repeat|output|leak|tell me)\b[^.?!\n]{0,30}\b(?:your|the)\s+"
        r"(?:prompt|instructions|rules|configuration)",
        r"\byou are now\b|\bact as\b|\bpretend (?:to be|you)\b|\bjailbreak|\bdeveloper mode\b|"
        r"\bDAN\b",
        r"\bnew (?:instructions|rules)\b",
        r"<\|[a-z_]+\|>|\[/?INST\]|<<SYS>>|^\s*(?:system|assistant)\s*:",
        r"\b(?:say|state|write|tell (?:them|the patient|him|her))\b[^.?!\n]{0,20}\bthat\b"
        r"[^.?!\n]{0,30}\b(?:is healthy|has no|does not have|is fine|has cancer)",
    )
]

_OFF_TOPIC_TASKS = re.compile(
    r"\b(?:write|compose|generate|create|make)\b[^.?!\n]{0,30}\b(?:poem|song|story|essay|"
    r"joke|code|program|script|function|email|letter|tweet|recipe|lyrics|novel)\b"
    r"|\b(?:translate|summari[sz]e this article|solve this equation)\b",
    re.IGNORECASE,
)

_CASE_REFERENCE = re.compile(
    r"\b(?:this|the|my|our|that|its)\s+(?:result|prediction|case|scan|image|images|picture|"
    r"heat\s?map|output|probabilit\w*|score|scores|finding|explanation|report|x-ray|mri|"
    r"ultrasound|classification|label|answer)\b"
    r"|\bwhy (?:did|does|would|is) (?:it|the model|oncoflow|the ai|the system)\b"
    r"|\bthe model\b|\bthe ai\b|\bwhat did it\b|\bhow sure\b|\bhow confident\b",
    re.IGNORECASE,
)


def check_question(question: str, max_chars: int = MAX_QUESTION_CHARS) -> str:
    """Validate and clean a user question; raise `InputError` when it cannot be used."""
    if not isinstance(question, str):
        raise InputError("the question must be text")
    if len(question) > max_chars:
        raise InputError(
            f"the question is {len(question)} characters long; shorten it to at most {max_chars}"
        )
    cleaned = clean_user_text(question)
    if not cleaned:
        raise InputError("the question is empty; type a question about the case or the notes")
    return cleaned


def check_id(value: str, what: str) -> str:
    """User and session ids: 1-128 characters from [A-Za-z0-9_.:@-]."""
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise InputError(f"{what} must be 1-128 characters of letters, digits or _ . : @ -")
    return value


def looks_like_injection(text: str | None) -> bool:
    """True when the text tries to instruct the assistant instead of asking it something."""
    if not text:
        return False
    return any(p.search(text) for p in _INJECTION_PATTERNS)


def is_off_topic_task(question: str) -> bool:
    """Requests for work the assistant does not do (poems, code, translation...)."""
    return bool(_OFF_TOPIC_TASKS.search(question))


def refers_to_case(question: str) -> bool:
    """Does the question ask about the open case ("why did it say glioma?")?"""
    return bool(_CASE_REFERENCE.search(question))


def unsafe_claims(text: str, predicted_label: str | None = None, labels=()) -> list[str]:
    """Phrases that state a diagnosis or contradict the model's output; [] if none."""
    found = [m.group(0) for p in _UNSAFE_PATTERNS for m in p.finditer(text)]
    if predicted_label is not None:
        found.extend(_contradictions(text, predicted_label, labels))
    return found


def _contradictions(text: str, predicted_label: str, labels) -> list[str]:
    from components.assistant.case import plain_label

    def names(label: str) -> set[str]:
        return {label.lower(), plain_label(label).lower(), label.lower().replace("_", " ")}

    own = names(predicted_label)
    others = {n for lab in labels if lab != predicted_label for n in names(lab)} - own
    found = []
    for match in _MODEL_SAYS.finditer(text):
        after = text[match.end() : match.end() + 60].lower()
        if any(after.startswith(o) for o in own):
            continue
        hits = [o for o in others if after.startswith(o)]
        if hits:
            found.append(match.group(0) + hits[0])
    return found


def _shingles(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def leaks_prompt(text: str, system_prompt: str, n: int = 8) -> bool:
    """True when `text` repeats any `n` consecutive words of the system prompt."""
    secret = _shingles(tokens(system_prompt, drop_stopwords=False), n)
    return bool(secret & _shingles(tokens(text, drop_stopwords=False), n))


_URL_RE = re.compile(r"https?://\S+|www\.\S+", re.IGNORECASE)


def strip_urls(text: str) -> str:
    return _URL_RE.sub("", text)


def escape_data(text: str) -> str:
    """Neutralise untrusted text before it goes into a prompt: no tags, no special tokens."""
    text = clean_user_text(text)
    text = re.sub(r"<\|[^|>]{0,40}\|>", " ", text)
    return text.replace("<", "‹").replace(">", "›").replace("```", "'''")
