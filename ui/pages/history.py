"""History: the user's past cases (an admin's: everyone's), filtered and searched."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime

import gradio as gr
import pandas as pd

from ui import html
from ui.cases import FEEDBACK_STATES, Case, CaseFilter
from ui.charts import pretty_label
from ui.context import UiContext
from ui.errors import InvalidInput
from ui.messages import friendly

WIDTHS = {
    "Case #": "72px",
    "Date (UTC)": "140px",
    "Case id": "110px",
    "Clinician": "110px",
    "Prediction": "140px",
    "Confidence": "104px",
    "Feedback": "100px",
    "True label": "140px",
    "Note": "220px",
    "Model": "140px",
}
COLUMNS = [
    "Case #",
    "Date (UTC)",
    "Case id",
    "Clinician",
    "Prediction",
    "Confidence",
    "Feedback",
    "True label",
    "Note",
    "Model",
]


def when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M")


def feedback_word(case: Case) -> str:
    if case.feedback_agree is None:
        return "—"
    return "Agreed" if case.feedback_agree else "Disagreed"


def cases_frame(cases: Sequence[Case], show_user: bool) -> pd.DataFrame:
    rows = [
        [
            c.id,
            when(c.created_at),
            c.case_ref or "",
            c.username,
            pretty_label(c.label),
            html.percent(c.confidence),
            feedback_word(c),
            pretty_label(c.true_label) if c.true_label else "",
            c.feedback_note or "",
            f"{c.model_name} v{c.model_version}" if c.model_version else c.model_name,
        ]
        for c in cases
    ]
    frame = pd.DataFrame(rows, columns=COLUMNS)
    return frame if show_user else frame.drop(columns=["Clinician"])


def parse_day(text: str, what: str) -> date | None:
    text = (text or "").strip()
    if not text:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise InvalidInput(f"{what} must be a date like 2025-01-31.") from exc


class HistoryPage:
    def __init__(self, ctx: UiContext) -> None:
        self.ctx = ctx

    def build(self, token: gr.State) -> None:
        with gr.Row():
            self.text = gr.Textbox(label="Search case id or note", scale=3, elem_id="of-h-text")
            self.label = gr.Dropdown(
                choices=[("Any", "")],
                value="",
                label="Prediction",
                scale=2,
                elem_id="of-h-label",
            )
            self.feedback = gr.Dropdown(
                choices=list(FEEDBACK_STATES),
                value="any",
                label="Feedback",
                scale=2,
                elem_id="of-h-feedback",
            )
            self.since = gr.Textbox(label="From date", placeholder="YYYY-MM-DD", scale=2)
            self.until = gr.Textbox(label="To date", placeholder="YYYY-MM-DD", scale=2)
            self.user = gr.Textbox(label="Clinician (admins)", scale=2, visible=False)
        with gr.Row():
            self.search_button = gr.Button(
                "Search", variant="primary", scale=0, min_width=140, elem_id="of-h-search"
            )
            self.summary = gr.HTML()
        self.table = gr.Dataframe(
            elem_classes="of-table",
            value=pd.DataFrame(columns=COLUMNS),
            interactive=False,
            wrap=True,
            elem_id="of-history",
            max_height=520,
        )
        inputs = [token, self.text, self.label, self.feedback, self.since, self.until, self.user]
        outputs = [self.table, self.summary, self.label, self.user]
        for trigger in (self.search_button.click, self.text.submit):
            trigger(self.search, inputs, outputs, api_visibility="private")
        self.inputs, self.outputs = inputs, outputs

    def search(self, token, text, label, feedback, since, until, username):
        try:
            viewer = self.ctx.sessions.user(token)
            filters = CaseFilter(
                text=text or "",
                label=label or "",
                feedback=feedback or "any",
                username=(username or "") if viewer.is_admin else "",
                since=parse_day(since, "From"),
                until=parse_day(until, "To"),
            )
            cases = self.ctx.cases.search(viewer, filters)
            labels = sorted({c.label for c in self.ctx.cases.search(viewer)})
        except Exception as exc:
            return (
                gr.update(),
                html.notice("error", friendly(exc, "the history")),
                gr.update(),
                gr.update(),
            )
        whose = "all users" if viewer.is_admin else "you"
        summary = html.notice(
            "info", f"{len(cases)} case{'s' if len(cases) != 1 else ''} (made by {whose})."
        )
        frame = cases_frame(cases, viewer.is_admin)
        return (
            gr.Dataframe(value=frame, column_widths=[WIDTHS[c] for c in frame.columns]),
            summary,
            gr.update(choices=[("Any", ""), *[(pretty_label(x), x) for x in labels]]),
            gr.update(visible=viewer.is_admin),
        )
