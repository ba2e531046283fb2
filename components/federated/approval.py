"""A site's approval of a federation: what it agreed to run, checked on every message.

The coordinator writes an approval request (`write_request`: the `ClientSpec` every message
will carry, a readable summary and the coordinator's code fingerprint). The site looks at it
(`describe`) and decides (`decide`): the decision is stored in `<site>/approval.json` under the
fingerprint of the spec *and* of the code the site runs (a hash of the installed oncoflow
sources), together with the site's own maximum ε. The ClientApp calls `check` on every message:
an unknown spec, changed code, a spec asking for more ε than the site allows or other classes
are refused with a fixed, sanitised reason, before any data is read.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from components.errors import ConfigError, OncoflowError

APPROVAL_FILE = "approval.json"
REQUEST_KIND = "oncoflow-federation-request"
SOURCE_ROOT = Path(__file__).resolve().parents[2]
CODE_PACKAGES = ("components", "flows", "validation", "conf")  # what a site runs
CODE_SUFFIXES = (".py", ".yaml")
MAX_REASON = 200


class SiteRefused(OncoflowError):
    """The site refuses this message (its reason is safe to send to the coordinator)."""


@dataclass(frozen=True)
class Verdict:
    approved: bool
    reason: str
    spec_fingerprint: str = ""


@lru_cache(maxsize=1)
def code_fingerprint(root: str | None = None) -> str:
    """Hash of the oncoflow sources this process runs (paths relative to the project + bytes)."""
    base = Path(root) if root else SOURCE_ROOT
    digest = hashlib.sha256()
    for package in CODE_PACKAGES:
        for path in sorted((base / package).rglob("*")):
            if path.suffix in CODE_SUFFIXES and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(base)).encode())
                digest.update(b"\0")
                digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def spec_fingerprint(spec_json: str) -> str:
    """Hash of a `ClientSpec` JSON (key order normalised)."""
    text = json.dumps(json.loads(spec_json), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def spec_epsilon(spec) -> float:
    """The ε a `ClientSpec` asks a site to spend (inf: no differential privacy, or an ε that is
    only known after training because the noise multiplier is fixed instead)."""
    privacy = spec.privacy
    if not (privacy.dp_sgd or privacy.central_dp) or privacy.epsilon is None:
        return math.inf
    return float(privacy.epsilon)


def summary(spec) -> dict[str, Any]:
    """What a site's officer reads before deciding: model, rounds, training and privacy."""
    privacy = spec.privacy
    return {
        "model": dict(spec.model.architecture),
        "class_names": list(spec.model.class_names),
        "image_size": spec.model.preprocessing.get("size"),
        "rounds": spec.rounds,
        "local_epochs": spec.training.epochs,
        "batch_size": spec.training.batch_size,
        "privacy_mode": privacy.mode,
        "epsilon": None if math.isinf(spec_epsilon(spec)) else spec_epsilon(spec),
        "delta": privacy.delta if privacy.enabled else None,
        "attacks": sorted(spec.attacks),
    }


def sanitise(reason: str) -> str:
    """A reason safe to leave a site: no paths, printable ASCII, at most MAX_REASON chars."""
    text = re.sub(r"(?:[A-Za-z]:)?[\\/][^\s'\"]*", "<path>", str(reason))
    text = re.sub(r"[^\x20-\x7e]", "?", text)
    return text[:MAX_REASON]


# --------------------------------------------------------------------------- coordinator side


def write_request(path: str | Path, client_spec_json: str, federation: str) -> Path:
    """The approval request a coordinator hands to each site (`oncoflow site approve`)."""
    from components.federated.runspec import ClientSpec

    spec = ClientSpec.from_json(client_spec_json)
    request = {
        "kind": REQUEST_KIND,
        "federation": federation,
        "client_spec": json.loads(client_spec_json),
        "spec_fingerprint": spec_fingerprint(client_spec_json),
        "coordinator_code_fingerprint": code_fingerprint(),
        "summary": summary(spec),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(request, indent=1))
    return path


def read_request(path: str | Path) -> dict[str, Any]:
    try:
        request = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the federation request {path}: {exc}") from exc
    if request.get("kind") != REQUEST_KIND or "client_spec" not in request:
        raise ConfigError(f"{path} is not an oncoflow federation request")
    return request


# --------------------------------------------------------------------------- site side


def load_approvals(site_dir: str | Path) -> dict[str, Any]:
    path = Path(site_dir) / APPROVAL_FILE
    if not path.is_file():
        return {"max_epsilon": None, "decisions": {}}
    return json.loads(path.read_text())


