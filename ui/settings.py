"""UI settings, read from the environment.

ONCOFLOW_SERVICE_URL         diagnosis service base URL (default http://127.0.0.1:3000)
ONCOFLOW_API_KEY             API key for the service (sent as a Bearer token)
ONCOFLOW_WORKSPACE           workspace directory (default ./.oncoflow)
ONCOFLOW_UI_DB               SQLite file for users, sessions, cases (default <workspace>/ui.db)
ONCOFLOW_UI_SESSION_MINUTES  absolute session lifetime (default 480)
ONCOFLOW_UI_IDLE_MINUTES     idle timeout (default 30)
ONCOFLOW_UI_MAX_FAILED       failed sign-ins before a lockout (default 5)
ONCOFLOW_UI_LOCKOUT_MINUTES  lockout length (default 15)
ONCOFLOW_UI_TIMEOUT_S        HTTP timeout for calls to the service (default 120)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ui.errors import UiConfigError

DEFAULT_SERVICE_URL = "http://127.0.0.1:3000"
DEFAULT_WORKSPACE = ".oncoflow"


def _number(env: Mapping[str, str], name: str, default: float, minimum: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise UiConfigError(f"{name}={raw!r} is not a number") from exc
    if value < minimum:
        raise UiConfigError(f"{name} must be at least {minimum:g} (got {raw})")
    return value


@dataclass(frozen=True)
class UiConfig:
    """Everything the UI needs to run; build it with `UiConfig.from_env()`."""

    service_url: str = DEFAULT_SERVICE_URL
    api_key: str | None = None
    workspace: Path = Path(DEFAULT_WORKSPACE)
    db_path: Path = Path(DEFAULT_WORKSPACE) / "ui.db"
    session_ttl_s: float = 8 * 3600.0
    idle_timeout_s: float = 30 * 60.0
    max_failed_logins: int = 5
    lockout_s: float = 15 * 60.0
    request_timeout_s: float = 120.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> UiConfig:
        env = os.environ if env is None else env
        url = env.get("ONCOFLOW_SERVICE_URL", "").strip() or DEFAULT_SERVICE_URL
        if not url.startswith(("http://", "https://")):
            raise UiConfigError(f"ONCOFLOW_SERVICE_URL={url!r} must start with http:// or https://")
        workspace = Path(env.get("ONCOFLOW_WORKSPACE", "").strip() or DEFAULT_WORKSPACE)
        db = env.get("ONCOFLOW_UI_DB", "").strip()
        return cls(
            service_url=url.rstrip("/"),
            api_key=env.get("ONCOFLOW_API_KEY", "").strip() or None,
            workspace=workspace,
            db_path=Path(db) if db else workspace / "ui.db",
            session_ttl_s=_number(env, "ONCOFLOW_UI_SESSION_MINUTES", 480, 1) * 60.0,
            idle_timeout_s=_number(env, "ONCOFLOW_UI_IDLE_MINUTES", 30, 1) * 60.0,
            max_failed_logins=int(_number(env, "ONCOFLOW_UI_MAX_FAILED", 5, 1)),
            lockout_s=_number(env, "ONCOFLOW_UI_LOCKOUT_MINUTES", 15, 1) * 60.0,
            request_timeout_s=_number(env, "ONCOFLOW_UI_TIMEOUT_S", 120, 1),
        )
