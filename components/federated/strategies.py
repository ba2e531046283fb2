"""Map `federation.strategy` to a Flower (Message API) strategy from `flwr.serverapp.strategy`.

All seven rules exist in flwr 1.41 and are used as they are: the server's round driver
(`server_app.run_federation`) adds hygiene, per-site bookkeeping and checkpointing around their
`configure_*` / `aggregate_*` methods instead of re-implementing any aggregation.
"""

from __future__ import annotations

from typing import Any

from components.federated.settings import FederationSettings


def build_strategy(settings: FederationSettings, weighted_by_key: str = "num-examples") -> Any:
    """A configured `flwr.serverapp.strategy.Strategy` for `settings`; the averaging rules
    weight each site by the reply metric `weighted_by_key`."""
    from flwr.serverapp import strategy as fs

    common: dict[str, Any] = {
        "weighted_by_key": weighted_by_key,
        "fraction_train": settings.fraction_train,
        "fraction_evaluate": 1.0 if settings.evaluate_sites else 0.0,
        "min_train_nodes": settings.min_fit_sites,
        "min_evaluate_nodes": settings.min_fit_sites if settings.evaluate_sites else 0,
        "min_available_nodes": settings.min_available_sites,
    }
    f = settings.num_malicious
    name = settings.strategy
    if name == "fedavg":
        return fs.FedAvg(**common)
    if name == "fedprox":
        return fs.FedProx(**common, proximal_mu=settings.proximal_mu)
    if name == "krum":
        return fs.Krum(**common, num_malicious_nodes=f)
    if name == "multikrum":
        select = settings.selected_by_multikrum(settings.num_sites or settings.min_fit_sites)
        return fs.MultiKrum(**common, num_malicious_nodes=f, num_nodes_to_select=select)
    if name == "trimmed_mean":
        return fs.FedTrimmedAvg(**common, beta=settings.trim_fraction)
    if name == "median":
        return fs.FedMedian(**common)
    if name == "bulyan":
        return fs.Bulyan(**common, num_malicious_nodes=f)
    raise AssertionError(f"unvalidated strategy {name!r}")  # validate_federation rejects it


def strategy_state(settings: FederationSettings) -> dict[str, Any]:
    """What defines the strategy's behaviour, saved with each checkpoint.

    The seven rules keep no state between rounds beyond the global model (which the checkpoint
    stores), so their configuration is their whole state.
    """
    keys = (
        "strategy",
        "num_malicious",
        "multikrum_select",
        "trim_fraction",
        "mixing",
        "proximal_mu",
        "fraction_train",
        "min_fit_sites",
        "min_available_sites",
    )
    return {key: getattr(settings, key) for key in keys}


__all__ = ["build_strategy", "strategy_state"]