def _save(site_dir: str | Path, data: dict[str, Any]) -> Path:
    path = Path(site_dir) / APPROVAL_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.chmod(0o600)
    tmp.replace(path)
    return path


def describe(request: dict[str, Any], site_dir: str | Path) -> dict[str, Any]:
    """What `oncoflow site approve` shows: the spec summary, both code fingerprints, the ε the
    spec asks for against the site's maximum, and any decision already recorded."""
    from components.federated.runspec import ClientSpec

    text = json.dumps(request["client_spec"], sort_keys=True)
    spec = ClientSpec.from_json(text)
    approvals = load_approvals(site_dir)
    fingerprint = spec_fingerprint(text)
    return {
        "federation": request.get("federation"),
        "spec_fingerprint": fingerprint,
        "code_fingerprint": code_fingerprint(),
        "coordinator_code_fingerprint": request.get("coordinator_code_fingerprint"),
        "same_code_as_coordinator": request.get("coordinator_code_fingerprint")
        == code_fingerprint(),
        "max_epsilon": approvals.get("max_epsilon"),
        "summary": summary(spec),
        "previous_decision": approvals["decisions"].get(fingerprint),
    }


def decide(
    site_dir: str | Path,
    request: dict[str, Any],
    *,
    accept: bool,
    reason: str = "",
    max_epsilon: float | None = None,
) -> dict[str, Any]:
    """Record the site's decision on `request` (and its maximum ε, when given).

    Accepting a spec that asks for more ε than the site's maximum records a refusal instead.
    Returns the recorded decision.
    """
    from components.federated.runspec import ClientSpec

    text = json.dumps(request["client_spec"], sort_keys=True)
    spec = ClientSpec.from_json(text)
    data = load_approvals(site_dir)
    if max_epsilon is not None:
        if not (math.isfinite(max_epsilon) and max_epsilon > 0):
            raise ConfigError("--max-epsilon must be a positive number")
        data["max_epsilon"] = float(max_epsilon)
    asked = spec_epsilon(spec)
    limit = data.get("max_epsilon")
    if accept and limit is not None and asked > limit:
        accept, reason = False, _epsilon_reason(asked, limit)
    decision = {
        "decision": "accepted" if accept else "refused",
        "reason": sanitise(reason or ("accepted" if accept else "refused by the site")),
        "code_fingerprint": code_fingerprint(),
        "federation": request.get("federation"),
        "summary": summary(spec),
        "decided_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    data.setdefault("decisions", {})[spec_fingerprint(text)] = decision
    _save(site_dir, data)
    return decision


def _epsilon_reason(asked: float, limit: float) -> str:
    shown = "no differential privacy (unbounded)" if math.isinf(asked) else f"{asked:g}"
    return f"the spec asks for epsilon={shown}, above this site's maximum {limit:g}"


def check(site_dir: str | Path, spec_json: str, *, required: bool) -> Verdict:
    """May this site run the message's spec? (`required`: the site asks for approvals.)"""
    from components.federated.runspec import ClientSpec

    fingerprint = spec_fingerprint(spec_json)
    if not required:
        return Verdict(True, "approval not required at this site", fingerprint)
    data = load_approvals(site_dir)
    decision = data.get("decisions", {}).get(fingerprint)
    if decision is None:
        return Verdict(False, f"spec {fingerprint} has not been approved at this site", fingerprint)
    if decision["decision"] != "accepted":
        return Verdict(False, f"refused: {sanitise(decision['reason'])}", fingerprint)
    if decision["code_fingerprint"] != code_fingerprint():
        return Verdict(
            False,
            f"the code at this site ({code_fingerprint()}) is not the approved code "
            f"({decision['code_fingerprint']})",
            fingerprint,
        )
    spec = ClientSpec.from_json(spec_json)
    limit = data.get("max_epsilon")
    if limit is not None and spec_epsilon(spec) > limit:
        return Verdict(False, _epsilon_reason(spec_epsilon(spec), limit), fingerprint)
    return Verdict(True, "approved", fingerprint)


def require(site_dir: str | Path, spec_json: str, *, required: bool) -> None:
    """`SiteRefused` unless `check` approves."""
    verdict = check(site_dir, spec_json, required=required)
    if not verdict.approved:
        raise SiteRefused(verdict.reason)


__all__ = [
    "APPROVAL_FILE",
    "SiteRefused",
    "Verdict",
    "check",
    "code_fingerprint",
    "decide",
    "describe",
    "load_approvals",
    "read_request",
    "require",
    "sanitise",
    "spec_epsilon",
    "spec_fingerprint",
    "summary",
    "write_request",
]
