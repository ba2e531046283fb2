"""The messages between the federated ServerApp and ClientApp: record names, keys and helpers
both sides use (imported by `server_app`, `client_app` and the two SecAgg+ halves; it imports
neither, so they never import each other).

A train or evaluate message carries "arrays" (the named global weights) and "config" (the
`ClientSpec` JSON under `SPEC_KEY`, the round under `ROUND_KEY`). Every reply carries "metrics"
and names its site in the `SITE_RECORD` ConfigRecord; a train reply adds "arrays".

SecAgg+'s collect-masked-vectors message uses Flower's legacy FitIns layout instead
(`FITINS_PARAMETERS`, `FITINS_CONFIG`); its config adds the tensor names (`NAMES_KEY`) and the
masking parameters the site checks its update against (`MAX_WEIGHT_KEY`, `CLIPPING_KEY`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from flwr.app import Message
    from flwr.serverapp import Grid

SPEC_KEY = "oncoflow-spec"  # "config" key carrying the ClientSpec JSON
SITE_RECORD = "site"  # ConfigRecord in every reply naming the site: {"name": <site>}
ROUND_KEY = "server-round"  # set by Flower's strategies (and by the SecAgg+ round)

QUERY_KEY = "query"  # a query message's "config" key: "site" (roll call) | "preflight"
PREFLIGHT_RECORD = "preflight"  # ConfigRecord of a preflight reply: approval + statistics
FINAL_KEY = "oncoflow-final"  # evaluate-message flag: score the site's held-out test split
# evaluate-message key asking for the sums that calibrate the final model on the site's
# validation split: "temperature" (NLL on the T grid) | "conformal" (APS histogram at `T_KEY`)
CALIBRATE_KEY = "oncoflow-calibrate"
T_KEY = "oncoflow-temperature"
CALIBRATE_SPEC_KEY = "oncoflow-calibration-spec"  # its CalibrationSpec (JSON): dangerous classes
CALIBRATION_KEY = "oncoflow-calibration"  # final-evaluate key: the fitted block (JSON) to measure
REFUSED_CODE = 4030  # error code of a site's refusal (its reason follows "refused by site: ")
REFUSED_PREFIX = "refused by site: "

FITINS_PARAMETERS = "fitins.parameters"  # legacy FitIns layout that SecAgg+ sends to a site
FITINS_CONFIG = "fitins.config"
NAMES_KEY = "oncoflow-array-names"  # fit-config key: JSON list of the tensor names, in order
MAX_WEIGHT_KEY = "oncoflow-secagg-max-weight"
CLIPPING_KEY = "oncoflow-secagg-clipping-range"


def site_of(node: int, msg: Message | None, node_sites: dict[int, str]) -> str:
    """The site behind `node`: named in the reply (and remembered in `node_sites`), else
    learnt earlier, else `node-<id>`."""
    if msg is not None and not msg.has_error() and SITE_RECORD in msg.content.config_records:
        name = str(msg.content.config_records[SITE_RECORD]["name"])
        node_sites[node] = name
        return name
    return node_sites.get(node, f"node-{node}")


def accepted_row(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The per-site history row of an accepted training reply (from its metrics only)."""
    return {
        "status": "accepted",
        "num_examples": int(metrics.get("num-examples", 0)),
        "train_loss": float(metrics.get("train-loss", float("nan"))),
        "local_val_macro_f1": float(metrics.get("local-val-macro-f1", 0.0)),
        "fit_seconds": float(metrics.get("fit-seconds", 0.0)),
    } | {k.replace("-", "_"): float(v) for k, v in metrics.items() if k.startswith("dp-")}


def exchange(
    grid: Grid, messages: list[Message], timeout: float
) -> tuple[list[tuple[int, Message]], list[int]]:
    """Send `messages`; return [(destination node, reply)] and the nodes that did not reply.

    Errors the SuperLink generates itself (e.g. "Node Unavailable") carry the SuperLink's node
    id as sender, so replies are matched to their destination by the message they answer.
    """
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    sent = {
        m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id
    }
    pairs = [(sent.get(r.metadata.reply_to_message_id, r.metadata.src_node_id), r) for r in replies]
    answered = {node for node, _ in pairs}
    silent = [m.metadata.dst_node_id for m in messages if m.metadata.dst_node_id not in answered]
    return pairs, silent


def refusal_of(msg: Message) -> str | None:
    """The reason of a site's refusal reply, or None for any other reply."""
    if msg.has_error() and int(msg.error.code) == REFUSED_CODE:
        return str(msg.error.reason).removeprefix(REFUSED_PREFIX)
    return None


def masked_names(arrays: Mapping[str, np.ndarray]) -> list[str]:
    """The tensors whose update goes into the SecAgg+ sum: the floating-point ones, in order."""
    return [k for k, v in arrays.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]


__all__ = [
    "CALIBRATE_KEY",
    "CALIBRATE_SPEC_KEY",
    "CALIBRATION_KEY",
    "CLIPPING_KEY",
    "FINAL_KEY",
    "FITINS_CONFIG",
    "FITINS_PARAMETERS",
    "MAX_WEIGHT_KEY",
    "NAMES_KEY",
    "PREFLIGHT_RECORD",
    "QUERY_KEY",
    "REFUSED_CODE",
    "REFUSED_PREFIX",
    "ROUND_KEY",
    "SITE_RECORD",
    "SPEC_KEY",
    "T_KEY",
    "accepted_row",
    "exchange",
    "masked_names",
    "refusal_of",
    "site_of",
]
