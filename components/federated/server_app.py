"""The Flower ServerApp (Message API) and the round driver shared by every engine.

`run_federation(grid, spec)` runs the rounds with a `flwr.serverapp.strategy` rule:
per round it sends the global weights to the sites (`configure_train`), screens the replies
(`hygiene`), aggregates the accepted ones (`aggregate_train`), asks the sites to evaluate the
new global model, evaluates it on the held-out test split on the server, then checkpoints the
global model and the server state and rewrites the round ledger. A restarted run resumes
after its last checkpoint. Results go to `spec.out_dir` (`result.json`, `final_model.npz`).

Deployment loads the module attribute `app` (spec path in the run config `spec-file`);
the simulation engines build a ServerApp around a `RunSpec` with `build_server_app`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp

from components.errors import ConfigError, DataError
from components.federated.calibration_exchange import calibrate_federation, evaluate_messages
from components.federated.checkpoint import (
    CHECKPOINT_DIR,
    LEDGER,
    CheckpointStore,
    write_ledger,
)
from components.federated.hygiene import Rejection, screen_updates
from components.federated.preflight import ApprovedGrid, Preflight, run_preflight
from components.federated.protocol import SPEC_KEY, accepted_row, exchange, site_of
from components.federated.reasons import classify, site_error
from components.federated.runspec import RunSpec
from components.federated.secagg_server import secure_round, uses_secure_aggregation
from components.federated.settings import FederationSettings
from components.federated.status import (
    annotate_round,
    note_round_progress,
    recorded_run,
    round_failures,
    sanitise_rejections,
)
from components.federated.traffic import MeteredGrid
from components.privacy.federated import UNIT_WEIGHT, ServerPrivacy

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
FINAL_WEIGHTS = "final_model.npz"
SPEC_FILE_KEY = "spec-file"  # run-config key of the deployment ServerApp
PHASE_KEY = "phase"  # run-config key: "preflight" (ask the sites only) | "federate" (default)


def await_sites(grid: Grid, expected: int, minimum: int, timeout: float) -> int:
    """Wait until `expected` sites are connected (or `minimum` once `timeout` has passed).

    Raises `DataError` when fewer than `minimum` sites are connected after `timeout`, instead
    of blocking forever as sampling would.
    """
    deadline = time.monotonic() + timeout
    while True:
        connected = len(list(grid.get_node_ids()))
        if connected >= expected:
            return connected
        if time.monotonic() >= deadline:
            if connected >= minimum:
                log.warning(
                    "%d of %d sites connected; going on without the others", connected, expected
                )
                return connected
            raise DataError(
                f"only {connected} of {expected} sites connected after {timeout:.0f}s, fewer than "
                f"federation.min_available_sites={minimum}; start the missing SuperNodes or "
                "lower federation.min_available_sites"
            )
        time.sleep(0.5)


def roll_call(grid: Grid, node_sites: dict[int, str], timeout: float) -> None:
    """Ask connected nodes not yet known which site they are (a `query` message), so a site
    that fails before sending any update is still reported by name."""
    from flwr.app import MessageType, RecordDict

    unknown = [node for node in grid.get_node_ids() if node not in node_sites]
    if not unknown:
        return
    messages = [
        Message(
            content=RecordDict({"config": ConfigRecord({"query": "site"})}),
            dst_node_id=node,
            message_type=MessageType.QUERY,
        )
        for node in unknown
    ]
    pairs, silent = exchange(grid, messages, timeout)
    for node in silent:
        log.warning("node %d did not answer the roll call within %.0fs", node, timeout)
    for node, reply in pairs:
        if reply.has_error():
            why = site_error(reply.error.reason).text
            log.warning("node %d did not answer the roll call: %s", node, why)
            continue
        site = site_of(node, reply, node_sites)
        claimed = [n for n, s in node_sites.items() if s == site]
        if len(claimed) > 1:
            log.warning("nodes %s all claim to be site %s", claimed, site)
    log.info("sites: %s", ", ".join(f"{s} (node {n})" for n, s in sorted(node_sites.items())))


class _TestSet:
    """The server's held-out test split and a model to score global weights on it."""

    def __init__(self, spec: RunSpec) -> None:
        from components.federated.task import read_arrays

        self.spec = spec
        self.held = bool(spec.test_path)  # a real federation's coordinator may hold none
        self.split = read_arrays(Path(spec.test_path)) if self.held else None
        self.model = spec.model.build()

    def evaluate(self, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        from components.federated.task import evaluate_model, load_arrays

        if not self.held:
            return {}
        load_arrays(self.model, arrays)
        split = self.split
        return evaluate_model(self.model, self.spec.model.inputs(split), split.y, self.spec.model)


def _initial_arrays(spec: RunSpec) -> dict[str, np.ndarray]:
    """The first global model (seeded); a clinical model's statistics from the schema alone
    (`ModelSpec.build`): the server never fits anything on records."""
    import torch

    from components.federated.task import state_arrays

    torch.manual_seed(spec.settings.seed)
    return state_arrays(spec.model.build())


def _set_multikrum_selection(strategy: Any, settings: FederationSettings, n: int) -> None:
    """Multi-Krum averages n - f updates of the replies actually received (unless configured)."""
    if settings.strategy == "multikrum" and settings.multikrum_select is None:
        strategy.num_nodes_to_select = settings.selected_by_multikrum(n)


def _round_train(
    strategy: Any,
    grid: Grid,
    spec: RunSpec,
    server_round: int,
    arrays: dict[str, np.ndarray],
    node_sites: dict[int, str],
) -> tuple[dict[str, np.ndarray] | None, dict[str, dict], list[Rejection], list[str]]:
    """One training step: send, screen, aggregate. Returns (new arrays or None, per-site rows,
    rejections, notes)."""
    from components.federated.task import from_record, match_dtypes, to_record

    if uses_secure_aggregation(spec):  # SecAgg+: the server only ever sees the sum
        return secure_round(grid, spec, server_round, arrays, node_sites)
    settings = spec.settings
    config = ConfigRecord({SPEC_KEY: spec.client_spec.to_json()})
    messages = list(strategy.configure_train(server_round, to_record(arrays), config, grid))
    pairs, silent = exchange(grid, messages, settings.round_timeout)
    sites: dict[str, dict] = {}
    rejections: list[Rejection] = []
    notes: list[str] = []
    updates, good = [], []
    for node in silent:
        site = site_of(node, None, node_sites)
        reason = f"no reply within round_timeout={settings.round_timeout:.0f}s"
        rejections.append(Rejection(server_round, site, reason, node))
        sites[site] = {"status": "failed"}
    for node, msg in pairs:
        site = site_of(node, msg, node_sites)
        if msg.has_error():
            reason = f"no update: {msg.error.reason}"
            rejections.append(Rejection(server_round, site, reason, node))
            sites[site] = {"status": "failed"}
            log.warning(
                "round %d: site %s failed: %s",
                server_round,
                site,
                site_error(msg.error.reason).text,
            )
            continue
        if site in sites:
            reason = (
                "a second reply from the same site in this round (two SuperNodes share a site?)"
            )
            rejections.append(Rejection(server_round, site, reason, node))
            log.warning("round %d: ignored %s", server_round, reason)
            continue
        records = msg.content.array_records
        weights = from_record(records["arrays"]) if "arrays" in records else {}
        updates.append((site, node, weights))
        good.append((site, msg))
        sites[site] = accepted_row(dict(msg.content.metric_records["metrics"]))
    if silent:
        notes.append(f"{len(silent)} site(s) did not answer within {settings.round_timeout:.0f}s")
    accepted, rejected, norms = screen_updates(server_round, updates, arrays, settings.hygiene)
    rejections.extend(rejected)
    for r in rejected:
        sites[r.site]["status"] = "rejected"
    for site, norm in norms.items():
        sites[site]["update_norm"] = norm
    ordered = sorted(accepted, key=lambda i: good[i][0])  # site order
    chosen = [good[i][1] for i in ordered]
    if not chosen:
        notes.append("no acceptable update: the global model is unchanged")
        return None, sites, rejections, notes
    if settings.mixing == "nnm":
        weighted_by = getattr(strategy, "weighted_by_key", "num-examples")
        _mix_replies(
            [good[i][0] for i in ordered],
            chosen,
            [updates[i][2] for i in ordered],  # already decoded above
            settings.num_malicious,
            sites,
            weighted_by,
        )
    _set_multikrum_selection(strategy, settings, len(chosen))
    try:
        aggregated, _ = strategy.aggregate_train(server_round, chosen)
    except Exception as exc:  # a rule refusing this set of replies must not end the run
        notes.append(f"aggregation failed ({type(exc).__name__}: {exc}); model unchanged")
        return None, sites, rejections, notes
    if aggregated is None:
        notes.append(
            f"{settings.strategy} skipped aggregation with {len(chosen)} update(s); model unchanged"
        )
        return None, sites, rejections, notes
    new = match_dtypes(from_record(aggregated), arrays)
    if not all(np.all(np.isfinite(v)) for v in new.values() if np.issubdtype(v.dtype, np.floating)):
        notes.append("the aggregate is not finite; model unchanged")
        return None, sites, rejections, notes
    return new, sites, rejections, notes


def _mix_replies(
    names: list[str],
    replies: list[Message],
    weights: list[dict[str, np.ndarray]],
    f: int,
    sites: dict[str, dict],
    weighted_by: str,
) -> None:
    """Nearest-neighbour mixing (`mixing.mix`) of the replies' `weights`, written back into
    the replies; each site's row records the sites its update was averaged with."""
    from flwr.app import RecordDict

    from components.federated.mixing import mix
    from components.federated.task import to_record

    counts = [float(reply.content.metric_records["metrics"][weighted_by]) for reply in replies]
    mixed, groups = mix(weights, f, counts)
    for reply, arrays, group, name in zip(replies, mixed, groups, names, strict=True):
        content = RecordDict(dict(reply.content.items()))
        content["arrays"] = to_record(arrays)
        reply.content = content
        sites[name]["mixed_with"] = [names[j] for j in group]


def _round_evaluate(
    strategy: Any,
    grid: Grid,
    spec: RunSpec,
    server_round: int,
    arrays: dict[str, np.ndarray],
    node_sites: dict[int, str],
    sites: dict[str, dict],
    unreachable: frozenset[int] = frozenset(),
) -> dict[str, float]:
    """Ask the sites to evaluate the global model; fill per-site rows, return the aggregate.

    Nodes in `unreachable` (no training reply this round) are not asked again, so a crashed or
    stuck site costs the round one `round_timeout`, not two."""
    from components.federated.task import to_record

    if not spec.settings.evaluate_sites:
        return {}
    config = ConfigRecord({SPEC_KEY: spec.client_spec.to_json()})
    messages = list(strategy.configure_evaluate(server_round, to_record(arrays), config, grid))
    messages = [m for m in messages if m.metadata.dst_node_id not in unreachable]
    pairs, silent = exchange(grid, messages, spec.settings.round_timeout)
    usable = []
    for node in silent:
        row = sites.setdefault(site_of(node, None, node_sites), {"status": "evaluated only"})
        row["eval_error"] = "no reply within round_timeout"
    for node, msg in pairs:
        site = site_of(node, msg, node_sites)
        row = sites.setdefault(site, {"status": "evaluated only"})
        if msg.has_error():
            row["eval_error"] = site_error(msg.error.reason).text
            continue
        metrics = dict(msg.content.metric_records["metrics"])
        if int(metrics.get("num-examples", 0)) > 0:
            usable.append(msg)
            row.update(
                {
                    "val_examples": int(metrics["num-examples"]),
                    "val_loss": float(metrics["val-loss"]),
                    "val_accuracy": float(metrics["val-accuracy"]),
                    "val_balanced_accuracy": float(metrics["val-balanced-accuracy"]),
                    "val_macro_f1": float(metrics["val-macro-f1"]),
                    "best_val_macro_f1": float(metrics["best-val-macro-f1"]),
                }
            )
    if not usable:
        return {}
    aggregate = strategy.aggregate_evaluate(server_round, usable)
    return {k.replace("-", "_"): float(v) for k, v in dict(aggregate or {}).items()}


def _write_result(spec: RunSpec, arrays: dict[str, np.ndarray], state: dict[str, Any]) -> Path:
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / FINAL_WEIGHTS, **arrays)
    path = out / RESULT_FILE
    tmp = out / f".{RESULT_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=1, default=float))
    tmp.replace(path)
    return path


