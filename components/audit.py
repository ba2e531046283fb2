"""The audit trail: an append-only, hash-chained log of every action taken through the UI and
of every call to the diagnosis service (`open_log`: a log in a database of its own).

Each entry holds its sequence number, UTC time, the acting user's id and role (never a name),
the action, the UI's case number (pseudonymous: it identifies nobody outside this database) and
a few non-identifying details (numbers, booleans, class names, methods: never free text, images,
file names or user names). ``hash = SHA-256(canonical JSON of the entry, prev_hash included)``,
so editing, deleting or reordering a stored entry breaks the chain at that entry. Triggers make
the table append-only for the application; the chain catches anyone who bypasses them. A
truncated tail leaves a valid shorter chain: anchor ``head`` somewhere else (``oncoflow audit
verify`` prints it; ``--head`` checks it).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

GENESIS = "0" * 64
FIELDS = ("seq", "ts", "actor_id", "actor_role", "action", "case_id", "details", "prev_hash")
_ACTION = re.compile(r"^[a-z]+(\.[a-z_-]+)+$")
_DETAIL_KEY = re.compile(r"^[a-z_]{1,32}$")
_DETAIL_TEXT = re.compile(r"^[A-Za-z0-9_.:+ -]{0,64}$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_log (
    seq        INTEGER PRIMARY KEY,
    ts         TEXT NOT NULL,
    actor_id   INTEGER,
    actor_role TEXT,
    action     TEXT NOT NULL,
    case_id    INTEGER,
    details    TEXT NOT NULL,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""


@dataclass(frozen=True)
class Operator:
    """The actor of command-line actions (no UI account behind them)."""

    id: None = None
    role: str = "operator"


class AuditError(ValueError):
    """An entry that must not be written (e.g. a detail that could identify someone)."""


@dataclass(frozen=True)
class Entry:
    seq: int
    ts: str
    actor_id: int | None
    actor_role: str | None
    action: str
    case_id: int | None
    details: str  # canonical JSON object
    prev_hash: str
    hash: str

    def canonical(self) -> str:
        return canonical({k: getattr(self, k) for k in FIELDS})


@dataclass(frozen=True)
class Verification:
    ok: bool
    entries: int
    head: str  # hash of the last intact entry (GENESIS for an empty log)
    broken_seq: int | None = None
    reason: str = ""


def canonical(fields: Mapping[str, Any]) -> str:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def entry_hash(fields: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical(fields).encode()).hexdigest()


def clean_details(details: Mapping[str, Any] | None) -> str:
    """Details as canonical JSON; refuses anything that could carry free text."""
    out: dict[str, Any] = {}
    for key, value in (details or {}).items():
        if not _DETAIL_KEY.match(key):
            raise AuditError(f"audit detail key {key!r} is not allowed")
        if isinstance(value, float):
            value = round(value, 6)
        elif isinstance(value, str) and not _DETAIL_TEXT.match(value):
            raise AuditError(f"audit detail {key!r} is not a short code (free text never goes in)")
        elif value is not None and not isinstance(value, bool | int | str):
            raise AuditError(f"audit detail {key!r} must be a number, boolean or short code")
        out[key] = value
    return canonical(out)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class AuditLog:
    """Appends to and reads an ``audit_log`` table (the UI database's, or `open_log`'s)."""

    def __init__(self, connect: Callable[[], Any], clock: Callable[[], str] = _now) -> None:
        self.connect = connect  # a context manager factory giving a transaction (Database.connect)
        self.clock = clock

    def append(
        self,
        conn: sqlite3.Connection,
        actor: Any,
        action: str,
        case_id: int | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> Entry:
        """Append one entry inside the caller's transaction (so an action and its entry are
        written together or not at all). `actor` has ``id`` and ``role``, or is None."""
        if not _ACTION.match(action):
            raise AuditError(f"audit action {action!r} is not a dotted lower-case name")
        body = clean_details(details)
        if not conn.in_transaction:
            conn.execute("BEGIN IMMEDIATE")  # serialise writers: seq and prev_hash stay unique
        last = conn.execute("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
        fields = {
            "seq": (last[0] + 1) if last else 1,
            "ts": self.clock(),
            "actor_id": None if actor is None or actor.id is None else int(actor.id),
            "actor_role": None if actor is None else str(actor.role),
            "action": action,
            "case_id": None if case_id is None else int(case_id),
            "details": body,
            "prev_hash": last[1] if last else GENESIS,
        }
        entry = Entry(**fields, hash=entry_hash(fields))
        conn.execute(
            "INSERT INTO audit_log (seq, ts, actor_id, actor_role, action, case_id, details, "
            "prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            tuple(asdict(entry).values()),
        )
        return entry

    def record(
        self,
        actor: Any,
        action: str,
        case_id: int | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> Entry:
        """Append one entry in a transaction of its own."""
        with self.connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            return self.append(conn, actor, action, case_id, details)

    def entries(self, limit: int | None = None, newest_first: bool = False) -> list[Entry]:
        order = "DESC" if newest_first else "ASC"
        sql = f"SELECT * FROM audit_log ORDER BY seq {order}"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self.connect() as conn:
            rows = conn.execute(sql).fetchall()
        return [Entry(**{k: row[k] for k in (*FIELDS, "hash")}) for row in rows]

    def verify(self, head: str | None = None) -> Verification:
        """Walk the chain from seq 1; the first entry whose seq, link or hash is wrong breaks it.
        `head`: a hash anchored elsewhere earlier, which must still be in the chain."""
        return verify_entries(self.entries(), head)


def verify_entries(entries: Iterable[Entry], head: str | None = None) -> Verification:
    previous, count, seen_head = GENESIS, 0, head is None
    for expected, entry in enumerate(entries, start=1):
        if entry.seq != expected:
            return Verification(
                False, count, previous, expected, f"entry {expected} is missing or out of order"
            )
        if entry.prev_hash != previous:
            return Verification(
                False, count, previous, entry.seq, "the link to the previous entry is broken"
            )
        if entry_hash({k: getattr(entry, k) for k in FIELDS}) != entry.hash:
            return Verification(False, count, previous, entry.seq, "the entry was altered")
        previous, count = entry.hash, count + 1
        seen_head = seen_head or entry.hash == head
    if not seen_head:
        return Verification(
            False, count, previous, count + 1, "the anchored head is not in the chain (truncated)"
        )
    return Verification(True, count, previous)


def open_log(path: str | Path) -> AuditLog:
    """An audit log in its own SQLite file (created 0600 with its parent 0700 when missing):
    what the diagnosis service appends to (`serving.audit`). One connection serves every
    call, one call at a time: opening one and running the schema script per entry cost ~1 ms
    of CPU, at every API call."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        path.touch(mode=0o600)
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")  # appends do not block readers
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(SCHEMA)
    lock = threading.Lock()

    @contextmanager
    def connect() -> Iterator[sqlite3.Connection]:
        with lock:
            try:
                yield conn
                if conn.in_transaction:
                    conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    return AuditLog(connect)


def export(entries: Iterable[Entry], fmt: str) -> str:
    """The entries as CSV or JSON (with their hashes, so a copy can be verified too)."""
    rows = [asdict(e) for e in entries]
    if fmt == "json":
        return json.dumps(rows, indent=1) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=[*FIELDS, "hash"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()
    raise AuditError(f"export format must be csv or json, not {fmt!r}")
