"""My results (patients): their own cases, released results in plain language, the released
PDF, questions to the clinician and the answers. Every handler asks `sessions.patient` and
`ui.care`, which check the account owns the case; the dropdown is a convenience, not a guard."""

from __future__ import annotations

import html as html_escape
import tempfile
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from ui import html
from ui.care import PatientCase
from ui.charts import pretty_label
from ui.context import UiContext
from ui.errors import InvalidInput
from ui.messages import friendly
from ui.pages.history import when
from ui.pages.worklist_page import case_number

REPORT_MAX_AGE_S = 1800
KIND_WORDS = {
    "png": "an image",
    "jpeg": "an image",
    "dicom": "a scan (DICOM image)",
    "record": "your clinical information",
}


def result_html(case: PatientCase) -> str:
    """The released result in plain words; a short 'not ready' note otherwise."""
    looked_at = KIND_WORDS.get(case.input_kind, "an image")
    if not case.released:
        return html.notice(
            "info",
            f"Case #{case.case_id} ({when(case.created_at)} UTC): your clinician has not "
            "released this result yet. You will see it here once they have reviewed it.",
        )
    label = pretty_label(case.label or "")
    unsure = ""
    if case.refer:
        unsure = (
            "<p>The computer program was <b>not certain</b> about this result, so it asked for "
            "a specialist to look at it.</p>"
        )
    others = [pretty_label(c) for c in (case.prediction_set or []) if c != case.label]
    if others:
        unsure += f"<p>It could not rule out: {', '.join(others)}.</p>"
    note = (
        f"<p><b>Your clinician's note:</b> {html_escape.escape(case.note)}</p>"
        if case.note
        else "<p>Your clinician did not add a note.</p>"
    )
    return (
        f"<div id='of-p-card' class='of-card'><h3>Your result · case #{case.case_id}</h3>"
        f"<p><b>What was looked at:</b> {looked_at}, taken on {when(case.created_at)} UTC.</p>"
        f"<p><b>What the computer program suggested:</b> {html_escape.escape(label)} "
        f"(it gave this {html.percent(case.confidence or 0.0)} likelihood). Such programs "
        "support doctors; they do not make a diagnosis on their own.</p>"
        f"{unsure}"
        f"<p><b>A clinician reviewed this result</b> and released it to you on "
        f"{when(case.released_at or 0)} UTC.</p>{note}"
        "<p>If anything is unclear, ask your clinician below.</p></div>"
    )


def cases_frame(cases: list[PatientCase]) -> pd.DataFrame:
    rows = [
        [
            c.case_id,
            when(c.created_at),
            "Result ready" if c.released else "Waiting for your clinician",
        ]
        for c in cases
    ]
    return pd.DataFrame(rows, columns=["Case #", "Date (UTC)", "Status"])


def thread_html(questions) -> str:
    if not questions:
        return ""
    parts = []
    for q in questions:
        answer = (
            f"<div class='of-answer'><b>Your clinician answered:</b> "
            f"{html_escape.escape(q.answer)}</div>"
            if q.answered
            else "<div class='of-answer'><i>Waiting for an answer.</i></div>"
        )
        parts.append(
            f"<div class='of-question'><b>You asked</b> ({when(q.asked_at)} UTC): "
            f"{html_escape.escape(q.body)}</div>{answer}"
        )
    return "".join(parts)


