"""Diagnose: upload an image (+ clinical fields when the model takes them), see the prediction,
Grad-CAM, SHAP and similar cases, download the PDF report and give feedback."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from ui import html
from ui.cases import check_case_ref, input_kind
from ui.charts import pretty_label, probability_chart
from ui.clinical import NO, YES, field_info, field_label, record_from_fields
from ui.context import UiContext
from ui.errors import InvalidInput
from ui.images import blend, preview
from ui.messages import friendly
from ui.service import DiagnosisService, Explanation, Prediction

log = logging.getLogger(__name__)

AGREE, DISAGREE = "Agree", "Disagree"
DEFAULT_OPACITY = 0.45
SIMILAR_K = 6
KIND_FILENAMES = {"png": "image.png", "jpeg": "image.jpg", "dicom": "image.dcm"}
PROGRESS = gr.Progress()  # marker default: Gradio passes a live tracker per call
EMPTY_RESULT = html.notice("info", "Upload an image and press “Analyse image” to see the result.")


@dataclass
class OpenCase:
    """The case on screen (kept server-side in a gr.State; never sent to the browser)."""

    case_id: int
    case_ref: str | None
    image: bytes
    kind: str
    base: Image.Image
    clinical: dict[str, Any]
    prediction: Prediction
    explanation: Explanation | None = None
    similar: list = field(default_factory=list)

    @property
    def filename(self) -> str:
        return KIND_FILENAMES[self.kind]

    def assistant_context(self, model_card: dict | None = None) -> dict[str, Any]:
        """The case as the assistant's chat endpoint takes it (no identifiers)."""
        context: dict[str, Any] = {
            "predicted_label": self.prediction.label,
            "probabilities": self.prediction.probabilities,
        }
        if self.explanation is not None:
            if self.explanation.cam_summary:
                context["gradcam_summary"] = self.explanation.cam_summary[:500]
            if self.explanation.shap_features:
                context["shap_features"] = [
                    {"name": f["name"], "value": f["value"]}
                    for f in self.explanation.shap_features[:20]
                    if "name" in f and "value" in f
                ]
        if model_card:
            context["model_card"] = model_card
        return context


def read_upload(path: str | None) -> bytes:
    if not path:
        raise InvalidInput("Please choose an image file first.")
    data = Path(path).read_bytes()
    if not data:
        raise InvalidInput("The file is empty.")
    return data


