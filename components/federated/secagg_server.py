"""SecAgg+ secure aggregation of the federated rounds (`privacy.mode` = secagg / secagg_dp):
the server's half (the site's half is `secagg_client`).

One training round runs Flower's SecAgg+ protocol (`SecAggPlusWorkflow` on the server,
`secaggplus_mod` on each site) in four stages: *setup* (each site sends two public keys),
*share keys* (each site splits its mask seed and key into Shamir shares, encrypted for its
neighbours), *collect masked vectors* (each site trains, then uploads its update hidden under
pairwise masks, which cancel in the sum, and a private mask) and *unmask* (the surviving sites
return the shares the server needs to remove the private masks, and the pairwise masks of
sites that dropped out, from the **sum**). A site that drops out before uploading is left out
of the sum; the round goes on while every site keeps at least `reconstruction_threshold`
live neighbours.

What a site masks is its **update** (local weights minus the round's global weights, whose L2
norm the site bounds to `privacy.update_norm_bound`) over the floating-point tensors, scaled by
num_examples / max_weight, clipped per coordinate to ±clipping_range and stochastically
quantised to quantization_range levels. The server unmasks only the sum, divides by the
(quantised) total weight and adds the result to the global model: FedAvg, up to the bound of
`aggregate_error_bound`. Integer buffers (BatchNorm's batch counters, unused with the default
momentum) are not part of the sum and keep the global model's values.

What the server sees per site: the two public keys, encrypted key shares it cannot read, the
masked vector (uniform modulo modulus_range on its own), the site's name, its number of
training examples and its training metrics (loss, local validation scores, timing, DP-SGD ε),
and whether it dropped out. It never sees a site's weights or update, nor its norm (the site
drops norm metrics from its reply), so server-side update hygiene and the rules that compare
individual updates (Krum family, trimmed mean, median) cannot run under SecAgg+;
`components.privacy.settings` refuses those combinations.

Server side (this module): `secure_round` (the SecAgg+ counterpart of the round driver's
training step), `uses_secure_aggregation` (whether a run's rounds go through it) and
`aggregate_error_bound` (how far the result may be from exact FedAvg).
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from components.errors import ConfigError, DataError
from components.federated.hygiene import Rejection
from components.federated.protocol import (
    CLIPPING_KEY,
    MAX_WEIGHT_KEY,
    NAMES_KEY,
    ROUND_KEY,
    SPEC_KEY,
    accepted_row,
    exchange,
    masked_names,
    site_of,
)
from components.privacy.settings import SecAggSettings

log = logging.getLogger(__name__)

STAGE_NAMES = {
    Stage.SETUP: "setup",
    Stage.SHARE_KEYS: "share keys",
    Stage.COLLECT_MASKED_VECTORS: "collect masked vectors",
    Stage.UNMASK: "unmask",
}


# --------------------------------------------------------------------------- settings


def secagg_settings(spec: Any) -> SecAggSettings | None:
    """The SecAgg+ settings of a `RunSpec`, or None when the run does not use secure
    aggregation."""
    privacy = spec.privacy
    return privacy.secagg if privacy.secure_aggregation else None


def uses_secure_aggregation(spec: Any) -> bool:
    """Whether the run's training rounds go through SecAgg+."""
    return secagg_settings(spec) is not None


def aggregate_error_bound(
    settings: SecAggSettings, num_examples: Sequence[int], update_max: float = 0.0
) -> float:
    """Bound on |SecAgg+ average update - exact example-weighted average update| per coordinate.

    Each site uploads q_i = round(n_i / max_weight * Q) (Q = quantization_range) and its update
    times q_i / Q, stochastically rounded on a grid of step 2 * clipping_range / Q (error < one
    step per site); the server divides the sum by sum(q_i) / Q. Hence

        error < 2 * clipping_range * m / sum(q_i)  +  sum_i |q_i / sum(q) - n_i / sum(n)| * U

    for m sites and updates bounded by U = `update_max` (largest absolute coordinate), provided
    no coordinate was clipped (|update| * n_i / max_weight <= clipping_range).
    """
    q = [round(n / settings.max_weight * settings.quantization_range) for n in num_examples]
    total_q, total_n = sum(q), sum(num_examples)
    if total_q <= 0 or total_n <= 0:
        raise DataError("no example weight: every site reported zero training examples")
    rounding = 2 * settings.clipping_range * len(q) / total_q
    weights = sum(abs(qi / total_q - n / total_n) for qi, n in zip(q, num_examples, strict=True))
    return float(rounding + weights * update_max)


