"""`oncoflow prefect ...`: the local Prefect stack, deployments, promotion and data events.

Only argparse here at import time: `oncoflow --help` must stay fast.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any


def add_prefect_parser(sub: argparse._SubParsersAction) -> None:
    """Add the `prefect` command and its sub-commands to the `oncoflow` parser."""
    prefect = sub.add_parser(
        "prefect",
        help="local Prefect server/worker and deployments: up | deploy | status | promote | down",
        description="Run oncoflow's Prefect deployments: local server/worker, deploy, promote.",
    )
    prefect.add_argument("--workspace", default=None, help="default $ONCOFLOW_WORKSPACE")
    prefect.set_defaults(prefect_help=prefect.print_help)
    cmds = prefect.add_subparsers(dest="prefect_command", metavar="PREFECT_COMMAND")
    up = cmds.add_parser("up", help="start a Prefect server and a process worker (background)")
    up.add_argument("--port", type=int, default=4200)
    up.add_argument("--no-worker", action="store_true")
    up.add_argument("--pool", default=None, help="work pool (default oncoflow-process)")
    deploy = cmds.add_parser("deploy", help="create the work pool and deploy prefect.yaml")
    deploy.add_argument("--api-url", default=None)
    deploy.add_argument("--pool", default=None, help="work pool (default oncoflow-process)")
    deploy.add_argument("--prefect-file", default=None, help="default: the project's")
    deploy.add_argument("--pool-type", default="process", help="process | docker | kubernetes")
    deploy.add_argument("--base-job-template", default=None, help="work-pool template JSON")
    cmds.add_parser("down", help="stop what `up` started")
    cmds.add_parser("status", help="print the running stack")
    promote = cmds.add_parser("promote", help="package a registered version (default champion)")
    promote.add_argument("overrides", nargs="*")
    promote.add_argument("--version", default="champion")
    promote.add_argument("--reason", default=None, help="move the champion alias first")
    promote.add_argument("--no-build", action="store_true", help="import only, no Bento")
    data = cmds.add_parser("data-arrived", help="announce new data (triggers validation)")
    data.add_argument("overrides", nargs="*")
    data.add_argument("--api-url", default=None)


def run_prefect(args: argparse.Namespace) -> int:
    """Run one `oncoflow prefect` sub-command and print its result as JSON."""
    if args.prefect_command is None:
        args.prefect_help()
        return 0
    if args.workspace:  # the config's paths.workspace reads it too
        os.environ["ONCOFLOW_WORKSPACE"] = str(Path(args.workspace).expanduser().resolve())
    print(json.dumps(_dispatch(args), indent=2, default=str))
    return 0


def _dispatch(args: argparse.Namespace) -> Any:
    command = args.prefect_command
    if command == "promote":
        from flows.promote import run_promote

        build = False if args.no_build else None
        return run_promote(args.overrides, args.version, args.reason, build)
    if command == "data-arrived":
        from flows.events import announce_data

        return {"announced": announce_data(args.overrides, args.api_url, args.workspace)}
    from flows import prefect_local as stack

    if command == "up":
        pool = args.pool or stack.POOL
        return stack.up(args.port, args.workspace, pool=pool, worker=not args.no_worker)
    if command == "deploy":
        names = stack.deploy_all(
            args.api_url,
            args.workspace,
            args.pool or stack.POOL,
            args.prefect_file or stack.PREFECT_FILE,
            args.pool_type,
            args.base_job_template,
        )
        return {"deployments": names}
    if command == "down":
        return {"stopped": stack.down(args.workspace)}
    if command == "status":
        return stack.status(args.workspace)
    raise AssertionError(command)
