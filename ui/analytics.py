"""Usage and quality figures computed from the stored cases (pure functions, no I/O).

Accuracy here is *feedback-based*: among cases a clinician rated, how often the prediction
matched the label they gave. It describes rated cases only, which may not be representative.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta

from ui.cases import Case


def predictions_per_day(cases: Sequence[Case], fill_gaps: bool = True) -> list[tuple[date, int]]:
    """(UTC day, number of predictions) in date order; days without cases count 0."""
    counts = Counter(c.day for c in cases)
    if not counts:
        return []
    if not fill_gaps:
        return sorted(counts.items())
    first, last = min(counts), max(counts)
    days = (last - first).days + 1
    return [(first + timedelta(d), counts.get(first + timedelta(d), 0)) for d in range(days)]


def class_mix(cases: Sequence[Case], classes: Sequence[str] = ()) -> dict[str, int]:
    """Predicted label -> count, most frequent first (ties by name); `classes` never
    predicted are listed with 0."""
    counts = Counter({c: 0 for c in classes})
    counts.update(c.label for c in cases)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


@dataclass(frozen=True)
class Bin:
    low: float
    high: float
    count: int


def confidence_histogram(cases: Sequence[Case], bins: int = 10) -> list[Bin]:
    """Counts of top-class confidence in `bins` equal bins over [0, 1] (1.0 in the last)."""
    if bins < 1:
        raise ValueError("bins must be at least 1")
    counts = [0] * bins
    for c in cases:
        counts[min(int(c.confidence * bins), bins - 1)] += 1
    return [Bin(i / bins, (i + 1) / bins, n) for i, n in enumerate(counts)]


def low_confidence(cases: Sequence[Case], threshold: float = 0.6) -> list[Case]:
    """Cases whose top-class confidence is below `threshold`, least confident first."""
    return sorted((c for c in cases if c.confidence < threshold), key=lambda c: c.confidence)


@dataclass(frozen=True)
class ClassAccuracy:
    label: str  # the true label given in feedback
    rated: int
    correct: int

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.rated if self.rated else None


def feedback_accuracy(
    cases: Sequence[Case], classes: Sequence[str] = ()
) -> tuple[list[ClassAccuracy], ClassAccuracy]:
    """Per true class (from feedback): rated cases and how many the model got right; plus the
    overall figure. `classes` lists classes to show even without rated cases."""
    rated = [c for c in cases if c.has_feedback and c.true_label]
    labels = list(dict.fromkeys([*classes, *sorted({c.true_label for c in rated})]))
    rows = []
    for label in labels:
        mine = [c for c in rated if c.true_label == label]
        rows.append(ClassAccuracy(label, len(mine), sum(c.label == label for c in mine)))
    overall = ClassAccuracy("all classes", len(rated), sum(c.label == c.true_label for c in rated))
    return rows, overall


def feedback_rate(cases: Sequence[Case]) -> float | None:
    """Share of cases that received feedback."""
    return sum(c.has_feedback for c in cases) / len(cases) if cases else None
