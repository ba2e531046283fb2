"""Nearest-neighbour mixing (NNM): a pre-aggregation step that makes robust rules work on
heterogeneous sites.

Krum, the coordinate-wise median and the trimmed mean throw away most of what honest but
label-skewed sites contribute: five hospitals with different case mixes send five different
updates, and the "most central" one or the per-coordinate median is far from their mean. NNM
(Allouah et al., "Fixing by Mixing", AISTATS 2023) replaces every update by the average of its
n - f nearest updates (itself included, Euclidean distance over all weights) before the robust
rule runs. An honest site's neighbourhood is then mostly honest, so the mixed honest updates
are close to the honest mean, while an outlier can only pull its own mixed vector (and any
neighbourhood it sits in) by its share of the weights. The averages are weighted by the
sites' sample counts, as FedAvg is (an unweighted mean lets a site with a handful of images
count as much as one with thousands, which costs far more accuracy on skewed sites than the
attack does); counts are self-reported, so each is capped at the (f+1)-th largest: f lying
sites cannot claim more weight than the largest honest one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

MIXING: tuple[str, ...] = ("none", "nnm")


def _floating(arrays: Mapping[str, np.ndarray]) -> list[str]:
    return [k for k, v in arrays.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]


def neighbourhoods(updates: Sequence[Mapping[str, np.ndarray]], f: int) -> list[list[int]]:
    """For each update, the indices of its n - f nearest updates (itself first, then by
    distance; ties by index), with n = len(updates) and at least one neighbour (itself)."""
    n = len(updates)
    if n == 0:
        return []
    keys = _floating(updates[0])
    flat = np.stack(
        [np.concatenate([np.ravel(u[k]).astype(np.float64) for k in keys]) for u in updates]
    )
    distances = np.stack([np.linalg.norm(flat - row, axis=1) for row in flat])
    np.fill_diagonal(distances, -1.0)  # itself always comes first
    k = max(1, n - int(f))
    return [np.lexsort((np.arange(n), row))[:k].tolist() for row in distances]


def capped_weights(weights: Sequence[float], f: int) -> np.ndarray:
    """Sample counts as mixing weights, each capped at the (f+1)-th largest reported count, so
    that f lying sites cannot outweigh the largest honest one."""
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0:
        return w
    cap = np.sort(w)[::-1][min(int(f), len(w) - 1)]
    return np.clip(w, 0.0, cap)


def mix(
    updates: Sequence[Mapping[str, np.ndarray]],
    f: int,
    weights: Sequence[float] | None = None,
) -> tuple[list[dict[str, np.ndarray]], list[list[int]]]:
    """Every update replaced by the mean of its `neighbourhoods`, weighted by `weights` (the
    sites' sample counts, `capped_weights`; unweighted if None); non-floating arrays (e.g.
    step counters) are kept as they are. Returns the mixed updates and the neighbourhoods."""
    groups = neighbourhoods(updates, f)
    if not updates:
        return [], groups
    w = np.ones(len(updates)) if weights is None else capped_weights(weights, f)
    keys = set(_floating(updates[0]))
    mixed = []
    for i, group in enumerate(groups):
        total = w[group].sum()
        share = w[group] / total if total > 0 else np.full(len(group), 1.0 / len(group))
        out = {}
        for key, value in updates[i].items():
            if key in keys:
                stacked = np.stack([np.asarray(updates[j][key], dtype=np.float64) for j in group])
                out[key] = np.tensordot(share, stacked, axes=1).astype(np.asarray(value).dtype)
            else:
                out[key] = value
        mixed.append(out)
    return mixed, groups


__all__ = ["MIXING", "capped_weights", "mix", "neighbourhoods"]
