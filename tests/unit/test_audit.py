"""The audit trail: the hash chain (edit, delete, reorder detected), exactly one entry per UI
action, nothing identifying in it, and the `oncoflow audit` commands."""

from __future__ import annotations

import itertools
import json
import sqlite3

import pytest
from argon2 import PasswordHasher

from components.audit import GENESIS, AuditError, AuditLog, clean_details, export
from ui.accounts import AccountStore
from ui.care import CareStore
from ui.cases import CaseStore
from ui.db import Database
from ui.errors import InvalidInput, LoginRefused, NotFound

PDF = b"%PDF-1.4 released report"
CLASSES = {"glioma": 0.7, "meningioma": 0.2, "none": 0.1}


@pytest.fixture
def site(tmp_path):
    db = Database(tmp_path / "ui.db")
    audit = AuditLog(db.connect)
    hasher = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    accounts = AccountStore(db, max_failed=2, hasher=hasher, audit=audit)
    cases = CaseStore(db, audit=audit)
    care = CareStore(db, accounts, cases, audit=audit)
    admin = accounts.create_admin("chief", "admin-pass-0001")
    return db, audit, accounts, cases, care, admin


def predict(cases, user, ref="TB-0412"):
    return cases.record(
        user,
        label="glioma",
        probabilities=CLASSES,
        model_name="m",
        model_version="3",
        model_tag="m:abc",
        input_kind="png",
        case_ref=ref,
        danger=0.9,
        refer=False,
        image=b"\x89PNG fake image bytes",
    )


def tamper(db: Database, sql: str, *params) -> None:
    """What someone with write access to the file could do (the triggers dropped first)."""
    conn = sqlite3.connect(db.path)
    conn.execute("DROP TRIGGER audit_log_no_update")
    conn.execute("DROP TRIGGER audit_log_no_delete")
    conn.execute(sql, params)
    conn.commit()
    conn.close()


def test_the_chain_links_each_entry_to_the_previous(site):
    _, audit, _, _, _, admin = site
    for _ in range(3):
        audit.record(admin, "audit.export", details={"format": "csv"})
    entries = audit.entries()
    assert [e.seq for e in entries] == [1, 2, 3, 4]  # 1: the admin's creation
    assert entries[0].prev_hash == GENESIS
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(entries))
    result = audit.verify()
    assert result.ok and result.entries == 4 and result.head == entries[-1].hash


def test_the_application_cannot_update_or_delete_entries(site):
    db, audit, *_ = site
    with sqlite3.connect(db.path) as conn, pytest.raises(sqlite3.IntegrityError, match="append"):
        conn.execute("UPDATE audit_log SET action = 'x.y' WHERE seq = 1")
    with sqlite3.connect(db.path) as conn, pytest.raises(sqlite3.IntegrityError, match="append"):
        conn.execute("DELETE FROM audit_log")
    assert audit.verify().ok


@pytest.mark.parametrize(
    ("how", "sql", "broken"),
    [
        ("edit", 'UPDATE audit_log SET details = \'{"label":"none"}\' WHERE seq = 3', 3),
        ("edit actor", "UPDATE audit_log SET actor_id = 99 WHERE seq = 2", 2),
        ("delete", "DELETE FROM audit_log WHERE seq = 3", 3),
        (
            "reorder",
            "UPDATE audit_log SET seq = CASE seq WHEN 2 THEN 3 ELSE 2 END WHERE seq IN (2, 3)",
            2,
        ),
    ],
)
def test_tampering_is_detected_at_the_first_broken_entry(site, how, sql, broken):
    db, audit, accounts, cases, _, admin = site
    clinician = accounts.create_user(admin, "dr.a", "clinic-pass-0001", "clinician")
    predict(cases, clinician)
    audit.record(admin, "audit.export", details={"format": "json"})
    assert audit.verify().ok
    if how == "reorder":  # swap two rows through a free seq (the primary key is unique)
        tamper(db, "UPDATE audit_log SET seq = 100 WHERE seq = 2")
        conn = sqlite3.connect(db.path)
        conn.execute("UPDATE audit_log SET seq = 2 WHERE seq = 3")
        conn.execute("UPDATE audit_log SET seq = 3 WHERE seq = 100")
        conn.commit()
        conn.close()
    else:
        tamper(db, sql)
    result = audit.verify()
    assert not result.ok and result.broken_seq == broken, result


def test_a_truncated_tail_is_caught_by_an_anchored_head(site):
    db, audit, _, _, _, admin = site
    audit.record(admin, "audit.export", details={"format": "csv"})
    head = audit.verify().head
    assert audit.verify(head=head).ok
    tamper(db, "DELETE FROM audit_log WHERE seq = 2")
    assert audit.verify().ok  # a shorter chain is still a chain...
    assert not audit.verify(head=head).ok  # ...which the anchored head exposes


def test_details_refuse_free_text():
    assert clean_details({"label": "glioma_tumor", "n": 3}) == '{"label":"glioma_tumor","n":3}'
    with pytest.raises(AuditError):
        clean_details({"note": "Patient Jane Doe, born 1980, says ..."})
    with pytest.raises(AuditError):
        clean_details({"image": b"\x89PNG"})
    with pytest.raises(AuditError):
        clean_details({"Bad Key": 1})


def expect_not_found(fn, *args):
    with pytest.raises(NotFound):
        fn(*args)


def expect_refused(fn, *args):
    with pytest.raises(InvalidInput, match="not valid"):
        fn(*args)


