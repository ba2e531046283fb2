"""The care workflow on the server side: invitations, who may read what (patient, clinician,
admin), state transitions, the risk-ordered worklist, and upgrading an older database."""

from __future__ import annotations

import sqlite3
from datetime import date

import pytest
from argon2 import PasswordHasher

from ui.accounts import AccountStore
from ui.care import CareStore, code_hash, new_code
from ui.cases import CaseStore
from ui.db import Database
from ui.errors import InvalidInput, NotFound, PermissionDenied
from ui.sessions import SessionStore
from ui.worklist import WorklistFilter, danger_of, worklist

PDF = b"%PDF-1.4 report"
DAY = 86400.0


class Clock:
    now = 1_735_689_600.0  # 2025-01-01 UTC

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def site(tmp_path):
    db = Database(tmp_path / "ui.db")
    clock = Clock()
    hasher = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    accounts = AccountStore(db, hasher=hasher, clock=clock)
    cases = CaseStore(db, clock=clock)
    care = CareStore(db, accounts, cases, clock=clock)
    admin = accounts.create_admin("chief", "admin-pass-0001")
    a = accounts.create_user(admin, "dr.a", "clinic-pass-0001", "clinician")
    b = accounts.create_user(admin, "dr.b", "clinic-pass-0002", "clinician")
    return db, accounts, cases, care, clock, admin, a, b


def predict(cases, user, danger=None, refer=None, label="glioma", image=True):
    probs = {c: 0.1 for c in ("glioma", "meningioma", "none")} | {label: 0.8}
    return cases.record(
        user,
        label=label,
        probabilities=probs,
        model_name="m",
        model_version="3",
        model_tag="m:abc",
        input_kind="png" if image else "record",
        danger=danger,
        refer=refer,
        prediction_set=[label],
        image=b"\x89PNG bytes" if image else None,
    )


def released_case_with_patient(site, username="pat.one"):
    _, _, cases, care, _, _, a, _ = site
    case = predict(cases, a, danger=0.8)
    code = care.invite(a, case.id).code
    patient = care.sign_up(code, username, "patient-pass-01")
    cases.move(a, case.id, "reviewed")
    cases.move(a, case.id, "released", "Please book a follow-up.", PDF)
    return case, patient


def test_codes_are_random_one_time_and_stored_hashed(site):
    db, _, cases, care, clock, _, a, _ = site
    assert new_code() != new_code() and len(new_code()) == 17
    case = predict(cases, a)
    invite = care.invite(a, case.id)
    with sqlite3.connect(db.path) as conn:
        stored = conn.execute("SELECT code_hash FROM invites").fetchone()[0]
    assert stored == code_hash(invite.code) and invite.code not in stored
    patient = care.sign_up(invite.code.lower().replace("-", " "), "pat.one", "patient-pass-01")
    assert patient.role == "patient" and care.my_cases(patient)[0].case_id == case.id
    with pytest.raises(InvalidInput, match="not valid"):  # used
        care.sign_up(invite.code, "pat.two", "patient-pass-02")
    other = predict(cases, a)
    late = care.invite(a, other.id)
    clock.now += 15 * DAY
    with pytest.raises(InvalidInput, match="not valid"):  # expired
        care.sign_up(late.code, "pat.two", "patient-pass-02")
    first, second = care.invite(a, other.id), care.invite(a, other.id)
    with pytest.raises(InvalidInput, match="not valid"):  # replaced by a newer code
        care.sign_up(first.code, "pat.two", "patient-pass-02")
    assert care.redeem(patient, second.code).case_id == other.id
    with pytest.raises(InvalidInput, match="already linked"):
        care.invite(a, other.id)


def test_no_self_registration_and_no_patient_accounts_from_admin(site):
    _, accounts, _, care, _, admin, _, _ = site
    with pytest.raises(InvalidInput, match="not valid"):
        care.sign_up("AAAAA-BBBBB-CCCCC", "pat.x", "patient-pass-01")
    with pytest.raises(InvalidInput, match="invitation"):
        accounts.create_user(admin, "pat.x", "patient-pass-01", "patient")


