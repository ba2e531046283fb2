"""Worklist (clinicians and admins): open cases riskiest first; review, release to the patient,
invite the patient, answer the patient's questions."""

from __future__ import annotations

import html as html_escape

import gradio as gr
import pandas as pd

from ui import html
from ui.cases import Case
from ui.charts import pretty_label
from ui.context import UiContext
from ui.errors import InvalidInput
from ui.gateway import ServiceGateway
from ui.messages import friendly
from ui.pages.history import parse_day, when
from ui.worklist import STATUS_CHOICES, WorkItem, WorklistFilter, worklist

KIND_FILENAMES = {"png": "image.png", "jpeg": "image.jpg", "dicom": "image.dcm"}
COLUMNS = [
    "Case #",
    "Case id",
    "Date (UTC)",
    "Prediction",
    "Risk",
    "Referral",
    "Status",
    "Patient",
    "Questions",
]


def risk_text(case: Case) -> str:
    return "—" if case.danger is None else html.percent(case.danger)


def referral_text(case: Case) -> str:
    return {True: "Refer", False: "", None: "—"}[case.refer]


def worklist_frame(items: list[WorkItem]) -> pd.DataFrame:
    rows = [
        [
            i.case.id,
            i.case.case_ref or "",
            when(i.case.created_at),
            pretty_label(i.case.label),
            risk_text(i.case),
            referral_text(i.case),
            i.case.status,
            "linked" if i.case.patient_account else "",
            f"{i.open_questions} waiting" if i.open_questions else "",
        ]
        for i in items
    ]
    return pd.DataFrame(rows, columns=COLUMNS)


def case_number(value) -> int:
    try:
        number = int(str(value).strip().lstrip("#"))
    except (TypeError, ValueError) as exc:
        raise InvalidInput("Enter a case number from the worklist.") from exc
    if number < 1:
        raise InvalidInput("Enter a case number from the worklist.")
    return number


def thread_html(questions) -> str:
    if not questions:
        return html.notice("info", "No questions from the patient on this case.")
    parts = []
    for q in questions:
        answer = (
            f"<div class='of-answer'><b>Answer</b> ({when(q.answered_at)} UTC): "
            f"{html_escape.escape(q.answer)}</div>"
            if q.answered
            else "<div class='of-answer'><i>Not answered yet.</i></div>"
        )
        parts.append(
            f"<div class='of-question'><b>Question #{q.id}</b> ({when(q.asked_at)} UTC): "
            f"{html_escape.escape(q.body)}</div>{answer}"
        )
    return "<div id='of-thread'>" + "".join(parts) + "</div>"


