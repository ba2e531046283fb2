"""`FederatedResult`: what a federated run returns to the pipeline (model + bookkeeping)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from components.errors import ModelError


@dataclass
class FederatedResult:
    """The final global model (eval mode) and what happened on the way.

    history:       one row per round: `round`/`step`, `server` (test metrics of the global
                   model), `sites` ({site: train/eval metrics, status}), `sites_eval`
                   (aggregated site validation metrics), counts, notes, `round_seconds`
    per_site:      {site: [one row per round it took part in, with `round`]}
    rejected:      updates not aggregated: [{round, site, reason, node_id}]
    test_metrics:  full evaluation of the final model on the test split (confusion matrix...)
    """

    model: Any
    history: list[dict[str, Any]]
    per_site: dict[str, list[dict[str, Any]]]
    round_seconds: list[float]
    rejected: list[dict[str, Any]]
    test_metrics: dict[str, Any]
    checkpoint_dir: Path
    out_dir: Path
    site_report: dict[str, Any]
    strategy: str
    resumed_from: int = 0
    wall_seconds: float = 0.0
    site_dirs: dict[str, Path] = field(default_factory=dict)
    architecture: dict[str, Any] = field(default_factory=dict)  # `build_model` kwargs
    privacy: dict[str, Any] | None = None  # ServerPrivacy.report(): ε, δ, per site, ...
    status: str = "completed"  # or "stopped: <why>" (e.g. a privacy budget)
    # calibration_exchange.calibrate_federation: {"fitted", "calibration" block | "reason", ...}
    calibration: dict[str, Any] | None = None

    @property
    def mean_round_seconds(self) -> float:
        return float(np.mean(self.round_seconds)) if self.round_seconds else 0.0

    def mlflow_history(self) -> list[dict[str, Any]]:
        """Rows for `TrainingRecord.history` (`round_metrics` of every round)."""
        return [round_metrics(row) for row in self.history]

    def summary(self) -> dict[str, Any]:
        """JSON-safe summary (no model)."""
        final = self.history[-1]["server"] if self.history else {}
        return {
            "strategy": self.strategy,
            "status": self.status,
            "rounds": len(self.history),
            "resumed_from": self.resumed_from,
            "final_server_metrics": final,
            "mean_round_seconds": self.mean_round_seconds,
            "wall_seconds": self.wall_seconds,
            "rejected_updates": len(self.rejected),
            "last_round_failures": {
                f["site"]: f"{f['category']}: {f['message']}"
                for f in (self.history[-1].get("failures", []) if self.history else [])
            },
            "sites": self.site_report.get("num_sites"),
            "out_dir": str(self.out_dir),
            "calibration": self.calibration,
        }


ROUND_METRICS = (
    "server",
    "sites",
    "sites_eval",
    "accepted",
    "rejected",
    "failed",
    "round_seconds",
    "privacy",
)


def round_metrics(row: dict[str, Any]) -> dict[str, Any]:
    """A round's row (history or ledger) as MLflow metrics: `step` = round; nested keys
    flatten to `server.macro_f1`, `sites.<site>.train_loss`, `sites_eval.val_macro_f1`,
    `privacy.epsilon`, `privacy.site_epsilon.<site>`, ... (strings are dropped)."""
    return {"step": int(row["round"])} | {k: row[k] for k in ROUND_METRICS if k in row}


def per_site_rows(history: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for row in history:
        for site, values in row.get("sites", {}).items():
            out.setdefault(site, []).append({"round": row["round"], **values})
    return out


def load_result(layout) -> FederatedResult:
    """Read the result a ServerApp wrote under `layout.out_dir` and rebuild the final model."""
    from components.federated.server_app import FINAL_WEIGHTS, RESULT_FILE
    from components.federated.task import load_arrays

    out = Path(layout.out_dir)
    try:
        data = json.loads((out / RESULT_FILE).read_text())
        with np.load(out / FINAL_WEIGHTS, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError as exc:
        raise ModelError(_no_result_message(out, Path(exc.filename).name)) from exc
    model = load_arrays(layout.spec.model.build(), arrays).eval()
    history = data["history"]
    return FederatedResult(
        model=model,
        history=history,
        per_site=per_site_rows(history),
        round_seconds=[float(r["round_seconds"]) for r in history],
        rejected=data["rejected"],
        test_metrics=data["test_metrics"],
        checkpoint_dir=Path(data["checkpoint_dir"]),
        out_dir=out,
        site_report=layout.report,
        strategy=data["strategy"],
        resumed_from=int(data.get("resumed_from", 0)),
        wall_seconds=float(data.get("wall_seconds", 0.0)),
        site_dirs=dict(layout.sites),
        architecture=dict(layout.spec.model.architecture),
        privacy=data.get("privacy"),
        status=str(data.get("status", "completed")),
        calibration=data.get("calibration"),
    )


def _no_result_message(out: Path, missing: str) -> str:
    """Why there is no result: the failure `run_state.json` recorded, else the ServerApp log."""
    from components.federated.status import read_status

    status = read_status(out)
    if status.reason:
        why = f"{status.reason['category']}: {status.reason['message']}"
        return (
            f"the federated run {status.state} after {status.rounds_done} round(s): {why} "
            f"(`oncoflow fl status` shows each site's last state)"
        )
    return f"the federated run left no result in {out} (missing {missing}); see the ServerApp log"


__all__ = ["ROUND_METRICS", "FederatedResult", "load_result", "per_site_rows", "round_metrics"]