def _ledger_rows(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "step"} for r in history]


def _unreachable(rejections: list[Rejection]) -> frozenset[int]:
    """Nodes that did not answer this round's training (timed out or gone)."""
    gone = ("timeout", "unavailable")
    return frozenset(
        r.node_id
        for r in rejections
        if r.node_id is not None and classify(r.reason).category in gone
    )


@recorded_run  # run_state.json: running -> completed | stopped-budget | failed (with why)
def run_federation(grid: Grid, spec: RunSpec) -> dict[str, Any]:
    """Run (or resume) the federated rounds of `spec` over `grid`; return the result dict.

    Every finished round is appended to `ledger.jsonl` at once, with its real end time and a
    sanitised reason for each site that did not contribute (`status.annotate_round`)."""
    from components.federated.strategies import build_strategy, strategy_state
    from components.federated.task import headline

    settings = spec.settings
    out = Path(spec.out_dir)
    store = CheckpointStore(out / CHECKPOINT_DIR, spec.fingerprint(), settings.keep_checkpoints)
    privacy = ServerPrivacy(spec.privacy, settings.rounds, len(spec.sites))
    weighting = UNIT_WEIGHT if privacy.settings.central_dp else "num-examples"
    strategy = privacy.wrap(build_strategy(settings, weighted_by_key=weighting))
    test = _TestSet(spec)
    started = time.perf_counter()

    checkpoint = store.latest() if settings.resume else None
    if not settings.resume:
        store.clear()
    if checkpoint is not None:
        arrays = checkpoint.arrays
        state = checkpoint.state
        history: list[dict[str, Any]] = state["history"]
        rejected: list[dict[str, Any]] = state["rejected"]
        node_sites = {int(k): v for k, v in state.get("node_sites", {}).items()}
        privacy.restore(state.get("privacy"))
        first = checkpoint.round + 1
        log.info("resuming after round %d from %s", checkpoint.round, checkpoint.path)
    else:
        arrays, history, rejected, node_sites, first = _initial_arrays(spec), [], [], {}, 1
    resumed_from = first - 1
    write_ledger(out / LEDGER, _ledger_rows(history))  # no stale rounds of an earlier run
    preflight = _preflight(grid, spec, node_sites)  # refusing sites never train
    preflight.raise_unless_ok()
    grid, approved = MeteredGrid(ApprovedGrid(grid, preflight.nodes)), len(preflight.nodes)

    for server_round in range(first, settings.rounds + 1):
        privacy.stopped = privacy.stopped or privacy.stop_reason(server_round)
        if privacy.stopped:
            log.warning("stopping before round %d: %s", server_round, privacy.stopped)
            break
        t0, started_at = time.perf_counter(), time.time()
        note_round_progress(out, server_round, "training", [])
        await_sites(
            grid,
            expected=approved if server_round == first else settings.min_available_sites,
            minimum=settings.min_available_sites,
            timeout=settings.connect_timeout,
        )
        roll_call(grid, node_sites, settings.round_timeout)
        new, sites, rejections, notes = _round_train(
            strategy, grid, spec, server_round, arrays, node_sites
        )
        rejections = sanitise_rejections(rejections)
        note_round_progress(out, server_round, "evaluating", round_failures(sites, rejections))
        if new is not None:
            arrays = new
        federated_eval = _round_evaluate(
            strategy, grid, spec, server_round, arrays, node_sites, sites, _unreachable(rejections)
        )
        server_metrics = headline(test.evaluate(arrays))
        seconds = time.perf_counter() - t0
        row = {
            "round": server_round,
            "step": server_round,
            "server": server_metrics,
            "sites_eval": federated_eval,
            "sites": sites,
            "accepted": sum(1 for s in sites.values() if s.get("status") == "accepted"),
            "rejected": sum(1 for s in sites.values() if s.get("status") == "rejected"),
            "failed": sum(1 for s in sites.values() if s.get("status") == "failed"),
            "aggregated": new is not None,
            "notes": notes,
            "round_seconds": seconds,
            "bytes": grid.take(node_sites),  # array bytes sent to / received from each site
        }
        if privacy.settings.enabled:
            row["privacy"] = privacy.after_round(sites, new is not None)
        refused = [r for r in rejections if "PrivacyBudgetExceeded" in r.reason]
        if refused:
            privacy.stopped = f"site {refused[0].site} refused to train: {refused[0].reason}"
            notes.append(privacy.stopped)
        site_epsilon = {site: v["epsilon"] for site, v in privacy.sites.items()}
        annotate_round(row, rejections, started_at=started_at, site_epsilon=site_epsilon)
        history.append(row)
        rejected.extend(r.to_dict() for r in rejections)
        for note in notes:
            log.warning("round %d: %s", server_round, note)
        log.info(
            "round %d/%d: %d accepted, %d rejected, %d failed; test macro-F1 %.4f (%.1fs)",
            server_round,
            settings.rounds,
            row["accepted"],
            row["rejected"],
            row["failed"],
            server_metrics.get("macro_f1", float("nan")),
            seconds,
        )
        store.save(
            server_round,
            arrays,
            {
                "history": history,
                "rejected": rejected,
                "node_sites": {str(k): v for k, v in node_sites.items()},
                "strategy": strategy_state(settings),
                "privacy": privacy.state(),
            },
        )
        write_ledger(out / LEDGER, _ledger_rows(history))

    final_metrics = test.evaluate(arrays)
    calibration = calibrate_federation(grid, spec, arrays, node_sites)
    block = calibration.get("calibration")
    site_evaluation = (
        final_evaluation(grid, spec, arrays, node_sites, block) if spec.site_test else None
    )
    result = {
        "status": "stopped: " + privacy.stopped if privacy.stopped else "completed",
        "rounds": settings.rounds,
        "rounds_completed": len(history),
        "privacy": privacy.report(),
        "resumed_from": resumed_from,
        "strategy": settings.strategy,
        "sites": list(spec.sites),
        "history": history,
        "rejected": rejected,
        "test_metrics": final_metrics,
        "preflight": preflight.to_dict(),
        "federated_evaluation": site_evaluation,
        "calibration": calibration,
        "wall_seconds": time.perf_counter() - started,
        "checkpoint_dir": str(store.directory),
    }
    _write_result(spec, arrays, result)
    return result


