"""Differential privacy in a federation, with one ledger per data holder.

- `SiteDP` (on each site): DP-SGD inside the site's local training. σ is calibrated once, for
  the site's own data, over the **whole** planned federation (rounds × local epochs); the
  site's ledger lives in the site's own directory, so a restarted SuperNode or a resumed run
  continues it. Before training a round the site checks that the round fits its budget and
  refuses otherwise (`PrivacyBudgetExceeded`); it reports ε spent and ε after one more round.
- `ServerPrivacy` (on the server): central DP (Flower's server-side DP wrappers, fixed or
  adaptive clipping, site-level (ε, δ) accounted over rounds with Opacus' accountant), the
  per-site ε table of DP-SGD runs, the decision to stop before a round that would exceed a
  budget, and the privacy report that goes to MLflow, the bundle and the model card.

Accounting for central DP uses sampling rate 1 (no amplification by site sampling): the sites
of a round are not Poisson-sampled, so claiming amplification would overstate the guarantee.
The aggregate is an unweighted mean of clipped updates (sensitivity C/m for m updates); when
fewer than the planned n sites contribute, the effective noise multiplier σ·m/n is recorded.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.errors import ConfigError
from components.privacy.dp import (
    DPSGD,
    PrivacyBudgetExceeded,
    PrivacyLedger,
    calibrate_noise,
    plan_noise,
    steps_per_epoch,
)
from components.privacy.settings import PrivacySettings

log = logging.getLogger(__name__)

SITE_LEDGER = "privacy_ledger.json"
UNIT_WEIGHT = "unit-weight"  # metric every site reports; central DP averages updates uniformly


# --------------------------------------------------------------------------- site side


@dataclass
class SiteDP:
    """One site's DP-SGD state for one federated run (see the module docstring)."""

    settings: PrivacySettings
    path: Path
    run_key: str
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    ledger: PrivacyLedger
    rounds: list[int]

    @classmethod
    def open(
        cls,
        settings: PrivacySettings,
        site_dir: str | Path,
        run_key: str,
        *,
        rounds: int,
        local_epochs: int,
        num_examples: int,
        batch_size: int,
    ) -> SiteDP:
        """The site's ledger for `run_key` (a new one, with σ planned, if there is none)."""
        path = Path(site_dir) / SITE_LEDGER
        steps_round = steps_per_epoch(num_examples, batch_size) * int(local_epochs)
        stored = json.loads(path.read_text()) if path.is_file() else {}
        if stored.get("run_key") == run_key:
            return cls(
                settings,
                path,
                run_key,
                float(stored["noise_multiplier"]),
                float(stored["sample_rate"]),
                steps_round,
                PrivacyLedger.from_dict(stored["ledger"]),
                [int(r) for r in stored.get("rounds", [])],
            )
        sigma, q, _ = plan_noise(
            settings,
            num_examples=num_examples,
            batch_size=batch_size,
            epochs_total=int(rounds) * int(local_epochs),
        )
        ledger = PrivacyLedger(settings.accountant, settings.delta, settings.epsilon)
        return cls(settings, path, run_key, sigma, q, steps_round, ledger, [])

    def check(self, server_round: int) -> None:
        """Raise `PrivacyBudgetExceeded` if training this round would exceed the budget."""
        if self.ledger.would_exceed(self.noise_multiplier, self.sample_rate, self.steps_per_round):
            after = self.ledger.projected_epsilon(
                self.noise_multiplier, self.sample_rate, self.steps_per_round
            )
            raise PrivacyBudgetExceeded(
                f"round {server_round} would raise this site's ε from {self.ledger.epsilon():.3f} "
                f"to {after:.3f}, over its budget ε={self.ledger.budget} (δ={self.ledger.delta}); "
                "the site does not train"
            )

    def hooks(self) -> DPSGD:
        """A fresh DP-SGD hook pair recording into this site's ledger."""
        return DPSGD(
            self.noise_multiplier,
            self.settings.max_grad_norm,
            self.ledger,
            grad_sample_mode=self.settings.grad_sample_mode,
            secure_mode=self.settings.secure_mode,
        )

    def commit(self, server_round: int) -> None:
        """Persist the ledger (atomically) before the update leaves the site."""
        self.rounds.append(int(server_round))
        data = {
            "run_key": self.run_key,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "rounds": self.rounds,
            "ledger": self.ledger.to_dict(),
        }
        tmp = self.path.with_name(f".{SITE_LEDGER}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.path)

    def metrics(self) -> dict[str, float]:
        """What the site tells the server (numbers only, no data)."""
        return {
            "dp-epsilon": self.ledger.epsilon(),
            "dp-epsilon-next": self.ledger.projected_epsilon(
                self.noise_multiplier, self.sample_rate, self.steps_per_round
            ),
            "dp-steps": self.ledger.steps,
            "dp-noise-multiplier": self.noise_multiplier,
            "dp-sample-rate": self.sample_rate,
        }


def clear_site_ledger(site_dir: str | Path) -> None:
    """Forget a site's ledger (a fresh, non-resumed run starts from ε = 0)."""
    (Path(site_dir) / SITE_LEDGER).unlink(missing_ok=True)


def bound_update(weights: dict, received: dict, bound: float) -> tuple[dict, float]:
    """Scale the update (weights - received, floating tensors) to L2 norm ≤ `bound`.

    Returns the bounded weights and the update's norm before bounding."""
    import numpy as np

    floating = [k for k, v in weights.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]
    deltas = {
        k: np.asarray(weights[k], np.float64) - np.asarray(received[k], np.float64)
        for k in floating
    }
    norm = float(np.sqrt(sum(float(np.sum(d * d)) for d in deltas.values())))
    if norm <= bound or norm == 0.0:
        return dict(weights), norm
    scale = bound / norm
    out = dict(weights)
    for key, delta in deltas.items():
        out[key] = (np.asarray(received[key], np.float64) + delta * scale).astype(
            np.asarray(weights[key]).dtype
        )
    return out, norm


# --------------------------------------------------------------------------- server side


class ServerPrivacy:
    """The server's view of a run's privacy (see the module docstring)."""

    def __init__(self, settings: PrivacySettings, rounds: int, num_sites: int) -> None:
        self.settings = settings
        self.rounds = int(rounds)
        self.num_sites = int(num_sites)
        self.sites: dict[str, dict[str, float]] = {}
        self.stopped: str | None = None
        self.ledger: PrivacyLedger | None = None
        self.noise_multiplier: float | None = None
        self._wrapper: Any = None
        if settings.central_dp:
            c = settings.central
            self.noise_multiplier = c.noise_multiplier
            if self.noise_multiplier is None:
                self.noise_multiplier = calibrate_noise(
                    settings.epsilon, settings.delta, 1.0, self.rounds, settings.accountant
                )
                log.info(
                    "central DP: calibrated σ=%.4f for ε=%s δ=%s over %d rounds",
                    self.noise_multiplier,
                    settings.epsilon,
                    settings.delta,
                    self.rounds,
                )
            self.ledger = PrivacyLedger(settings.accountant, settings.delta, settings.epsilon)

    def wrap(self, strategy: Any) -> Any:
        """Central DP: wrap `strategy` in Flower's server-side DP wrapper (else unchanged)."""
        if not self.settings.central_dp:
            return strategy
        try:
            self._wrapper = self._dp_wrapper(strategy)
        except ValueError as exc:  # Flower's own parameter checks
            raise ConfigError(f"privacy.central: {exc}") from None
        return self._wrapper

    def _dp_wrapper(self, strategy: Any) -> Any:
        from flwr.serverapp import strategy as fs

        c = self.settings.central
        if c.clipping == "fixed":
            return fs.DifferentialPrivacyServerSideFixedClipping(
                strategy, self.noise_multiplier, c.clipping_norm, self.num_sites
            )
        return fs.DifferentialPrivacyServerSideAdaptiveClipping(
            strategy,
            self.noise_multiplier,
            self.num_sites,
            initial_clipping_norm=c.clipping_norm,
            target_clipped_quantile=c.target_clipped_quantile,
            clip_norm_lr=c.clip_norm_lr,
            clipped_count_stddev=c.clipped_count_stddev,
        )

    @property
    def clipping_norm(self) -> float | None:
        return None if self._wrapper is None else float(self._wrapper.clipping_norm)

    def stop_reason(self, next_round: int) -> str | None:
        """Why round `next_round` must not run (a budget would be exceeded), or None."""
        budget = self.settings.epsilon
        if budget is None:
            return None
        if self.ledger is not None and self.ledger.would_exceed(self.noise_multiplier, 1.0, 1):
            after = self.ledger.projected_epsilon(self.noise_multiplier, 1.0, 1)
            return (
                f"privacy budget: round {next_round} would raise the site-level ε from "
                f"{self.ledger.epsilon():.3f} to {after:.3f} > {budget}"
            )
        over = {s: v["epsilon_next"] for s, v in self.sites.items() if v["epsilon_next"] > budget}
        if over:
            site, eps = max(over.items(), key=lambda kv: kv[1])
            return (
                f"privacy budget: round {next_round} would raise site {site}'s ε to {eps:.3f} "
                f"> {budget} (DP-SGD, δ={self.settings.delta})"
            )
        return None

    def after_round(self, sites: dict[str, dict[str, Any]], aggregated: bool) -> dict[str, Any]:
        """Record the round; returns the round's privacy row for the ledger/history."""
        row: dict[str, Any] = {}
        if self.ledger is not None:
            accepted = sum(1 for r in sites.values() if r.get("status") == "accepted")
            if aggregated and accepted:
                sigma = self.noise_multiplier * min(1.0, accepted / self.num_sites)
                self.ledger.step(sigma, 1.0, 1)
            row = {"epsilon": self.ledger.epsilon(), "clipping_norm": self.clipping_norm}
        for site, r in sites.items():
            if "dp_epsilon" in r:
                self.sites[site] = {
                    "epsilon": float(r["dp_epsilon"]),
                    "epsilon_next": float(r["dp_epsilon_next"]),
                    "steps": int(r["dp_steps"]),
                    "noise_multiplier": float(r["dp_noise_multiplier"]),
                    "sample_rate": float(r["dp_sample_rate"]),
                }
        if self.sites:
            row["worst_site_epsilon"] = max(v["epsilon"] for v in self.sites.values())
        return row

    def state(self) -> dict[str, Any]:
        return {
            "sites": self.sites,
            "ledger": None if self.ledger is None else self.ledger.to_dict(),
            "clipping_norm": self.clipping_norm,
            "stopped": self.stopped,
        }

    def restore(self, state: dict[str, Any] | None) -> None:
        """Continue from a checkpoint's `state()` (the ledger, the site table, the clip norm)."""
        if not state:
            return
        self.sites = {k: dict(v) for k, v in state.get("sites", {}).items()}
        if self.ledger is not None and state.get("ledger"):
            self.ledger = PrivacyLedger.from_dict(state["ledger"])
        if self._wrapper is not None and state.get("clipping_norm") is not None:
            self._wrapper.clipping_norm = float(state["clipping_norm"])

    def report(self) -> dict[str, Any] | None:
        """The run's privacy facts (None without privacy)."""
        s = self.settings
        if not s.enabled:
            return None
        out: dict[str, Any] = {
            "mode": s.mode,
            "delta": s.delta,
            "epsilon_budget": s.epsilon,
            "accountant": s.accountant,
            "secure_aggregation": s.secure_aggregation,
            "stopped_early": self.stopped,
        }
        if s.secure_aggregation:
            out["update_norm_bound"] = s.update_norm_bound
        if self.ledger is not None:
            out |= {
                "level": "site (a whole hospital's data)",
                "epsilon": self.ledger.epsilon(),
                "noise_multiplier": self.noise_multiplier,
                "clipping": s.central.clipping,
                "clipping_norm": self.clipping_norm,
                "sample_rate": 1.0,
                "rounds": self.ledger.steps,
            }
        if s.dp_sgd:
            worst_site = max(self.sites, key=lambda k: self.sites[k]["epsilon"], default=None)
            worst = self.sites.get(worst_site, {})
            out |= {
                "level": "sample (one image), per site",
                "epsilon": worst.get("epsilon", 0.0),
                "worst_site": worst_site,
                "noise_multiplier": worst.get("noise_multiplier"),
                "sample_rate": worst.get("sample_rate"),
                "steps": worst.get("steps"),
                "max_grad_norm": s.max_grad_norm,
                "per_site": self.sites,
            }
        return out


__all__ = [
    "SITE_LEDGER",
    "UNIT_WEIGHT",
    "ServerPrivacy",
    "SiteDP",
    "bound_update",
    "clear_site_ledger",
]
