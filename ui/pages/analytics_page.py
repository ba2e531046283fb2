"""Analytics (admins): usage and feedback-based quality, computed from the stored cases."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from ui import analytics, html
from ui.charts import class_mix_chart, confidence_chart, per_day_chart, pretty_label
from ui.context import UiContext
from ui.messages import friendly
from ui.pages.history import when

DEFAULT_THRESHOLD = 0.6


class AnalyticsPage:
    def __init__(self, ctx: UiContext) -> None:
        self.ctx = ctx

    def build(self, token: gr.State) -> None:
        with gr.Row():
            self.refresh_button = gr.Button(
                "Refresh", scale=0, min_width=140, elem_id="of-a-refresh"
            )
            self.threshold = gr.Slider(
                0.3,
                0.95,
                DEFAULT_THRESHOLD,
                step=0.05,
                label="Low-confidence threshold",
                scale=3,
            )
        self.notice = gr.HTML()
        self.kpis = gr.HTML(elem_id="of-kpis")
        with gr.Row():
            self.per_day = gr.Plot(show_label=False, elem_id="of-per-day")
            self.mix = gr.Plot(show_label=False, elem_id="of-mix")
        with gr.Row():
            self.confidence = gr.Plot(show_label=False, elem_id="of-confidence")
            with gr.Column():
                gr.HTML('<div class="of-section-title">Feedback-based accuracy per class</div>')
                self.accuracy = gr.Dataframe(
                    elem_classes="of-table", interactive=False, elem_id="of-accuracy"
                )
                gr.Markdown(
                    "Among cases a clinician rated: how often the prediction matched the true "
                    "label they gave, per true class. Unrated cases are not counted.",
                )
        gr.HTML('<div class="of-section-title">Low-confidence cases</div>')
        self.low = gr.Dataframe(
            elem_classes="of-table", interactive=False, elem_id="of-low", max_height=320
        )
        self.inputs = [token, self.threshold]
        self.outputs = [
            self.notice,
            self.kpis,
            self.per_day,
            self.mix,
            self.confidence,
            self.accuracy,
            self.low,
        ]
        for trigger in (self.refresh_button.click, self.threshold.release):
            trigger(self.refresh, self.inputs, self.outputs, api_visibility="private")

    def refresh(self, token, threshold: float):
        try:
            admin = self.ctx.sessions.admin(token)  # role re-checked server-side
            cases = self.ctx.cases.all_cases(admin)
        except Exception as exc:
            empty = pd.DataFrame()
            return (
                html.notice("error", friendly(exc, "analytics")),
                "",
                None,
                None,
                None,
                empty,
                empty,
            )
        threshold = float(threshold or DEFAULT_THRESHOLD)
        classes = sorted({k for c in cases for k in c.probabilities})
        per_class, overall = analytics.feedback_accuracy(cases, classes)
        low = analytics.low_confidence(cases, threshold)
        rate = analytics.feedback_rate(cases)
        kpis = html.kpis(
            [
                ("Predictions", str(len(cases))),
                ("Clinicians", str(len({c.user_id for c in cases}))),
                ("Rated by a clinician", "—" if rate is None else f"{100 * rate:.0f}%"),
                (
                    "Feedback-based accuracy",
                    "—"
                    if overall.accuracy is None
                    else f"{100 * overall.accuracy:.0f}% ({overall.correct}/{overall.rated})",
                ),
                (f"Below {100 * threshold:.0f}% confidence", str(len(low))),
            ]
        )
        accuracy = pd.DataFrame(
            [
                [
                    pretty_label(r.label),
                    r.rated,
                    r.correct,
                    "—" if r.accuracy is None else f"{100 * r.accuracy:.0f}%",
                ]
                for r in [*per_class, overall]
            ],
            columns=["True class", "Rated", "Correct", "Accuracy"],
        )
        low_frame = pd.DataFrame(
            [
                [
                    c.id,
                    when(c.created_at),
                    c.case_ref or "",
                    c.username,
                    pretty_label(c.label),
                    html.percent(c.confidence),
                ]
                for c in low
            ],
            columns=["Case #", "Date (UTC)", "Case id", "Clinician", "Prediction", "Confidence"],
        )
        return (
            "",
            kpis,
            per_day_chart(analytics.predictions_per_day(cases)),
            class_mix_chart(analytics.class_mix(cases, classes)),
            confidence_chart(analytics.confidence_histogram(cases), threshold),
            accuracy,
            low_frame,
        )
