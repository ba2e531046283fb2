"""The Flower ClientApp (Message API): one site trains and evaluates on its own data only.

Deployment: `flower-supernode --node-config 'data-dir="/path/to/<site>"'` points the site at
its partition (written by `write_site`). Simulation: `build_client_app(site_dirs)` maps
Flower's `partition-id` to a site directory.

train:    load the global weights, train `local_epochs` with `fit_local` (FedProx term when
          configured), evaluate the local model on the site's validation data, keep the site's
          best model on the site, reply with the weights and training metrics.
evaluate: score the global weights on the site's validation data, keep them as the site's best
          model if they beat it, reply with the metrics.
query:    roll call ("site"): reply with the site's name and data sizes (so the server can name
          a site that fails before it ever sent an update); preflight ("preflight"): reply with
          the site's approval of the spec and its released statistics (stats.json) only.
final evaluate (an evaluate message flagged `FINAL_KEY`): score the final global model on the
          site's held-out test split and reply with counts and sums only (`site_metrics`).

A site prepared by `oncoflow site prepare` requires approval: every train/evaluate message is
checked against `approval.json` first (`approval.require`); a refusal is an error reply with
code `REFUSED_CODE` and a sanitised reason, and nothing is trained or evaluated.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from components.errors import DataError
from components.federated.approval import SiteRefused, require, sanitise
from components.federated.protocol import (
    CALIBRATE_KEY,
    CALIBRATE_SPEC_KEY,
    CALIBRATION_KEY,
    FINAL_KEY,
    PREFLIGHT_RECORD,
    QUERY_KEY,
    REFUSED_CODE,
    REFUSED_PREFIX,
    ROUND_KEY,
    SITE_RECORD,
    SPEC_KEY,
    T_KEY,
)
from components.federated.reasons import outgoing_error
from components.federated.runspec import ClientSpec
from components.federated.secagg_client import is_secure_train, secure_mod, secure_train
from components.privacy.federated import UNIT_WEIGHT, bound_update

log = logging.getLogger(__name__)

TRAIN_KEYS = (
    "train-loss",
    "val-examples",
    "local-val-macro-f1",
    "local-val-accuracy",
    "fit-seconds",
)
EVAL_KEYS = (
    "val-loss",
    "val-accuracy",
    "val-balanced-accuracy",
    "val-macro-f1",
    "best-val-macro-f1",
)


def site_dir_for(context: Context, site_dirs: list[str] | None = None) -> Path:
    """The site's data directory: node config `data-dir`, else `site_dirs[partition-id]`."""
    config = context.node_config
    if "data-dir" in config:
        return Path(str(config["data-dir"]))
    if site_dirs is not None and "partition-id" in config:
        index = int(config["partition-id"])
        if 0 <= index < len(site_dirs):
            return Path(site_dirs[index])
    raise DataError(
        "this SuperNode has no site data configured; start it with "
        "--node-config 'data-dir=\"<workspace>/federation/sites/<site>\"'"
    )


def _spec(msg: Message) -> tuple[ClientSpec, int]:
    config = msg.content["config"]
    return ClientSpec.from_json(str(config[SPEC_KEY])), int(config[ROUND_KEY])


def _approval_required(site_dir: Path) -> bool:
    import json

    from components.federated.task import SITE_META, check_site_dir

    meta = json.loads((check_site_dir(site_dir) / SITE_META).read_text())
    return bool(meta.get("approval_required", False))


def check_approval(msg: Message, site_dir: Path) -> None:
    """`SiteRefused` unless this site has approved the message's spec and code."""
    spec_json = str(msg.content["config"][SPEC_KEY])
    require(site_dir, spec_json, required=_approval_required(site_dir))


def _refusal(msg: Message, reason: str) -> Message:
    log.warning("refused a %s message: %s", msg.metadata.message_type, reason)
    return Message(Error(code=REFUSED_CODE, reason=REFUSED_PREFIX + sanitise(reason)), reply_to=msg)


def _site_error(msg: Message, exc: Exception) -> Message:
    """The error reply for an exception at the site: its details stay in this site's log; the
    coordinator gets the class and, for oncoflow's own errors, a path-free message."""
    log.exception("the %s handler failed", msg.metadata.message_type)
    reason = outgoing_error(exc)
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