class PatientPage:
    def __init__(self, ctx: UiContext) -> None:
        self.ctx = ctx
        self.reports_dir = Path(tempfile.mkdtemp(prefix="oncoflow-ui-released-"))

    def build(self, token: gr.State) -> None:
        gr.HTML(
            "<h2 style='margin:0'>My results</h2><div style='color:#6b7280;font-size:13px'>"
            "Only results your clinician has reviewed and released are shown.</div>"
        )
        self.table = gr.Dataframe(
            elem_classes="of-table", interactive=False, elem_id="of-p-cases", max_height=240
        )
        with gr.Row():
            self.case = gr.Dropdown(
                choices=[],
                label="Case",
                allow_custom_value=True,
                scale=3,
                elem_id="of-p-case",
            )
            self.open_button = gr.Button("Open", scale=0, min_width=100, elem_id="of-p-open")
        self.result = gr.HTML(elem_id="of-p-result")
        self.download = gr.DownloadButton(
            "Download the report (PDF)", visible=False, elem_id="of-p-download"
        )
        gr.HTML('<div class="of-section-title">Questions to your clinician</div>')
        self.thread = gr.HTML(elem_id="of-p-thread")
        self.question = gr.Textbox(
            label="Your question", lines=2, max_length=1000, elem_id="of-p-question"
        )
        self.ask_button = gr.Button("Send question", elem_id="of-p-ask")
        self.notice = gr.HTML(elem_id="of-p-notice")
        with gr.Accordion("Add another case with an invitation code", open=False):
            self.code = gr.Textbox(label="Invitation code", max_lines=1, elem_id="of-p-code")
            self.redeem_button = gr.Button("Add case", elem_id="of-p-redeem")

        self.inputs = [token]
        self.outputs = [self.table, self.case]
        case_outputs = [self.result, self.download, self.thread, self.notice]
        for trigger in (self.open_button.click, self.case.select):
            trigger(self.open_case, [token, self.case], case_outputs, api_visibility="private")
        self.ask_button.click(
            self.ask,
            [token, self.case, self.question],
            [self.thread, self.notice, self.question],
            api_visibility="private",
        )
        self.redeem_button.click(
            self.redeem,
            [token, self.code],
            [*self.outputs, self.notice, self.code],
            api_visibility="private",
        )

    def refresh(self, token):
        try:
            patient = self.ctx.sessions.patient(token)
            cases = self.ctx.care.my_cases(patient)
        except Exception:  # signed out meanwhile: the session check says so
            return gr.update(), gr.update(choices=[], value=None)
        choices = [(f"Case #{c.case_id} · {when(c.created_at)}", str(c.case_id)) for c in cases]
        return cases_frame(cases), gr.update(
            choices=choices, value=choices[0][1] if choices else None
        )

    def open_case(self, token, number):
        try:
            patient = self.ctx.sessions.patient(token)
            case = self.ctx.care.view(patient, case_number(number))
            questions = self.ctx.care.questions(patient, case.case_id)
            download = gr.update(visible=False, value=None)
            if case.released and case.input_kind != "record":
                self._sweep()
                path = self.reports_dir / f"oncoflow-result-case-{case.case_id}.pdf"
                path.write_bytes(self.ctx.care.report(patient, case.case_id))
                download = gr.update(visible=True, value=str(path))
        except Exception as exc:
            return (
                "",
                gr.update(visible=False, value=None),
                "",
                html.notice("error", friendly(exc, "your result")),
            )
        return result_html(case), download, thread_html(questions), ""

    def _sweep(self, max_age_s: float = REPORT_MAX_AGE_S) -> None:
        """Delete report copies older than `max_age_s` (Gradio serves its own cached copy)."""
        cutoff = time.time() - max_age_s
        for old in self.reports_dir.glob("*.pdf"):
            try:
                if old.stat().st_mtime < cutoff:
                    old.unlink()
            except FileNotFoundError:
                pass

    def ask(self, token, number, text):
        try:
            patient = self.ctx.sessions.patient(token)
            question = self.ctx.care.ask(patient, case_number(number), text or "")
            questions = self.ctx.care.questions(patient, question.case_id)
        except Exception as exc:
            return gr.update(), html.notice("error", friendly(exc, "your question")), gr.update()
        return (
            thread_html(questions),
            html.notice("ok", "Your question was sent. Your clinician will answer here."),
            "",
        )

    def redeem(self, token, code):
        try:
            patient = self.ctx.sessions.patient(token)
            if not (code or "").strip():
                raise InvalidInput("Please enter the code from your clinician.")
            case = self.ctx.care.redeem(patient, code)
        except Exception as exc:
            return gr.update(), gr.update(), html.notice("error", friendly(exc, "the code")), ""
        table, choices = self.refresh(token)
        return table, choices, html.notice("ok", f"Case #{case.case_id} added."), ""
