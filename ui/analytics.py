"""Usage and quality figures computed from the stored cases (pure functions, no I/O).

Accuracy here is *feedback-based*: among cases a clinician rated, how often the prediction
matched the label they gave. It describes rated cases only, which may not be representative.
Operations: processing-time percentiles, each staff member's activity (from the audit log) and
a class-mix drift check.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
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


# ---------------------------------------------------------------- operations


@dataclass(frozen=True)
class Latency:
    n: int
    p50: float | None
    p95: float | None


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least `q` of the values at or
    below it (no interpolation: every figure shown is a processing time that happened)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def processing_time(cases: Sequence[Case]) -> Latency:
    """p50 / p95 of the service's processing time per prediction (ms)."""
    times = [c.latency_ms for c in cases if c.latency_ms is not None]
    if not times:
        return Latency(0, None, None)
    return Latency(len(times), percentile(times, 0.5), percentile(times, 0.95))


#: The audit actions counted as a clinician's activity, with their column names.
ACTIVITY = {
    "case.predict": "Predictions",
    "case.feedback": "Feedback",
    "case.review": "Reviewed",
    "case.release": "Released",
    "question.answer": "Answers",
    "invite.create": "Invitations",
}


def activity(entries: Iterable, names: Mapping[int, str]) -> list[tuple[str, dict[str, int]]]:
    """Per staff member (by name), how many of each `ACTIVITY` action the audit log holds."""
    counts: dict[int, Counter] = {}
    for e in entries:
        if e.action in ACTIVITY and e.actor_id is not None and e.actor_role != "patient":
            counts.setdefault(e.actor_id, Counter())[ACTIVITY[e.action]] += 1
    rows = [
        (names.get(user, f"user {user}"), {col: c.get(col, 0) for col in ACTIVITY.values()})
        for user, c in counts.items()
    ]
    return sorted(rows, key=lambda r: (-sum(r[1].values()), r[0]))


DRIFT_THRESHOLD = 0.2  # total-variation distance that raises the alert
DRIFT_WINDOW = 200  # the most recent predictions compared
DRIFT_MIN_CASES = 30  # fewer recent predictions: too few to judge


@dataclass(frozen=True)
class DriftCheck:
    """Total-variation distance between the recent predicted-class mix and the class mix of
    the model card's test split: TV = ½ Σ_c |p_recent(c) − p_test(c)| (0: same, 1: disjoint)."""

    distance: float | None
    cases: int
    threshold: float
    alert: bool
    message: str


def test_distribution(card_metrics: Mapping) -> dict[str, float]:
    """Class shares of the model card's test split (from its per-class support)."""
    per_class = (card_metrics or {}).get("per_class") or {}
    support = {c: float(v.get("support", 0)) for c, v in per_class.items() if isinstance(v, dict)}
    total = sum(support.values())
    return {c: n / total for c, n in support.items()} if total else {}


def drift(
    cases: Sequence[Case],
    reference: Mapping[str, float],
    threshold: float = DRIFT_THRESHOLD,
    window: int = DRIFT_WINDOW,
    min_cases: int = DRIFT_MIN_CASES,
) -> DriftCheck:
    recent = sorted(cases, key=lambda c: (c.created_at, c.id))[-window:]
    if not reference:
        return DriftCheck(
            None, len(recent), threshold, False, "The model card has no test class mix."
        )
    if len(recent) < min_cases:
        return DriftCheck(
            None,
            len(recent),
            threshold,
            False,
            f"{len(recent)} predictions so far; the drift check starts at {min_cases}.",
        )
    mix = Counter(c.label for c in recent)
    classes = set(reference) | set(mix)
    tv = 0.5 * sum(abs(mix.get(c, 0) / len(recent) - reference.get(c, 0.0)) for c in classes)
    alert = tv > threshold
    verdict = "ABOVE" if alert else "within"
    return DriftCheck(
        tv,
        len(recent),
        threshold,
        alert,
        f"Total-variation distance between the last {len(recent)} predictions' class mix and "
        f"the model card's test split: {tv:.2f} ({verdict} the alert threshold {threshold:.2f}).",
    )
