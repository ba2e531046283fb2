"""Update hygiene: reject malformed or absurd site updates before aggregation.

Runs on the server for every strategy. An update is rejected when its keys or shapes differ
from the global model, when it holds NaN/Inf, or when the L2 norm of (local - global) over the
floating-point tensors is absurd (see `HygieneSettings`). Each rejection names the site and the
reason; the round continues with the remaining updates.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from components.federated.settings import HygieneSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rejection:
    """One update (or reply) the server did not aggregate, and why."""

    round: int
    site: str
    reason: str
    node_id: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def structural_problem(
    candidate: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
) -> str | None:
    """Why `candidate` cannot be aggregated with `reference` (keys, shapes, finiteness), or None."""
    missing = sorted(set(reference) - set(candidate))
    extra = sorted(set(candidate) - set(reference))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{'…' if len(missing) > 3 else ''}")
        if extra:
            parts.append(f"unexpected {', '.join(extra[:3])}{'…' if len(extra) > 3 else ''}")
        return "tensor names differ from the global model: " + "; ".join(parts)
    for key, ref in reference.items():
        value = np.asarray(candidate[key])
        if value.shape != np.shape(ref):
            return f"wrong shape for {key}: {value.shape}, the global model has {np.shape(ref)}"
        if np.issubdtype(value.dtype, np.number) and not np.all(np.isfinite(value)):
            return f"non-finite values (NaN/Inf) in {key}"
    return None


def update_norm(candidate: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of candidate - reference over floating-point tensors (float64 accumulation)."""
    total = 0.0
    for key, ref in reference.items():
        ref = np.asarray(ref)
        if not np.issubdtype(ref.dtype, np.floating):
            continue
        diff = np.asarray(candidate[key], dtype=np.float64) - ref.astype(np.float64)
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return float(np.sqrt(total))


def screen_updates(
    server_round: int,
    updates: Sequence[tuple[str, int | None, Mapping[str, np.ndarray]]],
    reference: Mapping[str, np.ndarray],
    settings: HygieneSettings,
) -> tuple[list[int], list[Rejection], dict[str, float]]:
    """Check `updates` = [(site, node_id, weights)] against the round's global weights.

    Returns (indices of accepted updates, rejections, {site: update norm}).
    """
    rejections: list[Rejection] = []
    sound: list[int] = []
    for i, (site, node, weights) in enumerate(updates):
        problem = structural_problem(weights, reference)
        if problem:
            rejections.append(Rejection(server_round, site, problem, node))
        else:
            sound.append(i)
    norms = {updates[i][0]: update_norm(updates[i][2], reference) for i in sound}
    accepted: list[int] = []
    median = float(np.median(list(norms.values()))) if len(norms) >= 3 else None
    for i in sound:
        site, node, _ = updates[i]
        norm = norms[site]
        reason = None
        if settings.max_norm is not None and norm > settings.max_norm:
            reason = f"update norm {norm:.3g} exceeds the cap max_norm={settings.max_norm:g}"
        elif (
            settings.max_norm_ratio is not None
            and median is not None
            and median > 0
            and norm > settings.max_norm_ratio * median
        ):
            reason = (
                f"update norm {norm:.3g} is {norm / median:.0f}x the round's median "
                f"{median:.3g} (limit {settings.max_norm_ratio:g}x)"
            )
        if reason:
            rejections.append(Rejection(server_round, site, reason, node))
        else:
            accepted.append(i)
    for r in rejections:
        log.warning("round %d: rejected the update of site %s: %s", r.round, r.site, r.reason)
    return accepted, rejections, norms


__all__ = ["Rejection", "screen_updates", "structural_problem", "update_norm"]
