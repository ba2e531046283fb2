"""UI accounts and sessions: hashing, lockout, disabled users, admin-only actions, expiry."""

from __future__ import annotations

import sqlite3

import pytest
from argon2 import PasswordHasher

from ui.accounts import WRONG_CREDENTIALS, AccountStore
from ui.db import Database
from ui.errors import InvalidInput, LoginRefused, PermissionDenied, SessionExpired
from ui.sessions import SessionStore

ADMIN_PW = "admin-pass-0001"
CLIN_PW = "clinic-pass-0002"
FAST = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)  # tests only


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def db(tmp_path):
    return Database(tmp_path / "ui.db")


@pytest.fixture
def accounts(db, clock):
    return AccountStore(db, max_failed=3, lockout_s=600, clock=clock, hasher=FAST)


@pytest.fixture
def admin(accounts):
    return accounts.create_admin("chief", ADMIN_PW)


@pytest.fixture
def clinician(accounts, admin):
    return accounts.create_user(admin, "dr.lee", CLIN_PW, "clinician")


def test_passwords_are_stored_as_argon2_hashes(db, clinician):
    with sqlite3.connect(db.path) as conn:
        stored = conn.execute(
            "SELECT password_hash FROM users WHERE username = 'dr.lee'"
        ).fetchone()[0]
    assert CLIN_PW not in stored
    assert stored.startswith("$argon2")
    assert FAST.verify(stored, CLIN_PW)
    raw = db.path.read_bytes()
    assert CLIN_PW.encode() not in raw and ADMIN_PW.encode() not in raw


def test_right_password_signs_in_and_wrong_one_is_refused(accounts, clinician):
    assert accounts.authenticate("dr.lee", CLIN_PW).id == clinician.id
    assert accounts.authenticate("DR.LEE", CLIN_PW).id == clinician.id  # names ignore case
    with pytest.raises(LoginRefused, match="wrong password"):
        accounts.authenticate("dr.lee", "not-the-password")
    with pytest.raises(LoginRefused) as unknown:
        accounts.authenticate("nobody", CLIN_PW)
    assert str(unknown.value) == WRONG_CREDENTIALS  # the same words: no user enumeration


def test_lockout_after_repeated_failures_then_expiry(accounts, clinician, clock):
    for _ in range(3):
        with pytest.raises(LoginRefused, match="wrong password"):
            accounts.authenticate("dr.lee", "bad-password-x")
    with pytest.raises(LoginRefused, match="locked"):
        accounts.authenticate("dr.lee", CLIN_PW)  # even the right password
    clock.now += 599
    with pytest.raises(LoginRefused, match="locked"):
        accounts.authenticate("dr.lee", CLIN_PW)
    clock.now += 2
    assert accounts.authenticate("dr.lee", CLIN_PW).failed_attempts == 0


def test_a_success_resets_the_failure_count(accounts, clinician):
    for _ in range(2):
        with pytest.raises(LoginRefused):
            accounts.authenticate("dr.lee", "bad-password-x")
    accounts.authenticate("dr.lee", CLIN_PW)
    for _ in range(2):
        with pytest.raises(LoginRefused, match="wrong password"):
            accounts.authenticate("dr.lee", "bad-password-x")
    assert accounts.authenticate("dr.lee", CLIN_PW)


def test_admin_unlocks(accounts, admin, clinician):
    for _ in range(3):
        with pytest.raises(LoginRefused):
            accounts.authenticate("dr.lee", "bad-password-x")
    accounts.unlock(admin, "dr.lee")
    assert accounts.authenticate("dr.lee", CLIN_PW)


def test_disabled_user_is_refused_and_reenabled(accounts, admin, clinician):
    accounts.set_active(admin, "dr.lee", False)
    with pytest.raises(LoginRefused, match="disabled"):
        accounts.authenticate("dr.lee", CLIN_PW)
    with pytest.raises(LoginRefused, match="wrong password"):
        accounts.authenticate("dr.lee", "bad-password-x")  # no state leak without the password
    accounts.set_active(admin, "dr.lee", True)
    assert accounts.authenticate("dr.lee", CLIN_PW)


def test_clinician_cannot_administer(accounts, admin, clinician):
    with pytest.raises(PermissionDenied):
        accounts.create_user(clinician, "sneaky", "some-password-1", "admin")
    with pytest.raises(PermissionDenied):
        accounts.create_user(clinician, "sneaky", "some-password-1", "clinician")
    with pytest.raises(PermissionDenied):
        accounts.set_active(clinician, "chief", False)
    with pytest.raises(PermissionDenied):
        accounts.reset_password(clinician, "dr.lee", "new-password-123")
    with pytest.raises(PermissionDenied):
        accounts.list_users(clinician)
    assert accounts.find("sneaky") is None