def _reply(
    msg: Message,
    arrays: ArrayRecord | None,
    metrics: dict[str, Any],
    site: str,
    sums: dict[str, Any] | None = None,
) -> Message:
    """A reply: metrics, the site's name, and (calibration) JSON sums under CALIBRATION_KEY."""
    import json

    content = RecordDict(
        {"metrics": MetricRecord(metrics), SITE_RECORD: ConfigRecord({"name": site})}
    )
    if arrays is not None:
        content["arrays"] = arrays
    if sums is not None:
        content[CALIBRATION_KEY] = ConfigRecord({"sums": json.dumps(sums)})
    return Message(content=content, reply_to=msg)


def _validation(model, site, spec) -> dict[str, Any] | None:
    from components.federated.task import evaluate_model

    if not len(site.y_val):
        return None
    return evaluate_model(model, spec.model.inputs(site.val), site.y_val, spec.model)


def handle_train(msg: Message, site_dir: Path) -> Message:
    from components.federated.attacks import UPDATE_ATTACKS, poison_labels, poison_update
    from components.federated.task import (
        from_record,
        keep_best,
        load_arrays,
        load_site,
        local_seed,
        set_threads,
        state_arrays,
        to_record,
        train_local,
    )

    check_approval(msg, site_dir)
    spec, server_round = _spec(msg)
    site = load_site(site_dir)
    set_threads(spec.training.threads)
    model = spec.model.build()
    received = from_record(msg.content["arrays"])
    load_arrays(model, received)
    attack = spec.attacks.get(site.name)
    y = site.y_train
    if attack and attack["behaviour"] == "label_flip":
        y = poison_labels(y, spec.model.num_classes)
    seed = local_seed(spec.seed, server_round, site.name)
    privacy = spec.privacy
    dp = _site_dp(privacy, spec, site, server_round, model)
    started = time.perf_counter()
    fit = train_local(
        model,
        spec.model.inputs(site.train),
        y,
        spec.model,
        spec.training,
        seed,
        dp and dp.hooks(),
        label=f"{site.name} round {server_round}",
    )
    seconds = time.perf_counter() - started
    if dp is not None:
        dp.commit(server_round)  # the ledger is on disk before the update leaves the site
    val = _validation(model, site, spec)
    if val is not None:
        keep_best(
            site.directory,
            model,
            spec.model,
            val["macro_f1"],
            server_round=server_round,
            source="local",
            site=site.name,
            metrics={k: val[k] for k in ("accuracy", "macro_f1", "loss")},
        )
    weights = state_arrays(model)
    if attack and attack["behaviour"] in UPDATE_ATTACKS:
        weights = poison_update(weights, received, attack, np.random.default_rng(seed))
    extra: dict[str, Any] = dp.metrics() if dp is not None else {}
    if privacy.update_norm_bound is not None:
        weights, norm = bound_update(weights, received, privacy.update_norm_bound)
        extra["update-norm-before-bound"] = norm
    metrics = {
        "num-examples": int(fit["num_examples"]),
        "train-loss": float(fit["train_loss"]),
        "val-examples": len(site.y_val),
        "local-val-macro-f1": float(val["macro_f1"]) if val else 0.0,
        "local-val-accuracy": float(val["accuracy"]) if val else 0.0,
        "fit-seconds": float(seconds),
        UNIT_WEIGHT: 1,
        **extra,
    }
    return _reply(msg, to_record(weights), metrics, site.name)


def _site_dp(privacy, spec: ClientSpec, site, server_round: int, model):
    """The site's DP-SGD state for this round (None without DP-SGD): the model is made
    Opacus-compatible and the round is checked against the site's budget before training."""
    if not privacy.dp_sgd:
        return None
    from components.privacy.dp import make_private_compatible
    from components.privacy.federated import SiteDP

    make_private_compatible(model)
    dp = SiteDP.open(
        privacy,
        site.directory,
        spec.run_key,
        rounds=spec.rounds,
        local_epochs=spec.training.epochs,
        num_examples=len(site.y_train),
        batch_size=spec.training.batch_size,
    )
    dp.check(server_round)
    return dp


