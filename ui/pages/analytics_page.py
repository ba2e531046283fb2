"""Analytics (admins): usage and feedback-based quality from the stored cases; operations
(processing time, each clinician's activity, the drift alert) and the feedback export."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from ui import analytics, html
from ui.charts import class_mix_chart, confidence_chart, per_day_chart, pretty_label
from ui.context import UiContext
from ui.feedback_export import export_feedback
from ui.gateway import ServiceGateway
from ui.messages import friendly
from ui.pages.history import when

DEFAULT_THRESHOLD = 0.6


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f} ms"


class AnalyticsPage:
    def __init__(self, ctx: UiContext, service: ServiceGateway | None = None) -> None:
        self.ctx = ctx
        self.service = service

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
        self.drift = gr.HTML(elem_id="of-drift")
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
        gr.HTML('<div class="of-section-title">Activity per clinician (audit log)</div>')
        self.activity = gr.Dataframe(
            elem_classes="of-table", interactive=False, elem_id="of-activity"
        )
        with gr.Accordion("Export confirmed labels as a new dataset of this site", open=False):
            gr.Markdown(
                "Cases with clinician feedback become `<site>-feedback-v<N>/<label>/<image>` "
                "under the workspace's `feedback-datasets/` folder, with a content-hash "
                "manifest: ingest it with `dataset.adapter=folder` for the next training or "
                "federated round. Each export is audited."
            )
            with gr.Row():
                self.site = gr.Textbox(label="Site name", value="site", scale=2)
                self.export_button = gr.Button("Export", scale=0, elem_id="of-export")
            self.export_notice = gr.HTML(elem_id="of-export-notice")
        self.export_button.click(
            self.export, [token, self.site], [self.export_notice], api_visibility="private"
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
            self.drift,
            self.activity,
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
                "",
                empty,
            )
        threshold = float(threshold or DEFAULT_THRESHOLD)
        classes = sorted({k for c in cases for k in c.probabilities})
        per_class, overall = analytics.feedback_accuracy(cases, classes)
        low = analytics.low_confidence(cases, threshold)
        rate = analytics.feedback_rate(cases)
        speed = analytics.processing_time(cases)
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
                ("Processing time p50", _ms(speed.p50)),
                ("Processing time p95", _ms(speed.p95)),
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
            self._drift(cases),
            self._activity(admin),
        )

    def _drift(self, cases) -> str:
        try:
            card = self.service.model_card() if self.service else None
        except Exception as exc:
            return html.notice("warn", "Drift check unavailable: " + friendly(exc, "model card"))
        reference = analytics.test_distribution(card.metrics if card else {})
        check = analytics.drift(cases, reference)
        kind = "error" if check.alert else ("ok" if check.distance is not None else "info")
        advice = (
            " The cases seen here differ from what the model was tested on: review recent "
            "results, and consider re-validating or retraining on this site's data."
            if check.alert
            else ""
        )
        return html.notice(kind, "Drift: " + check.message + advice)

    def _activity(self, admin) -> pd.DataFrame:
        names = {u.id: u.username for u in self.ctx.accounts.list_users(admin)}
        rows = analytics.activity(self.ctx.audit.entries(), names)
        columns = ["Clinician", *analytics.ACTIVITY.values()]
        return pd.DataFrame([[name, *counts.values()] for name, counts in rows], columns=columns)

    def export(self, token, site):
        try:
            admin = self.ctx.sessions.admin(token)
            root = self.ctx.config.workspace / "feedback-datasets"
            result = export_feedback(self.ctx.cases, admin, root, (site or "").strip())
        except Exception as exc:
            return html.notice("error", friendly(exc, "the feedback export"))
        counts = ", ".join(f"{pretty_label(c)}: {n}" for c, n in result.classes.items())
        skipped = ", ".join(f"{n} {why}" for why, n in result.skipped.items())
        return html.notice(
            "ok",
            f"Exported version {result.version}: {result.files} images ({counts}) to "
            f"{result.path.name}/ · content hash {result.content_hash[:16]}…"
            + (f" · left out: {skipped}" if skipped else ""),
        )
