"""The `oncoflow` command line. Imports nothing heavy until a subcommand needs it."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from flows.case_library_commands import add_case_library_parser, run_case_library
from flows.fl_commands import add_fl_parser, run_fl
from flows.prefect_commands import add_prefect_parser, run_prefect
from flows.site_commands import add_site_parser, run_site

EPILOG = """examples:
  oncoflow run dataset=brain_tumor_mri model=efficientnet_lite0 trainer.max_epochs=3
  oncoflow validate dataset=busi
  oncoflow serve --case-library ./case-library
  oncoflow case-library build --images ./our-cases --out ./case-library
  oncoflow ui
  oncoflow audit verify && oncoflow audit export --format csv --out audit.csv
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
    serve.add_argument("--host", default=None, help="default: serving.host (127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="default: serving.port (3000)")
    serve.add_argument(
        "--case-library",
        default=None,
        help="this site's similar-case library (oncoflow case-library build); default: "
        "serving.case_library; without one /similar answers 404",
    )
    add_case_library_parser(sub)

    add_prefect_parser(sub)

    add_fl_parser(sub)

    add_site_parser(sub)

    from flows.audit_commands import add_audit_parser  # the UI's log; argparse only, no gradio

    add_audit_parser(sub)

    ui = sub.add_parser("ui", help="the clinician web UI (Gradio) on top of the service")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=7860)

    demo = sub.add_parser("demo", help="the main job: train on real data, package and serve")
    demo.add_argument("overrides", nargs="*")
    demo.add_argument("--no-serve", action="store_true", help="stop after packaging")
    return parser


#: Libraries whose INFO lines are internal housekeeping (Great Expectations registers ~200
#: functions on import; httpx logs every call Prefect's client makes): WARNING and up only,
#: unless --verbose.
CHATTY_LOGGERS = ("great_expectations", "httpx", "httpcore")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # the run's own progress, not each library's housekeeping
        for name in CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    from components.errors import OncoflowError
    from components.telemetry import quiet_environment

    quiet_environment()  # before any tool is imported: they read these settings on import
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

        return serve(
            model_tag=args.model, host=args.host, port=args.port, case_library=args.case_library
        )
    if args.command == "case-library":
        return run_case_library(args)
    if args.command == "prefect":
        return run_prefect(args)
    if args.command == "fl":
        return run_fl(args)
    if args.command == "site":
        return run_site(args)
    if args.command == "audit":
        from flows.audit_commands import run_audit

        return run_audit(args)
    if args.command == "ui":
        from ui.__main__ import main as ui_main

        return ui_main(["--host", args.host, "--port", str(args.port)])
    if args.command == "demo":
        from flows.demo import demo

        return demo(args.overrides, serve=not args.no_serve)
    raise AssertionError(args.command)


def _print_summary(summary: dict) -> None:
    import json

    print(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