def test_patient_sees_only_released_results_of_own_cases(site):
    _, _, cases, care, _, _, a, _ = site
    case = predict(cases, a)
    patient = care.sign_up(care.invite(a, case.id).code, "pat.one", "patient-pass-01")
    waiting = care.view(patient, case.id)
    assert not waiting.released and waiting.label is None and waiting.confidence is None
    with pytest.raises(NotFound, match="not been released"):
        care.report(patient, case.id)
    cases.move(a, case.id, "reviewed")
    assert care.view(patient, case.id).label is None  # reviewed is not released
    cases.move(a, case.id, "released", "Nothing to worry about.", PDF)
    shown = care.view(patient, case.id)
    assert shown.released and shown.label == "glioma" and shown.note == "Nothing to worry about."
    assert care.report(patient, case.id) == PDF


def test_a_patient_cannot_reach_another_patients_case(site):
    _, _, cases, care, _, _, _a, _ = site
    case, first = released_case_with_patient(site)
    _, second = released_case_with_patient(site, "pat.two")
    for call in (
        lambda: care.view(second, case.id),
        lambda: care.report(second, case.id),
        lambda: care.ask(second, case.id, "is this mine?"),
        lambda: care.questions(second, case.id),
    ):
        with pytest.raises(NotFound):
            call()
    assert [c.case_id for c in care.my_cases(second)] != [case.id]
    # nor through the clinician's functions
    with pytest.raises(NotFound):
        cases.get(first, case.id)
    assert cases.search(first) == []
    with pytest.raises(PermissionDenied):
        predict(cases, first)
    with pytest.raises(PermissionDenied):
        care.invite(first, case.id)


def test_patient_sessions_are_refused_by_staff_handlers(site):
    db, accounts, *_ = site
    _, patient = released_case_with_patient(site)
    sessions = SessionStore(db, accounts)
    token = sessions.create(patient)
    with pytest.raises(PermissionDenied):
        sessions.user(token)  # what every clinician handler calls
    with pytest.raises(PermissionDenied):
        sessions.admin(token)
    assert sessions.patient(token).id == patient.id
    assert sessions.any_user(token).id == patient.id


def test_questions_and_answers(site):
    _, _, _cases, care, _, _, a, b = site
    case, patient = released_case_with_patient(site)
    question = care.ask(patient, case.id, "Do I need another scan?")
    assert care.open_questions(a) == {case.id: 1} and care.open_questions(b) == {}
    with pytest.raises(NotFound):
        care.answer(b, question.id, "not my patient")
    answered = care.answer(a, question.id, "Yes, in three months.")
    assert answered.answer == "Yes, in three months." and answered.answered
    assert care.questions(patient, case.id)[0].answer == "Yes, in three months."
    with pytest.raises(InvalidInput, match="already"):
        care.answer(a, question.id, "again")
    assert care.open_questions(a) == {}
    for n in range(5):
        care.ask(patient, case.id, f"question {n}")
    with pytest.raises(InvalidInput, match="waiting"):
        care.ask(patient, case.id, "one too many")


def test_state_transitions(site):
    _, _, cases, _, _, admin, a, b = site
    case = predict(cases, a)
    with pytest.raises(InvalidInput, match="new; it can move to reviewed"):
        cases.move(a, case.id, "released", "", PDF)
    with pytest.raises(NotFound):
        cases.move(b, case.id, "reviewed")  # not b's case
    assert cases.move(a, case.id, "reviewed").status == "reviewed"
    with pytest.raises(InvalidInput, match="reviewed"):
        cases.move(a, case.id, "reviewed")
    with pytest.raises(InvalidInput, match="PDF"):
        cases.move(a, case.id, "released", "", b"")
    released = cases.move(admin, case.id, "released", "note", PDF)
    assert released.status == "released" and released.release_note == "note"
    with pytest.raises(InvalidInput, match="final"):
        cases.move(a, case.id, "reviewed")
    record_only = predict(cases, a, image=False)
    cases.move(a, record_only.id, "reviewed")
    assert cases.move(a, record_only.id, "released").status == "released"  # no image: no PDF


