"""Model: the model card served by the diagnosis service."""

from __future__ import annotations

from typing import Any

import gradio as gr

from ui import html
from ui.charts import pretty_label
from ui.context import UiContext
from ui.gateway import SOURCE_NAMES, ServiceGateway
from ui.html import Markup
from ui.messages import friendly
from ui.pages.diagnose import METHOD_NAMES

KIND_WORDS = {
    "image": "an image",
    "fusion": "an image and a clinical record",
    "tabular": "a clinical record",
}
HEADLINE_METRICS = (
    ("accuracy", "Accuracy"),
    ("balanced_accuracy", "Balanced accuracy"),
    ("macro_f1", "Macro F1"),
    ("auroc", "AUROC (macro)"),
    ("ece", "Calibration error (ECE)"),
)


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def privacy_text(privacy: dict | None) -> str:
    """The privacy guarantee in words, from the card's privacy report."""
    if not privacy:
        return "No differential-privacy guarantee: trained without DP-SGD."
    eps, delta = privacy.get("epsilon"), privacy.get("delta")
    if eps is None:
        return "; ".join(f"{k}: {v}" for k, v in privacy.items())
    text = (
        f"(ε = {_number(eps)}, δ = {delta:g})-differential privacy"
        if delta
        else (f"ε = {_number(eps)} differential privacy")
    )
    extras = [
        f"{k.replace('_', ' ')}: {v}"
        for k, v in privacy.items()
        if k not in ("epsilon", "delta") and isinstance(v, str | int | float)
    ]
    return text + (f" ({'; '.join(extras)})" if extras else "")


def card_html(card) -> str:
    data = card.model_dump() if hasattr(card, "model_dump") else dict(card)
    model = data.get("model") or {}
    metrics = data.get("metrics") or {}
    rows: list[tuple[str, Any]] = [
        ("Model", model.get("name", "")),
        ("Version", model.get("version") or "not registered"),
        ("Served artefact", model.get("tag", "")),
        ("Architecture", data.get("architecture", "")),
        ("Input", KIND_WORDS.get(data.get("kind") or "image", data.get("kind") or "")),
        ("Classes", ", ".join(pretty_label(c) for c in data.get("classes") or [])),
    ]
    schema = data.get("clinical_schema") or []
    if schema:
        rows.append(("Clinical fields", ", ".join(str(f.get("name", "")) for f in schema)))
    rows += [(name, _number(metrics[key])) for key, name in HEADLINE_METRICS if key in metrics]
    per_class = metrics.get("per_class")
    if isinstance(per_class, dict) and per_class:
        cells = "".join(
            f"<li>{html.escape(pretty_label(k))}: "
            + ", ".join(
                f"{html.escape(m)} {_number(v)}"
                for m, v in (vals or {}).items()
                if isinstance(v, int | float)
            )
            + "</li>"
            for k, vals in per_class.items()
            if isinstance(vals, dict)
        )
        rows.append(("Per class", Markup(f"<ul style='margin:0;padding-left:18px'>{cells}</ul>")))
    rows.append(("Privacy guarantee", privacy_text(data.get("privacy"))))
    rows.append(("Intended use", data.get("intended_use") or "not stated by the service"))
    limitations = data.get("limitations")
    if isinstance(limitations, list):
        limitations = Markup(
            "<ul style='margin:0;padding-left:18px'>"
            + "".join(f"<li>{html.escape(str(x))}</li>" for x in limitations)
            + "</ul>"
        )
    rows.append(("Limitations", limitations or "not stated by the service"))
    methods = data.get("explain_methods") or []
    if methods:
        rows.append(
            (
                "Explanations",
                ", ".join(METHOD_NAMES.get(m, m) for m in methods)
                + (", SHAP" if data.get("kind") != "tabular" else ""),
            )
        )
    if data.get("similar_cases"):
        where = SOURCE_NAMES.get(data.get("similar_source") or "", "the service's case index")
        rows.append(("Similar cases", f"{data['similar_cases']} cases from {where}"))
    elif data.get("kind") != "tabular":
        rows.append(("Similar cases", "none: this hospital has no case library for this model"))
    contents = data.get("contents")
    if isinstance(contents, dict):
        rows.append(("Model bundle holds", contents_text(contents)))
    rows.append(("Assistant", "available" if data.get("chat") else "not available"))
    if data.get("data_fingerprint"):
        rows.append(("Training data fingerprint", data["data_fingerprint"][:16] + "…"))
    return html.table(rows)


def contents_text(contents: dict) -> str:
    """What the model bundle holds, in words."""
    index = contents.get("case_index") or 0
    parts = [
        "the weights",
        f"SHAP reference: {contents.get('background', 'none')}",
        f"{index} training images for similar cases" if index else "no similar-case index",
    ]
    images = "training images: yes" if contents.get("training_images") else "no training images"
    return "; ".join([*parts, images])


class ModelPage:
    def __init__(self, ctx: UiContext, service: ServiceGateway) -> None:
        self.ctx = ctx
        self.service = service

    def build(self, token: gr.State) -> None:
        self.refresh_button = gr.Button("Refresh", scale=0, min_width=140)
        self.card = gr.HTML(elem_id="of-model-card")
        self.inputs, self.outputs = [token], [self.card]
        self.refresh_button.click(self.refresh, self.inputs, self.outputs, api_visibility="private")

    def refresh(self, token):
        try:
            self.ctx.sessions.user(token)
            card = self.service.model_card()
        except Exception as exc:
            return html.notice("error", friendly(exc, "the model card"))
        return card_html(card)
