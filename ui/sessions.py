"""Server-side sessions: random tokens with an absolute lifetime and an idle timeout.

Only a SHA-256 of each token is stored, so a copy of the database does not let anyone sign
in. Every request resolves its token here and then re-reads the user, so disabling an account
or changing its role takes effect on the next click.

Least privilege by default: `user()` answers for staff (clinician, admin) only, so every
clinician handler refuses a patient's session without saying so itself; patient handlers ask
for `patient()`, and only the session check and sign-out accept any role.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable, Collection

from ui.accounts import ROLES, STAFF_ROLES, AccountStore, User
from ui.db import Database
from ui.errors import PermissionDenied, SessionExpired

EXPIRED = "Your session has expired. Please sign in again."


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class SessionStore:
    def __init__(
        self,
        db: Database,
        accounts: AccountStore,
        ttl_s: float = 8 * 3600.0,
        idle_s: float = 30 * 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.accounts = accounts
        self.ttl_s = ttl_s
        self.idle_s = idle_s
        self.clock = clock

    def create(self, user: User) -> str:
        """A new session for a user who just signed in; returns the token (keep it secret)."""
        token = secrets.token_urlsafe(32)
        now = self.clock()
        with self.db.connect() as conn:
            conn.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,))
            conn.execute(
                "INSERT INTO sessions (token_hash, user_id, created_at, last_seen, expires_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (_digest(token), user.id, now, now, now + self.ttl_s),
            )
        return token

    def user(
        self, token: str | None, touch: bool = True, roles: Collection[str] = STAFF_ROLES
    ) -> User:
        """The active user behind `token`; with `touch` the session's idle clock restarts
        (background checks pass ``touch=False`` so an open but idle page still times out).

        SessionExpired when the token is unknown, revoked, past its lifetime or idle too
        long, or when the account was disabled meanwhile; PermissionDenied when the user's
        role is not in `roles` (default: staff only).
        """
        if not token:
            raise SessionExpired("Please sign in.")
        now = self.clock()
        key = _digest(token)
        with self.db.connect() as conn:
            row = conn.execute(
                "SELECT user_id, last_seen, expires_at FROM sessions WHERE token_hash = ?", (key,)
            ).fetchone()
            if row is None:
                raise SessionExpired(EXPIRED)
            if row["expires_at"] <= now or now - row["last_seen"] > self.idle_s:
                conn.execute("DELETE FROM sessions WHERE token_hash = ?", (key,))
                raise SessionExpired(EXPIRED)
            if touch:
                conn.execute("UPDATE sessions SET last_seen = ? WHERE token_hash = ?", (now, key))
        user = self.accounts.get(row["user_id"])
        if not user.active:
            self.revoke(token)
            raise SessionExpired("This account has been disabled. Please ask an administrator.")
        if user.role not in roles:
            raise PermissionDenied("Your account cannot open this page.")
        return user

    def any_user(self, token: str | None, touch: bool = True) -> User:
        """The user behind `token`, whatever the role (session checks, sign-out)."""
        return self.user(token, touch, ROLES)

    def patient(self, token: str | None) -> User:
        """Like `user`, for patient pages: PermissionDenied for staff accounts."""
        return self.user(token, roles=("patient",))

    def admin(self, token: str | None) -> User:
        """Like `user`, but PermissionDenied unless the user is an admin (checked server-side)."""
        user = self.user(token)
        if not user.is_admin:
            raise PermissionDenied("This page is for administrators only.")
        return user

    def revoke(self, token: str | None) -> None:
        if token:
            with self.db.connect() as conn:
                conn.execute("DELETE FROM sessions WHERE token_hash = ?", (_digest(token),))
