"""The case store: every prediction made through the UI, and the clinician's feedback on it.

Stored per case: who asked (user id), when, the kind of input (png/jpeg/dicom), the model's
answer (label, confidence, all probabilities, model name/version/tag) and feedback (agree or
not, the true label, a note). No images, file names or patient identifiers; the only link to a
patient is an optional pseudonymous case id that the clinician chooses.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime

from ui.accounts import User
from ui.db import Database
from ui.errors import InvalidInput, NotFound, PermissionDenied

MAX_NOTE = 1000
_CASE_REF = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_LONG_NUMBER = re.compile(r"\d{8,}")
_DATE_LIKE = re.compile(r"(19|20)\d\d[-./]?[01]\d[-./]?[0-3]\d|[0-3]\d[-./][01]\d[-./](19|20)?\d\d")
FEEDBACK_STATES = ("any", "with feedback", "without feedback", "agreed", "disagreed")


def check_case_ref(value: str | None) -> str | None:
    """A pseudonymous case id, or None. Refuses things that look like identifiers."""
    ref = (value or "").strip()
    if not ref:
        return None
    if not _CASE_REF.match(ref):
        raise InvalidInput(
            "A case id is up to 32 letters, digits, dashes or underscores (no spaces)."
        )
    if _LONG_NUMBER.search(ref) or _DATE_LIKE.search(ref):
        raise InvalidInput(
            "That case id looks like a hospital number or a date. Please use a pseudonymous "
            "id that does not identify the patient."
        )
    return ref


def input_kind(data: bytes) -> str:
    """png, jpeg, dicom or other, from the file's first bytes (never from its name)."""
    if data.startswith(b"\x89PNG"):
        return "png"
    if data.startswith(b"\xff\xd8"):
        return "jpeg"
    if len(data) > 132 and data[128:132] == b"DICM":
        return "dicom"
    return "other"


@dataclass(frozen=True)
class Case:
    id: int
    user_id: int
    username: str
    case_ref: str | None
    created_at: float
    input_kind: str
    label: str
    confidence: float
    probabilities: dict[str, float]
    model_name: str
    model_version: str
    model_tag: str
    latency_ms: float | None
    feedback_agree: bool | None
    true_label: str | None
    feedback_note: str | None
    feedback_at: float | None

    @property
    def has_feedback(self) -> bool:
        return self.feedback_agree is not None

    @property
    def day(self) -> date:
        return datetime.fromtimestamp(self.created_at, UTC).date()


def _case(row) -> Case:
    agree = row["feedback_agree"]
    return Case(
        id=row["id"],
        user_id=row["user_id"],
        username=row["username"],
        case_ref=row["case_ref"],
        created_at=row["created_at"],
        input_kind=row["input_kind"],
        label=row["label"],
        confidence=row["confidence"],
        probabilities=json.loads(row["probabilities"]),
        model_name=row["model_name"],
        model_version=row["model_version"],
        model_tag=row["model_tag"],
        latency_ms=row["latency_ms"],
        feedback_agree=None if agree is None else bool(agree),
        true_label=row["true_label"],
        feedback_note=row["feedback_note"],
        feedback_at=row["feedback_at"],
    )


@dataclass(frozen=True)
class CaseFilter:
    """History filters; empty fields match everything."""

    text: str = ""  # substring of the case id or the feedback note
    label: str = ""  # predicted label
    feedback: str = "any"  # one of FEEDBACK_STATES
    username: str = ""  # admins only: one user's cases
    since: date | None = None
    until: date | None = None


_SELECT = (
    "SELECT cases.*, users.username AS username FROM cases JOIN users ON users.id = cases.user_id"
)


