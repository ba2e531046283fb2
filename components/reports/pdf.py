"""A one-case PDF report (reportlab): prediction, explanations, model and privacy facts.

No patient identifiers: the only case reference allowed is an optional pseudonymous id of
letters, digits, '-' and '_' (no spaces, so no names). Every text field is escaped before it
reaches reportlab's paragraph markup.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from xml.sax.saxutils import escape

from components.errors import InputError

DEFAULT_TITLE = "oncoflow decision-support report"
DISCLAIMER = (
    "Decision support only. This report was produced by a machine-learning model for research "
    "use; it is not a diagnosis and not medical advice. A qualified clinician must interpret it "
    "together with the full clinical picture, and may disagree with it."
)
NO_PRIVACY = "No formal privacy guarantee: the model was trained without differential privacy."
_CASE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_MAX_SHAP_ROWS = 10
_MAX_METRICS = 12
_IMAGE_CM = 6.5


@dataclass
class ReportInput:
    """Everything one report shows. `probabilities` maps class name -> probability in [0, 1].

    `shap_features`: [{feature, value, unit?, description?, shap}] (largest |shap| first),
    listed by the feature's name in words with its schema description; `metrics`,
    `privacy`, `data_fingerprint` and `architecture` come from the bundle (see
    `bundle_facts`); `model_version` from the registry.
    """

    image_png: bytes
    predicted_label: str
    probabilities: Mapping[str, float]
    model_name: str
    model_version: str
    architecture: str
    overlay_png: bytes | None = None
    cam_method: str | None = None
    heat_summary: str | None = None
    shap_features: Sequence[Mapping[str, Any]] | None = None
    shap_class: str | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)
    data_fingerprint: str = ""
    privacy: Mapping[str, Any] | None = None
    case_id: str | None = None
    # conformal prediction set (most probable first), referral and its reason in plain words;
    # None: the model is not calibrated (the report then says so)
    prediction_set: Sequence[str] | None = None
    refer: bool | None = None
    referral_reason: str | None = None
    # P(any dangerous class) and the operating point's threshold; None: no operating point
    danger_probability: float | None = None
    danger_threshold: float | None = None
    # why the image got no diagnosis (unlike the training images); None: it got one. The
    # report then shows the image and this reason only (no label, probabilities or heatmap)
    out_of_distribution: str | None = None
    created_at: datetime | None = None
    title: str = DEFAULT_TITLE
    disclaimer: str = DISCLAIMER


def bundle_facts(bundle) -> dict[str, Any]:
    """The `ReportInput` fields a `ModelBundle` supplies: architecture, metrics, privacy,
    data fingerprint."""
    return {
        "architecture": bundle.architecture,
        "metrics": dict(bundle.metrics or {}),
        "privacy": bundle.privacy,
        "data_fingerprint": bundle.data_fingerprint or "",
    }


def format_probability(p: float) -> str:
    """0.8734 -> '87.3%' (the form the report prints)."""
    return f"{100.0 * float(p):.1f}%"


def render_report(report: ReportInput) -> bytes:
    """Render `report` as PDF bytes; raises `InputError` for unusable input."""
    from reportlab.lib import colors
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.styles import getSampleStyleSheet
    from reportlab.lib.units import cm
    from reportlab.platypus import Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

    probabilities = _check(report)
    created = (report.created_at or datetime.now(UTC)).astimezone(UTC)
    styles = getSampleStyleSheet()
    body, small, h2 = styles["BodyText"], styles["Italic"], styles["Heading2"]

    def para(text: str, style=body) -> Paragraph:
        return Paragraph(escape(str(text)), style)

    grid = TableStyle(
        [
            ("GRID", (0, 0), (-1, -1), 0.4, colors.grey),
            ("BACKGROUND", (0, 0), (-1, 0), colors.whitesmoke),
            ("FONTSIZE", (0, 0), (-1, -1), 9),
            ("VALIGN", (0, 0), (-1, -1), "MIDDLE"),
        ]
    )
    story: list[Any] = [para(report.title, styles["Title"])]
    header = f"Generated {created:%Y-%m-%d %H:%M:%S} UTC"
    if report.case_id:
        header += f" · Case {report.case_id}"
    story += [para(header), Spacer(1, 0.2 * cm), para(report.disclaimer, small)]

    story += [para("Prediction", h2)]
    if report.out_of_distribution:
        story += [
            para("No diagnosis: the image is unlike the training images", styles["Heading4"]),
            para(report.out_of_distribution, body),
        ]
    else:
        story += [
            para(
                f"Predicted class: {report.predicted_label} "
                f"({format_probability(probabilities[report.predicted_label])})"
            )
        ]
        story += _referral(report, para, styles["Heading4"], body)
        rows = [["Class", "Probability", ""]]
        for name, p in sorted(probabilities.items(), key=lambda kv: -kv[1]):
            rows.append([para(name), format_probability(p), _bar(p, 6 * cm)])
        story += [Table(rows, colWidths=[5 * cm, 2.5 * cm, 6.5 * cm], style=grid)]

    story += [para("Image and Grad-CAM" if report.overlay_png else "Image", h2)]
    pictures = [_image(report.image_png, "image", _IMAGE_CM * cm)]
    captions = ["Input image"]
    if report.overlay_png is not None:
        pictures.append(_image(report.overlay_png, "overlay", _IMAGE_CM * cm))
        method = report.cam_method or "Grad-CAM"
        captions.append(f"{method} overlay for {report.predicted_label}")
    story += [Table([pictures, [para(c, small) for c in captions]])]
    if report.heat_summary:
        story += [para(report.heat_summary)]

    if report.shap_features:
        target = report.shap_class or report.predicted_label
        story += [para(f"Top SHAP features (towards {target})", h2)]
        rows = [["Feature", "Value", "SHAP"]]
        for item in list(report.shap_features)[:_MAX_SHAP_ROWS]:
            rows.append([para(_feature(item)), para(_value(item)), f"{float(item['shap']):+.4f}"])
        story += [Table(rows, colWidths=[7 * cm, 4 * cm, 3 * cm], style=grid)]
        story += [
            para(
                "Positive values push the prediction towards the class, negative away "
                "from it (expected-gradients SHAP on the class probability).",
                small,
            )
        ]

    story += [para("Model", h2)]
    facts = [
        ["Model", para(f"{report.model_name} version {report.model_version}")],
        ["Architecture", para(report.architecture)],
        ["Data fingerprint", para(report.data_fingerprint or "not recorded")],
    ]
    story += [Table(facts, colWidths=[4 * cm, 10 * cm], style=_plain(colors))]
    metric_rows = _metric_rows(report.metrics)
    if metric_rows:
        story += [Spacer(1, 0.2 * cm), para("Held-out test metrics", styles["Heading3"])]
        story += [
            Table([["Metric", "Value"], *metric_rows], colWidths=[7 * cm, 4 * cm], style=grid)
        ]

    story += [para("Privacy", h2), para(_privacy_text(report.privacy))]
    story += [Spacer(1, 0.4 * cm), para(report.disclaimer, styles["Heading4"])]

    buffer = io.BytesIO()
    doc = SimpleDocTemplate(
        buffer,
        pagesize=A4,
        title=report.title,
        author="oncoflow",
        leftMargin=2 * cm,
        rightMargin=2 * cm,
        topMargin=1.5 * cm,
        bottomMargin=1.5 * cm,
    )
    doc.build(story)
    return buffer.getvalue()


NOT_CALIBRATED = (
    "No prediction set: this model was not calibrated, so the probabilities are its raw scores "
    "and the report cannot say when the model is unsure; interpret them with care."
)


def _referral(report: ReportInput, para, heading, body) -> list[Any]:
    """The prediction set and the referral, in plain words (above the probabilities)."""
    if report.prediction_set is None or report.refer is None:
        return [para(NOT_CALIBRATED, body)]
    names = ", ".join(str(n).replace("_", " ") for n in report.prediction_set)
    lines = [para(f"Prediction set: {names}", body)]
    if report.refer:
        lines.insert(0, para("Refer for specialist review", heading))
    if report.referral_reason:
        lines.append(para(report.referral_reason, body))
    if report.danger_probability is not None and report.danger_threshold is not None:
        lines.append(
            para(
                f"Probability of a dangerous class: "
                f"{format_probability(report.danger_probability)} (operating point: "
                f"{format_probability(report.danger_threshold)}; at or above it the case is "
                "treated as possibly dangerous)",
                body,
            )
        )
    return lines


def _check(report: ReportInput) -> dict[str, float]:
    if report.out_of_distribution and not report.probabilities:
        _check_case_id(report)
        return {}
    if not report.probabilities:
        raise InputError("a report needs the class probabilities")
    probabilities: dict[str, float] = {}
    for name, p in report.probabilities.items():
        value = float(p)
        if not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise InputError(f"probability of {name!r} is {p}; expected a value in [0, 1]")
        probabilities[str(name)] = value
    if report.predicted_label not in probabilities:
        raise InputError(f"predicted label {report.predicted_label!r} has no probability")
    _check_case_id(report)
    for item in report.shap_features or ():
        if "feature" not in item or "shap" not in item:
            raise InputError("each SHAP feature needs 'feature' and 'shap'")
    return probabilities


def _check_case_id(report: ReportInput) -> None:
    if report.case_id is not None and not _CASE_ID.match(report.case_id):
        raise InputError(
            "case_id must be a pseudonymous code of 1-64 letters, digits, '-' or '_' "
            "(no names or other identifiers)"
        )


def _image(png: bytes, what: str, width: float):
    from PIL import Image as PILImage
    from reportlab.platypus import Image

    try:
        with PILImage.open(io.BytesIO(png)) as probe:
            probe.verify()
        with PILImage.open(io.BytesIO(png)) as opened:
            w, h = opened.size
    except Exception as exc:  # PIL raises many types for bad bytes
        raise InputError(f"the {what} is not a readable image: {exc}") from exc
    return Image(io.BytesIO(png), width=width, height=width * h / max(1, w))


def _bar(p: float, width: float):
    from reportlab.graphics.shapes import Drawing, Rect
    from reportlab.lib import colors

    drawing = Drawing(width, 10)
    drawing.add(Rect(0, 1, width, 8, fillColor=colors.whitesmoke, strokeColor=colors.grey))
    drawing.add(Rect(0, 1, width * p, 8, fillColor=colors.steelblue, strokeColor=None))
    return drawing


def _plain(colors):
    from reportlab.platypus import TableStyle

    return TableStyle(
        [
            ("GRID", (0, 0), (-1, -1), 0.4, colors.grey),
            ("FONTSIZE", (0, 0), (-1, -1), 9),
            ("VALIGN", (0, 0), (-1, -1), "MIDDLE"),
        ]
    )


def _feature(item: Mapping[str, Any]) -> str:
    """'diameter_1' -> 'Diameter 1'; with the schema's description after it in brackets."""
    words = " ".join(str(item["feature"]).replace("_", " ").split())
    name = words[:1].upper() + words[1:]
    description = str(item.get("description") or "").strip()
    return f"{name} ({description})" if description else name