def build_workflow(settings: SecAggSettings, default_timeout: float):
    """A `SecAggPlusWorkflow` for `settings` (`ConfigError` for parameters Flower refuses)."""
    from flwr.server.workflow import SecAggPlusWorkflow

    try:
        return SecAggPlusWorkflow(
            num_shares=settings.num_shares,
            reconstruction_threshold=settings.reconstruction_threshold,
            max_weight=float(settings.max_weight),
            clipping_range=float(settings.clipping_range),
            quantization_range=int(settings.quantization_range),
            modulus_range=int(settings.modulus_range),
            timeout=settings.timeout if settings.timeout is not None else default_timeout,
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"privacy.secagg: {exc}") from exc


# --------------------------------------------------------------------------- the round


class _WatchedGrid:
    """The round's grid as the SecAgg+ workflow uses it (`send_and_receive`), noting per node
    the stage it dropped out at and why, and its reply to the collect-masked-vectors stage."""

    def __init__(self, grid: Any, timeout: float) -> None:
        self.grid = grid
        self.timeout = timeout
        self.dropped: dict[int, tuple[str, str]] = {}
        self.uploads: dict[int, Message] = {}
        self.last_stage = ""

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        messages = list(messages)
        if not messages:
            return []
        stage = str(messages[0].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])
        self.last_stage = STAGE_NAMES.get(stage, stage)
        wait = timeout if timeout is not None else self.timeout
        pairs, silent = exchange(self.grid, messages, wait)
        for node in silent:
            self.dropped.setdefault(node, (self.last_stage, f"no reply within {wait:.0f}s"))
        for node, reply in pairs:
            if reply.has_error():
                self.dropped.setdefault(node, (self.last_stage, reply.error.reason))
            elif stage == Stage.COLLECT_MASKED_VECTORS:
                self.uploads[node] = reply
        return [reply for _, reply in pairs]


def _legacy_strategy(proxies: list[Any], config: dict[str, Any]):
    """A legacy `flwr.server.strategy.Strategy` that instructs `proxies` with `config` and keeps
    what SecAgg+ hands to `aggregate_fit`: the unmasked average of the masked vectors."""
    from flwr.common import FitIns, parameters_to_ndarrays
    from flwr.server.strategy import Strategy

    class SecureSum(Strategy):
        def __init__(self) -> None:
            self.contributors: list[int] | None = None
            self.average: list[np.ndarray] | None = None

        def initialize_parameters(self, client_manager):
            return None

        def configure_fit(self, server_round, parameters, client_manager):
            return [(proxy, FitIns(parameters, dict(config))) for proxy in proxies]

        def aggregate_fit(self, server_round, results, failures):
            # SecAggPlusWorkflow sets every result's parameters to the unmasked average
            self.contributors = [proxy.node_id for proxy, _ in results]
            if not results:
                return None, {}
            parameters = results[0][1].parameters
            self.average = parameters_to_ndarrays(parameters)
            return parameters, {}

        def configure_evaluate(self, server_round, parameters, client_manager):
            return []

        def aggregate_evaluate(self, server_round, results, failures):
            return None, {}

        def evaluate(self, server_round, parameters):
            return None

    return SecureSum()


def sample_nodes(grid: Any, spec: Any, server_round: int) -> list[int]:
    """The round's sites: `fraction_train` of the connected nodes (at least `min_fit_sites`),
    drawn with a seed fixed by the run seed and the round."""
    settings = spec.settings
    nodes = sorted(int(n) for n in grid.get_node_ids())
    wanted = max(settings.min_fit_sites, math.ceil(settings.fraction_train * len(nodes)))
    if wanted >= len(nodes):
        return nodes
    return sorted(random.Random(settings.seed * 100_003 + server_round).sample(nodes, wanted))