def test_a_demoted_or_disabled_admin_object_is_rechecked(accounts, admin, clinician, db):
    second = accounts.create_user(admin, "deputy", "second-pass-01", "admin")
    accounts.set_active(admin, "deputy", False)
    with pytest.raises(PermissionDenied):  # the stale User object still says role=admin
        accounts.create_user(second, "x-user", "some-password-1", "clinician")


def test_admin_cannot_disable_self_and_input_is_checked(accounts, admin):
    with pytest.raises(InvalidInput, match="own account"):
        accounts.set_active(admin, "chief", False)
    with pytest.raises(InvalidInput, match="10 characters"):
        accounts.create_user(admin, "newbie", "short", "clinician")
    with pytest.raises(InvalidInput, match="user name"):
        accounts.create_user(admin, "newbie", "newbie-password", "clinician")
    with pytest.raises(InvalidInput, match="Role"):
        accounts.create_user(admin, "newbie", "long-enough-pw", "superuser")
    with pytest.raises(InvalidInput, match="taken"):
        accounts.create_user(admin, "CHIEF", "long-enough-pw", "clinician")


def test_bootstrap_from_env_only_without_an_admin(db, clock):
    store = AccountStore(db, clock=clock, hasher=FAST)
    assert store.bootstrap_from_env({}) is None
    with pytest.raises(InvalidInput, match="PASSWORD"):
        store.bootstrap_from_env({"ONCOFLOW_UI_ADMIN_USER": "root"})
    env = {"ONCOFLOW_UI_ADMIN_USER": "root", "ONCOFLOW_UI_ADMIN_PASSWORD": "bootstrap-pass-1"}
    assert store.bootstrap_from_env(env).is_admin
    assert store.bootstrap_from_env({**env, "ONCOFLOW_UI_ADMIN_USER": "other"}) is None
    assert store.find("other") is None


def test_cli_creates_an_admin(tmp_path, monkeypatch, capsys):
    import io

    from ui.accounts import main

    monkeypatch.setenv("ONCOFLOW_UI_DB", str(tmp_path / "cli.db"))
    monkeypatch.setattr("sys.stdin", io.StringIO("cli-admin-pass-1\n"))
    assert main(["create-admin", "ops", "--password-stdin"]) == 0
    store = AccountStore(Database(tmp_path / "cli.db"), hasher=FAST)
    assert store.authenticate("ops", "cli-admin-pass-1").is_admin


# ---------------------------------------------------------------- sessions


@pytest.fixture
def sessions(db, accounts, clock):
    return SessionStore(db, accounts, ttl_s=3600, idle_s=600, clock=clock)


def test_session_resolves_and_token_is_not_stored(sessions, clinician, db):
    token = sessions.create(clinician)
    assert sessions.user(token).id == clinician.id
    with sqlite3.connect(db.path) as conn:
        stored = [r[0] for r in conn.execute("SELECT token_hash FROM sessions")]
    assert token not in stored and len(stored) == 1


def test_session_idle_timeout_and_absolute_expiry(sessions, clinician, clock):
    token = sessions.create(clinician)
    clock.now += 500
    sessions.user(token)  # activity restarts the idle clock
    clock.now += 500
    sessions.user(token, touch=False)  # a background check does not
    clock.now += 200
    with pytest.raises(SessionExpired, match="expired"):
        sessions.user(token)
    with pytest.raises(SessionExpired):
        sessions.user(token)  # deleted, not revived

    token = sessions.create(clinician)
    for _ in range(7):  # active every 500 s up to 3500 s
        clock.now += 500
        sessions.user(token)
    clock.now += 100  # 3600 s: the absolute lifetime is over although the user is active
    with pytest.raises(SessionExpired):
        sessions.user(token)


def test_revoked_and_unknown_tokens_and_disabled_users(sessions, accounts, admin, clinician):
    token = sessions.create(clinician)
    sessions.revoke(token)
    with pytest.raises(SessionExpired):
        sessions.user(token)
    with pytest.raises(SessionExpired):
        sessions.user("made-up-token")
    with pytest.raises(SessionExpired):
        sessions.user(None)
    token = sessions.create(clinician)
    accounts.set_active(admin, "dr.lee", False)
    with pytest.raises(SessionExpired, match="disabled"):
        sessions.user(token)


def test_admin_check_is_server_side(sessions, admin, clinician):
    assert sessions.admin(sessions.create(admin)).id == admin.id
    with pytest.raises(PermissionDenied):
        sessions.admin(sessions.create(clinician))
