"""Assistant: questions answered by the service's chat endpoint, with the open case as context."""

from __future__ import annotations

import hashlib

import gradio as gr

from ui import html
from ui.charts import pretty_label
from ui.context import UiContext
from ui.errors import InvalidInput
from ui.messages import friendly
from ui.pages.diagnose import OpenCase
from ui.service import DiagnosisService

MAX_QUESTION = 2000
WELCOME = (
    "Ask about the current result, how to read Grad-CAM or SHAP, the model's performance or "
    "its privacy guarantee. Answers come from the project's documentation and the open case; "
    "they are not medical advice."
)


def chat_session_id(token: str) -> str:
    """A stable id for this sign-in's conversation that does not reveal the session token."""
    return "ui-" + hashlib.sha256(f"chat:{token}".encode()).hexdigest()[:24]


def case_line(case: OpenCase | None) -> str:
    if case is None:
        return html.notice("info", "No case open: answers will not refer to a specific image.")
    p = case.prediction
    return html.notice(
        "info",
        f"Context: case #{case.case_id} — {pretty_label(p.label)} ({html.percent(p.confidence)}).",
    )


class AssistantPage:
    def __init__(self, ctx: UiContext, service: DiagnosisService) -> None:
        self.ctx = ctx
        self.service = service

    def build(self, token: gr.State, case: gr.State) -> None:
        self.context = gr.HTML(case_line(None), elem_id="of-chat-context")
        self.chatbot = gr.Chatbot(
            label="Assistant",
            height=420,
            placeholder=WELCOME,
            elem_id="of-chat",
            feedback_options=None,
        )
        with gr.Row():
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
            self.clear_button = gr.Button("New conversation", scale=0, min_width=160)
        self.notice = gr.HTML()
        inputs = [token, self.question, self.chatbot, case, self.use_case]
        outputs = [self.chatbot, self.question, self.notice]
        for trigger in (self.ask_button.click, self.question.submit):
            trigger(self.ask, inputs, outputs, api_visibility="private")
        self.clear_button.click(
            lambda: ([], ""), None, [self.chatbot, self.notice], api_visibility="private"
        )
        self.case_state = case

    def ask(self, token, question, history, case: OpenCase | None, use_case: bool):
        history = list(history or [])
        question = (question or "").strip()
        try:
            self.ctx.sessions.user(token)
            if not question:
                raise InvalidInput("Please type a question.")
            if len(question) > MAX_QUESTION:
                raise InvalidInput(f"Questions are limited to {MAX_QUESTION} characters.")
        except Exception as exc:
            yield history, question, html.notice("error", friendly(exc, "the assistant"))
            return
        history.append({"role": "user", "content": question})
        history.append({"role": "assistant", "content": "…"})
        yield history, "", ""
        context = case.assistant_context() if (case is not None and use_case) else None
        try:
            # The service adapter yields the whole answer so far, each time it grows.
            for text in self.service.chat(question, context, chat_session_id(token)):
                history[-1] = {"role": "assistant", "content": text}
                yield history, "", ""
        except Exception as exc:
            history.pop()
            yield history, question, html.notice("error", friendly(exc, "the assistant"))