def secure_round(
    grid: Any,
    spec: Any,
    server_round: int,
    arrays: dict[str, np.ndarray],
    node_sites: dict[int, str],
    *,
    settings: SecAggSettings | None = None,
) -> tuple[dict[str, np.ndarray] | None, dict[str, dict], list[Rejection], list[str]]:
    """One SecAgg+ training step: the contract of `server_app._round_train` (new arrays or None,
    per-site rows, rejections, notes). `settings` defaults to the spec's `privacy.secagg`.

    The new arrays are the global ones plus the example-weighted average update of the sites
    that uploaded a masked vector, computed from the unmasked sum only. Per-site rows carry the
    status (accepted / failed / aborted), num_examples and the training metrics; no update norm.
    """
    from flwr.app import RecordDict
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD

    from components.federated.task import match_dtypes, to_record

    settings = settings or secagg_settings(spec)
    if settings is None:
        raise ConfigError("secure_round needs privacy.mode=secagg or secagg_dp")
    fed = spec.settings
    workflow = build_workflow(settings, fed.round_timeout)
    names = list(arrays)
    config = {
        SPEC_KEY: spec.client_spec.to_json(),
        ROUND_KEY: int(server_round),
        NAMES_KEY: json.dumps(names),
        MAX_WEIGHT_KEY: float(settings.max_weight),
        CLIPPING_KEY: float(settings.clipping_range),
    }
    nodes = sample_nodes(grid, spec, server_round)
    watched = _WatchedGrid(grid, fed.round_timeout)
    run_id = int(getattr(getattr(grid, "run", None), "run_id", 0) or 0)
    proxies = [GridClientProxy(node, watched, run_id) for node in nodes]  # type: ignore[arg-type]
    strategy = _legacy_strategy(proxies, config)
    base = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
    context = LegacyContext(base, strategy=strategy)
    for proxy in proxies:
        context.client_manager.register(proxy)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {"current_round": int(server_round)}
    )
    context.state.array_records[MAIN_PARAMS_RECORD] = to_record(arrays)

    notes: list[str] = []
    try:
        workflow(watched, context)  # type: ignore[arg-type]
    except Exception as exc:  # a protocol failure must not end the run
        log.exception("round %d: SecAgg+ failed", server_round)
        notes.append(f"SecAgg+ failed ({type(exc).__name__}: {exc}); model unchanged")

    sites: dict[str, dict] = {}
    rejections: list[Rejection] = []
    contributors = set(strategy.contributors or [])
    halted = strategy.contributors is None
    for node in nodes:
        upload = watched.uploads.get(node)
        site = site_of(node, upload, node_sites)
        if node in contributors and upload is not None:
            sites[site] = accepted_row(dict(upload.content.metric_records.get("metrics", {})))
            if node in watched.dropped:
                stage, why = watched.dropped[node]
                notes.append(
                    f"site {site} left during {stage} ({why}) after uploading; its masked "
                    "update was unmasked with its neighbours' shares"
                )
        elif node in watched.dropped:
            stage, why = watched.dropped[node]
            reason = f"dropped out of SecAgg+ at stage '{stage}': {why}"
            rejections.append(Rejection(server_round, site, reason, node))
            sites[site] = {"status": "failed"}
            log.warning("round %d: site %s %s", server_round, site, reason)
        else:
            sites[site] = {"status": "aborted"}
    failed = sum(1 for r in sites.values() if r["status"] == "failed")
    if failed:
        notes.append(f"{failed} site(s) dropped out of the SecAgg+ round")
    if halted or strategy.average is None:
        if not any("SecAgg+ failed" in n for n in notes):
            notes.append(
                f"SecAgg+ stopped at stage '{watched.last_stage}': too few sites left to "
                f"reconstruct the masks (reconstruction_threshold="
                f"{settings.reconstruction_threshold}); the global model is unchanged"
            )
        for row in sites.values():
            if row["status"] == "accepted":
                row["status"] = "aborted"
        return None, sites, rejections, notes
    average, masked = strategy.average, masked_names(arrays)
    shapes_ok = len(average) == len(masked) and all(
        np.shape(a) == np.shape(arrays[k]) for a, k in zip(average, masked, strict=False)
    )
    if not shapes_ok:
        notes.append("the unmasked aggregate does not fit the global model; model unchanged")
        return None, sites, rejections, notes
    new = dict(arrays)  # integer buffers are not aggregated: they keep the global values
    for key, mean_update in zip(masked, average, strict=True):
        new[key] = np.asarray(arrays[key], dtype=np.float64) + np.asarray(mean_update, np.float64)
    if not all(np.all(np.isfinite(v)) for v in new.values()):
        notes.append("the aggregate is not finite; model unchanged")
        return None, sites, rejections, notes
    return match_dtypes(new, arrays), sites, rejections, notes


__all__ = [
    "aggregate_error_bound",
    "build_workflow",
    "sample_nodes",
    "secagg_settings",
    "secure_round",
    "uses_secure_aggregation",
]