def final_evaluation(
    grid: Grid,
    spec: RunSpec,
    arrays: dict[str, np.ndarray],
    node_sites: dict[int, str],
    calibration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Each site scores the final global model on its own held-out test split and returns
    counts only; returns per-site and pooled metrics (`site_metrics.pool`) and the sites that
    did not answer, with a sanitised reason. With a `calibration` block the sites score the
    calibrated probabilities and the result adds the pooled calibration report."""
    from components.calibration.record import Calibration
    from components.federated.protocol import CALIBRATION_KEY, FINAL_KEY
    from components.federated.reasons import site_error
    from components.federated.site_calibration import pooled_report
    from components.federated.site_metrics import pool

    k = spec.model.num_classes
    extra: dict[str, Any] = {FINAL_KEY: True}
    if calibration:
        extra[CALIBRATION_KEY] = json.dumps(calibration)
    messages = evaluate_messages(grid, spec, arrays, extra)
    pairs, silent = exchange(grid, messages, spec.settings.round_timeout)
    summaries: dict[str, dict[str, Any]] = {}
    calibration_sums: list[dict[str, Any]] = []
    missing = {site_of(n, None, node_sites): "no reply within round_timeout" for n in silent}
    for node, reply in pairs:
        site = site_of(node, reply, node_sites)
        if reply.has_error():
            missing[site] = site_error(reply.error.reason).text
            continue
        m = dict(reply.content.metric_records["metrics"])
        auroc = float(m["macro-auroc"])
        summaries[site] = {
            "n": int(m["num-examples"]),
            "confusion_matrix": np.asarray(m["confusion-matrix"], dtype=np.int64).reshape(k, k),
            "ece_count": list(m["ece-count"]),
            "ece_correct": list(m["ece-correct"]),
            "ece_confidence": list(m["ece-confidence"]),
            "macro_auroc": None if auroc < 0 else auroc,
        }
        if CALIBRATION_KEY in reply.content.config_records:
            sums = str(reply.content.config_records[CALIBRATION_KEY]["sums"])
            calibration_sums.append(json.loads(sums))
    pooled = pool(summaries, spec.model.class_names)
    pooled["missing"] = missing
    if calibration and calibration_sums:
        report = pooled_report(calibration_sums, Calibration.from_dict(calibration))
        pooled["calibration"] = report
    pooled["sizes"] = {site: s["n"] for site, s in summaries.items()}
    log.info(
        "federated evaluation on %d site(s): pooled macro-F1 %s",
        len(summaries),
        pooled["pooled"].get("macro_f1"),
    )
    return pooled


def _preflight(grid: Grid, spec: RunSpec, node_sites: dict[int, str]) -> Preflight:
    """Wait for the sites (as the first round would), ask them, write preflight.json."""
    settings = spec.settings
    try:
        await_sites(grid, len(spec.sites), settings.min_available_sites, settings.connect_timeout)
    except DataError as exc:  # the preflight names every site that is missing
        log.warning("preflight: %s", exc)
    preflight = run_preflight(grid, spec, node_sites)
    preflight.save(spec.out_dir)
    return preflight


def run_preflight_only(grid: Grid, spec: RunSpec) -> dict[str, Any]:
    """The preflight phase of a deployment run: ask the sites, write preflight.json."""
    return _preflight(grid, spec, {}).to_dict()


def build_server_app(spec: RunSpec) -> ServerApp:
    """A ServerApp bound to `spec` (simulation engines pass it in memory)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, spec)

    return server


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployment entry point: the run config names the run spec written by `prepare_federation`."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    spec_file = context.run_config.get(SPEC_FILE_KEY)
    if not spec_file:
        raise ConfigError(f"the run config has no {SPEC_FILE_KEY!r}; submit with submit_run()")
    spec = RunSpec.load(str(spec_file))
    if str(context.run_config.get(PHASE_KEY, "federate")) == "preflight":
        run_preflight_only(grid, spec)
    else:
        run_federation(grid, spec)


__all__ = [
    "FINAL_WEIGHTS",
    "PHASE_KEY",
    "RESULT_FILE",
    "app",
    "await_sites",
    "build_server_app",
    "final_evaluation",
    "roll_call",
    "run_federation",
    "run_preflight_only",
]
