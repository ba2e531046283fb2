"""`oncoflow site ...`: what a hospital runs (parsing and dispatch).

    oncoflow site prepare DATA_DIR --site NAME --out SITE_DIR [overrides]
    oncoflow site approve SITE_DIR REQUEST.json [--max-epsilon E] [--accept | --refuse REASON]

`prepare` runs the `site_pipeline` flow (data that fails validation: the report's summary on
this terminal, the full report in SITE_DIR, exit code 2, nothing written to train on);
`approve` shows the run spec, the code fingerprint and the ε asked for, and records the site's
decision in SITE_DIR/approval.json (it asks when neither --accept nor --refuse is given).
The SuperNode is `oncoflow fl supernode SITE_DIR`.
"""

from __future__ import annotations

import argparse
import json
import sys


class _IntermixedParser(argparse.ArgumentParser):
    """Options may stand between positionals, as documented: `prepare DATA_DIR --site N --out D
    dataset=...` (plain argparse takes the overrides for unrecognised arguments there)."""

    _inner = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inner:  # parse_known_intermixed_args calls parse_known_args itself
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


def add_site_parser(sub: argparse._SubParsersAction) -> None:
    site = sub.add_parser("site", help="a hospital's side: prepare its data, approve a run")
    site_sub = site.add_subparsers(
        dest="site_command",
        required=True,
        metavar="SITE_COMMAND",
        parser_class=_IntermixedParser,
    )
    prep = site_sub.add_parser(
        "prepare", help="ingest, split and validate this hospital's folder; write the site"
    )
    prep.add_argument("data_dir", help="the hospital's image folder (dataset adapter layout)")
    prep.add_argument("--site", required=True, help="the site's name in the federation")
    prep.add_argument("--out", required=True, dest="site_dir", help="the site directory")
    prep.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. dataset=brain_tumor_mri")
    approve = site_sub.add_parser("approve", help="review a federation request and decide")
    approve.add_argument("site_dir")
    approve.add_argument("request", help="the coordinator's site_request.json")
    approve.add_argument("--max-epsilon", type=float, default=None, help="this site's maximum ε")
    decision = approve.add_mutually_exclusive_group()
    decision.add_argument("--accept", action="store_true")
    decision.add_argument("--refuse", metavar="REASON", default=None)


def run_site(args: argparse.Namespace) -> int:
    if args.site_command == "prepare":
        from flows.runtime import prepare

        prepare(args.overrides)
        from components.errors import ValidationFailed
        from flows.site_pipeline import site_pipeline

        try:
            summary = site_pipeline(args.data_dir, args.site, args.site_dir, list(args.overrides))
        except ValidationFailed as exc:  # the readable summary, on the site's own terminal only
            from validation.outcome import summarise

            if exc.report:
                print(summarise(exc.report), file=sys.stderr)
            raise
        print(json.dumps(summary, indent=2))
        return 0
    return approve(args.site_dir, args.request, args.max_epsilon, args.accept, args.refuse)


def approve(
    site_dir: str,
    request_file: str,
    max_epsilon: float | None,
    accept: bool,
    refuse: str | None,
    *,
    ask=input,
) -> int:
    """Show the request and record the decision; exit code 0 when accepted, 1 when refused."""
    from components.federated import approval

    request = approval.read_request(request_file)
    shown = approval.describe(request, site_dir)
    if max_epsilon is not None:
        shown["max_epsilon"] = max_epsilon
    print(json.dumps(shown, indent=2))
    if not shown["same_code_as_coordinator"]:
        print("note: the coordinator runs other code than this site", file=sys.stderr)
    if not accept and refuse is None:
        answer = ask("accept this federated run at this site? [y/N] ").strip().lower()
        accept = answer in ("y", "yes")
        if not accept:
            refuse = ask("reason for refusing (sent to the coordinator): ").strip()
    decision = approval.decide(
        site_dir, request, accept=accept, reason=refuse or "", max_epsilon=max_epsilon
    )
    print(json.dumps({"recorded": decision["decision"], "reason": decision["reason"]}))
    return 0 if decision["decision"] == "accepted" else 1


__all__ = ["add_site_parser", "approve", "run_site"]