def handle_evaluate(msg: Message, site_dir: Path) -> Message:
    from components.federated.task import best_score, from_record, keep_best, load_arrays, load_site

    check_approval(msg, site_dir)
    if bool(msg.content["config"].get(FINAL_KEY, False)):
        return handle_final_evaluate(msg, site_dir)
    if CALIBRATE_KEY in msg.content["config"]:
        return handle_calibrate(msg, site_dir)
    spec, server_round = _spec(msg)
    site = load_site(site_dir)
    model = spec.model.build()
    load_arrays(model, from_record(msg.content["arrays"]))
    val = _validation(model, site, spec)
    if val is None:
        metrics = dict.fromkeys(EVAL_KEYS, 0.0)
        return _reply(msg, None, {"num-examples": 0, UNIT_WEIGHT: 0, **metrics}, site.name)
    keep_best(
        site.directory,
        model,
        spec.model,
        val["macro_f1"],
        server_round=server_round,
        source="global",
        site=site.name,
        metrics={k: val[k] for k in ("accuracy", "macro_f1", "loss")},
    )
    metrics = {
        "num-examples": len(site.y_val),
        "val-loss": float(val["loss"]),
        "val-accuracy": float(val["accuracy"]),
        "val-balanced-accuracy": float(val["balanced_accuracy"]),
        "val-macro-f1": float(val["macro_f1"]),
        "best-val-macro-f1": float(best_score(site.directory) or 0.0),
        UNIT_WEIGHT: 1,  # central DP's rule weights every site alike, evaluation included
    }
    return _reply(msg, None, metrics, site.name)


def handle_calibrate(msg: Message, site_dir: Path) -> Message:
    """Sums over the site's validation split that calibrate the final global model
    (`site_calibration`): NLL on the temperature grid, or the APS-score histogram at the
    coordinator's T. No case, score or prediction leaves the site."""
    import json

    from components.evaluation.predict import predict_logits
    from components.federated import site_calibration as sc
    from components.federated.task import from_record, load_arrays, load_site

    spec, _ = _spec(msg)
    config = msg.content["config"]
    site = load_site(site_dir)
    model = load_arrays(spec.model.build(), from_record(msg.content["arrays"]))
    n = len(site.y_val)
    if n == 0:
        return _reply(msg, None, {"num-examples": 0}, site.name, {"n": 0})
    logits = predict_logits(model, spec.model.inputs(site.val), spec.model.prep())
    if str(config[CALIBRATE_KEY]) == "temperature":
        sums = sc.temperature_sums(logits, site.y_val, len(spec.model.class_names))
    else:
        from components.calibration.temperature import softmax

        probs = softmax(logits, float(config[T_KEY]))
        sums = {"n": n, "aps_histogram": sc.aps_histogram(probs, site.y_val)}
        dangerous = sc.CalibrationSpec.from_dict(json.loads(str(config[CALIBRATE_SPEC_KEY])))
        if dangerous.dangerous:
            classes = spec.model.class_names
            sums["danger"] = sc.danger_histograms(probs, site.y_val, classes, dangerous.dangerous)
    return _reply(msg, None, {"num-examples": n}, site.name, sums)


def handle_final_evaluate(msg: Message, site_dir: Path) -> Message:
    """Score the final global model on the site's held-out test split; reply with counts and
    sums only (confusion matrix, ECE bin sums, macro-AUROC, size). With a calibration block in
    the message, the scores are of the calibrated probabilities (as served) and the reply adds
    the calibration's sums (`site_calibration.evaluation_sums`)."""
    import json

    from components.calibration.record import Calibration
    from components.evaluation.predict import predict_logits
    from components.federated.site_calibration import evaluation_sums
    from components.federated.site_metrics import site_summary
    from components.federated.task import from_record, load_arrays, site_test_split

    spec, _ = _spec(msg)
    test = site_test_split(site_dir)
    y = test.y
    model = load_arrays(spec.model.build(), from_record(msg.content["arrays"]))
    logits = predict_logits(model, spec.model.inputs(test), spec.model.prep())
    block = msg.content["config"].get(CALIBRATION_KEY)
    cal = Calibration.from_dict(json.loads(str(block))) if block else None
    probs = cal.probabilities(logits) if cal else _softmax(logits)
    summary = site_summary(y, probs, spec.model.class_names)
    sums = evaluation_sums(logits, y, cal) if cal is not None and len(y) else None
    metrics = {
        "num-examples": int(summary["n"]),
        "confusion-matrix": [int(v) for row in summary["confusion_matrix"] for v in row],
        "ece-count": [int(v) for v in summary["ece_count"]],
        "ece-correct": [float(v) for v in summary["ece_correct"]],
        "ece-confidence": [float(v) for v in summary["ece_confidence"]],
        "macro-auroc": -1.0 if summary["macro_auroc"] is None else float(summary["macro_auroc"]),
    }
    return _reply(msg, None, metrics, _site_name(site_dir), sums)


