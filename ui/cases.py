"""The case store: every prediction made through the UI, the clinician's feedback on it, and
its place in the care workflow (new -> reviewed -> released).

Stored per case: who asked (user id) and who it is assigned to, when, the kind of input
(png/jpeg/dicom), the model's answer (label, confidence, all probabilities, model
name/version/tag, the probability of the model's dangerous classes, the referral flag and
conformal set), feedback (agree or not, the true label, a note) and the workflow state. No file
names or patient identifiers; the only link to a patient is an optional pseudonymous case id
that the clinician chooses and, once invited, the patient's own UI account. The image bytes
are kept apart (`case_files`, this site's database only) because the released PDF and the
feedback export need them; they never leave the site but through those two.

Every read checks the viewer: a clinician sees the cases they made or are assigned to, an admin
all of them, a patient none through this store (patients read released results through
`ui.care`). Every action is appended to the audit log in the same transaction.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime

from components.audit import AuditLog
from ui.accounts import User
from ui.db import Database
from ui.errors import InvalidInput, NotFound, PermissionDenied

MAX_NOTE = 1000
_CASE_REF = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_LONG_NUMBER = re.compile(r"\d{8,}")
_DATE_LIKE = re.compile(r"(19|20)\d\d[-./]?[01]\d[-./]?[0-3]\d|[0-3]\d[-./][01]\d[-./](19|20)?\d\d")
FEEDBACK_STATES = ("any", "with feedback", "without feedback", "agreed", "disagreed")
STATUSES = ("new", "reviewed", "released")
#: The only moves a case can make (a released result is final: a correction is a new case).
TRANSITIONS = {"new": ("reviewed",), "reviewed": ("released",), "released": ()}


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
    status: str = "new"
    assigned_to: int | None = None
    danger: float | None = None  # P(any dangerous class); None: the model names none
    refer: bool | None = None
    prediction_set: list[str] | None = None
    reviewed_at: float | None = None
    released_at: float | None = None
    release_note: str | None = None
    patient_account: int | None = None

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
        status=row["status"],
        assigned_to=row["assigned_to"],
        danger=row["danger"],
        refer=None if row["refer"] is None else bool(row["refer"]),
        prediction_set=json.loads(row["prediction_set"]) if row["prediction_set"] else None,
        reviewed_at=row["reviewed_at"],
        released_at=row["released_at"],
        release_note=row["release_note"],
        patient_account=row["patient_account"],
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
    def __init__(
        self,
        db: Database,
        clock: Callable[[], float] = time.time,
        audit: AuditLog | None = None,
    ) -> None:
        self.db = db
        self.clock = clock
        self.audit = audit or AuditLog(db.connect)

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
        danger: float | None = None,
        refer: bool | None = None,
        prediction_set: list[str] | None = None,
        image: bytes | None = None,
    ) -> Case:
        """Store one prediction (and its image, site-locally) and audit it; returns the case."""
        require_staff(user)
        if label not in probabilities:
            raise InvalidInput(f"label {label!r} is not among the probabilities")
        probs = {str(k): float(v) for k, v in probabilities.items()}
        with self.db.connect() as conn:
            cursor = conn.execute(
                "INSERT INTO cases (user_id, assigned_to, case_ref, created_at, input_kind, label,"
                " confidence, probabilities, model_name, model_version, model_tag, latency_ms,"
                " danger, refer, prediction_set) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    user.id,
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
                    None if danger is None else float(danger),
                    None if refer is None else int(refer),
                    json.dumps(list(prediction_set)) if prediction_set else None,
                ),
            )
            case_id = cursor.lastrowid
            if image is not None:
                conn.execute(
                    "INSERT INTO case_files (case_id, kind, sha256, image) VALUES (?, ?, ?, ?)",
                    (case_id, input_kind, hashlib.sha256(image).hexdigest(), image),
                )
            self.audit.append(
                conn,
                user,
                "case.predict",
                case_id,
                {"label": label, "refer": refer, "model_version": model_version},
            )
        return self.get(user, case_id)

    def get(self, viewer: User, case_id: int) -> Case:
        """One case: an admin sees every case, a clinician the cases they made or are assigned
        to, a patient none (NotFound, the same answer as for a case that does not exist)."""
        with self.db.connect() as conn:
            row = conn.execute(f"{_SELECT} WHERE cases.id = ?", (int(case_id),)).fetchone()
        if row is None or not can_see(viewer, row["user_id"], row["assigned_to"]):
            self.audit.record(viewer, "access.refused", int(case_id))  # also probes of numbers
            raise NotFound(f"Case {case_id} was not found.")
        return _case(row)

    def log_access(
        self, user: User, case_id: int, action: str, details: Mapping | None = None
    ) -> None:
        """Audit an action on a case that changes nothing stored (an explanation, a similar-case
        query, a report download), after checking the user may see the case."""
        self.get(user, case_id)
        self.audit.record(user, action, case_id, details)

    def image(self, viewer: User, case_id: int) -> tuple[bytes, str]:
        """The case's image bytes and kind (png/jpeg/dicom), for the viewer's own cases."""
        self.get(viewer, case_id)
        with self.db.connect() as conn:
            row = conn.execute(
                "SELECT image, kind FROM case_files WHERE case_id = ?", (int(case_id),)
            ).fetchone()
        if row is None:
            raise NotFound(f"Case {case_id} has no stored image.")
        return bytes(row["image"]), row["kind"]

    def move(self, user: User, case_id: int, to: str, note: str = "", report: bytes = b"") -> Case:
        """Move a case along new -> reviewed -> released (anything else is refused).

        Releasing an image case needs the PDF that the patient will be able to download
        (`report`); it takes an optional note for the patient.
        """
        require_staff(user)
        case = self.get(user, case_id)
        if to not in TRANSITIONS.get(case.status, ()):
            allowed = " or ".join(TRANSITIONS[case.status]) or "nothing (it is final)"
            raise InvalidInput(
                f"Case #{case.id} is {case.status}; it can move to {allowed}, not to {to}."
            )
        note = (note or "").strip()
        if len(note) > MAX_NOTE:
            raise InvalidInput(f"Notes are limited to {MAX_NOTE} characters.")
        now = self.clock()
        with self.db.connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            current = conn.execute("SELECT status FROM cases WHERE id = ?", (case.id,)).fetchone()[
                "status"
            ]
            if current != case.status:  # someone else moved it meanwhile
                raise InvalidInput(f"Case #{case.id} is now {current}; reload the worklist.")
            if to == "reviewed":
                conn.execute(
                    "UPDATE cases SET status = 'reviewed', reviewed_by = ?, reviewed_at = ? "
                    "WHERE id = ?",
                    (user.id, now, case.id),
                )
                self.audit.append(conn, user, "case.review", case.id)
            else:
                if case.input_kind != "record" and not report.startswith(b"%PDF-"):
                    raise InvalidInput("Releasing needs the PDF report for the patient.")
                conn.execute(
                    "UPDATE cases SET status = 'released', released_by = ?, released_at = ?, "
                    "release_note = ? WHERE id = ?",
                    (user.id, now, note or None, case.id),
                )
                conn.execute(
                    "UPDATE case_files SET report = ?, report_at = ? WHERE case_id = ?",
                    (report or None, now, case.id),
                )
                self.audit.append(
                    conn, user, "case.release", case.id, {"note": bool(note), "pdf": len(report)}
                )
        return self.get(user, case.id)

    def assign(self, user: User, case_id: int, clinician: User) -> Case:
        """Hand a case over to another active clinician (its assignee or an admin may)."""
        case = self.get(user, case_id)
        if not user.is_admin and case.assigned_to != user.id:
            raise PermissionDenied("Only the clinician the case is assigned to can hand it over.")
        if clinician.role != "clinician" or not clinician.active:
            raise InvalidInput("Cases can be assigned to active clinicians only.")
        with self.db.connect() as conn:
            conn.execute("UPDATE cases SET assigned_to = ? WHERE id = ?", (clinician.id, case.id))
            self.audit.append(conn, user, "case.assign", case.id, {"to_user": clinician.id})
        return self.get(user, case.id)

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
        if user.id not in (case.user_id, case.assigned_to) and not user.is_admin:
            raise PermissionDenied("Only the case's clinician can rate it.")
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
            self.audit.append(
                conn, user, "case.feedback", case_id, {"agree": agree, "true_label": true_label}
            )
        return self.get(user, case_id)

    def search(
        self, viewer: User, filters: CaseFilter | None = None, limit: int = 500
    ) -> list[Case]:
        """The viewer's cases (an admin's: everyone's), newest first, filtered."""
        f = filters or CaseFilter()
        where, params = [], []
        if viewer.is_patient:
            return []
        if not viewer.is_admin:
            where.append("(cases.user_id = ? OR cases.assigned_to = ?)")
            params += [viewer.id, viewer.id]
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


def require_staff(user: User) -> None:
    if user.role not in ("clinician", "admin") or not user.active:
        raise PermissionDenied("Only clinicians can do this.")


def can_see(viewer: User, made_by: int, assigned_to: int | None) -> bool:
    """Whether `viewer` may read a case made by `made_by` and assigned to `assigned_to`."""
    if viewer.is_admin:
        return True
    return viewer.role == "clinician" and viewer.id in (made_by, assigned_to)
