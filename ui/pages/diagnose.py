"""Diagnose: upload an image (+ clinical fields when the model takes them), see the prediction,
Grad-CAM, SHAP and similar cases, download the PDF report and give feedback."""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from ui import html
from ui.cases import check_case_ref, input_kind
from ui.charts import pretty_label, probability_chart
from ui.clinical import clinical_input, readable_name, record_from_fields
from ui.context import UiContext
from ui.errors import InvalidInput
from ui.gateway import (
    Explanation,
    ModelInfo,
    NoCaseLibrary,
    Prediction,
    ServiceGateway,
    SimilarCase,
)
from ui.images import blend, enlarge, preview
from ui.messages import friendly
from ui.worklist import care_fields

log = logging.getLogger(__name__)

AGREE, DISAGREE = "Agree", "Disagree"
DEFAULT_OPACITY = 0.45
DEFAULT_METHOD = "gradcam"
SIMILAR_K = 6
REPORT_MAX_AGE_S = 1800
KIND_FILENAMES = {"png": "image.png", "jpeg": "image.jpg", "dicom": "image.dcm"}
PROGRESS = gr.Progress()  # marker default: Gradio passes a live tracker per call
EMPTY_RESULT = html.notice("info", "Upload an image and press “Analyse” to see the result.")
METHOD_NAMES = {
    "gradcam": "Grad-CAM",
    "gradcam++": "Grad-CAM++",
    "scorecam": "Score-CAM",
    "eigencam": "Eigen-CAM",
    "eigengradcam": "EigenGrad-CAM",
    "fullgrad": "FullGrad",
    "layercam": "Layer-CAM",
    "ablationcam": "Ablation-CAM",
    "xgradcam": "XGrad-CAM",
    "hirescam": "HiRes-CAM",
}


@dataclass
class OpenCase:
    """The case on screen (kept server-side in a gr.State; never sent to the browser)."""

    case_id: int
    case_ref: str | None
    image: bytes | None  # None for a clinical-record-only model
    kind: str
    base: Image.Image | None
    clinical: dict[str, Any]
    prediction: Prediction
    explanation: Explanation | None = None
    similar: list[SimilarCase] = field(default_factory=list)

    @property
    def filename(self) -> str:
        return KIND_FILENAMES.get(self.kind, "image")

    @property
    def report_id(self) -> str:
        """The id printed on the PDF: the pseudonymous case id, else the UI's case number."""
        return self.case_ref or f"UI-{self.case_id}"


def read_upload(path: str | None) -> bytes:
    if not path:
        raise InvalidInput("Please choose an image file first.")
    data = Path(path).read_bytes()
    if not data:
        raise InvalidInput("The file is empty.")
    return data


def method_choices(info: ModelInfo | None) -> list[tuple[str, str]]:
    methods = (info.explain_methods if info else None) or [DEFAULT_METHOD]
    return [(METHOD_NAMES.get(m, m), m) for m in methods]


