"""Matplotlib figures for the UI in one calm, readable style (shown with `gr.Plot`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import date

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from ui.analytics import Bin

INK = "#1f2a37"
MUTED = "#6b7280"
ACCENT = "#1f6f8b"
ACCENT_LIGHT = "#a9cfdc"
GRID = "#e5e7eb"


def pretty_label(label: str) -> str:
    """'glioma_tumor' -> 'Glioma tumor'."""
    text = str(label).replace("_", " ").strip()
    return text[:1].upper() + text[1:]


def _figure(width: float, height: float) -> tuple[Figure, plt.Axes]:
    fig, ax = plt.subplots(figsize=(width, height), dpi=110)
    fig.patch.set_facecolor("white")
    ax.set_facecolor("white")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_color(GRID)
    ax.tick_params(colors=INK, labelsize=9)
    return fig, ax


def _title(ax: plt.Axes, text: str) -> None:
    ax.set_title(text, loc="left", fontsize=10.5, fontweight="bold", color=INK, pad=10)


def _pad_categories(ax: plt.Axes, n: int, minimum: int, axis: str = "x") -> None:
    """Keep bars slim and centred when there are fewer than `minimum` of them."""
    pad = max(0.0, (minimum - n) / 2)
    limits = (-0.5 - pad, n - 0.5 + pad)
    (ax.set_xlim if axis == "x" else ax.set_ylim)(*limits)


def _empty(fig: Figure, ax: plt.Axes, text: str) -> Figure:
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", color=MUTED, fontsize=10)
    fig.tight_layout()
    plt.close(fig)
    return fig


def probability_chart(probabilities: Mapping[str, float], predicted: str) -> Figure:
    """Horizontal bars, most probable on top, the predicted class highlighted, % labels."""
    items = sorted(probabilities.items(), key=lambda kv: kv[1])
    fig, ax = _figure(5.6, 0.55 * len(items) + 1.0)
    _title(ax, "Class probabilities")
    names = [pretty_label(k) for k, _ in items]
    values = [100.0 * v for _, v in items]
    colours = [ACCENT if k == predicted else ACCENT_LIGHT for k, _ in items]
    bars = ax.barh(names, values, color=colours, height=0.6)
    for bar, value in zip(bars, values, strict=True):
        ax.text(
            min(value + 1.5, 88),
            bar.get_y() + bar.get_height() / 2,
            f"{value:.1f}%",
            va="center",
            fontsize=9,
            color=INK,
        )
    ax.set_xlim(0, 100)
    ax.set_xlabel("Probability (%)", color=MUTED, fontsize=9)
    ax.xaxis.grid(True, color=GRID, linewidth=0.8)
    ax.set_axisbelow(True)
    fig.tight_layout()
    plt.close(fig)
    return fig


def per_day_chart(days: Sequence[tuple[date, int]]) -> Figure:
    fig, ax = _figure(5.6, 2.8)
    _title(ax, "Predictions per day (UTC)")
    if not days:
        return _empty(fig, ax, "No predictions yet")
    ax.bar([d.isoformat() for d, _ in days], [n for _, n in days], color=ACCENT, width=0.6)
    _pad_categories(ax, len(days), 7)
    ax.set_ylabel("Predictions", color=MUTED, fontsize=9)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.yaxis.grid(True, color=GRID, linewidth=0.8)
    ax.set_axisbelow(True)
    if len(days) > 7:
        ax.tick_params(axis="x", labelrotation=45)
    fig.tight_layout()
    plt.close(fig)
    return fig


def class_mix_chart(mix: Mapping[str, int]) -> Figure:
    fig, ax = _figure(5.6, 2.8)
    _title(ax, "Predicted class mix")
    if not sum(mix.values()):
        return _empty(fig, ax, "No predictions yet")
    items = list(mix.items())[::-1]
    bars = ax.barh(
        [pretty_label(k) for k, _ in items], [n for _, n in items], color=ACCENT, height=0.6
    )
    total = sum(mix.values())
    for bar, (_, n) in zip(bars, items, strict=True):
        ax.text(
            bar.get_width(),
            bar.get_y() + bar.get_height() / 2,
            f"  {n} ({100 * n / total:.0f}%)",
            va="center",
            fontsize=9,
            color=INK,
        )
    ax.set_xlim(0, max(mix.values()) * 1.35)
    _pad_categories(ax, len(items), 4, axis="y")
    ax.set_xlabel("Predictions", color=MUTED, fontsize=9)
    ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    plt.close(fig)
    return fig


def confidence_chart(bins: Sequence[Bin], threshold: float | None = None) -> Figure:
    fig, ax = _figure(5.6, 2.8)
    _title(ax, "Confidence of the predicted class")
    if not any(b.count for b in bins):
        return _empty(fig, ax, "No predictions yet")
    width = bins[0].high - bins[0].low
    colours = [
        "#d97706" if threshold is not None and b.high <= threshold + 1e-9 else ACCENT for b in bins
    ]
    ax.bar(
        [100 * b.low for b in bins],
        [b.count for b in bins],
        width=100 * width * 0.9,
        align="edge",
        color=colours,
    )
    if threshold is not None:
        ax.axvline(100 * threshold, color="#b45309", linestyle="--", linewidth=1)
    ax.set_xlim(0, 100)
    ax.set_xlabel(
        "Confidence (%) · orange: below the low-confidence threshold", color=MUTED, fontsize=9
    )
    ax.set_ylabel("Cases", color=MUTED, fontsize=9)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.yaxis.grid(True, color=GRID, linewidth=0.8)
    ax.set_axisbelow(True)
    fig.tight_layout()
    plt.close(fig)
    return fig
