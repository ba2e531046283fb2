"""SecAgg+ on a site (the ClientApp's half of `privacy.mode` = secagg / secagg_dp).

The server's half, and the protocol's four stages, are in `secagg_server`. A site serves the
key-exchange stages with Flower's `secaggplus_mod`; at the collect-masked-vectors stage it
trains with the ClientApp's own train handler and masks its **update** (local weights minus the
round's global weights, L2 norm bounded to `privacy.update_norm_bound` by `handle_train`) over
the floating-point tensors (`protocol.masked_names`); `secaggplus_mod` scales it by
num_examples / max_weight, clips it per coordinate to ±clipping_range and quantises it before
masking. The reply keeps the site's name and its training metrics in the clear, less any
metric about the update itself (`PRIVATE_METRICS`).

`secure_mod` is the ClientApp mod (SecAgg+ messages go through `secaggplus_mod`, all others
pass); `secure_train` serves the SecAgg+ train message with the ClientApp's `handle_train`.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from components.errors import DataError
from components.federated.hygiene import structural_problem
from components.federated.protocol import (
    CLIPPING_KEY,
    FITINS_CONFIG,
    FITINS_PARAMETERS,
    MAX_WEIGHT_KEY,
    NAMES_KEY,
    SITE_RECORD,
    masked_names,
)

log = logging.getLogger(__name__)

PRIVATE_METRICS = ("update-norm",)  # metric-name prefixes that describe the update itself


def is_secagg_message(msg: Message) -> bool:
    """A message of the SecAgg+ protocol (it carries the protocol's config record)."""
    return (
        msg.metadata.message_type == "train"
        and msg.has_content()
        and RECORD_KEY_CONFIGS in msg.content.config_records
    )


def secure_mod(msg: Message, ctxt: Context, call_next: Callable[[Message, Context], Message]):
    """ClientApp mod: SecAgg+ messages go through Flower's `secaggplus_mod`; every other
    message (plain train, evaluate, query) passes unchanged."""
    if is_secagg_message(msg):
        from flwr.client.mod import secaggplus_mod

        # secaggplus_mod pops keys from the protocol's record: hand it its own copy, so a
        # transport that does not serialise (the inline engine) cannot leak the change into
        # the message the workflow sends to the next site
        content = RecordDict(dict(msg.content))
        content[RECORD_KEY_CONFIGS] = ConfigRecord(dict(msg.content[RECORD_KEY_CONFIGS]))
        own = Message(content=content, metadata=copy.copy(msg.metadata))
        return secaggplus_mod(own, ctxt, call_next)
    return call_next(msg, ctxt)


def is_secure_train(msg: Message) -> bool:
    """A train message in the legacy FitIns layout (SecAgg+'s collect-masked-vectors stage)."""
    return msg.has_content() and FITINS_PARAMETERS in msg.content.array_records


def secure_train(msg: Message, train: Callable[[Message], Message]) -> Message:
    """Serve a SecAgg+ train message with the ClientApp's own train handler.

    `train` (e.g. `lambda m: handle_train(m, site_dir)`) gets the message in the ClientApp's
    layout ("arrays" with the named global weights, "config" with the ClientSpec and the round)
    and replies with "arrays", "metrics" and "site". The reply is turned into the FitRes layout
    `secaggplus_mod` masks: the update (local - global weights, float64, floating-point tensors
    in the global order, `masked_names`) and the site's number of examples. "metrics" (less
    any metric about the update itself) and "site" travel on in the clear; `secaggplus_mod`
    empties every array record of the reply before it leaves the site.
    """
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    from components.federated.task import from_record, to_record

    params = msg.content.array_records[FITINS_PARAMETERS]
    config = msg.content.config_records[FITINS_CONFIG]
    names = [str(n) for n in json.loads(str(config[NAMES_KEY]))]
    if len(params) != len(names):
        raise DataError(
            f"the SecAgg+ train message holds {len(params)} tensors for {len(names)} names"
        )
    received = {name: params[str(i)].numpy() for i, name in enumerate(names)}
    ours = {k: v for k, v in config.items() if k not in (NAMES_KEY, MAX_WEIGHT_KEY, CLIPPING_KEY)}
    view = Message(
        content=RecordDict({"arrays": to_record(received), "config": ConfigRecord(ours)}),
        metadata=copy.copy(msg.metadata),
    )
    reply = train(view)
    if reply.has_error():
        raise DataError(f"local training failed: {reply.error.reason}")
    weights = from_record(reply.content.array_records["arrays"])
    problem = structural_problem(weights, received)
    if problem:
        raise DataError(f"refusing to mask a malformed update: {problem}")
    metrics = reply.content.metric_records["metrics"]
    num_examples = int(metrics["num-examples"])
    max_weight = float(config[MAX_WEIGHT_KEY])
    if num_examples > max_weight:
        raise DataError(
            f"this site trained on {num_examples} examples, more than privacy.secagg.max_weight="
            f"{max_weight:g}; raise max_weight to at least the largest site's example count"
        )
    update = [
        np.asarray(weights[k], dtype=np.float64) - np.asarray(received[k], dtype=np.float64)
        for k in masked_names(received)
    ]
    _warn_if_clipped(update, num_examples / max_weight, float(config[CLIPPING_KEY]))
    fitres = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(update), num_examples, {})
    content = compat.fitres_to_recorddict(fitres, keep_input=False)
    public = {k: v for k, v in metrics.items() if not k.startswith(PRIVATE_METRICS)}
    content["metrics"] = MetricRecord(public)
    if SITE_RECORD in reply.content.config_records:
        content[SITE_RECORD] = reply.content.config_records[SITE_RECORD]
    return Message(content=content, reply_to=msg)


def _warn_if_clipped(update: list[np.ndarray], ratio: float, clipping_range: float) -> None:
    largest = max((float(np.max(np.abs(u))) for u in update if u.size), default=0.0)
    if not np.isfinite(largest):
        raise DataError("refusing to mask a non-finite update (NaN/Inf)")
    if largest * ratio > clipping_range:
        log.warning(
            "SecAgg+ will clip this update (largest coordinate %.3g x weight %.3g > clipping_range"
            " %g): the aggregate is biased; bound the update norm (privacy.update_norm_bound)",
            largest,
            ratio,
            clipping_range,
        )


__all__ = ["is_secagg_message", "is_secure_train", "secure_mod", "secure_train"]
