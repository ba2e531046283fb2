"""UI case store (no identifiers, ownership, filters, feedback) and analytics on hand-made data."""

from __future__ import annotations

import sqlite3
from datetime import date

import pytest
from argon2 import PasswordHasher

from ui import analytics
from ui.accounts import AccountStore
from ui.cases import CaseFilter, CaseStore, check_case_ref, input_kind
from ui.db import Database
from ui.errors import InvalidInput, NotFound, PermissionDenied

DAY = 86400.0
T0 = 1_735_689_600.0  # 2025-01-01 00:00 UTC
CLASSES = ["glioma", "meningioma", "none"]


class Clock:
    now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def env(tmp_path):
    db = Database(tmp_path / "ui.db")
    accounts = AccountStore(db, hasher=PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))
    admin = accounts.create_admin("chief", "admin-pass-0001")
    a = accounts.create_user(admin, "dr.a", "clinic-pass-0001", "clinician")
    b = accounts.create_user(admin, "dr.b", "clinic-pass-0002", "clinician")
    clock = Clock()
    return db, CaseStore(db, clock=clock), clock, admin, a, b


def probs(top: str, p: float) -> dict[str, float]:
    rest = (1.0 - p) / (len(CLASSES) - 1)
    return {c: (p if c == top else rest) for c in CLASSES}


def add(store, user, top, p, ref=None):
    return store.record(
        user,
        label=top,
        probabilities=probs(top, p),
        model_name="m",
        model_version="3",
        model_tag="m:abc",
        input_kind="jpeg",
        latency_ms=12.0,
        case_ref=ref,
    )


def test_record_stores_no_identifiers_and_the_answer(env):
    db, store, _, _, a, _ = env
    case = add(store, a, "glioma", 0.7, ref="TB-0412")
    assert case.label == "glioma" and case.confidence == pytest.approx(0.7)
    assert case.case_ref == "TB-0412" and case.username == "dr.a"
    with sqlite3.connect(db.path) as conn:
        columns = [r[1] for r in conn.execute("PRAGMA table_info(cases)")]
    assert not {"filename", "file_name", "patient", "patient_id", "name", "image"} & set(columns)


@pytest.mark.parametrize(
    "bad", ["Jane Doe", "19800101", "1980-01-02", "02.01.1980", "MRN123456789", "x" * 40]
)
def test_case_ref_refuses_identifier_like_values(bad):
    with pytest.raises(InvalidInput):
        check_case_ref(bad)


def test_case_ref_accepts_pseudonyms():
    assert check_case_ref("  TB-0412 ") == "TB-0412"
    assert check_case_ref("") is None and check_case_ref(None) is None


def test_input_kind_from_bytes_not_names():
    assert input_kind(b"\x89PNG\r\n\x1a\n....") == "png"
    assert input_kind(b"\xff\xd8\xff\xe0") == "jpeg"
    assert input_kind(b"\0" * 128 + b"DICM" + b"\0" * 8) == "dicom"
    assert input_kind(b"hello") == "other"


def test_clinicians_see_only_their_cases_admins_see_all(env):
    _, store, _, admin, a, b = env
    mine = add(store, a, "glioma", 0.9)
    theirs = add(store, b, "none", 0.8)
    assert [c.id for c in store.search(a)] == [mine.id]
    assert [c.id for c in store.search(b)] == [theirs.id]
    assert {c.id for c in store.search(admin)} == {mine.id, theirs.id}
    assert [c.id for c in store.search(admin, CaseFilter(username="dr.b"))] == [theirs.id]
    assert [c.id for c in store.search(a, CaseFilter(username="dr.b"))] == [mine.id]
    with pytest.raises(NotFound):
        store.get(a, theirs.id)
    with pytest.raises(NotFound):
        store.add_feedback(a, theirs.id, agree=True)
    with pytest.raises(PermissionDenied):
        store.all_cases(a)


def test_feedback_rules(env):
    _, store, _, _, a, _ = env
    case = add(store, a, "glioma", 0.9)
    with pytest.raises(InvalidInput, match="true label"):
        store.add_feedback(a, case.id, agree=False)
    with pytest.raises(InvalidInput, match="not one of"):
        store.add_feedback(a, case.id, agree=False, true_label="cat")
    with pytest.raises(InvalidInput):
        store.add_feedback(a, case.id, agree=False, true_label="glioma")
    with pytest.raises(InvalidInput):
        store.add_feedback(a, case.id, agree=True, true_label="none")
    agreed = store.add_feedback(a, case.id, agree=True, note="  clear case ")
    assert (agreed.feedback_agree, agreed.true_label, agreed.feedback_note) == (
        True,
        "glioma",
        "clear case",
    )
    changed = store.add_feedback(a, case.id, agree=False, true_label="none")
    assert (changed.feedback_agree, changed.true_label, changed.feedback_note) == (
        False,
        "none",
        None,
    )