def _softmax(logits: np.ndarray) -> np.ndarray:
    from components.calibration.temperature import softmax

    return softmax(logits, 1.0)


def _site_name(site_dir: Path) -> str:
    import json

    from components.federated.task import SITE_META, check_site_dir

    return str(json.loads((check_site_dir(site_dir) / SITE_META).read_text())["site"])


def handle_preflight(msg: Message, site_dir: Path) -> Message:
    """The site's answer to the coordinator's preflight: its approval of the spec (with the
    sanitised reason) and its released statistics (`stats.json`), nothing else."""
    import json

    from components.federated.approval import check
    from components.federated.site_stats import read_stats

    spec_json = str(msg.content["config"][SPEC_KEY])
    verdict = check(site_dir, spec_json, required=_approval_required(site_dir))
    stats = read_stats(site_dir)
    record = ConfigRecord(
        {
            "approved": verdict.approved,
            "reason": sanitise(verdict.reason),
            "spec-fingerprint": verdict.spec_fingerprint,
            "stats": json.dumps(stats) if stats is not None else "",
        }
    )
    reply = _reply(msg, None, {}, _site_name(site_dir))
    reply.content[PREFLIGHT_RECORD] = record
    return reply


def handle_query(msg: Message, site_dir: Path) -> Message:
    """Roll call (name the site and its data sizes; reads only `site.json`) or preflight."""
    import json

    from components.federated.task import SITE_META, check_site_dir

    config = msg.content.config_records.get("config")
    if config is not None and str(config.get(QUERY_KEY, "")) == "preflight":
        return handle_preflight(msg, site_dir)
    meta = json.loads((check_site_dir(site_dir) / SITE_META).read_text())
    counts = {"num-train": int(meta["num_train"]), "num-val": int(meta["num_val"])}
    return _reply(msg, None, counts, str(meta["site"]))


def build_client_app(site_dirs: list[str] | None = None) -> ClientApp:
    """A ClientApp whose site is `data-dir` from the node config, or `site_dirs[partition-id]`.

    `secure_mod` runs Flower's SecAgg+ protocol for SecAgg+ messages; its train step reaches
    `handle_train` through `secure_train` (see `components.federated.secagg_client`)."""
    client = ClientApp(mods=[secure_mod])

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        site_dir = site_dir_for(context, site_dirs)
        if is_secure_train(msg):
            return secure_train(msg, lambda plain: handle_train(plain, site_dir))
        try:
            return handle_train(msg, site_dir)
        except SiteRefused as exc:
            return _refusal(msg, str(exc))
        except Exception as exc:
            return _site_error(msg, exc)

    @client.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        try:
            return handle_evaluate(msg, site_dir_for(context, site_dirs))
        except SiteRefused as exc:
            return _refusal(msg, str(exc))
        except Exception as exc:
            return _site_error(msg, exc)

    @client.query()
    def query(msg: Message, context: Context) -> Message:
        try:
            return handle_query(msg, site_dir_for(context, site_dirs))
        except Exception as exc:
            return _site_error(msg, exc)

    return client


app = build_client_app()

__all__ = [
    "app",
    "build_client_app",
    "check_approval",
    "handle_evaluate",
    "handle_final_evaluate",
    "handle_preflight",
    "handle_query",
    "handle_train",
    "site_dir_for",
]
