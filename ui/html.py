"""Small HTML fragments (escaped) and the page's stylesheet."""

from __future__ import annotations

from html import escape
from typing import Any

from ui.charts import pretty_label

DISCLAIMER = (
    "Decision support only. The model's output is not a diagnosis; every finding must be "
    "confirmed by a qualified clinician. Not validated for clinical use."
)

CSS = """
:root { --of-ink: #1f2a37; --of-muted: #6b7280; --of-accent: #1f6f8b; --of-line: #e5e7eb; }
.gradio-container { max-width: 1320px !important; margin: 0 auto !important; }
body, .gradio-container { background: #f4f7f9 !important; }
footer { display: none !important; }
#of-top { align-items: center; }
#of-logout { align-self: center; max-height: 40px; }
#of-header { display: flex; align-items: center; justify-content: space-between;
  background: #ffffff; border: 1px solid var(--of-line); border-radius: 10px;
  padding: 12px 18px; }
#of-header .of-brand { font-size: 20px; font-weight: 650; color: var(--of-accent);
  letter-spacing: .2px; }
#of-header .of-sub { font-size: 13px; color: var(--of-muted); margin-left: 10px; }
#of-header .of-user { font-size: 13px; color: var(--of-ink); text-align: right; }
.of-pill { display: inline-block; padding: 2px 10px; border-radius: 999px; font-size: 12px;
  font-weight: 600; margin-left: 8px; }
.of-pill.ok { background: #e6f4ea; color: #1e6b34; }
.of-pill.down { background: #fdecea; color: #a61b1b; }
.of-pill.role { background: #e8f1f5; color: var(--of-accent); }
#of-banner { background: #fff8e6; border: 1px solid #f3d27a; color: #6b4f00; border-radius: 8px;
  padding: 8px 14px; font-size: 13px; }
.of-notice { border-radius: 8px; padding: 10px 14px; font-size: 14px; margin: 4px 0; }
.of-notice.info { background: #eef6fb; border: 1px solid #b9dcec; color: #174e63; }
.of-notice.ok { background: #e6f4ea; border: 1px solid #a8d5b5; color: #1e5631; }
.of-notice.warn { background: #fff8e6; border: 1px solid #f3d27a; color: #6b4f00; }
.of-notice.error { background: #fdecea; border: 1px solid #f5b5b0; color: #8a1c1c; }
.of-result { background: #ffffff; border: 1px solid var(--of-line); border-left: 6px solid
  var(--of-accent); border-radius: 8px; padding: 14px 18px; }
.of-result.low { border-left-color: #d97706; }
.of-result .of-label { font-size: 24px; font-weight: 650; color: var(--of-ink); }
.of-result .of-conf { font-size: 15px; color: var(--of-ink); margin-top: 2px; }
.of-result .of-meta { font-size: 12px; color: var(--of-muted); margin-top: 6px; }
.of-kpis { display: flex; gap: 12px; flex-wrap: wrap; }
.of-kpi { flex: 1 1 150px; background: #fff; border: 1px solid var(--of-line);
  border-radius: 8px; padding: 10px 14px; }
.of-kpi .v { font-size: 22px; font-weight: 650; color: var(--of-ink); }
.of-kpi .k { font-size: 12px; color: var(--of-muted); }
#of-login { max-width: 440px; margin: 48px auto 0 auto; background: #fff;
  border: 1px solid var(--of-line); border-radius: 12px; padding: 22px 26px; }
.of-table, .of-table * { font-family: system-ui, "Segoe UI", Roboto, Arial, sans-serif
  !important; }
.of-section-title { font-size: 15px; font-weight: 600; color: var(--of-ink); margin: 2px 0; }
.of-card { background: #fff; border: 1px solid var(--of-line); border-radius: 8px;
  padding: 4px 12px; }
.of-card table { border-collapse: collapse !important; width: 100%; font-size: 14px;
  border: none !important; margin: 0 !important; }
.of-card td, .of-card th { border: none !important; border-bottom: 1px solid var(--of-line)
  !important; padding: 7px 8px !important; text-align: left; vertical-align: top;
  background: transparent !important; }
.of-card tr { border: none !important; }
.of-card tr:last-child td, .of-card tr:last-child th { border-bottom: none !important; }
.of-card th { color: var(--of-muted); font-weight: 500; width: 34%; }
"""


def notice(kind: str, text: str) -> str:
    """A coloured message box; kind is info, ok, warn or error. Empty text -> nothing."""
    if not text:
        return ""
    return f'<div class="of-notice {escape(kind)}" role="status">{escape(text)}</div>'


def header(
    username: str | None = None, role: str | None = None, service_ok: bool | None = None
) -> str:
    right = ""
    if username:
        right += f"Signed in as <b>{escape(username)}</b>"
        right += f'<span class="of-pill role">{escape(role or "")}</span>'
    if service_ok is not None:
        state = ("ok", "Service connected") if service_ok else ("down", "Service unavailable")
        right += f'<span class="of-pill {state[0]}" id="of-service">{state[1]}</span>'
    return (
        '<div id="of-header"><div><span class="of-brand">oncoflow</span>'
        '<span class="of-sub">Imaging decision support</span></div>'
        f'<div class="of-user">{right}</div></div>'
    )


