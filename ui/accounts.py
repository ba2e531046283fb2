"""User accounts: argon2-hashed passwords, roles, disabling, lockout after failed sign-ins.

There is no self-service sign-up into clinical data and no route to the admin role from the UI:
an admin creates staff accounts, a patient account exists only through a clinician's one-time
invitation for a case (`ui.care`), and the first admin comes from the operator, either from
the environment (``ONCOFLOW_UI_ADMIN_USER`` / ``ONCOFLOW_UI_ADMIN_PASSWORD``, used only while
the database has no admin) or from the command line::

    python -m ui.accounts create-admin USERNAME     # asks for the password twice

There is never a default password. Every sign-in (success, failure, lockout) and every account
change is appended to the audit log in the same transaction.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import re
import sqlite3
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from components.audit import AuditLog
from ui.db import Database
from ui.errors import InvalidInput, LoginRefused, NotFound, PermissionDenied, UiError

log = logging.getLogger(__name__)

ROLES = ("patient", "clinician", "admin")
STAFF_ROLES = ("clinician", "admin")
MIN_PASSWORD_LENGTH = 10
_USERNAME = re.compile(r"^[A-Za-z0-9._-]{3,64}$")
WRONG_CREDENTIALS = "Unknown user name or wrong password."


@dataclass(frozen=True)
class User:
    id: int
    username: str
    role: str
    active: bool
    failed_attempts: int
    locked_until: float
    created_at: float
    last_login: float | None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def is_patient(self) -> bool:
        return self.role == "patient"


def _user(row: sqlite3.Row) -> User:
    return User(
        id=row["id"],
        username=row["username"],
        role=row["role"],
        active=bool(row["active"]),
        failed_attempts=row["failed_attempts"],
        locked_until=row["locked_until"],
        created_at=row["created_at"],
        last_login=row["last_login"],
    )


def check_username(username: str) -> str:
    name = (username or "").strip()
    if not _USERNAME.match(name):
        raise InvalidInput(
            "User names are 3 to 64 characters: letters, digits, dot, dash or underscore."
        )
    return name


def check_password(password: str, username: str) -> str:
    if len(password or "") < MIN_PASSWORD_LENGTH:
        raise InvalidInput(f"Passwords need at least {MIN_PASSWORD_LENGTH} characters.")
    if username.lower() in password.lower():
        raise InvalidInput("The password must not contain the user name.")
    return password


class AccountStore:
    """Users in the UI database. Every change that needs an admin takes the acting user and
    re-reads that user's role and status from the database before doing anything."""

    def __init__(
        self,
        db: Database,
        max_failed: int = 5,
        lockout_s: float = 900.0,
        clock: Callable[[], float] = time.time,
        hasher: PasswordHasher | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        if max_failed < 1 or lockout_s <= 0:
            raise UiError("max_failed must be at least 1 and lockout_s positive")
        self.db = db
        self.max_failed = max_failed
        self.lockout_s = lockout_s
        self.clock = clock
        self.hasher = hasher or PasswordHasher()
        self.audit = audit or AuditLog(db.connect)
        # Verified for unknown users too, so timing does not reveal which names exist.
        self._dummy_hash = self.hasher.hash("not-a-real-password-0000")

    # ------------------------------------------------------------------ reading

    def get(self, user_id: int) -> User:
        with self.db.connect() as conn:
            row = conn.execute("SELECT * FROM users WHERE id = ?", (user_id,)).fetchone()
        if row is None:
            raise NotFound(f"There is no user with id {user_id}.")
        return _user(row)

    def find(self, username: str) -> User | None:
        with self.db.connect() as conn:
            row = conn.execute(
                "SELECT * FROM users WHERE username = ?", ((username or "").strip(),)
            ).fetchone()
        return _user(row) if row else None

    def has_admin(self) -> bool:
        with self.db.connect() as conn:
            return bool(
                conn.execute("SELECT 1 FROM users WHERE role = 'admin' AND active = 1").fetchone()
            )

    def list_users(self, actor: User) -> list[User]:
        self.require_admin(actor)
        with self.db.connect() as conn:
            rows = conn.execute("SELECT * FROM users ORDER BY username").fetchall()
        return [_user(r) for r in rows]

    def require_admin(self, actor: User) -> User:
        """The actor as stored now; PermissionDenied unless an active admin."""
        current = self.get(actor.id)
        if not (current.active and current.is_admin):
            raise PermissionDenied("Only an administrator can do this.")
        return current

    # ------------------------------------------------------------------ sign-in

    def authenticate(self, username: str, password: str) -> User:
        """The user for these credentials, or LoginRefused with a message for the screen.

        Each wrong password counts; at `max_failed` in a row the account locks for
        `lockout_s` seconds, during which even the right password is refused.
        """
        user = self.find(username) if _USERNAME.match((username or "").strip()) else None
        if user is None:
            self._verify(self._dummy_hash, password or "")
            self.audit.record(None, "login.failure", details={"reason": "unknown_user"})
            raise LoginRefused(WRONG_CREDENTIALS)
        now = self.clock()
        if user.locked_until > now:
            self.audit.record(user, "login.refused", details={"reason": "locked"})
            minutes = max(1, round((user.locked_until - now) / 60))
            raise LoginRefused(
                "This account is locked after too many failed sign-ins. Try again in about "
                f"{minutes} minute{'s' if minutes != 1 else ''}, or ask an administrator."
            )
        with self.db.connect() as conn:
            stored = conn.execute(
                "SELECT password_hash FROM users WHERE id = ?", (user.id,)
            ).fetchone()["password_hash"]
        if not self._verify(stored, password or ""):
            self._record_failure(user, now)
            raise LoginRefused(WRONG_CREDENTIALS)
        if not user.active:
            self.audit.record(user, "login.refused", details={"reason": "disabled"})
            raise LoginRefused("This account is disabled. Please ask an administrator.")
        with self.db.connect() as conn:
            self.audit.append(conn, user, "login.success")
            conn.execute(
                "UPDATE users SET failed_attempts = 0, locked_until = 0, last_login = ? "
                "WHERE id = ?",
                (now, user.id),
            )
            if self.hasher.check_needs_rehash(stored):
                conn.execute(
                    "UPDATE users SET password_hash = ? WHERE id = ?",
                    (self.hasher.hash(password), user.id),
                )
        log.info("user id %d signed in", user.id)
        return self.get(user.id)

    def _verify(self, stored: str, password: str) -> bool:
        try:
            return self.hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return False

    def _record_failure(self, user: User, now: float) -> None:
        with self.db.connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            failed = conn.execute(
                "UPDATE users SET failed_attempts = failed_attempts + 1 WHERE id = ? "
                "RETURNING failed_attempts",
                (user.id,),
            ).fetchone()[0]
            if failed >= self.max_failed:
                conn.execute(
                    "UPDATE users SET failed_attempts = 0, locked_until = ? WHERE id = ?",
                    (now + self.lockout_s, user.id),
                )
                self.audit.append(conn, user, "login.lockout", details={"failures": failed})
                log.warning("user id %d locked after %d failed sign-ins", user.id, failed)
            else:
                self.audit.append(conn, user, "login.failure", details={"reason": "wrong_password"})

    # ------------------------------------------------------------------ admin actions

    def _insert(
        self,
        username: str,
        password: str,
        role: str,
        actor: User | None,
        conn: sqlite3.Connection | None = None,
        audited: bool = True,
    ) -> User:
        """Insert an account (in `conn`'s transaction when given) and audit it (unless the
        caller audits the larger action it belongs to, `audited=False`)."""
        name = check_username(username)
        if role not in ROLES:
            raise InvalidInput(f"Role must be one of {', '.join(ROLES)}.")
        check_password(password, name)
        secret = self.hasher.hash(password)

        def insert(c: sqlite3.Connection) -> int:
            try:
                new_id = c.execute(
                    "INSERT INTO users (username, password_hash, role, created_at, created_by) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (name, secret, role, self.clock(), actor.id if actor else None),
                ).lastrowid
            except sqlite3.IntegrityError as exc:
                raise InvalidInput(f"The user name {name!r} is already taken.") from exc
            if audited:
                self.audit.append(c, actor, "user.create", details={"user": new_id, "role": role})
            return new_id

        if conn is not None:
            new_id = insert(conn)
            log.info("user id %d created with role %s", new_id, role)
            return _user(conn.execute("SELECT * FROM users WHERE id = ?", (new_id,)).fetchone())
        with self.db.connect() as c:
            new_id = insert(c)
        log.info("user id %d created with role %s", new_id, role)
        return self.get(new_id)

    def create_user(self, actor: User, username: str, password: str, role: str) -> User:
        """A new staff account; only an active admin may create one. Patient accounts come
        only from a clinician's invitation (`ui.care.CareStore.sign_up`)."""
        admin = self.require_admin(actor)
        if role == "patient":
            raise InvalidInput(
                "Patients join with an invitation code from their clinician; create clinician "
                "or admin accounts here."
            )
        return self._insert(username, password, role, admin)

    def set_active(self, actor: User, username: str, active: bool) -> User:
        """Enable or disable an account; an admin cannot disable their own account."""
        admin = self.require_admin(actor)
        target = self.find(username)
        if target is None:
            raise NotFound(f"There is no user called {username!r}.")
        if target.id == admin.id and not active:
            raise InvalidInput("You cannot disable your own account.")
        with self.db.connect() as conn:
            conn.execute("UPDATE users SET active = ? WHERE id = ?", (int(active), target.id))
            action = "user.enable" if active else "user.disable"
            self.audit.append(conn, admin, action, details={"user": target.id})
        log.info(
            "user id %d %s by user id %d", target.id, "enabled" if active else "disabled", admin.id
        )
        return self.get(target.id)

    def unlock(self, actor: User, username: str) -> User:
        admin = self.require_admin(actor)
        target = self.find(username)
        if target is None:
            raise NotFound(f"There is no user called {username!r}.")
        with self.db.connect() as conn:
            conn.execute(
                "UPDATE users SET failed_attempts = 0, locked_until = 0 WHERE id = ?",
                (target.id,),
            )
            self.audit.append(conn, admin, "user.unlock", details={"user": target.id})
        return self.get(target.id)

    def reset_password(self, actor: User, username: str, password: str) -> User:
        admin = self.require_admin(actor)
        target = self.find(username)
        if target is None:
            raise NotFound(f"There is no user called {username!r}.")
        check_password(password, target.username)
        with self.db.connect() as conn:
            conn.execute(
                "UPDATE users SET password_hash = ?, failed_attempts = 0, locked_until = 0 "
                "WHERE id = ?",
                (self.hasher.hash(password), target.id),
            )
            self.audit.append(conn, admin, "user.reset_password", details={"user": target.id})
        return self.get(target.id)

    # ------------------------------------------------------------------ bootstrap

    def create_admin(self, username: str, password: str) -> User:
        """Operator action (CLI): an admin account, without an acting admin."""
        return self._insert(username, password, "admin", None)  # audited with no actor

    def bootstrap_from_env(self, env: Mapping[str, str]) -> User | None:
        """Create the first admin from the environment while the database has none."""
        name = env.get("ONCOFLOW_UI_ADMIN_USER", "").strip()
        password = env.get("ONCOFLOW_UI_ADMIN_PASSWORD", "")
        if not name or self.has_admin():
            return None
        if not password:
            raise InvalidInput(
                "ONCOFLOW_UI_ADMIN_USER is set but ONCOFLOW_UI_ADMIN_PASSWORD is empty."
            )
        existing = self.find(name)
        if existing is not None:
            raise InvalidInput(f"{name!r} exists but is not an active admin; use the CLI.")
        try:
            return self.create_admin(name, password)
        except InvalidInput as exc:
            raise InvalidInput(f"ONCOFLOW_UI_ADMIN_USER/ONCOFLOW_UI_ADMIN_PASSWORD: {exc}") from exc


def main(argv: list[str] | None = None) -> int:
    """``python -m ui.accounts create-admin NAME``: create an admin (password asked twice)."""
    from ui.settings import UiConfig

    parser = argparse.ArgumentParser(prog="python -m ui.accounts")
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create-admin", help="create an administrator account")
    create.add_argument("username")
    create.add_argument("--password-stdin", action="store_true", help="read it from stdin")
    args = parser.parse_args(argv)
    config = UiConfig.from_env()
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Repeat: ") != password:
            print("The passwords differ.", file=sys.stderr)
            return 2
    store = AccountStore(Database(config.db_path))
    try:
        user = store.create_admin(args.username, password)
    except UiError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"created admin {user.username!r} in {config.db_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
