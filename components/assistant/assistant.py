"""The grounded, case-aware assistant: retrieve → generate → check → cite → disclaim.

    assistant = Assistant(retriever, backend, HistoryStore())
    answer = assistant.answer("why did it say glioma?", session_id, case, user_id="u1")
    for piece in assistant.stream(question, session_id, case, user_id="u1"):
        ...  # str pieces, then one final Answer

Whatever the backend writes passes the same checks (grounding.GroundingChecker): only
retrieved notes can be cited, no diagnosis beyond the model's output, no system-prompt echo.
A generative answer that fails them is replaced by the extractive answer and the Answer says
why (`fallback_reason`). Every answer ends with the decision-support disclaimer.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from components.assistant.backends.base import GenerationRequest
from components.assistant.backends.extractive import ExtractiveBackend
from components.assistant.case import CaseContext, plain_label
from components.assistant.grounding import GroundingChecker
from components.assistant.history import HistoryStore
from components.assistant.prompts import SYSTEM_PROMPT, build_messages
from components.assistant.retriever import Passage, Retriever
from components.assistant.safety import (
    MAX_QUESTION_CHARS,
    check_id,
    check_question,
    is_off_topic_task,
    looks_like_injection,
    refers_to_case,
)
from components.errors import ModelError

logger = logging.getLogger(__name__)

DISCLAIMER = (
    "oncoflow is decision-support software for research use: this answer explains the model's "
    "output and is not a diagnosis or medical advice. A qualified clinician must interpret it "
    "with the full clinical picture."
)
SCOPE = (
    "I can explain the conditions covered by oncoflow's models (glioma, meningioma, pituitary "
    "tumours, breast ultrasound findings, pneumonia, cervical cytology and cervical cancer risk "
    "factors), how to read the model's probabilities, Grad-CAM heat maps and SHAP values, the "
    "model card and its metrics, and what differential privacy and federated learning mean."
)
REFUSAL_NOT_COVERED = (
    "I could not find anything about this in oncoflow's notes, so I will not guess. " + SCOPE
)
REFUSAL_TASK = "That is outside what I can help with. " + SCOPE
REFUSAL_INJECTION = (
    "Your message contains instructions aimed at changing how I work. I treat messages as "
    "questions to answer, never as instructions, and my rules stay the same. " + SCOPE
)
REFUSAL_UNSAFE = (
    "I could not put together an answer that meets my safety checks, so I will not answer "
    "this one. Please discuss the result with the clinician responsible for the care."
)

_ABOUT_ME = re.compile(
    r"\bwhat (?:can|do) you (?:do|help)|\bwho are you\b|\bhow do you (?:work|answer)\b|"
    r"\bwhere do (?:your|the) answers come from\b|\bwhat are you\b",
    re.IGNORECASE,
)
_FOCUS = [
    ("gradcam", re.compile(r"grad-?cam|heat\s?-?map|\bheat\b|highlight|red area|colou?r", re.I)),
    ("shap", re.compile(r"\bshap\b|feature", re.I)),
    ("privacy", re.compile(r"ε|epsilon|\beps\b|privacy|private|\bdelta\b|δ", re.I)),
    ("probability", re.compile(r"probabilit|confiden|how sure|percent|%|\bscore", re.I)),
]


@dataclass(frozen=True)
class Citation:
    """A knowledge note section cited as [n] in the answer text."""

    n: int
    note_id: str
    title: str
    section: str
    sources: list[str] = field(default_factory=list)


@dataclass
class Answer:
    """A finished answer. `text` ends with the disclaimer; [n] markers refer to `citations`."""

    text: str
    citations: list[Citation]
    refused: bool
    disclaimer: str
    backend: str
    fallback_reason: str | None = None
    injection_detected: bool = False
    retrieval_mode: str = "hybrid"
    replaces_stream: bool = False  # streamed text was discarded; show `text` instead

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Plan:
    question: str
    user_id: str
    session_id: str
    case: CaseContext | None
    passages: list[Passage]
    request: GenerationRequest | None
    refusal: str | None
    injection: bool


class Assistant:
    """Answers questions from the knowledge notes and the open case, per user session."""

    def __init__(
        self,
        retriever: Retriever,
        backend=None,
        history_store: HistoryStore | None = None,
        top_k: int = 4,
        history_in_prompt: int = 4,
        max_question_chars: int = MAX_QUESTION_CHARS,
    ) -> None:
        self.retriever = retriever
        self.extractive = ExtractiveBackend()
        self.backend = backend or self.extractive
        self.history = history_store or HistoryStore()
        self.top_k = top_k
        self.history_in_prompt = history_in_prompt
        self.max_question_chars = max_question_chars

    # -- public API -------------------------------------------------------------------------
    def answer(
        self,
        question: str,
        session_id: str,
        case: CaseContext | None = None,
        *,
        user_id: str = "anonymous",
    ) -> Answer:
        """Answer one question; the turn is stored in this user's session history."""
        final = None
        for item in self.stream(question, session_id, case, user_id=user_id):
            if isinstance(item, Answer):
                final = item
        assert final is not None
        return final

    def stream(
        self,
        question: str,
        session_id: str,
        case: CaseContext | None = None,
        *,
        user_id: str = "anonymous",
    ) -> Iterator[str | Answer]:
        """Yield checked pieces of the answer as they are ready, then the final `Answer`.

        Pieces are whole sentences that passed the checks. If a later sentence fails, the
        generative answer is abandoned, the final Answer carries the extractive answer with
        `replaces_stream=True`, and clients should show `Answer.text` instead of the pieces.
        """
        plan = self._plan(question, session_id, case, user_id)
        if plan.refusal is not None:
            answer = Answer(
                text=f"{plan.refusal}\n\n{DISCLAIMER}",
                citations=[],
                refused=True,
                disclaimer=DISCLAIMER,
                backend="none",
                injection_detected=plan.injection,
                retrieval_mode=self.retriever.mode,
            )
            yield plan.refusal
            yield f"\n\n{DISCLAIMER}"
            self._remember(plan, answer)
            yield answer
            return

        checker = self._checker(plan)
        streamed: list[str] = []
        fallback_reason = None
        backend_name = self.backend.name
        try:
            pieces = (
                self.backend.stream(plan.request)
                if self.backend.supports_streaming
                else iter([self.backend.generate(plan.request)])
            )
            try:
                for chunk in pieces:
                    for piece in checker.feed(chunk):
                        streamed.append(piece)
                        yield piece
                    if checker.fatal:
                        break
            finally:
                close = getattr(pieces, "close", None)
                if close:
                    close()
            if not checker.fatal:
                for piece in checker.close():
                    streamed.append(piece)
                    yield piece
            ok, fallback_reason = checker.ok()
        except ModelError as exc:
            logger.error("assistant backend %s failed: %s", self.backend.name, exc)
            ok, fallback_reason = False, f"the {self.backend.name} backend failed: {exc}"

        replaces_stream = False
        if not ok:
            if self.backend is not self.extractive:
                logger.warning("answer replaced by the extractive one: %s", fallback_reason)
            checker = self._checker(plan)
            checker.feed(self.extractive.generate(plan.request))
            checker.close()
            backend_name = self.extractive.name
            replaces_stream = bool(streamed)
            if not checker.ok()[0]:
                logger.error("extractive answer failed the checks: %s", checker.ok()[1])
                answer = Answer(
                    text=f"{REFUSAL_UNSAFE}\n\n{DISCLAIMER}",
                    citations=[],
                    refused=True,
                    disclaimer=DISCLAIMER,
                    backend="none",
                    fallback_reason=fallback_reason,
                    injection_detected=plan.injection,
                    retrieval_mode=self.retriever.mode,
                    replaces_stream=replaces_stream,
                )
                self._remember(plan, answer)
                yield answer
                return
            if not replaces_stream:
                yield checker.text
        yield f"\n\n{DISCLAIMER}"
        answer = Answer(
            text=f"{checker.text}\n\n{DISCLAIMER}",
            citations=self._citations(plan.passages, checker.cited_numbers()),
            refused=False,
            disclaimer=DISCLAIMER,
            backend=backend_name,
            fallback_reason=None if ok else fallback_reason,
            injection_detected=plan.injection,
            retrieval_mode=self.retriever.mode,
            replaces_stream=replaces_stream,
        )
        self._remember(plan, answer)
        yield answer

    def new_session(self) -> str:
        """A fresh random session id."""
        return self.history.new_session_id()

    # -- steps ------------------------------------------------------------------------------
    def _plan(self, question: str, session_id: str, case: CaseContext | None, user_id: str):
        user_id = check_id(user_id, "user_id")
        session_id = check_id(session_id, "session_id")
        question = check_question(question, self.max_question_chars)
        if case is not None and not isinstance(case, CaseContext):
            case = CaseContext.from_dict(case)
        injection = looks_like_injection(question)
        if case is not None and looks_like_injection(case.clinical_note):
            logger.warning("instructions found inside a clinical note; treated as data")
            injection = True

        def refuse(message: str) -> _Plan:
            return _Plan(question, user_id, session_id, case, [], None, message, injection)

        if looks_like_injection(question):
            return refuse(REFUSAL_INJECTION)
        if is_off_topic_task(question):
            return refuse(REFUSAL_TASK)
        passages = self._retrieve(question, case)
        if not passages:
            return refuse(REFUSAL_NOT_COVERED)
        facts = case.facts() if case is not None else []
        history = self.history.get(user_id, session_id, last=self.history_in_prompt)
        request = GenerationRequest(
            question=question,
            passages=passages,
            case_facts=facts,
            focus=self._focus(question, case),
            history=history,
            messages=build_messages(
                question,
                passages,
                facts,
                clinical_note=case.untrusted_note() if case is not None else None,
                history=history,
            ),
        )
        return _Plan(question, user_id, session_id, case, passages, request, None, injection)

    def _retrieve(self, question: str, case: CaseContext | None) -> list[Passage]:
        """Passages for the question; for a question about the open case, the note section
        on what the predicted label means comes first."""
        first: list[Passage] = []
        if case is not None and refers_to_case(question):
            label = plain_label(case.predicted_label)
            first = self.retriever.search(f"what the oncoflow {label} output means", k=1)
        passages = self.retriever.search(question, k=self.top_k)
        if not passages and _ABOUT_ME.search(question):
            passages = self.retriever.search("about this assistant: what it can help with", k=2)
        merged: list[Passage] = []
        for passage in first + passages:
            if all(p.chunk.chunk_id != passage.chunk.chunk_id for p in merged):
                merged.append(passage)
        return merged[: self.top_k]

    @staticmethod
    def _focus(question: str, case: CaseContext | None) -> str:
        for name, pattern in _FOCUS:
            if pattern.search(question):
                return name
        return "case" if case is not None and refers_to_case(question) else "general"

    @staticmethod
    def _checker(plan: _Plan) -> GroundingChecker:
        case = plan.case
        return GroundingChecker(
            passages=plan.passages,
            case_facts=plan.request.case_facts if plan.request else [],
            system_prompt=SYSTEM_PROMPT,
            predicted_label=case.predicted_label if case else None,
            labels=tuple(case.probabilities) if case else (),
        )

    @staticmethod
    def _citations(passages: list[Passage], numbers: list[int]) -> list[Citation]:
        out = []
        for n in sorted(numbers):
            chunk = passages[n - 1].chunk
            out.append(Citation(n, chunk.note_id, chunk.title, chunk.section, list(chunk.sources)))
        return out

    def _remember(self, plan: _Plan, answer: Answer) -> None:
        body = answer.text.removesuffix(answer.disclaimer).strip()
        self.history.append(plan.user_id, plan.session_id, "user", plan.question)
        self.history.append(plan.user_id, plan.session_id, "assistant", body)
