"""The clinician's worklist: the cases a clinician may see, riskiest first.

Risk is the probability of the model's dangerous classes (`Case.danger`: the service's
`danger_probability`, else the sum of the probabilities of the classes the model card names
dangerous). "Open" means new or reviewed, or released with an unanswered patient question.
Order: higher risk first; cases whose risk is unknown after all known ones; among
equal risk, referred cases first, then the oldest (it has waited longest).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

from ui.accounts import User
from ui.cases import STATUSES, Case, CaseFilter, CaseStore

STATUS_CHOICES = ("open", *STATUSES, "all")  # open: new or reviewed


@dataclass(frozen=True)
class WorklistFilter:
    status: str = "open"  # one of STATUS_CHOICES
    mine: bool = False  # only cases assigned to the viewer
    since: date | None = None
    until: date | None = None


@dataclass(frozen=True)
class WorkItem:
    case: Case
    open_questions: int


def danger_of(probabilities: Mapping[str, float], dangerous: Sequence[str]) -> float | None:
    """P(any dangerous class) = the sum of their probabilities; None when none is named."""
    named = [c for c in dangerous if c in probabilities]
    return sum(probabilities[c] for c in named) if named else None


def care_fields(prediction: Any, info: Any, image: bytes | None) -> dict[str, Any]:
    """What `CaseStore.record` keeps for the worklist from a gateway `Prediction` and the
    model's `ModelInfo` (None when unknown): risk, referral, prediction set, the image."""
    danger = prediction.danger_probability
    if danger is None:
        danger = danger_of(prediction.probabilities, info.dangerous if info else [])
    return {
        "danger": danger,
        "refer": prediction.refer,
        "prediction_set": prediction.prediction_set,
        "image": image,
    }


def risk_key(case: Case) -> tuple:
    unknown = case.danger is None
    return (unknown, -(case.danger or 0.0), not case.refer, case.created_at, case.id)


def order(cases: Sequence[Case]) -> list[Case]:
    return sorted(cases, key=risk_key)


def worklist(
    store: CaseStore,
    viewer: User,
    filters: WorklistFilter,
    open_questions: Mapping[int, int] | None = None,
) -> list[WorkItem]:
    """The viewer's worklist (CaseStore.search enforces who sees what)."""
    if filters.status not in STATUS_CHOICES:
        raise ValueError(f"status must be one of {STATUS_CHOICES}")
    cases = store.search(viewer, CaseFilter(since=filters.since, until=filters.until), 5000)
    wanted = {"open": ("new", "reviewed"), "all": STATUSES}.get(filters.status, (filters.status,))
    questions = open_questions or {}
    # "open" also holds released cases with a patient question waiting for an answer
    cases = [
        c for c in cases if c.status in wanted or (filters.status == "open" and questions.get(c.id))
    ]
    if filters.mine:
        cases = [c for c in cases if c.assigned_to == viewer.id]
    return [WorkItem(c, questions.get(c.id, 0)) for c in order(cases)]
