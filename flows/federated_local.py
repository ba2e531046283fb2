"""`oncoflow fl local`: a real federation on one machine, from per-hospital folders.

For each `--site NAME=DIR`: the `site_pipeline` flow prepares `<root>/sites/NAME` from DIR;
the coordinator's run spec is written and every site approves it explicitly (what was approved
is printed); a SuperLink and one SuperNode per site start as local processes with TLS
(`LocalDeployment`); then the coordinator's `federated_pipeline` runs through that SuperLink.
With `federation.engine=inline` the same ClientApp and ServerApp run in this process instead
(a quick try, and the default test suite's path).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def parse_sites(items: list[str]) -> dict[str, str]:
    from components.errors import ConfigError

    sites: dict[str, str] = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ConfigError(f"--site takes NAME=DIR, got {item!r}")
        if name in sites:
            raise ConfigError(f"site {name!r} given twice")
        sites[name] = folder
    return sites


def run_local_federation(
    sites: dict[str, str],
    overrides: list[str],
    root: str | Path,
    *,
    max_epsilon: float | None = None,
) -> dict[str, Any]:
    """Prepare, approve and run a federation of `sites` ({name: hospital folder}) here."""
    from components.config import compose, to_container
    from components.federated import approval
    from components.federated.coordinator import coordinator_layout, request_path
    from components.federated.local_deployment import LocalDeployment
    from flows.federated_pipeline import federated_pipeline
    from flows.site_pipeline import site_pipeline

    root = Path(root).resolve()
    overrides = ["training=federated", *overrides]
    site_dirs = {name: str(root / "sites" / name) for name in sites}
    for name, folder in sites.items():
        site_pipeline(folder, name, site_dirs[name], overrides)
    # the spec the coordinator's flow will build (same config, same sites) for the approvals
    cfg = to_container(compose(overrides))
    preview = coordinator_layout(cfg, list(sites), root / "approval", site_dirs=site_dirs)
    request = approval.read_request(request_path(preview))
    for name, site_dir in site_dirs.items():
        decision = approval.decide(site_dir, request, accept=True, max_epsilon=max_epsilon)
        print(
            json.dumps(
                {
                    "site": name,
                    "decision": decision["decision"],
                    "reason": decision["reason"],
                    "spec": request["spec_fingerprint"],
                    "code": decision["code_fingerprint"],
                    "approved": decision["summary"],
                }
            )
        )
    if cfg["federation"]["engine"] == "inline":  # the same apps in this process (quick tries)
        return federated_pipeline(overrides, sites=list(sites), site_dirs=site_dirs)
    with LocalDeployment(preview, tls=True) as deployment:
        deployment.start()
        return federated_pipeline(overrides, sites=list(sites), flwr_home=str(deployment.flwr_home))


__all__ = ["parse_sites", "run_local_federation"]
