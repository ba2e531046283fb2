"""The coordinator's record of a federated run, written as it happens and read by
`oncoflow fl status` and the pipeline's live MLflow watcher.

Two files in the run's output directory (`<root>/server/out/`), both rewritten atomically:

- `ledger.jsonl` (`checkpoint.write_ledger`): one JSON line per finished round. Besides the
  metrics, `annotate_round` adds the round's real start/end time (`started_at`, `ended_at`,
  Unix seconds), the accepted/rejected/failed site lists, a sanitised `reason`
  (`reasons.SiteReason`) on every site row that did not contribute, a `failures` list and the
  per-site ε where privacy reports it (`privacy.site_epsilon`); the round driver adds the
  array bytes sent to and received from each site (`bytes`, `traffic.MeteredGrid`).
- `run_state.json`: the run's state (`running`, `completed`, `stopped-budget`, `failed`), the
  planned rounds and sites, the sanitised reason of a failure or stop, a heartbeat
  (`updated_at`), and, mid-round, the round in progress with the failures known so far. When
  the ServerApp dies with its SuperLink, the coordinator's wait writes the end instead
  (`record_interrupted`: `failed`, category `interrupted`).

`read_status(root)` turns those files (and `preflight.json`) into a `FederationStatus`; nothing
else is read, so it works on the coordinator's machine with no access to any site. A preflight
that refused the run (too few approving sites) reads as `refused`, with its reason.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from components.errors import DataError
from components.federated.checkpoint import LEDGER, read_ledger
from components.federated.reasons import SiteReason, classify, scrub, server_error

RUN_STATE = "run_state.json"
RESULT_FILE = "result.json"  # server_app.RESULT_FILE (not imported: that pulls in Flower)
PREFLIGHT_FILE = "preflight.json"  # preflight.PREFLIGHT_FILE: each site's answer before round 1
RUNNING, COMPLETED, STOPPED, FAILED, STALLED, REFUSED = (
    "running",
    "completed",
    "stopped-budget",
    "failed",
    "stalled",
    "refused",  # the preflight found too few approving sites: no round ran
)
NOT_STARTED = "not started"
CONTRIBUTED = "accepted"


# ----------------------------------------------------------------------------- writing


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def update_run_state(out_dir: str | Path, **fields: Any) -> dict[str, Any]:
    """Merge `fields` into `run_state.json` (with a fresh heartbeat); return the new state."""
    path = Path(out_dir) / RUN_STATE
    state = _read_json(path) | fields | {"updated_at": time.time()}
    _write_json(path, state)
    return state


def stall_after(settings: Any) -> float:
    """Seconds without a heartbeat after which a running round driver counts as stalled: the
    longest a round may wait (connect, roll call, train, evaluate) plus a minute."""
    return float(settings.connect_timeout + 3 * settings.round_timeout + 60)


def state_of(result_status: str) -> str:
    """The run state of a finished run's result status (`completed` or `stopped: ...`)."""
    return COMPLETED if result_status == "completed" else STOPPED


