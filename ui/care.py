"""Patients in the care workflow: invitations, released results, questions and answers.

A clinician invites the patient of a case with a one-time code (random, 75 bits, shown once,
stored only as its SHA-256, valid for `INVITE_TTL_S`). With the code a patient creates an
account that is linked to that case, or a signed-in patient links a further case. A patient
reads only the cases linked to their account, and of those only what a clinician released;
they can download the released PDF and ask questions, which the case's clinician answers.

Every function takes the acting user (as re-read from the session) and checks role and
ownership itself, so a hidden button is never the only guard. Every action is audited.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

from components.audit import AuditLog
from ui.accounts import AccountStore, User
from ui.cases import MAX_NOTE, CaseStore, can_see, require_staff
from ui.db import Database
from ui.errors import InvalidInput, NotFound, PermissionDenied

INVITE_TTL_S = 14 * 86400.0
MAX_OPEN_QUESTIONS = 5
CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I
_CODE = re.compile(r"^[A-Z2-9]{15}$")
BAD_CODE = "This invitation code is not valid (it may have expired or been used already)."


class InvalidCode(InvalidInput):
    """An invitation code that is malformed, unknown, used, replaced or expired."""


def new_code() -> str:
    """A one-time code like ``ABCDE-FGHJK-LMNPQ`` (15 of 32 symbols: 75 random bits)."""
    raw = "".join(secrets.choice(CODE_ALPHABET) for _ in range(15))
    return "-".join(raw[i : i + 5] for i in range(0, 15, 5))


def normalise_code(code: str) -> str:
    raw = re.sub(r"[\s-]", "", code or "").upper()
    if not _CODE.match(raw):
        raise InvalidCode(BAD_CODE)
    return raw


def code_hash(code: str) -> str:
    return hashlib.sha256(normalise_code(code).encode()).hexdigest()


@dataclass(frozen=True)
class Invitation:
    case_id: int
    code: str  # shown once to the clinician, never stored
    expires_at: float


@dataclass(frozen=True)
class PatientCase:
    """What a patient may see of one of their cases."""

    case_id: int
    case_ref: str | None
    created_at: float
    input_kind: str
    released: bool
    released_at: float | None = None
    label: str | None = None
    confidence: float | None = None
    prediction_set: list[str] | None = None
    refer: bool | None = None
    note: str | None = None
    model: str | None = None


@dataclass(frozen=True)
class Question:
    id: int
    case_id: int
    body: str
    asked_at: float
    answer: str | None
    answered_at: float | None

    @property
    def answered(self) -> bool:
        return self.answer is not None


def _patient_case(row: sqlite3.Row) -> PatientCase:
    base = dict(
        case_id=row["id"],
        case_ref=row["case_ref"],
        created_at=row["created_at"],
        input_kind=row["input_kind"],
    )
    if row["status"] != "released":
        return PatientCase(**base, released=False)
    return PatientCase(
        **base,
        released=True,
        released_at=row["released_at"],
        label=row["label"],
        confidence=row["confidence"],
        prediction_set=json.loads(row["prediction_set"]) if row["prediction_set"] else None,
        refer=None if row["refer"] is None else bool(row["refer"]),
        note=row["release_note"],
        model=f"{row['model_name']} v{row['model_version']}",
    )


def _question(row: sqlite3.Row) -> Question:
    return Question(
        row["id"], row["case_id"], row["body"], row["asked_at"], row["answer"], row["answered_at"]
    )


def _text(value: str, what: str) -> str:
    text = (value or "").strip()
    if not text:
        raise InvalidInput(f"Please write your {what}.")
    if len(text) > MAX_NOTE:
        raise InvalidInput(f"A {what} is limited to {MAX_NOTE} characters.")
    return text


class CareStore:
    def __init__(
        self,
        db: Database,
        accounts: AccountStore,
        cases: CaseStore,
        clock: Callable[[], float] = time.time,
        audit: AuditLog | None = None,
        invite_ttl_s: float = INVITE_TTL_S,
    ) -> None:
        self.db = db
        self.accounts = accounts
        self.cases = cases
        self.clock = clock
        self.audit = audit or AuditLog(db.connect)
        self.invite_ttl_s = invite_ttl_s

    # ------------------------------------------------------------------ clinician side

    def invite(self, clinician: User, case_id: int) -> Invitation:
        """A one-time code for the patient of a case the clinician may see; earlier unused
        codes for the case stop working."""
        require_staff(clinician)
        case = self.cases.get(clinician, case_id)
        if case.patient_account is not None:
            raise InvalidInput(f"Case #{case.id} is already linked to the patient's account.")
        code, now = new_code(), self.clock()
        with self.db.connect() as conn:
            conn.execute(
                "UPDATE invites SET expires_at = ? WHERE case_id = ? AND used_at IS NULL "
                "AND expires_at > ?",
                (now, case.id, now),
            )
            conn.execute(
                "INSERT INTO invites (case_id, code_hash, created_by, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (case.id, code_hash(code), clinician.id, now, now + self.invite_ttl_s),
            )
            days = round(self.invite_ttl_s / 86400, 2)
            self.audit.append(conn, clinician, "invite.create", case.id, {"valid_days": days})
        return Invitation(case.id, code, now + self.invite_ttl_s)

    def answer(self, clinician: User, question_id: int, text: str) -> Question:
        """The case's clinician (or an admin) answers a patient's question, once."""
        require_staff(clinician)
        body = _text(text, "answer")
        with self.db.connect() as conn:
            row = conn.execute(
                "SELECT questions.*, cases.user_id AS made_by, cases.assigned_to "
                "FROM questions JOIN cases ON cases.id = questions.case_id "
                "WHERE questions.id = ?",
                (int(question_id),),
            ).fetchone()
            if row is None or not can_see(clinician, row["made_by"], row["assigned_to"]):
                raise NotFound(f"Question {question_id} was not found.")
            if row["answer"] is not None:
                raise InvalidInput("This question has already been answered.")
            conn.execute(
                "UPDATE questions SET answer = ?, answered_by = ?, answered_at = ? WHERE id = ?",
                (body, clinician.id, self.clock(), row["id"]),
            )
            self.audit.append(
                conn, clinician, "question.answer", row["case_id"], {"question": row["id"]}
            )
        with self.db.connect() as conn:
            updated = conn.execute("SELECT * FROM questions WHERE id = ?", (row["id"],)).fetchone()
        return _question(updated)

    def invitation_pending(self, clinician: User, case_id: int) -> bool:
        """Whether the case has a code that is still unused and valid."""
        case = self.cases.get(clinician, case_id)
        with self.db.connect() as conn:
            row = conn.execute(
                "SELECT 1 FROM invites WHERE case_id = ? AND used_at IS NULL AND expires_at > ?",
                (case.id, self.clock()),
            ).fetchone()
        return row is not None

    def open_questions(self, clinician: User) -> dict[int, int]:
        """Case id -> unanswered patient questions, over the cases the clinician may see."""
        require_staff(clinician)
        with self.db.connect() as conn:
            rows = conn.execute(
                "SELECT questions.case_id, COUNT(*) AS n, cases.user_id AS made_by, "
                "cases.assigned_to FROM questions JOIN cases ON cases.id = questions.case_id "
                "WHERE questions.answer IS NULL GROUP BY questions.case_id"
            ).fetchall()
        return {
            r["case_id"]: r["n"] for r in rows if can_see(clinician, r["made_by"], r["assigned_to"])
        }

    # ------------------------------------------------------------------ patient side

    def sign_up(self, code: str, username: str, password: str) -> User:
        """A patient account from an invitation code, linked to the invitation's case.
        A refused code is audited (`invite.refused`, no actor), so guessing shows in the log."""
        try:
            with self.db.connect() as conn:
                conn.execute("BEGIN IMMEDIATE")
                invite, now = self._usable(conn, code), self.clock()
                patient = self.accounts._insert(
                    username, password, "patient", None, conn=conn, audited=False
                )
                self._link(conn, invite, patient, now)
                self.audit.append(conn, patient, "patient.sign_up", invite["case_id"])
        except InvalidCode:
            self.audit.record(None, "invite.refused")
            raise
        return self.accounts.get(patient.id)

    def redeem(self, patient: User, code: str) -> PatientCase:
        """A signed-in patient links a further case with a new code."""
        self._require_patient(patient)
        try:
            with self.db.connect() as conn:
                conn.execute("BEGIN IMMEDIATE")
                invite = self._usable(conn, code)
                self._link(conn, invite, patient, self.clock())
                self.audit.append(conn, patient, "invite.redeem", invite["case_id"])
        except InvalidCode:
            self.audit.record(patient, "invite.refused")
            raise
        return self._own(patient, invite["case_id"])

    def my_cases(self, patient: User) -> list[PatientCase]:
        """The patient's cases, newest first; results only where released."""
        self._require_patient(patient)
        with self.db.connect() as conn:
            rows = conn.execute(
                "SELECT * FROM cases WHERE patient_account = ? ORDER BY created_at DESC, id DESC",
                (patient.id,),
            ).fetchall()
        return [_patient_case(r) for r in rows]

    def view(self, patient: User, case_id: int) -> PatientCase:
        """One of the patient's own cases (audited as a view); NotFound for anyone else's."""
        case = self._own(patient, case_id)
        self.audit.record(patient, "case.view", case.case_id, {"released": case.released})
        return case

    def report(self, patient: User, case_id: int) -> bytes:
        """The released PDF of the patient's own case."""
        case = self._own(patient, case_id)
        if not case.released:
            raise NotFound("This result has not been released yet.")
        with self.db.connect() as conn:
            row = conn.execute(
                "SELECT report FROM case_files WHERE case_id = ?", (case.case_id,)
            ).fetchone()
            if row is None or row["report"] is None:
                raise NotFound("The report of this result is not available.")
            self.audit.append(conn, patient, "report.download", case.case_id, {"released": True})
        return bytes(row["report"])

    def ask(self, patient: User, case_id: int, text: str) -> Question:
        """A question from the patient on their own case, for its clinician."""
        case = self._own(patient, case_id)
        body = _text(text, "question")
        with self.db.connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            waiting = conn.execute(
                "SELECT COUNT(*) FROM questions WHERE case_id = ? AND answer IS NULL",
                (case.case_id,),
            ).fetchone()[0]
            if waiting >= MAX_OPEN_QUESTIONS:
                raise InvalidInput(
                    f"You have {waiting} questions waiting for an answer on this case; please "
                    "wait for your clinician to reply."
                )
            question_id = conn.execute(
                "INSERT INTO questions (case_id, patient_id, body, asked_at) VALUES (?, ?, ?, ?)",
                (case.case_id, patient.id, body, self.clock()),
            ).lastrowid
            self.audit.append(
                conn, patient, "question.ask", case.case_id, {"question": question_id}
            )
        return self.questions(patient, case.case_id)[-1]

    # ------------------------------------------------------------------ both

    def questions(self, viewer: User, case_id: int) -> list[Question]:
        """A case's questions and answers, oldest first: for its patient and its clinicians."""
        if viewer.is_patient:
            self._own(viewer, case_id)
        else:
            self.cases.get(viewer, case_id)
        with self.db.connect() as conn:
            rows = conn.execute(
                "SELECT * FROM questions WHERE case_id = ? ORDER BY asked_at, id", (int(case_id),)
            ).fetchall()
        return [_question(r) for r in rows]

    # ------------------------------------------------------------------ helpers

    def _require_patient(self, user: User) -> None:
        if not user.is_patient or not user.active:
            raise PermissionDenied("This is for patients' own accounts.")

    def _own(self, patient: User, case_id: int) -> PatientCase:
        self._require_patient(patient)
        with self.db.connect() as conn:
            row = conn.execute(
                "SELECT * FROM cases WHERE id = ? AND patient_account = ?",
                (int(case_id), patient.id),
            ).fetchone()
        if row is None:  # the same answer whether the case exists or belongs to someone else
            self.audit.record(patient, "access.refused", int(case_id))
            raise NotFound(f"Case {case_id} was not found.")
        return _patient_case(row)

    def _usable(self, conn: sqlite3.Connection, code: str) -> sqlite3.Row:
        """The unused, unexpired invitation of a case not yet linked, or InvalidCode."""
        key, now = code_hash(code), self.clock()
        invite = conn.execute(
            "SELECT invites.*, cases.patient_account FROM invites "
            "JOIN cases ON cases.id = invites.case_id WHERE code_hash = ?",
            (key,),
        ).fetchone()
        if (
            invite is None
            or invite["used_at"] is not None
            or invite["expires_at"] <= now
            or invite["patient_account"] is not None
        ):
            raise InvalidCode(BAD_CODE)
        return invite

    def _link(self, conn: sqlite3.Connection, invite: sqlite3.Row, patient: User, now: float):
        conn.execute(
            "UPDATE invites SET used_at = ?, used_by = ? WHERE id = ?",
            (now, patient.id, invite["id"]),
        )
        conn.execute(
            "UPDATE cases SET patient_account = ? WHERE id = ?", (patient.id, invite["case_id"])
        )
