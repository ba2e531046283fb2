"""Run a prepared federation on one of three engines, from the same config:

- `simulation`: Flower's simulation engine (`flwr.simulation.run_simulation`, Ray backend) on
  this machine; each site is a virtual SuperNode reading its own directory.
- `deployment`: a real SuperLink and one SuperNode per site as separate processes on
  127.0.0.1 with TLS (`local_deployment.LocalDeployment`); the same commands start them on
  separate machines (`oncoflow fl superlink|supernode|submit`).
- `inline`: the same ServerApp driver and ClientApp handlers called in this process, one site
  after another (`inline.InlineGrid`); for tests and machines too small for Ray.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from components.data.preprocess import Preprocessing
from components.errors import ConfigError
from components.federated.layout import FederationLayout, prepare_federation
from components.federated.result import FederatedResult, load_result

log = logging.getLogger(__name__)


def run_inline(layout: FederationLayout) -> dict[str, Any]:
    """Run `layout` on the inline engine. Returns the ServerApp's result dict."""
    from components.federated.client_app import build_client_app
    from components.federated.inline import InlineGrid
    from components.federated.server_app import run_federation

    grid = InlineGrid(build_client_app(), [{"data-dir": str(p)} for p in layout.sites.values()])
    return run_federation(grid, layout.spec)


def run_flower_simulation(layout: FederationLayout) -> None:
    """Run `layout` on Flower's simulation engine (Ray). Results land in `layout.out_dir`."""
    from flwr.simulation import run_simulation

    from components.federated.client_app import build_client_app
    from components.federated.server_app import build_server_app

    sim = layout.settings.simulation
    total = sim.total_cpus or os.cpu_count() or 1
    init_args: dict[str, Any] = {"num_cpus": int(total), "include_dashboard": False}
    backend_config = {
        "client_resources": {"num_cpus": float(sim.cpus_per_site), "num_gpus": 0.0},
        "init_args": init_args,
    }
    site_dirs = [str(p) for p in layout.sites.values()]
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    run_simulation(
        server_app=build_server_app(layout.spec),
        client_app=build_client_app(site_dirs),
        num_supernodes=len(site_dirs),
        backend_config=backend_config,
    )


def run_prepared(layout: FederationLayout, engine: str | None = None) -> FederatedResult:
    """Run an already prepared federation on `engine` (default: federation.engine)."""
    from components.federated.local_deployment import run_local_deployment

    engine = engine or layout.settings.engine
    started = time.perf_counter()
    if engine == "inline":
        run_inline(layout)
    elif engine == "simulation":
        run_flower_simulation(layout)
    elif engine == "deployment":
        run_local_deployment(layout)
    else:
        raise ConfigError(f"unknown federation.engine {engine!r}")
    result = load_result(layout)
    log.info(
        "federated run (%s, %s) finished in %.1fs: %s",
        engine,
        layout.settings.strategy,
        time.perf_counter() - started,
        result.summary()["final_server_metrics"],
    )
    return result


def run_federated(
    cfg: Mapping[str, Any],
    arrays: Mapping[str, Any],
    class_names: list[str],
    preprocessing: Preprocessing,
    out_dir: str | Path,
    *,
    site_groups: Mapping[str, Any] | None = None,
) -> FederatedResult:
    """The federated training step of the pipeline: validate the federation config, partition
    `arrays` ("train"/"val"/"test" `SplitArrays`) into sites under `out_dir`, run the engine
    named by `federation.engine`, and return the final global model with its history."""
    layout = prepare_federation(
        cfg, arrays, class_names, preprocessing, out_dir, site_groups=site_groups
    )
    return run_prepared(layout)


__all__ = ["run_federated", "run_flower_simulation", "run_inline", "run_prepared"]
