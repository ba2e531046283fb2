"""Assistant: questions answered by the service's chat endpoint, with the open case as context."""

from __future__ import annotations

import gradio as gr

from serving.client import new_session_id
from ui import html
from ui.charts import pretty_label
from ui.context import UiContext
from ui.errors import InvalidInput
from ui.gateway import ChatAnswer, ServiceGateway
from ui.messages import friendly
from ui.pages.diagnose import OpenCase

MAX_QUESTION = 2000
WELCOME = (
    "Ask about the current result, how to read Grad-CAM or SHAP, the model's performance or "
    "its privacy guarantee. Answers come from the project's documentation and the open case; "
    "they are not medical advice."
)


def case_line(case: OpenCase | None) -> str:
    if case is None:
        return html.notice("info", "No case open: answers will not refer to a specific image.")
    p = case.prediction
    explained = " with its explanation" if case.explanation is not None else ""
    return html.notice(
        "info",
        f"Context: case #{case.case_id}{explained} — {pretty_label(p.label)} "
        f"({html.percent(p.confidence)}).",
    )


def with_sources(answer: ChatAnswer) -> str:
    if not answer.sources:
        return answer.text
    return answer.text + "\n\n**Sources:** " + "; ".join(answer.sources)


class AssistantPage:
    def __init__(self, ctx: UiContext, service: ServiceGateway) -> None:
        self.ctx = ctx
        self.service = service

    def build(self, token: gr.State, case: gr.State) -> None:
        self.session = gr.State(None)  # chat session id, new per conversation
        self.context = gr.HTML(case_line(None), elem_id="of-chat-context")
        self.chatbot = gr.Chatbot(
            show_label=False,
            height=540,
            placeholder=WELCOME,
            elem_id="of-chat",
            feedback_options=None,
            buttons=["copy"],
        )
        with gr.Row(equal_height=True):
            self.question = gr.Textbox(
                label="Your question",
                placeholder="e.g. Why is the confidence low?",
                scale=5,
                max_lines=4,
                elem_id="of-question",
            )
            self.use_case = gr.Checkbox(value=True, label="Use the current case", scale=1)
        with gr.Row():
            self.ask_button = gr.Button(
                "Ask", variant="primary", scale=0, min_width=140, elem_id="of-ask"
            )
            self.clear_button = gr.Button("New conversation", scale=0, min_width=220)
        self.notice = gr.HTML(elem_id="of-chat-notice")
        inputs = [token, self.session, self.question, self.chatbot, case, self.use_case]
        outputs = [self.chatbot, self.question, self.notice, self.session]
        for trigger in (self.ask_button.click, self.question.submit):
            trigger(self.ask, inputs, outputs, api_visibility="private")
        self.clear_button.click(
            self.new_conversation,
            [token, self.session],
            [self.chatbot, self.notice, self.session],
            api_visibility="private",
        )

    def new_conversation(self, token, session):
        if session:
            try:
                self.ctx.sessions.user(token)
                self.service.chat_reset(session)
            except Exception:  # forgetting is best effort: a new id starts afresh anyway
                pass
        return [], "", None

    def ask(self, token, session, question, history, case: OpenCase | None, use_case: bool):
        history = list(history or [])
        question = (question or "").strip()
        try:
            self.ctx.sessions.user(token)
            if not question:
                raise InvalidInput("Please type a question.")
            if len(question) > MAX_QUESTION:
                raise InvalidInput(f"Questions are limited to {MAX_QUESTION} characters.")
        except Exception as exc:
            yield history, question, html.notice("error", friendly(exc, "the assistant")), session
            return
        session = session or new_session_id()
        history.append({"role": "user", "content": question})
        history.append({"role": "assistant", "content": "…"})
        yield history, "", "", session
        prediction = case.prediction if (case is not None and use_case) else None
        explanation = case.explanation if (case is not None and use_case) else None
        try:
            for piece in self.service.chat(question, session, prediction, explanation):
                text = with_sources(piece) if isinstance(piece, ChatAnswer) else piece
                history[-1] = {"role": "assistant", "content": text}
                yield history, "", "", session
        except Exception as exc:
            history.pop()
            yield history, question, html.notice("error", friendly(exc, "the assistant")), session
