"""Plain functions behind `oncoflow fl certs|superlink|supernode|submit` (no argparse).

A deployment, step by step (one machine per role; the federation is written under <root> by
`oncoflow fl prepare <root> dataset=... federation=...`, which runs the pipeline's ingest,
split and validation steps and then `layout.prepare_federation`):

    certs(<root>/certs, hosts=["superlink.example.org"])             # once, on the SuperLink
    superlink(<root>, port=9092, host="0.0.0.0")                      # SuperLink machine
    supernode(<site dir>, superlink="superlink.example.org:9092",     # each hospital, its own
              root_cert="ca.crt")                                     #   site directory only
    submit(<root>, superlink="superlink.example.org:9092", root_cert=".../ca.crt")

The long-running commands run in the foreground and return their exit code.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from components.errors import ConfigError
from components.federated.certs import CertPaths, make_certificates, make_supernode_keys
from components.federated.deployment import (
    APP_DIR_NAME,
    base_env,
    register_supernode,
    submit_run,
    superlink_command,
    supernode_command,
    wait_for_run,
    write_app,
    write_flwr_config,
)


def certs(
    out_dir: str | Path,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    sites: Sequence[str] = (),
) -> dict[str, Any]:
    """Create the CA + SuperLink certificate (and SuperNode key pairs for `sites`)."""
    out = Path(out_dir)
    paths = make_certificates(out, hosts=hosts)
    keys = make_supernode_keys(out / "supernode-keys", sites) if sites else {}
    return {
        "ca_cert": str(paths.ca_cert),
        "server_cert": str(paths.server_cert),
        "server_key": str(paths.server_key),
        "supernode_keys": {
            s: {"private": str(k.private_key), "public": str(k.public_key)} for s, k in keys.items()
        },
    }


def _certs_in(root: Path) -> CertPaths:
    cert_dir = root / "certs"
    paths = CertPaths(cert_dir / "ca.crt", cert_dir / "server.pem", cert_dir / "server.key")
    missing = [
        p.name for p in (paths.ca_cert, paths.server_cert, paths.server_key) if not p.is_file()
    ]
    if missing:
        raise ConfigError(
            f"no TLS certificates in {cert_dir} (missing {', '.join(missing)}); "
            "create them with `oncoflow fl certs` or pass insecure=True for a local experiment"
        )
    return paths


def superlink(
    root: str | Path,
    *,
    port: int = 9092,
    host: str = "127.0.0.1",
    insecure: bool = False,
    supernode_auth: bool = False,
) -> int:
    """Run a SuperLink in the foreground (state persisted in <root>/superlink/state.db)."""
    root = Path(root)
    database = root / "superlink" / "state.db"
    database.parent.mkdir(parents=True, exist_ok=True)
    cmd = superlink_command(
        port=port,
        host=host,
        certs=None if insecure else _certs_in(root),
        insecure=insecure,
        supernode_auth=supernode_auth,
        database=database,
    )
    return subprocess.call(cmd, env=base_env())


def supernode(
    site_dir: str | Path,
    *,
    superlink: str,
    port: int = 9094,
    root_cert: str | Path | None = None,
    auth_key: str | Path | None = None,
    insecure: bool = False,
) -> int:
    """Run the SuperNode of one site in the foreground; it reads only `site_dir`."""
    cmd = supernode_command(
        site_dir,
        superlink=superlink,
        port=port,
        root_cert=root_cert,
        insecure=insecure,
        auth_key=auth_key,
    )
    return subprocess.call(cmd, env=base_env())


def _connection(root: Path, superlink: str, root_cert: str | Path | None, insecure: bool) -> Path:
    if root_cert is None and not insecure:
        default = root / "certs" / "ca.crt"
        if not default.is_file():
            raise ConfigError(f"pass root_cert (the federation's ca.crt); {default} is missing")
        root_cert = default
    home = root / "flwr_home"
    write_flwr_config(home, superlink, root_cert=None if insecure else root_cert)
    return home


def register(
    root: str | Path,
    public_key: str | Path,
    *,
    superlink: str,
    root_cert: str | Path | None = None,
) -> int:
    """Register a site's public key with a SuperLink started with supernode_auth=True."""
    home = _connection(Path(root), superlink, root_cert, insecure=False)
    return register_supernode(public_key, home)


def submit(
    root: str | Path,
    *,
    superlink: str,
    root_cert: str | Path | None = None,
    insecure: bool = False,
    wait: bool = True,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Submit the prepared federation under `root` to a SuperLink (`flwr run`).

    With `wait`, block until the run ends and return its summary (the final model and history
    are in <root>/server/out; `result.load_result(FederationLayout.open(root))` loads them).
    """
    from components.federated.layout import FederationLayout
    from components.federated.result import load_result

    root = Path(root)
    layout = FederationLayout.open(root)
    home = _connection(root, superlink, root_cert, insecure)
    app = write_app(root / APP_DIR_NAME, layout.spec_path)
    run_id = submit_run(app, home)
    if not wait:
        return {"run_id": run_id, "status": "submitted"}
    s = layout.settings
    budget = timeout or (s.connect_timeout + s.rounds * 2 * s.round_timeout + 120)
    status = wait_for_run(run_id, home, timeout=budget)
    return {"run_id": run_id, "status": status, **load_result(layout).summary()}


__all__ = ["certs", "register", "submit", "superlink", "supernode"]