def recorded_run(run: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """Wrap the round driver `run(grid, spec)`: `run_state.json` says `running` from the
    start, then `completed` / `stopped-budget` with its reason, or `failed` with a sanitised
    reason when the driver raises (the exception is re-raised)."""

    @functools.wraps(run)
    def wrapper(grid: Any, spec: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        out = Path(spec.out_dir)
        now = time.time()
        update_run_state(
            out,
            state=RUNNING,
            rounds_planned=int(spec.settings.rounds),
            sites=list(spec.sites),
            started_at=now,
            ended_at=None,
            reason=None,
            current=None,
            stall_after_s=stall_after(spec.settings),
        )
        try:
            result = run(grid, spec, *args, **kwargs)
        except BaseException as exc:
            update_run_state(
                out, state=FAILED, ended_at=time.time(), reason=server_error(exc).to_dict()
            )
            raise
        status = str(result.get("status", "completed"))
        reason = None
        if status != "completed":
            reason = SiteReason("stopped", scrub(status.removeprefix("stopped: "))).to_dict()
        update_run_state(
            out, state=state_of(status), ended_at=time.time(), reason=reason, current=None
        )
        return result

    return wrapper


def record_interrupted(out_dir: str | Path, why: str) -> dict[str, Any] | None:
    """The coordinator's record of a run lost with its ServerApp (killed with a crashed or
    restarted SuperLink): the round driver could not write its end, so `run_state.json` still
    says `running`. Mark it `failed`, category `interrupted`, naming the round in progress and
    the last checkpointed one; `why` is what the coordinator saw (sanitised here). Returns the
    new state, or None when the driver recorded its own end."""
    out = Path(out_dir)
    state = _read_json(out / RUN_STATE)
    if state.get("state") != RUNNING:
        return None
    done = len(read_ledger(out / LEDGER)) if (out / LEDGER).is_file() else 0
    at = (state.get("current") or {}).get("round") or done + 1
    seen = scrub(why.split(";")[0], 120)
    message = (
        f"the run was lost with its ServerApp during round {at} ({seen}); {done} round(s) are "
        "in the ledger and checkpointed; the run does not resume by itself: start it again"
    )
    reason = SiteReason("interrupted", message).to_dict()
    return update_run_state(out, state=FAILED, ended_at=time.time(), reason=reason, current=None)


def sanitise_rejections(rejections: list[Any]) -> list[Any]:
    """The round's `Rejection`s with their reasons in sanitised form (`category: message`)."""
    from dataclasses import replace

    return [replace(r, reason=classify(r.reason).text) for r in rejections]


def round_failures(sites: dict[str, dict], rejections: list[Any]) -> list[dict[str, Any]]:
    """[{site, status, category, message}] for every site of the round that did not contribute
    (the reason of its rejection, else one derived from its status)."""
    reasons = {r.site: classify(r.reason) for r in rejections}
    out = []
    for site in sorted(set(sites) | set(reasons)):
        status = sites.get(site, {}).get("status", "failed")
        if status == CONTRIBUTED and site not in reasons:
            continue
        if status == "evaluated only" and site not in reasons:
            continue
        reason = reasons.get(site) or SiteReason(status, f"the site's update was {status}")
        out.append({"site": site, "status": status, **reason.to_dict()})
    return out


def note_round_progress(out_dir: str | Path, server_round: int, phase: str, failures: list) -> None:
    """Mid-round heartbeat: the round in progress and the failures known so far (so a crashed
    or slow site shows at the coordinator as soon as its training reply is overdue)."""
    update_run_state(
        out_dir, current={"round": int(server_round), "phase": phase, "failures": failures}
    )


def annotate_round(
    row: dict[str, Any],
    rejections: list[Any],
    *,
    started_at: float,
    site_epsilon: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Add the ledger fields (times, site lists, sanitised reasons, ε per site) to `row`."""
    sites: dict[str, dict] = row["sites"]
    failures = round_failures(sites, rejections)
    for failure in failures:
        sites.setdefault(failure["site"], {"status": failure["status"]})["reason"] = {
            "category": failure["category"],
            "message": failure["message"],
        }
    by_status: dict[str, list[str]] = {}
    for site, values in sorted(sites.items()):
        by_status.setdefault(str(values.get("status")), []).append(site)
    row |= {
        "started_at": started_at,
        "ended_at": time.time(),
        "accepted_sites": by_status.get(CONTRIBUTED, []),
        "rejected_sites": by_status.get("rejected", []),
        "failed_sites": by_status.get("failed", []),
        "failures": failures,
    }
    if site_epsilon:
        row.setdefault("privacy", {})["site_epsilon"] = dict(site_epsilon)
    return row


# ----------------------------------------------------------------------------- reading


@dataclass
class SiteStatus:
    """A site's last known state at the coordinator."""

    site: str
    round: int | None = None  # the last round it appears in (0: preflight, None: never seen)
    status: str = "not seen"
    category: str | None = None
    message: str | None = None
    epsilon: float | None = None
    bytes_sent: int = 0  # array bytes sent to the site over all finished rounds
    bytes_received: int = 0  # array bytes received from it


@dataclass
class FederationStatus:
    """What `oncoflow fl status` prints."""

    state: str
    rounds_done: int
    rounds_planned: int | None
    last_round_at: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    reason: dict[str, str] | None = None
    current: dict[str, Any] | None = None
    central_epsilon: float | None = None
    sites: list[SiteStatus] = field(default_factory=list)
    out_dir: str = ""

    @property
    def ok(self) -> bool:
        """False when the run failed, was refused or its driver stopped reporting."""
        return self.state not in (FAILED, STALLED, REFUSED)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def out_dir_of(root: str | Path) -> Path:
    """The run's output directory: `<root>/server/out` of a prepared federation, `<root>/
    federation/server/out` of a pipeline run directory, or `root` itself."""
    root = Path(root)
    for candidate in (root / "server" / "out", root / "federation" / "server" / "out", root):
        if (candidate / RUN_STATE).is_file() or (candidate / LEDGER).is_file():
            return candidate
    return root / "server" / "out"


def _site_epsilon(row: dict[str, Any], site: str, values: dict[str, Any]) -> float | None:
    per_site = (row.get("privacy") or {}).get("site_epsilon") or {}
    if site in per_site:
        return float(per_site[site])
    if "dp_epsilon" in values:
        return float(values["dp_epsilon"])
    return None


def read_status(root: str | Path, now: float | None = None) -> FederationStatus:
    """The run's status from the coordinator's files under `root` (see `out_dir_of`);
    `DataError` when `root` does not exist."""
    if not Path(root).exists():
        raise DataError(f"{root} does not exist; pass a federation root (`oncoflow fl prepare`)")
    out = out_dir_of(root)
    state_file = _read_json(out / RUN_STATE)
    rows = read_ledger(out / LEDGER) if (out / LEDGER).is_file() else []
    result = _read_json(out / RESULT_FILE)
    state = state_file.get("state")
    preflight = _read_json(out / PREFLIGHT_FILE)
    if state is None:
        if result:
            state = state_of(str(result.get("status", "completed")))
        elif rows:
            state = RUNNING
        elif preflight and not preflight.get("ok", True):  # a preflight phase that refused
            state = REFUSED
            state_file["reason"] = {"category": "refused", "message": scrub(preflight["reason"])}
        else:
            state = NOT_STARTED
    last_at = max((float(r["ended_at"]) for r in rows if r.get("ended_at")), default=None)
    if state == RUNNING:
        beat = max(float(state_file.get("updated_at") or 0), last_at or 0)
        limit = state_file.get("stall_after_s")
        if beat and limit and (now or time.time()) - beat > float(limit):
            state = STALLED
    planned = state_file.get("rounds_planned", result.get("rounds"))
    names = list(state_file.get("sites") or result.get("sites") or [])
    sites = {name: SiteStatus(name) for name in names}
    for name, answer in (preflight.get("sites") or {}).items():
        status = str(answer.get("status", "unknown"))
        why = answer.get("reason") if status != "approved" else None
        sites[name] = SiteStatus(name, 0, status, status if why else None, why)
    central = None
    for row in rows:
        privacy = row.get("privacy") or {}
        if "epsilon" in privacy:
            central = float(privacy["epsilon"])
        for name, values in row.get("sites", {}).items():
            reason = values.get("reason") or {}
            previous = sites.get(name)
            epsilon = _site_epsilon(row, name, values)
            sites[name] = SiteStatus(
                name,
                int(row["round"]),
                str(values.get("status", "unknown")),
                reason.get("category"),
                reason.get("message"),
                epsilon if epsilon is not None else (previous.epsilon if previous else None),
            )
    for row in rows:  # what crossed the wire per site (`traffic.MeteredGrid`)
        for name, counted in (row.get("bytes") or {}).items():
            known = sites.setdefault(name, SiteStatus(name))
            known.bytes_sent += int(counted.get("sent", 0))
            known.bytes_received += int(counted.get("received", 0))
    current = state_file.get("current") if state in (RUNNING, STALLED) else None
    last_round = max((int(r["round"]) for r in rows), default=0)
    if current and int(current.get("round", 0)) <= last_round:
        current = None  # that round has ended: the ledger has it
    for failure in (current or {}).get("failures", []):
        known = sites.setdefault(failure["site"], SiteStatus(failure["site"]))
        known.round, known.status = int(current["round"]), str(failure["status"])
        known.category, known.message = failure.get("category"), failure.get("message")
    return FederationStatus(
        state=str(state),
        rounds_done=len(rows),
        rounds_planned=int(planned) if planned is not None else None,
        last_round_at=last_at,
        started_at=state_file.get("started_at"),
        ended_at=state_file.get("ended_at"),
        reason=state_file.get("reason"),
        current=current,
        central_epsilon=central,
        sites=[sites[name] for name in sorted(sites)],
        out_dir=str(out),
    )


def _when(seconds: float | None, now: float) -> str:
    if not seconds:
        return "-"
    stamp = datetime.fromtimestamp(float(seconds), UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    return f"{stamp} ({max(0.0, now - float(seconds)):.0f}s ago)"


def format_status(status: FederationStatus, now: float | None = None) -> str:
    """A few lines for a terminal: state, rounds, last round, one line per site."""
    now = now or time.time()
    planned = status.rounds_planned if status.rounds_planned is not None else "?"
    lines = [
        f"state:       {status.state}",
        f"rounds:      {status.rounds_done}/{planned}",
        f"last round:  {_when(status.last_round_at, now)}",
    ]
    if status.reason:
        lines.append(f"reason:      {status.reason['category']}: {status.reason['message']}")
    if status.current:
        lines.append(f"in progress: round {status.current['round']} ({status.current['phase']})")
    if status.central_epsilon is not None:
        lines.append(f"ε (central DP, site-level): {status.central_epsilon:.3f}")
    width = max([4, *(len(s.site) for s in status.sites)])
    lines.append("")
    lines.append(f"{'site':<{width}}  round  {'status':<14} {'ε':>7}  reason")
    for s in status.sites:
        eps = f"{s.epsilon:.3f}" if s.epsilon is not None else "-"
        why = f"{s.category}: {s.message}" if s.category else ""
        rnd = str(s.round) if s.round is not None else "-"
        lines.append(f"{s.site:<{width}}  {rnd:>5}  {s.status:<14} {eps:>7}  {why}".rstrip())
    return "\n".join(lines)


__all__ = [
    "COMPLETED",
    "FAILED",
    "REFUSED",
    "RUNNING",
    "RUN_STATE",
    "STALLED",
    "STOPPED",
    "FederationStatus",
    "SiteStatus",
    "annotate_round",
    "format_status",
    "note_round_progress",
    "out_dir_of",
    "read_status",
    "record_interrupted",
    "recorded_run",
    "round_failures",
    "sanitise_rejections",
    "update_run_state",
]