def actions(audit: AuditLog) -> list[str]:
    return [e.action for e in audit.entries()]


def test_every_action_leaves_exactly_one_entry_and_no_identifiers(site):
    _, audit, accounts, cases, care, admin = site
    steps = []

    def step(expected: str, fn, *args, **kwargs):
        before = len(audit.entries())
        try:
            out = fn(*args, **kwargs)
        except LoginRefused:
            out = None
        new = actions(audit)[before:]
        assert new == [expected], (expected, new)
        steps.append(expected)
        return out

    clinician = step(
        "user.create", accounts.create_user, admin, "dr.a", "clinic-pass-0001", "clinician"
    )
    step("login.success", accounts.authenticate, "dr.a", "clinic-pass-0001")
    step("login.failure", accounts.authenticate, "dr.a", "wrong-password-1")
    step("login.failure", accounts.authenticate, "nobody-here", "whatever-pass-1")
    step("login.lockout", accounts.authenticate, "dr.a", "wrong-password-2")
    step("login.refused", accounts.authenticate, "dr.a", "clinic-pass-0001")
    step("user.unlock", accounts.unlock, admin, "dr.a")
    case = step("case.predict", predict, cases, clinician)
    step(
        "case.explain", cases.log_access, clinician, case.id, "case.explain", {"method": "gradcam"}
    )
    step("case.similar", cases.log_access, clinician, case.id, "case.similar", {"k": 6})
    step("report.download", cases.log_access, clinician, case.id, "report.download")
    step("case.feedback", cases.add_feedback, clinician, case.id, agree=True)
    invite = step("invite.create", care.invite, clinician, case.id)
    step(
        "invite.refused", expect_refused, care.sign_up, "AAAAA-BBBBB-CCCCC", "pat.x", "pw-long-1234"
    )
    patient = step("patient.sign_up", care.sign_up, invite.code, "pat.one", "Secret-pass-99")
    step("case.review", cases.move, clinician, case.id, "reviewed")
    step("case.release", cases.move, clinician, case.id, "released", "All clear.", PDF)
    step("case.view", care.view, patient, case.id)
    step("report.download", care.report, patient, case.id)
    question = step("question.ask", care.ask, patient, case.id, "Jane Doe here: what next?")
    step("question.answer", care.answer, clinician, question.id, "Dr. A: we will call you.")
    other = step(
        "user.create", accounts.create_user, admin, "dr.b", "clinic-pass-0003", "clinician"
    )
    step("access.refused", expect_not_found, cases.get, other, case.id)
    step("access.refused", expect_not_found, care.view, patient, case.id + 1)
    step("user.disable", accounts.set_active, admin, "dr.a", False)
    step("user.enable", accounts.set_active, admin, "dr.a", True)
    step("user.reset_password", accounts.reset_password, admin, "dr.a", "clinic-pass-0002")
    assert audit.verify().ok

    entries = audit.entries()
    dump = export(entries, "json") + export(entries, "csv")
    for secret in (
        "dr.a",
        "pat.one",
        "chief",
        "Jane",
        "TB-0412",
        "wrong-password",
        "call you",
        "All clear",
        invite.code,
        "Secret-pass",
    ):
        assert secret not in dump, secret
    by_action = {e.action: e for e in entries}
    assert by_action["case.predict"].case_id == case.id
    assert by_action["case.predict"].actor_id == clinician.id
    assert by_action["case.predict"].actor_role == "clinician"
    assert by_action["question.ask"].actor_role == "patient"
    assert by_action["login.lockout"].actor_id == clinician.id
    assert json.loads(export(entries, "json"))[0]["hash"] == entries[0].hash


def test_cli_verify_and_export(site, tmp_path, capsys):
    from flows.cli import main

    db, audit, _, _, _, admin = site
    audit.record(admin, "audit.export", details={"format": "csv"})
    assert main(["audit", "verify", "--db", str(db.path)]) == 0
    assert "intact: 2 entries" in capsys.readouterr().out
    out = tmp_path / "log.csv"
    assert (
        main(["audit", "export", "--db", str(db.path), "--format", "csv", "--out", str(out)]) == 0
    )
    assert out.read_text().splitlines()[0].startswith("seq,ts,actor_id")
    assert len(out.read_text().splitlines()) == 1 + 2 + 0  # header + the entries before export
    assert audit.entries()[-1].action == "audit.export"  # the export itself is audited
    tamper(db, "UPDATE audit_log SET action = 'login.success' WHERE seq = 2")
    assert main(["audit", "verify", "--db", str(db.path)]) == 1
    assert "broken at entry 2" in capsys.readouterr().out


def test_the_service_log_keeps_one_chain_under_concurrent_calls_and_sees_outside_edits(tmp_path):
    import sqlite3
    from concurrent.futures import ThreadPoolExecutor

    from components.audit import open_log
    from serving.middleware import API_CLIENT

    path = tmp_path / "audit" / "service.db"
    log = open_log(path)
    details = {"key": "k", "status": 200, "request": "r1"}
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(
                lambda _: log.record(API_CLIENT, "service.predict", details=details), range(64)
            )
        )
    assert log.verify().ok and len(log.entries()) == 64
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    with sqlite3.connect(path) as outside:  # an edit through another connection is seen
        outside.execute("DROP TRIGGER audit_log_no_update")
        outside.execute("UPDATE audit_log SET details = '{}' WHERE seq = 5")
    assert log.verify().broken_seq == 5
