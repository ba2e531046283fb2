"""The description of one federated run, as the server reads it (`RunSpec`, JSON on disk) and
as each site receives it inside every message (`ClientSpec`, JSON in the ConfigRecord).

Sites get only what they need to train and evaluate: the model spec, local training settings,
the seed and (in Byzantine experiments) the attack description. They never see paths or data
of other sites; the server never sees site data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from components.errors import ConfigError
from components.federated.settings import FederationSettings
from components.federated.site_calibration import CalibrationSpec
from components.federated.task import LocalTraining, ModelSpec
from components.privacy.settings import PrivacySettings


@dataclass(frozen=True)
class ClientSpec:
    model: ModelSpec
    training: LocalTraining
    seed: int
    attacks: dict[str, dict[str, Any]] = field(default_factory=dict)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    rounds: int = 1  # the planned rounds (DP-SGD calibrates σ over all of them)
    run_key: str = ""  # identifies the run (a site keeps one privacy ledger per run)

    def to_json(self) -> str:
        return json.dumps(
            {
                "model": self.model.to_dict(),
                "training": asdict(self.training),
                "seed": self.seed,
                "attacks": self.attacks,
                "privacy": _privacy_json(self.privacy),
                "rounds": self.rounds,
                "run_key": self.run_key,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> ClientSpec:
        data = json.loads(text)
        return cls(
            model=ModelSpec.from_dict(data["model"]),
            training=LocalTraining.from_dict(data["training"]),
            seed=int(data["seed"]),
            attacks=dict(data.get("attacks", {})),
            privacy=PrivacySettings.from_dict(data.get("privacy") or {}),
            rounds=int(data.get("rounds", 1)),
            run_key=str(data.get("run_key", "")),
        )


@dataclass(frozen=True)
class RunSpec:
    """Everything the ServerApp needs: settings, model, local training, where the test split
    and the outputs live, the expected sites and the data fingerprint.

    `test_path` is "" when the coordinator holds no test set (a real federation); `site_test`:
    the sites hold held-out test splits and score the final model on them."""

    settings: FederationSettings
    model: ModelSpec
    training: LocalTraining
    test_path: str
    out_dir: str
    sites: list[str]
    attacks: dict[str, dict[str, Any]] = field(default_factory=dict)
    data_fingerprint: str = ""
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    site_test: bool = False
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)

    @property
    def client_spec(self) -> ClientSpec:
        return ClientSpec(
            self.model,
            self.training,
            self.settings.seed,
            self.attacks,
            privacy=self.privacy,
            rounds=self.settings.rounds,
            run_key=self.fingerprint(),
        )

    def fingerprint(self) -> str:
        """What a checkpoint must match to be resumed: settings, model, training and data."""
        payload = {
            "settings": self.settings.fingerprint(),
            "model": self.model.to_dict(),
            "training": {k: v for k, v in asdict(self.training).items() if k != "threads"},
            "sites": sorted(self.sites),
            "data": self.data_fingerprint,
            "privacy": _privacy_json(self.privacy),
        }
        text = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings.to_dict(),
            "model": self.model.to_dict(),
            "training": asdict(self.training),
            "test_path": self.test_path,
            "out_dir": self.out_dir,
            "sites": list(self.sites),
            "attacks": self.attacks,
            "data_fingerprint": self.data_fingerprint,
            "privacy": _privacy_json(self.privacy),
            "site_test": self.site_test,
            "calibration": self.calibration.to_dict(),
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> RunSpec:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(
                f"no federated run spec at {path}; prepare the run with "
                "`oncoflow fl prepare` (deployment.prepare_federation) first"
            ) from exc
        return cls(
            settings=FederationSettings.from_dict(data["settings"]),
            model=ModelSpec.from_dict(data["model"]),
            training=LocalTraining.from_dict(data["training"]),
            test_path=data["test_path"],
            out_dir=data["out_dir"],
            sites=list(data["sites"]),
            attacks=dict(data.get("attacks", {})),
            data_fingerprint=data.get("data_fingerprint", ""),
            privacy=PrivacySettings.from_dict(data.get("privacy") or {}),
            site_test=bool(data.get("site_test", False)),
            calibration=CalibrationSpec.from_dict(data.get("calibration")),
        )


def _privacy_json(privacy: PrivacySettings) -> dict[str, Any]:
    """The wire form of the privacy settings ({} without privacy, as specs always had)."""
    return privacy.to_dict() if privacy.enabled else {}


__all__ = ["ClientSpec", "RunSpec"]