class DiagnosePage:
    def __init__(self, ctx: UiContext, service: ServiceGateway) -> None:
        self.ctx = ctx
        self.service = service
        self.reports_dir = Path(tempfile.mkdtemp(prefix="oncoflow-ui-reports-"))

    # ------------------------------------------------------------------ layout

    def build(self, token: gr.State) -> None:
        self.token = token
        self.case = gr.State(None)
        self.info = gr.State(None)
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
                    label="Preview",
                    interactive=False,
                    height=260,
                    buttons=[],
                    elem_id="of-preview",
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
                    "Analyse", variant="primary", size="lg", elem_id="of-analyse"
                )
                self.notice = gr.HTML(elem_id="of-diagnose-notice")

            with gr.Column(scale=7, min_width=480):
                gr.HTML('<div class="of-section-title">2 · Result</div>')
                self.result = gr.HTML(EMPTY_RESULT, elem_id="of-result-box")
                with gr.Column(visible=False, elem_id="of-results") as self.results_box:
                    self.chart = gr.Plot(show_label=False, elem_id="of-probabilities")
                    with gr.Tabs():
                        with gr.Tab("Grad-CAM", id="gradcam"):
                            with gr.Row():
                                self.overlay = gr.Image(
                                    label="Overlay",
                                    interactive=False,
                                    height=300,
                                    elem_id="of-overlay",
                                    buttons=["fullscreen"],
                                )
                                self.heatmap = gr.Image(
                                    label="Heatmap (raw)",
                                    interactive=False,
                                    height=300,
                                    elem_id="of-heatmap",
                                    buttons=["fullscreen"],
                                )
                            with gr.Row(equal_height=True):
                                self.opacity = gr.Slider(
                                    0.0,
                                    1.0,
                                    DEFAULT_OPACITY,
                                    step=0.05,
                                    label="Overlay opacity",
                                    elem_id="of-opacity",
                                    scale=3,
                                )
                                self.method = gr.Dropdown(
                                    choices=method_choices(None),
                                    value=DEFAULT_METHOD,
                                    label="Method",
                                    scale=2,
                                    elem_id="of-method",
                                )
                                self.target = gr.Dropdown(
                                    choices=[],
                                    value=None,
                                    label="Explain class",
                                    scale=2,
                                    elem_id="of-target",
                                    info="Default: the predicted class",
                                )
                            self.reexplain = gr.Button(
                                "Update explanation", size="sm", interactive=False
                            )
                            self.cam_text = gr.Markdown(elem_id="of-cam-text")
                        with gr.Tab("SHAP", id="shap"):
                            self.shap = gr.Image(
                                label="SHAP attribution",
                                interactive=False,
                                height=300,
                                elem_id="of-shap",
                                buttons=["fullscreen"],
                            )
                            self.shap_text = gr.Markdown(elem_id="of-shap-text")
                        with gr.Tab("Similar cases", id="similar"):
                            gr.Markdown(
                                "The cases most alike in this hospital's own case library, "
                                "built here from the site's own labelled images (thumbnails "
                                "and labels only, no identifiers). The model itself carries "
                                "no patient images."
                            )
                            self.gallery = gr.Gallery(
                                show_label=False,
                                columns=3,
                                height=330,
                                object_fit="contain",
                                elem_id="of-similar",
                                allow_preview=True,
                            )
                            self.similar_notice = gr.HTML()
                    self.explain_notice = gr.HTML(elem_id="of-explain-notice")
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
                    self.report_notice = gr.HTML(elem_id="of-report-notice")
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
                    inputs = [clinical_input(entry) for entry in schema]
                analyse = self.analyse_button.click(
                    self.analyse,
                    [self.token, self.info, self.upload, self.case_ref, self.schema, *inputs],
                    self._result_outputs(),
                    show_progress_on=[self.result],
                    api_visibility="private",
                )
                self._chain_explanations(analyse)

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
        self._chain_explanations(None, trigger=self.reexplain)
        self.report_button.click(
            self.make_report,
            [self.token, self.case, self.method, self.target],
            [self.download, self.report_notice],
            api_visibility="private",
        )
        self.send.click(
            self.give_feedback,
            [self.token, self.case, self.verdict, self.true_label, self.note],
            [self.feedback_notice],
            api_visibility="private",
        )

    def _chain_explanations(self, after, trigger=None) -> None:
        """Explanations, then similar cases: after the analysis, or on `trigger`'s click."""
        explain_args = dict(
            fn=self.explain,
            inputs=[self.token, self.case, self.opacity, self.method, self.target],
            outputs=[
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
        )
        if trigger is not None:
            trigger.click(**explain_args)
            return
        after.then(**explain_args).then(
            self.find_similar,
            [self.token, self.case],
            [self.gallery, self.similar_notice, self.case],
            api_visibility="private",
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
            self.target,
            self.reexplain,
            self.results_box,
        ]

    # ------------------------------------------------------------------ handlers

    def load_model(self, token: str | None):
        """After sign-in: the model's kind, clinical schema and explanation methods."""
        if not token:  # the sign-in failed: nothing to load
            return (gr.update(),) * 5
        try:
            self.ctx.sessions.user(token)
            info = self.service.model_info()
        except Exception as exc:  # the notice tells the user; images may still work later
            return (
                None,
                [],
                gr.update(),
                gr.update(),
                html.notice("warn", friendly(exc, "the model description")),
            )
        return (
            info,
            info.clinical_schema,
            gr.update(visible=info.takes_image),
            gr.update(choices=method_choices(info), value=method_choices(info)[0][1]),
            "",
        )

    def on_upload(self, path: str | None):
        if not path:
            return None, ""
        try:
            return preview(read_upload(path)), ""
        except Exception as exc:
            return None, html.notice("error", friendly(exc, "the preview"))

    def analyse(self, progress=PROGRESS, *args):
        """Classify the upload, store the case, show the prediction (explanations follow).

        `args`: token, model info, upload path, case id, schema, then one value per clinical
        field. (Gradio finds the progress tracker only among leading positional parameters.)
        """
        token, info, path, case_ref, schema, *fields = args
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
            takes_image = info.takes_image if info is not None else True
            data = base = None
            kind = "record"
            if takes_image:
                progress(0.05, desc="Reading the image")
                data = read_upload(path)
                kind = input_kind(data)
                if kind not in KIND_FILENAMES:
                    raise InvalidInput("Please upload a PNG, JPEG or DICOM image.")
                base = preview(data)
            ref = check_case_ref(case_ref)
            clinical = record_from_fields(schema, fields) if schema else {}
            progress(0.3, desc="The diagnosis service is analysing the case")
            prediction = self.service.predict(data, clinical or None, KIND_FILENAMES.get(kind))
            if prediction.out_of_distribution:
                return cleared | self._no_diagnosis(prediction)
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
                **care_fields(prediction, info, data),  # risk, referral, image (site-local)
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
                self.target: gr.update(choices=[], value=None),
                self.reexplain: gr.update(interactive=False),
                self.results_box: gr.Column(visible=False),
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
                prediction_set=prediction.prediction_set,
                refer=prediction.refer,
                referral_reason=prediction.referral_reason,
                danger_probability=prediction.danger_probability,
                danger_threshold=prediction.danger_threshold,
            ),
            self.chart: probability_chart(prediction.probabilities, prediction.label),
            self.notice: html.notice("ok", f"Case #{stored.id} saved to your history."),
            self.report_button: gr.update(interactive=data is not None),
            self.send: gr.update(interactive=True),
            self.true_label: gr.update(choices=choices, value=None),
            self.target: gr.update(choices=choices, value=prediction.label),
            self.reexplain: gr.update(interactive=True),
            self.results_box: gr.Column(visible=True),
        }

    def _no_diagnosis(self, prediction) -> dict:
        """The page for an image unlike the training images: the reason and the referral, no
        finding, chart or explanation; the case is not saved (there is no diagnosis to keep)."""
        log.info("upload out of distribution for model %s; not saved", prediction.model_tag)
        return {
            self.case: None,
            self.result: html.ood_card(
                prediction.referral_reason or "",
                prediction.model_name,
                prediction.model_version,
                prediction.latency_ms,
            ),
            self.chart: None,
            self.notice: html.notice(
                "warn",
                "No diagnosis for this image: check that it is the kind of image the model "
                "reads (see the model card).",
            ),
            self.report_button: gr.update(interactive=False),
            self.send: gr.update(interactive=False),
            self.true_label: gr.update(choices=[], value=None),
            self.target: gr.update(choices=[], value=None),
            self.reexplain: gr.update(interactive=False),
            self.results_box: gr.Column(visible=False),
        }

    def explain(self, token, case: OpenCase | None, opacity, method, target, progress=PROGRESS):
        """Grad-CAM (overlay blended here, so the opacity slider needs no new request), SHAP."""
        outputs = (None, None, "", None, "")
        if case is None:
            return (*outputs, "", case)
        try:
            user = self.ctx.sessions.user(token)
            progress(0.2, desc="Computing the explanations")
            explanation = self.service.explain(
                case.image,
                case.clinical or None,
                case.filename,
                method or DEFAULT_METHOD,
                target or None,
            )
            self.ctx.cases.log_access(
                user,
                case.case_id,
                "case.explain",
                {"method": explanation.method or "", "target": explanation.target},
            )
        except Exception as exc:
            return (*outputs, html.notice("warn", friendly(exc, "explanations")), case)
        case.explanation = explanation
        overlay = (
            blend(case.base, explanation.heatmap, opacity)
            if explanation.heatmap is not None and case.base is not None
            else explanation.overlay
        )
        name = pretty_label(explanation.target)
        method_name = METHOD_NAMES.get(explanation.method or "", explanation.method or "")
        cam_text = ""
        if explanation.heatmap is not None:
            cam_text = (
                f"**{method_name}** for **{name}**: warm colours mark the regions the model "
                f"relied on most. {explanation.cam_summary}".strip()
            )
        warnings = html.notice("warn", " ".join(explanation.warnings))
        return (
            overlay,
            enlarge(explanation.heatmap),
            cam_text,
            enlarge(explanation.shap_image, smooth=False),
            shap_text(explanation),
            warnings,
            case,
        )

    def reblend(self, case: OpenCase | None, opacity: float):
        if (
            case is None
            or case.base is None
            or case.explanation is None
            or case.explanation.heatmap is None
        ):
            return gr.update()
        return blend(case.base, case.explanation.heatmap, opacity)

    def find_similar(self, token, case: OpenCase | None):
        if case is None:
            return None, "", case
        try:
            user = self.ctx.sessions.user(token)
            self.ctx.cases.log_access(user, case.case_id, "case.similar", {"k": SIMILAR_K})
            similar = self.service.similar(
                case.image, case.clinical or None, SIMILAR_K, case.filename
            )
        except NoCaseLibrary as exc:
            return None, html.notice("info", str(exc)), case
        except Exception as exc:
            return None, html.notice("warn", friendly(exc, "similar-case search")), case
        case.similar = similar.cases
        items = [
            (enlarge(s.thumbnail, 160), f"{pretty_label(s.label)} · {1 - s.distance:.2f}")
            for s in similar.cases
        ]
        return items, html.notice("info", similar.caption), case

    def make_report(self, token, case: OpenCase | None, method, target, progress=PROGRESS):
        if case is None:
            return gr.update(visible=False), html.notice("info", "Analyse a case first.")
        try:
            user = self.ctx.sessions.user(token)
            progress(0.3, desc="Preparing the PDF report")
            pdf = self.service.report(
                case.image,
                case.clinical or None,
                case.report_id,
                case.filename,
                method or DEFAULT_METHOD,
                target or None,
            )
            self.ctx.cases.log_access(user, case.case_id, "report.download", {"pdf": len(pdf)})
        except Exception as exc:
            return gr.update(visible=False), html.notice("error", friendly(exc, "PDF reports"))
        self._sweep_reports()
        path = self.reports_dir / f"oncoflow-report-case-{case.case_id}.pdf"
        path.write_bytes(pdf)
        return (
            gr.update(value=str(path), visible=True),
            html.notice("ok", "The report is ready: use “Download PDF report”."),
        )

    def _sweep_reports(self, max_age_s: float = REPORT_MAX_AGE_S) -> None:
        """Delete report files older than `max_age_s` (Gradio serves its own copy)."""
        cutoff = time.time() - max_age_s
        for old in self.reports_dir.glob("*.pdf"):
            try:
                if old.stat().st_mtime < cutoff:
                    old.unlink()
            except FileNotFoundError:
                pass

    def give_feedback(self, token, case: OpenCase | None, verdict, true_label, note):
        if case is None:
            return html.notice("info", "Analyse a case first.")
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


def shap_text(explanation: Explanation) -> str:
    """Words (and a table of clinical features) under the SHAP picture."""
    name = pretty_label(explanation.target)
    parts = []
    if explanation.shap_image is not None:
        parts.append(
            f"Red pixels pushed the model towards **{name}**, blue ones away from it. "
            + explanation.shap_summary
        )
    if explanation.shap_features:
        rows = ["| Clinical feature | Value | Effect on " + name + " |", "|---|---|---|"]
        for f in explanation.shap_features[:10]:
            unit = f" {f['unit']}" if f.get("unit") else ""
            shap = float(f.get("shap", 0.0))
            direction = "towards" if shap > 0 else "away"
            rows.append(
                f"| {readable_name(f.get('feature', ''))} | {f.get('value', '')}{unit} | "
                f"{shap:+.3f} ({direction}) |"
            )
        parts.append("\n".join(rows))
    if not parts:
        parts.append("No SHAP explanation for this model.")
    return "\n\n".join(parts)