def test_filters(env):
    _, store, clock, _, a, _ = env
    first = add(store, a, "glioma", 0.9, ref="A-1")
    clock.now += DAY
    second = add(store, a, "none", 0.5, ref="B-2")
    store.add_feedback(a, second.id, agree=False, true_label="meningioma", note="blurred scan")
    clock.now += DAY
    third = add(store, a, "glioma", 0.55)
    store.add_feedback(a, third.id, agree=True)

    def ids(**kw):
        return [c.id for c in store.search(a, CaseFilter(**kw))]

    assert ids() == [third.id, second.id, first.id]  # newest first
    assert ids(label="glioma") == [third.id, first.id]
    assert ids(text="B-") == [second.id]
    assert ids(text="blurred") == [second.id]
    assert ids(feedback="without feedback") == [first.id]
    assert ids(feedback="with feedback") == [third.id, second.id]
    assert ids(feedback="agreed") == [third.id]
    assert ids(feedback="disagreed") == [second.id]
    assert ids(since=date(2025, 1, 2)) == [third.id, second.id]
    assert ids(until=date(2025, 1, 2)) == [second.id, first.id]
    assert ids(since=date(2025, 1, 2), until=date(2025, 1, 2)) == [second.id]


# ---------------------------------------------------------------- analytics


@pytest.fixture
def history(env):
    """Six cases over 4 days (one empty day) with feedback on four of them."""
    _, store, clock, admin, a, b = env
    c1 = add(store, a, "glioma", 0.95)  # day 1, rated correct (glioma)
    c2 = add(store, b, "glioma", 0.45)  # day 1, rated wrong: truly meningioma
    clock.now += DAY
    c3 = add(store, a, "none", 0.62)  # day 2, rated correct (none)
    clock.now += 2 * DAY
    c4 = add(store, b, "meningioma", 0.58)  # day 4, rated wrong: truly glioma
    c5 = add(store, a, "glioma", 1.0)  # day 4, unrated
    c6 = add(store, a, "none", 0.34)  # day 4, unrated
    store.add_feedback(a, c1.id, agree=True)
    store.add_feedback(b, c2.id, agree=False, true_label="meningioma")
    store.add_feedback(a, c3.id, agree=True)
    store.add_feedback(b, c4.id, agree=False, true_label="glioma")
    return store.all_cases(admin), (c1, c2, c3, c4, c5, c6)


def test_predictions_per_day_fills_gaps(history):
    cases, _ = history
    assert analytics.predictions_per_day(cases) == [
        (date(2025, 1, 1), 2),
        (date(2025, 1, 2), 1),
        (date(2025, 1, 3), 0),
        (date(2025, 1, 4), 3),
    ]
    assert analytics.predictions_per_day(cases, fill_gaps=False)[2] == (date(2025, 1, 4), 3)
    assert analytics.predictions_per_day([]) == []


def test_class_mix(history):
    cases, _ = history
    assert analytics.class_mix(cases) == {"glioma": 3, "none": 2, "meningioma": 1}
    assert list(analytics.class_mix(cases)) == ["glioma", "none", "meningioma"]
    assert analytics.class_mix(cases[:1], ["none", "glioma", "meningioma"]) == {
        "glioma": 1,
        "meningioma": 0,
        "none": 0,
    }


def test_confidence_histogram(history):
    cases, _ = history
    bins = analytics.confidence_histogram(cases, bins=5)
    # 0.95, 0.45, 0.62, 0.58, 1.0, 0.34 -> [0,.2) 0, [.2,.4) 1, [.4,.6) 2, [.6,.8) 1, [.8,1] 2
    assert [b.count for b in bins] == [0, 1, 2, 1, 2]
    assert (bins[0].low, bins[-1].high) == (0.0, 1.0)
    with pytest.raises(ValueError):
        analytics.confidence_histogram(cases, bins=0)


def test_low_confidence(history):
    cases, (_, c2, _, c4, _, c6) = history
    assert [c.id for c in analytics.low_confidence(cases, 0.6)] == [c6.id, c2.id, c4.id]
    assert analytics.low_confidence(cases, 0.3) == []


def test_feedback_accuracy_per_true_class(history):
    cases, _ = history
    rows, overall = analytics.feedback_accuracy(cases, CLASSES)
    table = {r.label: (r.rated, r.correct, r.accuracy) for r in rows}
    # true glioma: c1 right, c4 wrong; true meningioma: c2 wrong; true none: c3 right
    assert table == {"glioma": (2, 1, 0.5), "meningioma": (1, 0, 0.0), "none": (1, 1, 1.0)}
    assert (overall.rated, overall.correct, overall.accuracy) == (4, 2, 0.5)
    assert analytics.feedback_rate(cases) == pytest.approx(4 / 6)
    empty_rows, empty = analytics.feedback_accuracy([], ["x"])
    assert empty_rows[0].accuracy is None and empty.accuracy is None
    assert analytics.feedback_rate([]) is None