class CaseStore:
    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock

    def record(
        self,
        user: User,
        *,
        label: str,
        probabilities: Mapping[str, float],
        model_name: str,
        model_version: str,
        model_tag: str,
        input_kind: str,
        latency_ms: float | None = None,
        case_ref: str | None = None,
    ) -> Case:
        """Store one prediction; returns the stored case."""
        if label not in probabilities:
            raise InvalidInput(f"label {label!r} is not among the probabilities")
        probs = {str(k): float(v) for k, v in probabilities.items()}
        with self.db.connect() as conn:
            cursor = conn.execute(
                "INSERT INTO cases (user_id, case_ref, created_at, input_kind, label, confidence,"
                " probabilities, model_name, model_version, model_tag, latency_ms) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    user.id,
                    check_case_ref(case_ref),
                    self.clock(),
                    input_kind,
                    label,
                    probs[label],
                    json.dumps(probs),
                    model_name,
                    model_version,
                    model_tag,
                    latency_ms,
                ),
            )
            case_id = cursor.lastrowid
        return self.get(user, case_id)

    def get(self, viewer: User, case_id: int) -> Case:
        """One case; a clinician sees only their own."""
        with self.db.connect() as conn:
            row = conn.execute(f"{_SELECT} WHERE cases.id = ?", (case_id,)).fetchone()
        if row is None or (not viewer.is_admin and row["user_id"] != viewer.id):
            raise NotFound(f"Case {case_id} was not found.")
        return _case(row)

    def add_feedback(
        self,
        user: User,
        case_id: int,
        *,
        agree: bool,
        true_label: str | None = None,
        note: str = "",
    ) -> Case:
        """Record the clinician's verdict. Agreeing means the true label is the prediction."""
        case = self.get(user, case_id)
        if case.user_id != user.id and not user.is_admin:
            raise PermissionDenied("Only the clinician who made this case can rate it.")
        if agree:
            if true_label and true_label != case.label:
                raise InvalidInput(
                    "You agreed with the prediction but chose a different true label."
                )
            true_label = case.label
        else:
            if not true_label:
                raise InvalidInput("Please choose the true label when you disagree.")
            if true_label not in case.probabilities:
                raise InvalidInput(f"{true_label!r} is not one of the model's classes.")
            if true_label == case.label:
                raise InvalidInput("You disagreed but chose the predicted label as the true label.")
        note = (note or "").strip()
        if len(note) > MAX_NOTE:
            raise InvalidInput(f"Notes are limited to {MAX_NOTE} characters.")
        with self.db.connect() as conn:
            conn.execute(
                "UPDATE cases SET feedback_agree = ?, true_label = ?, feedback_note = ?, "
                "feedback_at = ? WHERE id = ?",
                (int(agree), true_label, note or None, self.clock(), case_id),
            )
        return self.get(user, case_id)

    def search(
        self, viewer: User, filters: CaseFilter | None = None, limit: int = 500
    ) -> list[Case]:
        """The viewer's cases (an admin's: everyone's), newest first, filtered."""
        f = filters or CaseFilter()
        where, params = [], []
        if not viewer.is_admin:
            where.append("cases.user_id = ?")
            params.append(viewer.id)
        elif f.username.strip():
            where.append("users.username = ?")
            params.append(f.username.strip())
        if f.text.strip():
            where.append("(cases.case_ref LIKE ? OR cases.feedback_note LIKE ?)")
            pattern = f"%{f.text.strip()}%"
            params += [pattern, pattern]
        if f.label:
            where.append("cases.label = ?")
            params.append(f.label)
        feedback_clause = {
            "any": None,
            "with feedback": "cases.feedback_agree IS NOT NULL",
            "without feedback": "cases.feedback_agree IS NULL",
            "agreed": "cases.feedback_agree = 1",
            "disagreed": "cases.feedback_agree = 0",
        }
        if f.feedback not in feedback_clause:
            raise InvalidInput(f"feedback filter must be one of {FEEDBACK_STATES}")
        if feedback_clause[f.feedback]:
            where.append(feedback_clause[f.feedback])
        if f.since:
            where.append("cases.created_at >= ?")
            params.append(
                datetime(f.since.year, f.since.month, f.since.day, tzinfo=UTC).timestamp()
            )
        if f.until:
            where.append("cases.created_at < ?")
            end = datetime(f.until.year, f.until.month, f.until.day, tzinfo=UTC).timestamp()
            params.append(end + 86400)
        sql = _SELECT + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY cases.created_at DESC, cases.id DESC LIMIT ?"
        with self.db.connect() as conn:
            rows = conn.execute(sql, (*params, int(limit))).fetchall()
        return [_case(r) for r in rows]

    def all_cases(self, actor: User) -> list[Case]:
        """Every case, for analytics; admins only."""
        if not actor.is_admin:
            raise PermissionDenied("Analytics are for administrators only.")
        with self.db.connect() as conn:
            rows = conn.execute(_SELECT + " ORDER BY cases.created_at").fetchall()
        return [_case(r) for r in rows]
