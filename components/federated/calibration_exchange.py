"""The coordinator's side of federated calibration: two exchanges with the sites after the
last round (`site_calibration` has the arithmetic and what each site sends).

`calibrate_federation` returns the bundle's calibration block (or why there is none: too few
sites answered, a single class among all validation cases, ...). A site that fails or stays
silent is left out and named; calibration needs at least `min_fit_sites` answers to each
exchange, or the model is served uncalibrated with the reason in the result.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from components.errors import DataError
from components.federated import site_calibration as sc
from components.federated.protocol import (
    CALIBRATE_KEY,
    CALIBRATE_SPEC_KEY,
    CALIBRATION_KEY,
    ROUND_KEY,
    SPEC_KEY,
    T_KEY,
    exchange,
    site_of,
)
from components.federated.reasons import site_error
from components.federated.runspec import RunSpec

log = logging.getLogger(__name__)


def evaluate_messages(
    grid: Grid, spec: RunSpec, arrays: dict[str, np.ndarray], extra: dict[str, Any]
) -> list[Message]:
    """One evaluate message per connected site: the final weights, the client spec and
    `extra` config keys (what to compute)."""
    from flwr.app import MessageType

    from components.federated.task import to_record

    config = ConfigRecord(
        {SPEC_KEY: spec.client_spec.to_json(), ROUND_KEY: spec.settings.rounds, **extra}
    )
    return [
        Message(
            content=RecordDict({"arrays": to_record(arrays), "config": config}),
            dst_node_id=node,
            message_type=MessageType.EVALUATE,
        )
        for node in grid.get_node_ids()
    ]


def _ask(
    grid: Grid,
    spec: RunSpec,
    arrays: dict[str, np.ndarray],
    node_sites: dict[int, str],
    extra: dict[str, Any],
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """One evaluate exchange carrying `extra` in its config; the sites' sums and who failed."""
    messages = evaluate_messages(grid, spec, arrays, extra)
    pairs, silent = exchange(grid, messages, spec.settings.round_timeout)
    failed = {site_of(n, None, node_sites): "no reply within round_timeout" for n in silent}
    sums: dict[str, dict[str, Any]] = {}
    for node, reply in pairs:
        site = site_of(node, reply, node_sites)
        if reply.has_error():
            failed[site] = site_error(reply.error.reason).text
        elif CALIBRATION_KEY not in reply.content.config_records:
            failed[site] = "the site's reply carries no calibration sums"
        else:
            sums[site] = json.loads(str(reply.content.config_records[CALIBRATION_KEY]["sums"]))
    return sums, failed


def calibrate_federation(
    grid: Grid, spec: RunSpec, arrays: dict[str, np.ndarray], node_sites: dict[int, str]
) -> dict[str, Any]:
    """Fit T and q̂ of the final model from the sites' validation sums.

    Returns {"fitted": True, "calibration": block, "sites": [...], "failed": {...}} or
    {"fitted": False, "reason": ..., "failed": {...}}."""
    cal_spec, minimum = spec.calibration, spec.settings.min_fit_sites or 2
    failed: dict[str, str] = {}
    try:
        first, failed = _ask(grid, spec, arrays, node_sites, {CALIBRATE_KEY: "temperature"})
        usable = {s: v for s, v in first.items() if int(v["n"]) > 0}
        if len(usable) < minimum:
            raise DataError(
                f"{len(usable)} site(s) returned validation sums; calibration needs "
                f"min_fit_sites={minimum}"
            )
        t = sc.pooled_temperature(list(usable.values()), cal_spec.method)
        second, failed_2 = _ask(
            grid,
            spec,
            arrays,
            node_sites,
            {
                CALIBRATE_KEY: "conformal",
                T_KEY: t,
                CALIBRATE_SPEC_KEY: json.dumps(cal_spec.to_dict()),
            },
        )
        failed |= failed_2
        histograms = {s: v for s, v in second.items() if s in usable and int(v["n"]) > 0}
        if len(histograms) < minimum:
            raise DataError(
                f"{len(histograms)} site(s) returned conformal histograms; calibration needs "
                f"min_fit_sites={minimum}"
            )
        qhat = sc.pooled_qhat([v["aps_histogram"] for v in histograms.values()], cal_spec.coverage)
    except DataError as exc:
        log.warning("the federated model is left uncalibrated: %s", exc)
        return {"fitted": False, "reason": str(exc), "failed": failed}
    point, notes = _operating_point(cal_spec, list(histograms.values()))
    n = sum(int(v["n"]) for v in histograms.values())
    sites = sorted(histograms)
    block = sc.build_calibration(
        cal_spec, t, qhat, spec.model.class_names, n, sites, point=point, notes=notes
    )
    log.info(
        "federated calibration on %d site(s), %d cases: T=%.3f, q̂=%.3f", len(sites), n, t, qhat
    )
    return {"fitted": True, "calibration": block.to_dict(), "sites": sites, "failed": failed}


def _operating_point(
    cal_spec: sc.CalibrationSpec, sums: list[dict[str, Any]]
) -> tuple[Any, list[str]]:
    """The pooled operating point, or None and why (no dangerous class, no positives, ...)."""
    if not cal_spec.dangerous:
        return None, ["no operating point: the dataset marks no class as dangerous"]
    danger = [v["danger"] for v in sums if v.get("danger")]
    try:
        return sc.pooled_operating_point(danger, cal_spec.target_sensitivity), []
    except DataError as exc:
        return None, [f"no operating point: {exc}"]


__all__ = ["calibrate_federation", "evaluate_messages"]