def test_worklist_is_ordered_by_risk_and_filtered(site):
    _, _, cases, care, clock, admin, a, b = site
    low = predict(cases, a, danger=0.05)
    clock.now += 60
    unknown = predict(cases, a, danger=None)
    clock.now += 60
    high = predict(cases, a, danger=0.92)
    clock.now += 60
    tie_referred = predict(cases, a, danger=0.05, refer=True)
    clock.now += DAY
    later_high = predict(cases, a, danger=0.92)
    theirs = predict(cases, b, danger=0.99)
    items = worklist(cases, a, WorklistFilter())
    assert [i.case.id for i in items] == [
        high.id,
        later_high.id,
        tie_referred.id,
        low.id,
        unknown.id,
    ]
    assert theirs.id in [i.case.id for i in worklist(cases, admin, WorklistFilter())]
    cases.move(a, high.id, "reviewed")
    assert [i.case.id for i in worklist(cases, a, WorklistFilter(status="reviewed"))] == [high.id]
    cases.move(a, high.id, "released", "", PDF)
    assert high.id not in [i.case.id for i in worklist(cases, a, WorklistFilter())]
    # a released case with a waiting patient question is open again
    patient = care.sign_up(care.invite(a, high.id).code, "pat.one", "patient-pass-01")
    care.ask(patient, high.id, "what now?")
    items = worklist(cases, a, WorklistFilter(), care.open_questions(a))
    assert items[0].case.id == high.id and items[0].open_questions == 1
    cases.assign(a, low.id, b)
    assert low.id not in [i.case.id for i in worklist(cases, a, WorklistFilter(mine=True))]
    assert [i.case.id for i in worklist(cases, b, WorklistFilter(mine=True))] == [
        theirs.id,
        low.id,
    ]
    day2 = WorklistFilter(status="all", since=date(2025, 1, 2), until=date(2025, 1, 2))
    assert {i.case.id for i in worklist(cases, a, day2)} == {later_high.id}


def test_danger_is_the_mass_of_the_named_classes():
    probs = {"glioma": 0.5, "meningioma": 0.2, "none": 0.3}
    assert danger_of(probs, ["glioma", "meningioma"]) == pytest.approx(0.7)
    assert danger_of(probs, []) is None
    assert danger_of(probs, ["benign"]) is None


def test_an_older_database_is_upgraded_in_place(tmp_path):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE users (id INTEGER PRIMARY KEY, username TEXT NOT NULL UNIQUE COLLATE NOCASE,
            password_hash TEXT NOT NULL,
            role TEXT NOT NULL CHECK (role IN ('clinician', 'admin')),
            active INTEGER NOT NULL DEFAULT 1, failed_attempts INTEGER NOT NULL DEFAULT 0,
            locked_until REAL NOT NULL DEFAULT 0, created_at REAL NOT NULL,
            created_by INTEGER REFERENCES users(id), last_login REAL);
        CREATE TABLE cases (id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL REFERENCES users(id),
            case_ref TEXT, created_at REAL NOT NULL, input_kind TEXT NOT NULL,
            label TEXT NOT NULL, confidence REAL NOT NULL, probabilities TEXT NOT NULL,
            model_name TEXT NOT NULL, model_version TEXT NOT NULL, model_tag TEXT NOT NULL,
            latency_ms REAL, feedback_agree INTEGER, true_label TEXT, feedback_note TEXT,
            feedback_at REAL);
        INSERT INTO users VALUES (1, 'dr.old', 'x', 'clinician', 1, 0, 0, 0, NULL, NULL);
        INSERT INTO cases (id, user_id, created_at, input_kind, label, confidence,
            probabilities, model_name, model_version, model_tag)
            VALUES (7, 1, 0, 'png', 'a', 0.9, '{"a": 0.9, "b": 0.1}', 'm', '1', 't');
        """
    )
    conn.commit()
    conn.close()
    db = Database(path)
    Database(path)  # idempotent
    accounts = AccountStore(db, hasher=PasswordHasher(time_cost=1, memory_cost=1024))
    old = accounts.get(1)
    case = CaseStore(db).get(old, 7)
    assert case.status == "new" and case.assigned_to == 1
    with sqlite3.connect(path) as conn:
        conn.execute(
            "INSERT INTO users (username, password_hash, role, created_at) "
            "VALUES ('pat', 'x', 'patient', 0)"
        )
