"""The workspace: one directory under which every run writes (MLflow, Bento store, reports)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_WORKSPACE = ".oncoflow"


@dataclass(frozen=True)
class Workspace:
    """Well-known locations inside a workspace root."""

    root: Path

    @classmethod
    def from_env(cls, root: str | os.PathLike | None = None) -> Workspace:
        """Resolve the workspace from an explicit path, `$ONCOFLOW_WORKSPACE` or the default."""
        chosen = root or os.environ.get("ONCOFLOW_WORKSPACE") or DEFAULT_WORKSPACE
        return cls(Path(chosen).expanduser().resolve())

    def ensure(self) -> Workspace:
        for path in (self.root, self.cache, self.reports, self.bundles, self.bentoml_home):
            path.mkdir(parents=True, exist_ok=True)
        return self

    @property
    def mlflow_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def service_audit_db(self) -> Path:
        """The diagnosis service's audit log (unless `serving.audit_db` names another)."""
        return self.root / "audit" / "service.db"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def bundles(self) -> Path:
        return self.root / "bundles"

    @property
    def bentoml_home(self) -> Path:
        return self.root / "bentoml"

    @property
    def prefect_home(self) -> Path:
        return self.root / "prefect"

    @property
    def data_docs(self) -> Path:
        return self.root / "data_docs"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"