def banner() -> str:
    return f'<div id="of-banner" role="note"><b>⚠ {escape(DISCLAIMER.split(".")[0])}.</b> ' + (
        escape(DISCLAIMER.split(".", 1)[1].strip()) + "</div>"
    )


def percent(p: float) -> str:
    return f"{100.0 * float(p):.1f}%"


def result_card(
    label: str,
    confidence: float,
    model_name: str,
    model_version: str,
    case_id: int,
    case_ref: str | None,
    latency_ms: float | None,
    low_threshold: float = 0.6,
    prediction_set: list[str] | None = None,
    refer: bool | None = None,
    referral_reason: str | None = None,
    danger_probability: float | None = None,
    danger_threshold: float | None = None,
) -> str:
    """The result box. With a calibrated model (`refer` not None) the per-case message is the
    service's referral and prediction set; an uncalibrated model falls back to the fixed
    `low_threshold` on the top probability."""
    if refer is not None:
        low = bool(refer)
        caution = _referral_html(prediction_set or [label], refer, referral_reason or "")
        caution += _danger_html(danger_probability, danger_threshold)
    else:
        low = confidence < low_threshold
        caution = (
            '<div class="of-meta" style="color:#b45309">Low confidence: interpret with '
            "particular care and consider further work-up.</div>"
            if low
            else ""
        )
    version = f" v{escape(model_version)}" if model_version else ""
    ref = f" · case id {escape(case_ref)}" if case_ref else ""
    timing = ""
    if latency_ms:
        timing = (
            f" · answered in {latency_ms:.0f} ms"
            if latency_ms < 1000
            else f" · answered in {latency_ms / 1000:.1f} s"
        )
    return (
        f'<div class="of-result{" low" if low else ""}" id="of-result">'
        f'<div class="of-meta">Most likely finding</div>'
        f'<div class="of-label">{escape(pretty_label(label))}</div>'
        f'<div class="of-conf">Model confidence {percent(confidence)}</div>'
        f"{caution}"
        f'<div class="of-meta">Case #{case_id}{ref} · model {escape(model_name)}{version}'
        f"{timing}</div></div>"
    )


def ood_card(
    reason: str, model_name: str, model_version: str, latency_ms: float | None = None
) -> str:
    """The result box for an image the model finds unlike its training images: no finding,
    no confidence, only the reason and the referral (the case is not saved)."""
    version = f" v{escape(model_version)}" if model_version else ""
    return (
        '<div class="of-result low" id="of-result">'
        '<div class="of-meta">No diagnosis</div>'
        '<div class="of-label" id="of-ood">This image is unlike the images the model was '
        "trained on</div>"
        f'<div class="of-meta" id="of-referral-reason">{escape(reason)}</div>'
        '<div class="of-meta" id="of-refer" style="color:#b45309"><b>Refer for specialist '
        "review</b></div>"
        f'<div class="of-meta">Not saved to your history · model {escape(model_name)}{version}'
        "</div></div>"
    )


def _danger_html(probability: float | None, threshold: float | None) -> str:
    if probability is None or threshold is None:
        return ""
    side = "at or above" if probability >= threshold else "below"
    return (
        f'<div class="of-meta" id="of-danger">Probability of a dangerous finding '
        f"{percent(probability)}: {side} the {percent(threshold)} operating point chosen "
        "so that most dangerous cases are caught</div>"
    )


def _referral_html(prediction_set: list[str], refer: bool, reason: str) -> str:
    names = ", ".join(escape(pretty_label(n)) for n in prediction_set)
    words = f'<div class="of-meta" id="of-referral-reason">{escape(reason)}</div>' if reason else ""
    head = (
        '<div class="of-meta" id="of-refer" style="color:#b45309"><b>Refer for specialist '
        "review</b></div>"
        if refer
        else ""
    )
    return f'{head}<div class="of-meta" id="of-prediction-set">Prediction set: {names}</div>{words}'


def kpis(items: list[tuple[str, str]]) -> str:
    cells = "".join(
        f'<div class="of-kpi"><div class="v">{escape(v)}</div><div class="k">{escape(k)}</div>'
        "</div>"
        for k, v in items
    )
    return f'<div class="of-kpis">{cells}</div>'


def table(rows: list[tuple[str, Any]]) -> str:
    body = "".join(
        f"<tr><th>{escape(str(k))}</th><td>{v if isinstance(v, Markup) else escape(str(v))}</td>"
        "</tr>"
        for k, v in rows
    )
    return f'<div class="of-card"><table>{body}</table></div>'


class Markup(str):
    """A string that is already safe HTML (built here from escaped parts)."""
