"""``oncoflow audit verify|export``: check and export an audit log from the command line.

The database is the UI's (``--db``, default: ``ONCOFLOW_UI_DB`` or ``<workspace>/ui.db``), or
with ``--service`` the diagnosis service's log of API calls (default: ``serving.audit_db``,
else ``<workspace>/audit/service.db``).
``verify`` exits 1 and names the first broken entry when an entry was edited, deleted or
reordered; ``--head HASH`` also checks that an earlier printed head is still in the chain
(catches a cut-off tail). ``export`` writes CSV or JSON (stdout or ``--out``) and is itself
audited.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_audit_parser(sub) -> None:
    audit = sub.add_parser("audit", help="verify or export the UI's hash-chained audit log")
    commands = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    verify = commands.add_parser("verify", help="check the hash chain (exit 1 if broken)")
    export = commands.add_parser("export", help="write the log as CSV or JSON")
    for command in (verify, export):
        command.add_argument("--db", default=None, help="the database (default: the workspace's)")
        command.add_argument(
            "--service", action="store_true", help="the diagnosis service's log of API calls"
        )
    verify.add_argument("--head", default=None, help="a head hash printed by an earlier verify")
    export.add_argument("--format", choices=("csv", "json"), default="csv")
    export.add_argument("--out", default=None, help="file to write (default: stdout)")


def run_audit(args: argparse.Namespace) -> int:
    from components.audit import AuditLog, Operator, export, open_log

    if args.service:
        path = Path(args.db) if args.db else _service_log_path()
        if not path.is_file():
            print(f"oncoflow: error: no service audit log at {path}", file=sys.stderr)
            return 2
        log = open_log(path)
    else:
        from ui.db import Database
        from ui.settings import UiConfig

        path = Path(args.db) if args.db else UiConfig.from_env().db_path
        if not path.is_file():
            print(f"oncoflow: error: no UI database at {path}", file=sys.stderr)
            return 2
        log = AuditLog(Database(path).connect)
    if args.audit_command == "verify":
        result = log.verify(head=args.head)
        if result.ok:
            print(f"audit log intact: {result.entries} entries; head {result.head}")
            return 0
        print(
            f"audit log broken at entry {result.broken_seq}: {result.reason} "
            f"({result.entries} entries intact before it)"
        )
        return 1
    text = export(log.entries(), args.format)
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    log.record(Operator(), "audit.export", details={"format": args.format})
    return 0


def _service_log_path() -> Path:
    from components.workspace import Workspace
    from serving.settings import load_settings

    chosen = load_settings().audit_db
    return Path(chosen).expanduser() if chosen else Workspace.from_env().service_audit_db
