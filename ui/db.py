"""The UI's SQLite database: one file holding users, sessions, cases, the care workflow around
them (case images and released reports, patient invitations, questions) and the audit log.

A short-lived connection per operation keeps the stores safe to use from Gradio's worker
threads; WAL mode lets readers and one writer work side by side.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from components.audit import SCHEMA as AUDIT_SCHEMA

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id              INTEGER PRIMARY KEY,
    username        TEXT NOT NULL UNIQUE COLLATE NOCASE,
    password_hash   TEXT NOT NULL,
    role            TEXT NOT NULL CHECK (role IN ('patient', 'clinician', 'admin')),
    active          INTEGER NOT NULL DEFAULT 1,
    failed_attempts INTEGER NOT NULL DEFAULT 0,
    locked_until    REAL NOT NULL DEFAULT 0,
    created_at      REAL NOT NULL,
    created_by      INTEGER REFERENCES users(id),
    last_login      REAL
);
CREATE TABLE IF NOT EXISTS sessions (
    token_hash  TEXT PRIMARY KEY,
    user_id     INTEGER NOT NULL REFERENCES users(id),
    created_at  REAL NOT NULL,
    last_seen   REAL NOT NULL,
    expires_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_user ON sessions(user_id);
CREATE TABLE IF NOT EXISTS cases (
    id             INTEGER PRIMARY KEY,
    user_id        INTEGER NOT NULL REFERENCES users(id),
    case_ref       TEXT,
    created_at     REAL NOT NULL,
    input_kind     TEXT NOT NULL,
    label          TEXT NOT NULL,
    confidence     REAL NOT NULL,
    probabilities  TEXT NOT NULL,
    model_name     TEXT NOT NULL,
    model_version  TEXT NOT NULL,
    model_tag      TEXT NOT NULL,
    latency_ms     REAL,
    feedback_agree INTEGER,
    true_label     TEXT,
    feedback_note  TEXT,
    feedback_at    REAL
);
CREATE INDEX IF NOT EXISTS cases_user ON cases(user_id, created_at);
CREATE TABLE IF NOT EXISTS case_files (
    case_id    INTEGER PRIMARY KEY REFERENCES cases(id),
    kind       TEXT NOT NULL,
    sha256     TEXT NOT NULL,
    image      BLOB NOT NULL,
    report     BLOB,
    report_at  REAL
);
CREATE TABLE IF NOT EXISTS invites (
    id          INTEGER PRIMARY KEY,
    case_id     INTEGER NOT NULL REFERENCES cases(id),
    code_hash   TEXT NOT NULL UNIQUE,
    created_by  INTEGER NOT NULL REFERENCES users(id),
    created_at  REAL NOT NULL,
    expires_at  REAL NOT NULL,
    used_at     REAL,
    used_by     INTEGER REFERENCES users(id)
);
CREATE TABLE IF NOT EXISTS questions (
    id           INTEGER PRIMARY KEY,
    case_id      INTEGER NOT NULL REFERENCES cases(id),
    patient_id   INTEGER NOT NULL REFERENCES users(id),
    body         TEXT NOT NULL,
    asked_at     REAL NOT NULL,
    answer       TEXT,
    answered_by  INTEGER REFERENCES users(id),
    answered_at  REAL
);
CREATE INDEX IF NOT EXISTS questions_case ON questions(case_id);
"""


#: Columns of the care workflow, added to a `cases` table made before they existed.
CASE_COLUMNS = {
    "status": "TEXT NOT NULL DEFAULT 'new'",  # new -> reviewed -> released
    "assigned_to": "INTEGER REFERENCES users(id)",
    "danger": "REAL",  # probability of the model's dangerous classes (None: not known)
    "refer": "INTEGER",
    "prediction_set": "TEXT",
    "reviewed_by": "INTEGER REFERENCES users(id)",
    "reviewed_at": "REAL",
    "released_by": "INTEGER REFERENCES users(id)",
    "released_at": "REAL",
    "release_note": "TEXT",
    "patient_account": "INTEGER REFERENCES users(id)",  # the invited patient's UI account
}


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a database made by an earlier version up to this schema (idempotent)."""
    have = {row[1] for row in conn.execute("PRAGMA table_info(cases)")}
    for name, decl in CASE_COLUMNS.items():
        if name not in have:
            conn.execute(f"ALTER TABLE cases ADD COLUMN {name} {decl}")
    conn.execute("UPDATE cases SET assigned_to = user_id WHERE assigned_to IS NULL")
    conn.execute("CREATE INDEX IF NOT EXISTS cases_status ON cases(status, assigned_to)")
    conn.execute("CREATE INDEX IF NOT EXISTS cases_patient ON cases(patient_account)")
    users_sql = conn.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'users'"
    ).fetchone()[0]
    if "'patient'" not in users_sql:  # the role CHECK predates patients: rebuild the table
        conn.execute("PRAGMA foreign_keys=OFF")
        conn.execute("BEGIN")
        new_sql = users_sql.replace("'clinician', 'admin'", "'patient', 'clinician', 'admin'")
        conn.execute(new_sql.replace("CREATE TABLE users", "CREATE TABLE users_v2", 1))
        conn.execute("INSERT INTO users_v2 SELECT * FROM users")
        conn.execute("DROP TABLE users")
        conn.execute("ALTER TABLE users_v2 RENAME TO users")
        conn.execute("COMMIT")
        conn.execute("PRAGMA foreign_keys=ON")


class Database:
    """Opens connections to one SQLite file, creating the schema on first use."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=15.0, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(SCHEMA + AUDIT_SCHEMA)
            _migrate(conn)
        finally:
            conn.close()

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A connection in a transaction: committed on success, rolled back on error."""
        conn = sqlite3.connect(self.path, timeout=15.0)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA foreign_keys=ON")
        try:
            with conn:
                yield conn
        finally:
            conn.close()
