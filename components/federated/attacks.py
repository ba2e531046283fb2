"""Byzantine site behaviours for robustness experiments (never active unless configured).

A site named in `federation.attack` trains honestly, then corrupts what it sends
(`poison_update`), or trains on flipped labels (`poison_labels`). Only floating-point tensors
are touched; integer buffers (e.g. BatchNorm's `num_batches_tracked`) are sent as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from components.errors import ConfigError
from components.federated.settings import AttackSettings

UPDATE_ATTACKS = frozenset({"sign_flip", "scale", "gaussian", "nan"})


def attacker_sites(attack: AttackSettings, sites: Sequence[str]) -> dict[str, dict]:
    """{site: attack description} for the sites that attack (empty when none)."""
    if not attack.active:
        return {}
    names = sorted(sites)
    if isinstance(attack.sites, tuple):
        unknown = sorted(set(attack.sites) - set(names))
        if unknown:
            raise ConfigError(
                f"federation.attack.sites names unknown site(s) {', '.join(unknown)}; "
                f"sites are {', '.join(names)}"
            )
        chosen = sorted(attack.sites)
    else:
        if attack.sites >= len(names):
            raise ConfigError(
                f"federation.attack.sites={attack.sites} leaves no honest site among {len(names)}"
            )
        chosen = names[: attack.sites]
    spec = {"behaviour": attack.behaviour, "scale": attack.scale, "noise_std": attack.noise_std}
    return {site: dict(spec) for site in chosen}


def poison_labels(y: np.ndarray, num_classes: int) -> np.ndarray:
    """Label flip: class c becomes K-1-c (a fixed, maximally confusing permutation)."""
    return (num_classes - 1 - np.asarray(y, dtype=np.int64)).astype(np.int64)


def poison_update(
    local: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    attack: Mapping,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """The weights a Byzantine site sends instead of its honest `local` weights.

    `reference` holds the global weights the site received this round, so the honest update
    is Δ = local - reference.
    """
    behaviour = attack["behaviour"]
    if behaviour not in UPDATE_ATTACKS:
        return {k: np.asarray(v) for k, v in local.items()}
    out: dict[str, np.ndarray] = {}
    for key, value in local.items():
        w = np.asarray(value)
        if not np.issubdtype(w.dtype, np.floating):
            out[key] = w
            continue
        g = np.asarray(reference[key], dtype=w.dtype)
        if behaviour == "sign_flip":
            out[key] = (g - attack["scale"] * (w - g)).astype(w.dtype)
        elif behaviour == "scale":
            out[key] = (g + attack["scale"] * (w - g)).astype(w.dtype)
        elif behaviour == "gaussian":
            out[key] = (w + rng.normal(0.0, attack["noise_std"], size=w.shape)).astype(w.dtype)
        else:  # nan
            out[key] = np.full_like(w, np.nan)
    return out


__all__ = ["UPDATE_ATTACKS", "attacker_sites", "poison_labels", "poison_update"]