class WorklistPage:
    def __init__(self, ctx: UiContext, service: ServiceGateway) -> None:
        self.ctx = ctx
        self.service = service

    def build(self, token: gr.State) -> None:
        with gr.Row():
            self.status = gr.Dropdown(
                list(STATUS_CHOICES), value="open", label="Status", scale=2, elem_id="of-w-status"
            )
            self.mine = gr.Checkbox(label="Assigned to me", value=False, scale=1)
            self.since = gr.Textbox(label="From date", placeholder="YYYY-MM-DD", scale=2)
            self.until = gr.Textbox(label="To date", placeholder="YYYY-MM-DD", scale=2)
            self.refresh_button = gr.Button(
                "Refresh", variant="primary", scale=0, min_width=120, elem_id="of-w-refresh"
            )
        self.summary = gr.HTML(elem_id="of-w-summary")
        self.table = gr.Dataframe(
            value=pd.DataFrame(columns=COLUMNS),
            elem_classes="of-table",
            interactive=False,
            wrap=True,
            elem_id="of-worklist",
            max_height=360,
        )
        gr.HTML(
            "<div style='color:#6b7280;font-size:13px'>Risk: the model's probability of the "
            "classes its card names dangerous (— when it names none). Open: new or reviewed, "
            "or released with a patient question waiting.</div>"
        )
        with gr.Row(equal_height=False):
            with gr.Column(variant="panel"):
                gr.HTML('<div class="of-section-title">Case</div>')
                with gr.Row():
                    self.case = gr.Textbox(label="Case #", scale=2, elem_id="of-w-case")
                    self.open_button = gr.Button("Open", scale=0, min_width=90, elem_id="of-w-open")
                self.case_box = gr.HTML(elem_id="of-w-case-box")
                with gr.Row():
                    self.review_button = gr.Button("Mark reviewed", elem_id="of-w-review")
                    self.invite_button = gr.Button("Invite patient", elem_id="of-w-invite")
                self.release_note = gr.Textbox(
                    label="Note for the patient (shown with the released result)",
                    lines=2,
                    max_length=1000,
                    elem_id="of-w-note",
                    placeholder="Plain words; no other patient's details.",
                )
                self.release_button = gr.Button(
                    "Release to patient", variant="primary", elem_id="of-w-release"
                )
            with gr.Column(variant="panel"):
                gr.HTML('<div class="of-section-title">Patient questions</div>')
                self.thread = gr.HTML(elem_id="of-w-thread")
                self.question = gr.Dropdown(
                    choices=[], label="Question to answer", elem_id="of-w-question"
                )
                self.answer = gr.Textbox(
                    label="Your answer", lines=3, max_length=1000, elem_id="of-w-answer"
                )
                self.answer_button = gr.Button("Send answer", elem_id="of-w-send-answer")
        self.notice = gr.HTML(elem_id="of-w-notice")

        self.inputs = [token, self.status, self.mine, self.since, self.until]
        self.outputs = [self.table, self.summary]
        self.refresh_button.click(self.refresh, self.inputs, self.outputs, api_visibility="private")
        case_outputs = [self.case_box, self.thread, self.question, self.notice]
        for trigger in (self.open_button.click, self.case.submit):
            trigger(self.open_case, [token, self.case], case_outputs, api_visibility="private")
        self.review_button.click(
            self.review, [token, self.case], case_outputs, api_visibility="private"
        ).then(self.refresh, self.inputs, self.outputs, api_visibility="private")
        self.release_button.click(
            self.release,
            [token, self.case, self.release_note],
            [*case_outputs, self.release_note],
            api_visibility="private",
        ).then(self.refresh, self.inputs, self.outputs, api_visibility="private")
        self.invite_button.click(
            self.invite, [token, self.case], case_outputs, api_visibility="private"
        )
        self.answer_button.click(
            self.send_answer,
            [token, self.case, self.question, self.answer],
            [*case_outputs, self.answer],
            api_visibility="private",
        ).then(self.refresh, self.inputs, self.outputs, api_visibility="private")

    # ------------------------------------------------------------------ handlers

    def refresh(self, token, status, mine, since, until):
        try:
            user = self.ctx.sessions.user(token)
            filters = WorklistFilter(
                status=status or "open",
                mine=bool(mine),
                since=parse_day(since, "From"),
                until=parse_day(until, "To"),
            )
            items = worklist(self.ctx.cases, user, filters, self.ctx.care.open_questions(user))
        except Exception as exc:
            return gr.update(), html.notice("error", friendly(exc, "the worklist"))
        waiting = sum(i.open_questions for i in items)
        summary = f"{len(items)} case{'s' if len(items) != 1 else ''}, riskiest first"
        if waiting:
            summary += f"; {waiting} patient question{'s' if waiting != 1 else ''} waiting"
        return worklist_frame(items), html.notice("info", summary + ".")

    def _show(self, user, case: Case, message: str = "", kind: str = "ok"):
        questions = self.ctx.care.questions(user, case.id)
        open_ones = [(f"#{q.id}: {q.body[:60]}", q.id) for q in questions if not q.answered]
        box = html.kpis(
            [
                ("Case", f"#{case.id}" + (f" · {case.case_ref}" if case.case_ref else "")),
                ("Prediction", pretty_label(case.label)),
                ("Risk", risk_text(case)),
                ("Referral", referral_text(case) or "no"),
                ("Status", case.status),
                ("Patient", self._patient_state(user, case)),
            ]
        )
        return (
            box,
            thread_html(questions),
            gr.update(choices=open_ones, value=open_ones[0][1] if open_ones else None),
            html.notice(kind, message) if message else "",
        )

    def _patient_state(self, user, case: Case) -> str:
        if case.patient_account:
            return "signed up"
        return "invited" if self.ctx.care.invitation_pending(user, case.id) else "not invited"

    def _fail(self, exc: Exception, what: str, extra: int = 0):
        return (
            gr.update(),
            gr.update(),
            gr.update(),
            html.notice("error", friendly(exc, what)),
        ) + ((gr.update(),) * extra)

    def open_case(self, token, number):
        try:
            user = self.ctx.sessions.user(token)
            case = self.ctx.cases.get(user, case_number(number))
            return self._show(user, case)
        except Exception as exc:
            return self._fail(exc, "the case")

    def review(self, token, number):
        try:
            user = self.ctx.sessions.user(token)
            case = self.ctx.cases.move(user, case_number(number), "reviewed")
            return self._show(user, case, f"Case #{case.id} marked as reviewed.")
        except Exception as exc:
            return self._fail(exc, "the review")

    def release(self, token, number, note):
        """Release to the patient: the PDF the patient will download is made now, from the
        case's stored image, and kept with the case."""
        try:
            user = self.ctx.sessions.user(token)
            case = self.ctx.cases.get(user, case_number(number))
            if case.status != "reviewed":
                raise InvalidInput(f"Case #{case.id} is {case.status}; review it before release.")
            report = b""
            if case.input_kind != "record":
                image, kind = self.ctx.cases.image(user, case.id)
                report = self.service.report(
                    image, None, case.case_ref or f"UI-{case.id}", KIND_FILENAMES.get(kind, "image")
                )
            case = self.ctx.cases.move(user, case.id, "released", note or "", report)
            return (*self._show(user, case, f"Case #{case.id} released to the patient."), "")
        except Exception as exc:
            return self._fail(exc, "the release", extra=1)

    def invite(self, token, number):
        try:
            user = self.ctx.sessions.user(token)
            invitation = self.ctx.care.invite(user, case_number(number))
            case = self.ctx.cases.get(user, invitation.case_id)
            box, thread, question, _ = self._show(user, case)
            code = (
                f"<div id='of-w-code' class='of-code'>Invitation code for case #{case.id}: "
                f"<b>{invitation.code}</b><br>Give it to the patient in person or by letter; it "
                f"works once, until {when(invitation.expires_at)} UTC. It is not shown again.</div>"
            )
            return box, thread, question, code
        except Exception as exc:
            return self._fail(exc, "the invitation")

    def send_answer(self, token, number, question_id, text):
        try:
            user = self.ctx.sessions.user(token)
            if not question_id:
                raise InvalidInput("Choose a question to answer.")
            self.ctx.care.answer(user, int(question_id), text or "")
            case = self.ctx.cases.get(user, case_number(number))
            return (*self._show(user, case, "Your answer was sent to the patient."), "")
        except Exception as exc:
            return self._fail(exc, "the answer", extra=1)
