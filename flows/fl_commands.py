"""`oncoflow fl ...`: the Flower deployment sub-commands (parsing and dispatch).

`prepare` runs the pipeline's data steps and writes the federation; the other commands are the
roles of `components.federated.deployment` (certs, superlink, supernode, submit). Imports
nothing heavy until a command runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_fl_parser(sub: argparse._SubParsersAction) -> None:
    """Add `fl` and its sub-commands to the `oncoflow` sub-parsers `sub`."""
    fl = sub.add_parser(
        "fl",
        help="federation: prepare | certs | superlink | supernode | submit | request | "
        "coordinate | local | status",
    )
    fl_sub = fl.add_subparsers(dest="fl_command", required=True, metavar="FL_COMMAND")
    prep = fl_sub.add_parser(
        "prepare", help="ingest, validate and write one directory per site + the run spec"
    )
    prep.add_argument("root", help="where the federation is written (sites/, server/)")
    prep.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. federation=krum")
    certs = fl_sub.add_parser("certs", help="CA + SuperLink certificate (+ SuperNode keys)")
    out = certs.add_mutually_exclusive_group(required=True)
    out.add_argument("out_dir", nargs="?", metavar="OUT_DIR", help="where they are written")
    out.add_argument("--out", dest="out_option", metavar="OUT_DIR", help="same as OUT_DIR")
    certs.add_argument("--host", action="append", dest="hosts", help="SuperLink name (repeat)")
    certs.add_argument("--site", action="append", dest="sites", default=[], help="site key pair")
    link = fl_sub.add_parser("superlink", help="run a SuperLink for a prepared federation root")
    link.add_argument("root")
    link.add_argument("--host", default="127.0.0.1")
    link.add_argument("--port", type=int, default=9092)
    link.add_argument("--insecure", action="store_true", help="no TLS (tests only)")
    link.add_argument("--supernode-auth", action="store_true")
    node = fl_sub.add_parser("supernode", help="run the SuperNode of one site (its dir only)")
    node.add_argument("site_dir", help="the site's directory (<root>/sites/<site> of fl prepare)")
    node.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    node.add_argument("--port", type=int, default=9094)
    node.add_argument("--root-cert")
    node.add_argument("--auth-key")
    node.add_argument("--insecure", action="store_true")
    submit = fl_sub.add_parser("submit", help="submit the prepared federation's run")
    submit.add_argument("root")
    submit.add_argument("--superlink", required=True)
    submit.add_argument("--root-cert")
    submit.add_argument("--insecure", action="store_true")
    submit.add_argument("--no-wait", action="store_true")
    local = fl_sub.add_parser(
        "local", help="a real federation on this machine from per-hospital folders (TLS)"
    )
    local.add_argument(
        "--site",
        action="append",
        required=True,
        metavar="NAME=DIR",
        help="a hospital and its image folder (repeat, at least two)",
    )
    local.add_argument("--root", default=None, help="default: <workspace>/local-federation")
    local.add_argument("--max-epsilon", type=float, default=None, help="every site's maximum ε")
    local.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. federation.rounds=3")
    request = fl_sub.add_parser(
        "request", help="write the approval request (run spec + code fingerprint) sites approve"
    )
    request.add_argument("--site", action="append", required=True, metavar="NAME", dest="sites")
    request.add_argument("--out", required=True, help="the request file to send to the sites")
    request.add_argument("overrides", nargs="*", help="Hydra overrides (the run's config)")
    coordinate = fl_sub.add_parser(
        "coordinate", help="the coordinator's flow through a SuperLink (sites on other machines)"
    )
    coordinate.add_argument("--site", action="append", required=True, metavar="NAME", dest="sites")
    coordinate.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    coordinate.add_argument("--root-cert", required=True, help="the federation's CA certificate")
    coordinate.add_argument("overrides", nargs="*", help="Hydra overrides (as in the request)")
    status = fl_sub.add_parser(
        "status", help="a run's state, rounds and each site's last status, from the coordinator"
    )
    status.add_argument("root", help="the federation root (or a pipeline run directory)")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_fl(args: argparse.Namespace) -> int:
    """Run the parsed `oncoflow fl` command; return the exit code."""
    if args.fl_command == "local":
        return _local(args)
    if args.fl_command == "status":
        return _status(args.root, as_json=args.json)
    if args.fl_command in ("request", "coordinate"):
        return _coordinator(args)
    if args.fl_command == "prepare":
        from flows.runtime import prepare

        overrides = ["training=federated", *args.overrides]
        prepare(overrides)
        from flows.pipeline import prepare_federation_data

        _print_json(prepare_federation_data(args.root, overrides))
        return 0
    from components.federated import deployment as fl

    if args.fl_command == "certs":
        hosts = args.hosts or ["localhost", "127.0.0.1"]
        out_dir = args.out_dir or args.out_option
        _print_json(fl.certs(out_dir, hosts=hosts, sites=args.sites))
        return 0
    if args.fl_command == "superlink":
        return fl.superlink(
            args.root,
            port=args.port,
            host=args.host,
            insecure=args.insecure,
            supernode_auth=args.supernode_auth,
        )
    if args.fl_command == "supernode":
        return fl.supernode(
            args.site_dir,
            superlink=args.superlink,
            port=args.port,
            root_cert=args.root_cert,
            auth_key=args.auth_key,
            insecure=args.insecure,
        )
    summary = fl.submit(
        args.root,
        superlink=args.superlink,
        root_cert=args.root_cert,
        insecure=args.insecure,
        wait=not args.no_wait,
    )
    _print_json(summary)
    return 0


def _status(root: str, *, as_json: bool) -> int:
    """`oncoflow fl status`: exit code 1 when the run failed or its driver stopped reporting."""
    from components.federated.status import format_status, read_status

    status = read_status(root)
    if as_json:
        _print_json(status.to_dict())
    else:
        print(format_status(status))
    return 0 if status.ok else 1


def _coordinator(args: argparse.Namespace) -> int:
    """`fl request` writes what each site approves; `fl coordinate` runs the coordinator's flow
    with the same config and sites (the spec is the same, so the approvals match it)."""
    import shutil
    import tempfile

    from flows.runtime import prepare

    overrides = ["training=federated", *args.overrides]
    prepare(overrides)
    if args.fl_command == "request":
        from components.config import compose, to_container
        from components.federated.coordinator import coordinator_layout, request_path

        with tempfile.TemporaryDirectory() as scratch:
            root = Path(scratch) / "federation"
            layout = coordinator_layout(to_container(compose(overrides)), args.sites, root)
            shutil.copyfile(request_path(layout), args.out)
        _print_json({"request": args.out, "sites": args.sites})
        return 0
    from flows.federated_pipeline import federated_pipeline

    summary = federated_pipeline(
        list(args.overrides), sites=args.sites, superlink=args.superlink, root_cert=args.root_cert
    )
    _print_json(summary)
    return 0


def _local(args: argparse.Namespace) -> int:
    from flows.runtime import prepare

    workspace = prepare(["training=federated", *args.overrides])
    from flows.federated_local import parse_sites, run_local_federation

    root = args.root or workspace.root / "local-federation"
    sites = parse_sites(args.site)
    _print_json(
        run_local_federation(sites, list(args.overrides), root, max_epsilon=args.max_epsilon)
    )
    return 0


def _print_json(summary: dict) -> None:
    print(json.dumps(summary, indent=2, default=str))


__all__ = ["add_fl_parser", "run_fl"]
