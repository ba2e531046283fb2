"""The coordinator's preflight, before any round: which sites are up, whether each approved
this run's spec (and why not), and their released statistics.

`run_preflight(grid, spec, node_sites)` waits for the sites, sends each connected node a
preflight query (the `ClientSpec` it would train under) and returns a `Preflight`: one row per
site (status approved | refused | error | no reply, a sanitised reason, its statistics) and
whether enough sites approved (`federation.min_available_sites`). `ApprovedGrid` then shows the
round driver only the approved nodes, so a refusing site is never sampled.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from components.errors import DataError
from components.federated.approval import sanitise
from components.federated.protocol import PREFLIGHT_RECORD, QUERY_KEY, SPEC_KEY, exchange, site_of

log = logging.getLogger(__name__)

PREFLIGHT_FILE = "preflight.json"


class FederationRefused(DataError):
    """Too few sites approved the run (the message names every site and its reason)."""


@dataclass
class Preflight:
    sites: dict[str, dict[str, Any]]  # site -> {status, reason, node, stats}
    minimum: int
    nodes: dict[int, str] = field(default_factory=dict)  # approved node id -> site

    @property
    def approved(self) -> list[str]:
        return sorted(s for s, row in self.sites.items() if row["status"] == "approved")

    @property
    def ok(self) -> bool:
        return len(self.approved) >= self.minimum

    @property
    def reason(self) -> str:
        """Why the run may or may not start, one clause per site that will not train."""
        approved, total = len(self.approved), len(self.sites)
        head = f"{approved} of {total} site(s) approved (minimum {self.minimum})"
        others = [
            f"{site}: {row['status']} ({row['reason']})"
            for site, row in sorted(self.sites.items())
            if row["status"] != "approved"
        ]
        return head + ("; " + "; ".join(others) if others else "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "minimum": self.minimum,
            "approved": self.approved,
            "reason": self.reason,
            "sites": self.sites,
        }

    def save(self, out_dir: str | Path) -> Path:
        path = Path(out_dir) / PREFLIGHT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    def raise_unless_ok(self) -> None:
        if not self.ok:
            raise FederationRefused(f"the federated run does not start: {self.reason}")


def read_preflight(out_dir: str | Path) -> dict[str, Any] | None:
    path = Path(out_dir) / PREFLIGHT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _row(node: int, reply: Message) -> dict[str, Any]:
    from components.federated.reasons import site_error

    if reply.has_error():
        why = site_error(reply.error.reason)
        return {"node": node, "status": why.category, "reason": why.message, "stats": None}
    record = reply.content.config_records.get(PREFLIGHT_RECORD)
    if record is None:
        return {"node": node, "status": "error", "reason": "no preflight answer", "stats": None}
    stats = json.loads(str(record["stats"])) if str(record.get("stats", "")) else None
    approved = bool(record["approved"])
    return {
        "node": node,
        "status": "approved" if approved else "refused",
        "reason": sanitise(str(record.get("reason", ""))),
        "stats": stats,
    }


def run_preflight(
    grid: Grid, spec: Any, node_sites: dict[int, str], *, timeout: float | None = None
) -> Preflight:
    """Ask every connected site for its approval of `spec` and its statistics (the caller
    waits for the sites to connect first)."""
    settings = spec.settings
    minimum = int(settings.min_available_sites)
    config = ConfigRecord({QUERY_KEY: "preflight", SPEC_KEY: spec.client_spec.to_json()})
    messages = [
        Message(
            content=RecordDict({"config": config}),
            dst_node_id=node,
            message_type=MessageType.QUERY,
        )
        for node in grid.get_node_ids()
    ]
    pairs, silent = exchange(grid, messages, timeout or settings.round_timeout)
    sites: dict[str, dict[str, Any]] = {}
    nodes: dict[int, str] = {}
    for node, reply in pairs:
        site = site_of(node, reply, node_sites)
        row = _row(node, reply)
        if site in sites:  # the first node to answer for a site is the site
            log.warning("preflight: node %d also claims to be site %s; ignored", node, site)
            continue
        sites[site] = row
        if row["status"] == "approved":
            nodes[node] = site
    for node in silent:
        site = site_of(node, None, node_sites)
        row = {"node": node, "status": "no reply", "reason": "no preflight answer", "stats": None}
        sites.setdefault(site, row)
    for site in spec.sites:
        if site not in sites:
            row = {"node": None, "status": "absent", "reason": "not connected", "stats": None}
            sites[site] = row
    result = Preflight(sites, minimum, nodes)
    log.info("preflight: %s", result.reason)
    return result


class ApprovedGrid(Grid):
    """A Grid that shows only the approved nodes (everything else goes to `grid`)."""

    def __init__(self, grid: Grid, approved: Iterable[int]) -> None:
        self._grid = grid
        self._approved = set(approved)

    def set_run(self, run: Any) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self._grid.get_node_ids() if n in self._approved]

    def push_messages(self, messages):
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids):
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages, *, timeout=None):
        return self._grid.send_and_receive(messages, timeout=timeout)


__all__ = [
    "PREFLIGHT_FILE",
    "ApprovedGrid",
    "FederationRefused",
    "Preflight",
    "read_preflight",
    "run_preflight",
]
