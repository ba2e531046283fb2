"""The coordinator of a real federation: a run spec built from the config alone, and the
Flower runs that ask the sites (preflight) and train + evaluate with them (federate).

`coordinator_layout(cfg, sites, root)` writes, without any site data:

    <root>/server/spec.json          the RunSpec (class names and image size from the config;
                                     a test set only when the coordinator holds one)
    <root>/server/site_request.json  the approval request each site reviews (`site approve`)
    <root>/server/out/               preflight.json, result.json, final_model.npz, ledger...

`FederationConnection` runs a phase ("preflight" | "federate") either through a SuperLink
(`flwr run` with the phase in the run config; local or remote) or, for tests, on the inline
engine over site directories in this process.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from components.errors import ConfigError, ModelError
from components.federated.layout import FederationLayout, array_fingerprint, local_training
from components.federated.runspec import RunSpec

log = logging.getLogger(__name__)

REQUEST_FILE = "site_request.json"
PHASES = ("preflight", "federate")


def coordinator_layout(
    cfg: Mapping[str, Any],
    sites: list[str],
    root: str | Path,
    *,
    test: tuple[np.ndarray, np.ndarray] | None = None,
    site_dirs: Mapping[str, str | Path] | None = None,
) -> FederationLayout:
    """Build and write the run spec of a federation of `sites` (their names) under `root`.

    `test`: an optional coordinator-held test set (x uint8 N,C,H,W, y). `site_dirs` only for a
    federation whose sites live on this machine (`oncoflow fl local`, tests).
    """
    from components.data.inputs import CLINICAL, input_kinds
    from components.federated.approval import write_request
    from components.federated.attacks import attacker_sites
    from components.federated.settings import validate_federation
    from components.federated.site_calibration import CalibrationSpec
    from components.federated.task import ModelSpec, write_split
    from components.privacy.settings import validate_privacy
    from components.training.assembly import architecture_from_config, preprocessing_from_config

    if len(set(sites)) != len(sites) or len(sites) < 2:
        raise ConfigError(f"a federation needs at least two distinct sites, got {sites}")
    config = copy.deepcopy(dict(cfg))
    config["federation"] = {**config["federation"], "num_sites": len(sites), "partition": "given"}
    settings = validate_federation(config)
    privacy = validate_privacy(config["privacy"], settings.to_dict(), config["trainer"])
    class_names = [str(c) for c in config["dataset"]["classes"]]
    root = Path(root).resolve()
    server = root / "server"
    server.mkdir(parents=True, exist_ok=True)
    test_path, fingerprint = "", ""
    if test is not None:
        write_split(server / "test.npz", *test)
        test_path, fingerprint = str(server / "test.npz"), array_fingerprint(list(test))
    architecture = architecture_from_config(config, len(class_names), privacy=privacy)
    clinical = config["dataset"]["clinical"]
    reads_records = CLINICAL in input_kinds(architecture["name"])
    spec = RunSpec(
        settings=settings,
        model=ModelSpec(
            architecture=architecture,
            preprocessing=preprocessing_from_config(config).to_dict(),
            class_names=class_names,
            # the schema every site encoded its records by (`site prepare`, same config)
            schema=[dict(f) for f in clinical["features"]] if reads_records else None,
        ),
        training=local_training(config, settings, None),
        test_path=test_path,
        out_dir=str(server / "out"),
        sites=list(sites),
        attacks=attacker_sites(settings.attack, list(sites)),
        data_fingerprint=fingerprint,
        privacy=privacy,
        site_test=True,
        calibration=CalibrationSpec.from_config(config),
    )
    spec.model.warn_unscaled()
    spec_path = spec.save(server / "spec.json")
    write_request(server / REQUEST_FILE, spec.client_spec.to_json(), federation=root.name)
    dirs = {name: Path(d) for name, d in (site_dirs or {}).items()}
    return FederationLayout(root, settings, spec, spec_path, dirs, {"num_sites": len(sites)})


def request_path(layout: FederationLayout) -> Path:
    return Path(layout.root) / "server" / REQUEST_FILE


def federated_test_fingerprint(stats: Mapping[str, Mapping[str, Any]]) -> str:
    """What identifies the federated test set at the coordinator: the sites and their test
    class counts (the only description of it that leaves the sites)."""
    payload = {site: (s or {}).get("class_counts", {}).get("test") for site, s in stats.items()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class FederationConnection:
    """How the coordinator reaches the sites: `flwr_home` (a SuperLink connection written by
    `write_flwr_config` or `LocalDeployment`), or `inline_sites` (site dirs, tests only)."""

    flwr_home: Path | None = None
    inline_sites: dict[str, Path] = field(default_factory=dict)
    timeout: float | None = None

    @classmethod
    def superlink(
        cls, root: str | Path, address: str, root_cert: str | Path | None, insecure: bool = False
    ) -> FederationConnection:
        from components.federated.deployment import write_flwr_config

        if root_cert is None and not insecure:
            raise ConfigError("pass the federation's CA certificate (root_cert) or insecure")
        home = Path(root) / "flwr_home"
        write_flwr_config(home, address, root_cert=None if insecure else root_cert)
        return cls(flwr_home=home)

    def run(self, layout: FederationLayout, phase: str) -> None:
        """Run `phase` of `layout`'s spec; its outputs land in the spec's out dir."""
        if phase not in PHASES:
            raise ConfigError(f"unknown phase {phase!r}; one of {PHASES}")
        if self.inline_sites:
            self._run_inline(layout, phase)
        elif self.flwr_home is not None:
            self._run_superlink(layout, phase)
        else:
            raise ConfigError("no way to reach the sites: give a SuperLink or inline site dirs")

    def _run_inline(self, layout: FederationLayout, phase: str) -> None:
        from components.federated.client_app import build_client_app
        from components.federated.inline import InlineGrid
        from components.federated.server_app import run_federation, run_preflight_only

        configs = [{"data-dir": str(d)} for d in self.inline_sites.values()]
        grid = InlineGrid(build_client_app(), configs)
        if phase == "preflight":
            run_preflight_only(grid, layout.spec)
        else:
            run_federation(grid, layout.spec)

    def _run_superlink(self, layout: FederationLayout, phase: str) -> None:
        from components.federated.deployment import (
            APP_DIR_NAME,
            run_budget,
            submit_run,
            wait_for_run,
            write_app,
        )

        app = write_app(Path(layout.root) / APP_DIR_NAME, layout.spec_path)
        run_id = submit_run(app, self.flwr_home, run_config={"phase": phase})
        s = layout.settings
        budget = self.timeout or (
            run_budget(s) if phase == "federate" else s.connect_timeout + s.round_timeout + 120
        )
        log.info("federated %s run %d submitted", phase, run_id)
        try:
            wait_for_run(run_id, self.flwr_home, timeout=budget)
        except ModelError as exc:  # the ServerApp wrote why (e.g. preflight.json) when it could
            log.warning("the %s run %d did not complete: %s", phase, run_id, str(exc)[:300])
            if phase == "preflight":
                raise
            from components.federated.status import record_interrupted

            record_interrupted(layout.out_dir, str(exc))  # when the ServerApp could not


def connect(
    layout: FederationLayout,
    *,
    superlink: str | None = None,
    root_cert: str | Path | None = None,
    insecure: bool = False,
    flwr_home: str | Path | None = None,
    site_dirs: Mapping[str, str | Path] | None = None,
) -> FederationConnection:
    """The connection a coordinator flow uses: an existing `flwr_home` (a local deployment),
    a SuperLink address with the federation's CA, or (engine=inline, tests) site dirs."""
    if flwr_home is not None:
        return FederationConnection(flwr_home=Path(flwr_home))
    if superlink is not None:
        return FederationConnection.superlink(layout.root, superlink, root_cert, insecure)
    if site_dirs and layout.settings.engine == "inline":
        return FederationConnection(inline_sites={n: Path(d) for n, d in site_dirs.items()})
    raise ConfigError(
        "the coordinator needs the SuperLink's address (--superlink HOST:PORT --root-cert "
        "ca.crt), or federation.engine=inline with site directories on this machine"
    )


__all__ = [
    "FederationConnection",
    "connect",
    "coordinator_layout",
    "federated_test_fingerprint",
    "request_path",
]