class DiagnosePage:
    def __init__(self, ctx: UiContext, service: DiagnosisService) -> None:
        self.ctx = ctx
        self.service = service
        self.reports_dir = Path(tempfile.mkdtemp(prefix="oncoflow-ui-reports-"))

    # ------------------------------------------------------------------ layout

    def build(self, token: gr.State) -> None:
        self.token = token
        self.case = gr.State(None)
        self.schema = gr.State([])
        with gr.Row(equal_height=False):
            with gr.Column(scale=4, min_width=340):
                gr.HTML('<div class="of-section-title">1 · Image and case</div>')
                self.upload = gr.File(
                    label="Image (PNG, JPEG or DICOM)",
                    file_types=[".png", ".jpg", ".jpeg", ".dcm", ".dicom"],
                    type="filepath",
                    elem_id="of-upload",
                )
                self.preview = gr.Image(
                    label="Preview", interactive=False, height=260, buttons=[], elem_id="of-preview"
                )
                self.case_ref = gr.Textbox(
                    label="Case id (optional)",
                    placeholder="e.g. TB-0412",
                    info="A pseudonymous id only: no names, dates of birth or hospital numbers.",
                    max_lines=1,
                    elem_id="of-case-ref",
                )

                self.fields_box = gr.Column()
                self.analyse_button = gr.Button(
                    "Analyse image", variant="primary", size="lg", elem_id="of-analyse"
                )
                self.notice = gr.HTML(elem_id="of-diagnose-notice")

            with gr.Column(scale=7, min_width=480):
                gr.HTML('<div class="of-section-title">2 · Result</div>')
                self.result = gr.HTML(EMPTY_RESULT, elem_id="of-result-box")
                self.chart = gr.Plot(label="Class probabilities", elem_id="of-probabilities")
                with gr.Tabs():
                    with gr.Tab("Grad-CAM", id="gradcam"):
                        with gr.Row():
                            self.overlay = gr.Image(
                                label="Grad-CAM overlay",
                                interactive=False,
                                height=300,
                                elem_id="of-overlay",
                            )
                            self.heatmap = gr.Image(
                                label="Heatmap (raw)",
                                interactive=False,
                                height=300,
                                elem_id="of-heatmap",
                            )
                        self.opacity = gr.Slider(
                            0.0,
                            1.0,
                            DEFAULT_OPACITY,
                            step=0.05,
                            label="Overlay opacity",
                            elem_id="of-opacity",
                        )
                        self.cam_text = gr.Markdown()
                    with gr.Tab("SHAP", id="shap"):
                        self.shap = gr.Image(
                            label="SHAP attribution",
                            interactive=False,
                            height=300,
                            elem_id="of-shap",
                        )
                        self.shap_text = gr.Markdown()
                    with gr.Tab("Similar cases", id="similar"):
                        self.gallery = gr.Gallery(
                            label="Most similar training images",
                            columns=6,
                            height=220,
                            object_fit="contain",
                            elem_id="of-similar",
                        )
                        self.similar_notice = gr.HTML()
                self.explain_notice = gr.HTML()
                with gr.Row():
                    self.report_button = gr.Button(
                        "Prepare PDF report", elem_id="of-report", interactive=False
                    )
                    self.download = gr.DownloadButton(
                        "Download PDF report",
                        variant="primary",
                        visible=False,
                        elem_id="of-download",
                    )
                self.report_notice = gr.HTML()
                with gr.Accordion("Your feedback on this result", open=True, elem_id="of-fb"):
                    with gr.Row():
                        self.verdict = gr.Radio(
                            [AGREE, DISAGREE],
                            label="Do you agree with the model?",
                            elem_id="of-verdict",
                        )
                        self.true_label = gr.Dropdown(
                            choices=[],
                            label="True label",
                            value=None,
                            elem_id="of-true-label",
                            info="Required when you disagree.",
                        )
                    self.note = gr.Textbox(
                        label="Note (optional)",
                        lines=2,
                        max_length=1000,
                        elem_id="of-note",
                        placeholder="No patient identifiers, please.",
                    )
                    self.send = gr.Button(
                        "Send feedback", elem_id="of-send-feedback", interactive=False
                    )
                    self.feedback_notice = gr.HTML(elem_id="of-feedback-notice")

        with self.fields_box:

            @gr.render(inputs=[self.schema])
            def clinical_fields(schema: list[dict]) -> None:
                inputs = []
                if schema:
                    gr.HTML('<div class="of-section-title">Clinical information</div>')
                    inputs = [self._field(entry) for entry in schema]
                analyse = self.analyse_button.click(
                    self.analyse,
                    [self.token, self.upload, self.case_ref, self.schema, *inputs],
                    self._result_outputs(),
                    show_progress_on=[self.result],
                    api_visibility="private",
                )
                analyse.then(
                    self.explain,
                    [self.token, self.case, self.opacity],
                    [
                        self.overlay,
                        self.heatmap,
                        self.cam_text,
                        self.shap,
                        self.shap_text,
                        self.explain_notice,
                        self.case,
                    ],
                    show_progress_on=[self.overlay, self.shap],
                    api_visibility="private",
                ).then(
                    self.find_similar,
                    [self.token, self.case],
                    [self.gallery, self.similar_notice, self.case],
                    api_visibility="private",
                )

        self.upload.change(
            self.on_upload, [self.upload], [self.preview, self.notice], api_visibility="private"
        )
        self.opacity.change(
            self.reblend,
            [self.case, self.opacity],
            [self.overlay],
            api_visibility="private",
            show_progress="hidden",
        )
        self.report_button.click(
            self.make_report,
            [self.token, self.case],
            [self.download, self.report_notice],
            api_visibility="private",
        )
        self.send.click(
            self.give_feedback,
            [self.token, self.case, self.verdict, self.true_label, self.note],
            [self.feedback_notice],
            api_visibility="private",
        )

    def _field(self, entry: dict):
        label, info = field_label(entry), field_info(entry)
        kind = entry.get("type")
        if kind in ("float", "int"):
            return gr.Number(
                label=label,
                info=info,
                minimum=entry.get("min"),
                maximum=entry.get("max"),
                precision=0 if kind == "int" else None,
                key=f"clin-{entry['name']}",
            )
        if kind == "bool":
            return gr.Radio([YES, NO], label=label, info=info, key=f"clin-{entry['name']}")
        return gr.Dropdown(
            choices=list(entry.get("allowed") or []),
            value=None,
            label=label,
            info=info,
            key=f"clin-{entry['name']}",
        )

    def _result_outputs(self) -> list:
        return [
            self.case,
            self.result,
            self.chart,
            self.notice,
            self.overlay,
            self.heatmap,
            self.cam_text,
            self.shap,
            self.shap_text,
            self.gallery,
            self.explain_notice,
            self.similar_notice,
            self.download,
            self.report_button,
            self.report_notice,
            self.verdict,
            self.true_label,
            self.note,
            self.send,
            self.feedback_notice,
        ]

    # ------------------------------------------------------------------ handlers

    def load_schema(self, token: str | None) -> list[dict]:
        """The model's clinical feature schema (empty when it takes images only)."""
        try:
            self.ctx.sessions.user(token)
            card = self.service.model_card()
        except Exception:  # the page still works for images; the notice comes at analysis
            return []
        return list(getattr(card, "tabular_schema", None) or [])

    def on_upload(self, path: str | None):
        if not path:
            return None, ""
        try:
            return preview(read_upload(path)), ""
        except Exception as exc:
            return None, html.notice("error", friendly(exc, "the preview"))

    def analyse(self, progress=PROGRESS, *args):
        """Classify the upload, store the case, show the prediction (explanations follow).

        `args`: token, upload path, case id, schema, then one value per clinical field.
        (Gradio finds the progress tracker only among leading positional parameters.)
        """
        token, path, case_ref, schema, *fields = args
        cleared = {
            self.overlay: None,
            self.heatmap: None,
            self.cam_text: "",
            self.shap: None,
            self.shap_text: "",
            self.gallery: None,
            self.explain_notice: "",
            self.similar_notice: "",
            self.download: gr.update(visible=False, value=None),
            self.report_notice: "",
            self.verdict: None,
            self.note: "",
            self.feedback_notice: "",
        }
        try:
            user = self.ctx.sessions.user(token)
            progress(0.05, desc="Reading the image")
            data = read_upload(path)
            kind = input_kind(data)
            if kind not in KIND_FILENAMES:
                raise InvalidInput("Please upload a PNG, JPEG or DICOM image.")
            ref = check_case_ref(case_ref)
            clinical = record_from_fields(schema, fields) if schema else {}
            base = preview(data)
            progress(0.3, desc="The diagnosis service is analysing the image")
            prediction = self.service.predict(data, clinical or None, KIND_FILENAMES[kind])
            progress(0.9, desc="Saving the case")
            stored = self.ctx.cases.record(
                user,
                label=prediction.label,
                probabilities=prediction.probabilities,
                model_name=prediction.model_name,
                model_version=prediction.model_version,
                model_tag=prediction.model_tag,
                input_kind=kind,
                latency_ms=prediction.latency_ms,
                case_ref=ref,
            )
        except Exception as exc:
            return cleared | {
                self.case: None,
                self.result: EMPTY_RESULT,
                self.chart: None,
                self.notice: html.notice("error", friendly(exc, "predictions")),
                self.report_button: gr.update(interactive=False),
                self.send: gr.update(interactive=False),
                self.true_label: gr.update(choices=[], value=None),
            }
        case = OpenCase(stored.id, ref, data, kind, base, clinical, prediction)
        log.info("case %d predicted by model %s", stored.id, prediction.model_tag)
        choices = [(pretty_label(c), c) for c in prediction.probabilities]
        return cleared | {
            self.case: case,
            self.result: html.result_card(
                prediction.label,
                prediction.confidence,
                prediction.model_name,
                prediction.model_version,
                stored.id,
                ref,
                prediction.latency_ms,
            ),
            self.chart: probability_chart(prediction.probabilities, prediction.label),
            self.notice: html.notice("ok", f"Case #{stored.id} saved to your history."),
            self.report_button: gr.update(interactive=True),
            self.send: gr.update(interactive=True),
            self.true_label: gr.update(choices=choices, value=None),
        }

    def explain(self, token, case: OpenCase | None, opacity: float, progress=PROGRESS):
        outputs = (None, None, "", None, "")
        if case is None:
            return (*outputs, "", case)
        try:
            self.ctx.sessions.user(token)
            progress(0.2, desc="Computing Grad-CAM and SHAP explanations")
            explanation = self.service.explain(case.image, case.clinical or None, case.filename)
        except Exception as exc:
            return (*outputs, html.notice("warn", friendly(exc, "explanations")), case)
        case.explanation = explanation
        overlay = (
            blend(case.base, explanation.heatmap, opacity)
            if explanation.heatmap is not None
            else explanation.overlay
        )
        target = pretty_label(explanation.target_label or case.prediction.label)
        cam_text = f"Regions that most supported **{target}** are shown in warm colours. " + (
            explanation.cam_summary or ""
        )
        return (
            overlay,
            explanation.heatmap,
            cam_text,
            explanation.shap_image,
            _shap_text(explanation, target),
            "",
            case,
        )

    def reblend(self, case: OpenCase | None, opacity: float):
        if case is None or case.explanation is None or case.explanation.heatmap is None:
            return gr.update()
        return blend(case.base, case.explanation.heatmap, opacity)

    def find_similar(self, token, case: OpenCase | None):
        if case is None:
            return None, "", case
        try:
            self.ctx.sessions.user(token)
            similar = self.service.similar(case.image, SIMILAR_K, case.filename)
        except Exception as exc:
            return None, html.notice("warn", friendly(exc, "similar-case search")), case
        case.similar = similar
        items = [
            (s.thumbnail, f"{pretty_label(s.label)} · similarity {1 - s.distance:.2f}")
            for s in similar
        ]
        return items, "", case

    def make_report(self, token, case: OpenCase | None, progress=PROGRESS):
        if case is None:
            return gr.update(visible=False), html.notice("info", "Analyse an image first.")
        try:
            self.ctx.sessions.user(token)
            progress(0.3, desc="Preparing the PDF report")
            pdf = self.service.report(
                case.image, case.case_ref, case.clinical or None, case.filename
            )
        except Exception as exc:
            return gr.update(visible=False), html.notice("error", friendly(exc, "PDF reports"))
        path = self.reports_dir / f"oncoflow-report-case-{case.case_id}.pdf"
        path.write_bytes(pdf)
        return (
            gr.update(value=str(path), visible=True),
            html.notice("ok", "The report is ready: use “Download PDF report”."),
        )

    def give_feedback(self, token, case: OpenCase | None, verdict, true_label, note):
        if case is None:
            return html.notice("info", "Analyse an image first.")
        try:
            user = self.ctx.sessions.user(token)
            if verdict not in (AGREE, DISAGREE):
                raise InvalidInput("Please choose Agree or Disagree.")
            stored = self.ctx.cases.add_feedback(
                user,
                case.case_id,
                agree=verdict == AGREE,
                true_label=true_label or None,
                note=note or "",
            )
        except Exception as exc:
            return html.notice("error", friendly(exc, "feedback"))
        return html.notice(
            "ok",
            f"Thank you. Feedback for case #{stored.id} saved "
            f"(true label: {pretty_label(stored.true_label or '')}).",
        )


def _shap_text(explanation: Explanation, target: str) -> str:
    lines = [
        f"Pixels in red pushed the model towards **{target}**, blue ones away from it."
        if explanation.shap_image is not None
        else ""
    ]
    if explanation.shap_summary:
        lines.append(explanation.shap_summary)
    if explanation.shap_features:
        lines.append("| Clinical feature | Value | Contribution |\n|---|---|---|")
        for f in explanation.shap_features[:10]:
            lines.append(
                f"| {f.get('name', '')} | {f.get('value', '')} | {float(f.get('shap', 0)):+.3f} |"
            )
    return "\n\n".join(x for x in lines[:2] if x) + (
        "\n\n" + "\n".join(lines[2:]) if len(lines) > 2 else ""
    )