def _value(item: Mapping[str, Any]) -> str:
    value = item.get("value")
    if value is None:
        return "missing"
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    unit = item.get("unit") or ""
    return f"{text} {unit}".strip()


def _metric_rows(metrics: Mapping[str, Any]) -> list[list[str]]:
    """Top-level scalar metrics (nested per-class tables are left to the model card)."""
    rows = []
    for name, value in (metrics or {}).items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            continue
        rows.append([str(name), f"{value:.3f}" if isinstance(value, float) else str(value)])
    return rows[:_MAX_METRICS]


SECAGG_ONLY = (
    "Secure aggregation (SecAgg+): the server saw only the sum of the sites' updates. "
    "No differential privacy guarantee."
)


def _privacy_text(privacy: Mapping[str, Any] | None) -> str:
    if privacy and privacy.get("epsilon") is None and privacy.get("secure_aggregation"):
        return SECAGG_ONLY
    if not privacy or privacy.get("epsilon") is None:
        return NO_PRIVACY
    epsilon = float(privacy["epsilon"])
    if not math.isfinite(epsilon):
        return NO_PRIVACY
    parts = [f"Differentially private training: epsilon = {epsilon:.3g}"]
    if privacy.get("delta") is not None:
        parts.append(f"delta = {float(privacy['delta']):.3g}")
    if privacy.get("accountant"):
        parts.append(f"accountant: {privacy['accountant']}")
    text = ", ".join(parts) + "."
    extras = [
        f"{k}: {v}"
        for k, v in privacy.items()
        if k not in ("epsilon", "delta", "accountant")
        and isinstance(v, str | int | float)
        and not isinstance(v, bool)
    ]
    if extras:
        text += " " + "; ".join(extras) + "."
    return text


__all__ = [
    "DISCLAIMER",
    "NO_PRIVACY",
    "ReportInput",
    "bundle_facts",
    "format_probability",
    "render_report",
]
