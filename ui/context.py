"""What every page handler needs: settings, the stores and the service client, built once."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from components.audit import AuditLog
from serving.client import DiagnosisClient
from ui.accounts import AccountStore
from ui.care import CareStore
from ui.cases import CaseStore
from ui.db import Database
from ui.sessions import SessionStore
from ui.settings import UiConfig


@dataclass
class UiContext:
    config: UiConfig
    db: Database
    accounts: AccountStore
    sessions: SessionStore
    cases: CaseStore
    client: DiagnosisClient
    care: CareStore
    audit: AuditLog

    @classmethod
    def create(
        cls,
        config: UiConfig | None = None,
        client: DiagnosisClient | None = None,
        env: Mapping[str, str] | None = None,
    ) -> UiContext:
        """Open the database (bootstrapping the first admin from `env`) and the client."""
        config = config or UiConfig.from_env(env)
        db = Database(config.db_path)
        audit = AuditLog(db.connect)
        accounts = AccountStore(db, config.max_failed_logins, config.lockout_s, audit=audit)
        accounts.bootstrap_from_env(os.environ if env is None else env)
        cases = CaseStore(db, audit=audit)
        return cls(
            config=config,
            db=db,
            accounts=accounts,
            sessions=SessionStore(db, accounts, config.session_ttl_s, config.idle_timeout_s),
            cases=cases,
            client=client
            or DiagnosisClient(config.service_url, config.api_key, config.request_timeout_s),
            care=CareStore(db, accounts, cases, audit=audit),
            audit=audit,
        )
