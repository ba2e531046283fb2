"""The `oncoflow` command line. Imports nothing heavy until a subcommand needs it."""

from __future__ import annotations

import argparse
import logging
import os
import sys

EPILOG = """examples:
  oncoflow run dataset=brain_tumor_mri model=efficientnet_lite0 trainer.max_epochs=3
  oncoflow validate dataset=busi
  oncoflow serve
  oncoflow ui
  oncoflow prefect up && oncoflow prefect deploy
  oncoflow demo
Overrides use Hydra syntax (group=option, key.path=value); see conf/ for every option."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oncoflow",
        description="Privacy-preserving medical-image diagnosis: train, register and serve.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the whole training pipeline (Prefect flow)")
    run.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. dataset=busi")

    validate = sub.add_parser("validate", help="ingest and validate a dataset, no training")
    validate.add_argument("overrides", nargs="*")

    config = sub.add_parser("config", help="print the composed configuration")
    config.add_argument("overrides", nargs="*")

    serve = sub.add_parser("serve", help="serve the champion model over HTTP (BentoML)")
    serve.add_argument("--model", default=None, help="Bento model tag (default: latest import)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=3000)

    prefect = sub.add_parser(
        "prefect",
        help="local Prefect server/worker and deployments: up | deploy | status | promote | down",
        add_help=False,
    )
    prefect.add_argument("args", nargs=argparse.REMAINDER)

    fl = sub.add_parser(
        "fl", help="Flower deployment: prepare | certs | superlink | supernode | submit"
    )
    fl_sub = fl.add_subparsers(dest="fl_command", required=True, metavar="FL_COMMAND")
    prep = fl_sub.add_parser(
        "prepare", help="ingest, validate and write one directory per site + the run spec"
    )
    prep.add_argument("root", help="where the federation is written (sites/, server/)")
    prep.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. federation=krum")
    certs = fl_sub.add_parser("certs", help="CA + SuperLink certificate (+ SuperNode keys)")
    certs.add_argument("out_dir")
    certs.add_argument("--host", action="append", dest="hosts", help="SuperLink name (repeat)")
    certs.add_argument("--site", action="append", dest="sites", default=[], help="site key pair")
    link = fl_sub.add_parser("superlink", help="run a SuperLink for a prepared federation root")
    link.add_argument("root")
    link.add_argument("--host", default="127.0.0.1")
    link.add_argument("--port", type=int, default=9092)
    link.add_argument("--insecure", action="store_true", help="no TLS (tests only)")
    link.add_argument("--supernode-auth", action="store_true")
    node = fl_sub.add_parser("supernode", help="run the SuperNode of one site (its dir only)")
    node.add_argument("site_dir")
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

    ui = sub.add_parser("ui", help="the clinician web UI (Gradio) on top of the service")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=7860)

    demo = sub.add_parser("demo", help="the main job: train on real data, package and serve")
    demo.add_argument("overrides", nargs="*")
    demo.add_argument("--no-serve", action="store_true", help="stop after packaging")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["prefect"]:  # its own parser (flows/deploy.py) owns every flag after it
        from flows.deploy import main as prefect_main

        return prefect_main(argv[1:] or ["--help"])
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from components.errors import OncoflowError

    try:
        return _dispatch(args)
    except OncoflowError as exc:
        print(f"oncoflow: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("oncoflow: interrupted", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "config":
        from omegaconf import OmegaConf

        from components.config import compose

        print(OmegaConf.to_yaml(compose(args.overrides)))
        return 0
    if args.command == "run":
        from flows.runtime import prepare

        prepare(args.overrides)
        from flows.pipeline import run_pipeline

        summary = run_pipeline(args.overrides)
        _print_summary(summary)
        return 0
    if args.command == "validate":
        from flows.runtime import prepare

        prepare(args.overrides)
        from flows.pipeline import run_validation

        summary = run_validation(args.overrides)
        _print_summary(summary)
        return 0
    if args.command == "serve":
        from flows.runtime import prepare

        prepare([])  # the workspace's Bento store, unless BENTOML_HOME says otherwise
        from serving.launch import serve

        return serve(model_tag=args.model, host=args.host, port=args.port)
    if args.command == "fl":
        return _federated(args)
    if args.command == "ui":
        from ui.__main__ import main as ui_main

        return ui_main(["--host", args.host, "--port", str(args.port)])
    if args.command == "demo":
        from flows.demo import demo

        return demo(args.overrides, serve=not args.no_serve)
    raise AssertionError(args.command)


def _federated(args: argparse.Namespace) -> int:
    if args.fl_command == "prepare":
        from flows.runtime import prepare

        overrides = ["training=federated", *args.overrides]
        prepare(overrides)
        from flows.pipeline import prepare_federation_data

        _print_summary(prepare_federation_data(args.root, overrides))
        return 0
    from components.federated import cli as fl

    if args.fl_command == "certs":
        hosts = args.hosts or ["localhost", "127.0.0.1"]
        _print_summary(fl.certs(args.out_dir, hosts=hosts, sites=args.sites))
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
    _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    import json

    print(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
