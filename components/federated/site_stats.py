"""Site statistics: the only description of a hospital's data that leaves the hospital.

`site_statistics(...)` turns a site's labels, original image sizes and pixel arrays into
aggregate numbers — class counts per split, an image-size histogram over fixed edges and a mean
intensity histogram — and nothing else (no ids, paths, hashes or per-image values). With
`noise=laplace|gaussian` every released histogram gets DP noise: adding or removing one image
changes each histogram by at most 1 in L1 (the intensity histogram sums per-image normalised
histograms), so each gets ε/k of the budget for k histograms (basic composition); noisy values
are then clipped at 0 (post-processing). The counts of the release are what `stats.json` holds
and what the site answers to the coordinator's preflight.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from components.federated.settings import SiteStatsSettings

STATS_FILE = "stats.json"
SCHEMA_VERSION = 1
# Fixed edges (data-independent: edges chosen from the data would themselves leak).
SIZE_EDGES = (0, 64, 128, 256, 512, 1024, 2048, 4096)
SPLITS = ("train", "val", "test")


def _size_histogram(sides: np.ndarray) -> list[float]:
    """Counts of `sides` in [SIZE_EDGES[i], SIZE_EDGES[i+1]) and a last bin >= 4096."""
    edges = [*SIZE_EDGES, np.inf]
    counts, _ = np.histogram(np.asarray(sides, dtype=np.float64), bins=edges)
    return [float(c) for c in counts]


def _intensity_histogram(images: Sequence[np.ndarray], bins: int) -> list[float]:
    """Sum over images of each image's normalised pixel histogram over 0..255 (mass 1 each)."""
    total = np.zeros(bins, dtype=np.float64)
    for batch in images:
        for image in np.asarray(batch):
            counts, _ = np.histogram(image, bins=bins, range=(0, 256))
            if counts.sum():
                total += counts / counts.sum()
    return [float(v) for v in total]


def _noise(
    values: list[float], settings: SiteStatsSettings, share: float, rng: np.random.Generator
) -> list[float]:
    """`values` plus DP noise for an L1/L2 sensitivity of 1 and budget ε·share."""
    if settings.noise == "none":
        return values
    epsilon = settings.epsilon * share
    if settings.noise == "laplace":
        noise = rng.laplace(0.0, 1.0 / epsilon, size=len(values))
    else:  # gaussian mechanism (classic calibration, sensitivity 1)
        sigma = math.sqrt(2 * math.log(1.25 / settings.delta)) / epsilon
        noise = rng.normal(0.0, sigma, size=len(values))
    return [max(0.0, float(v + n)) for v, n in zip(values, noise, strict=True)]


def site_statistics(
    class_names: Sequence[str],
    labels: Mapping[str, np.ndarray],
    widths: np.ndarray,
    heights: np.ndarray,
    images: Sequence[np.ndarray],
    settings: SiteStatsSettings,
    *,
    seed: int | None = None,
) -> dict[str, Any]:
    """The site's releasable statistics (see the module doc).

    `labels`: integer labels per split ("train"/"val"/"test"); `widths`/`heights`: the original
    image sizes; `images`: uint8 arrays (N,C,H,W) whose pixels feed the intensity histogram.
    `seed` fixes the noise (tests); by default it is drawn from the OS.
    """
    k = len(class_names)
    released: dict[str, list[float]] = {}
    for split in SPLITS:
        y = np.asarray(labels.get(split, np.zeros(0, dtype=np.int64)), dtype=np.int64)
        released[f"class_counts.{split}"] = [float(c) for c in np.bincount(y, minlength=k)[:k]]
    released["image_width"] = _size_histogram(widths)
    released["image_height"] = _size_histogram(heights)
    released["intensity"] = _intensity_histogram(images, settings.histogram_bins)
    rng = np.random.default_rng(seed)
    share = 1.0 / len(released)
    noisy = {key: _noise(values, settings, share, rng) for key, values in released.items()}
    exact = settings.noise == "none"

    def shown(values: list[float]) -> list[float] | list[int]:
        return [round(v) for v in values] if exact else [round(v, 3) for v in values]

    counts = {
        split: dict(zip(class_names, shown(noisy[f"class_counts.{split}"]), strict=True))
        for split in SPLITS
    }
    return {
        "schema": SCHEMA_VERSION,
        "class_names": list(class_names),
        "class_counts": counts,
        "num_images": {split: sum(counts[split].values()) for split in SPLITS},
        "image_sizes": {
            "edges": [*SIZE_EDGES, "inf"],
            "width": shown(noisy["image_width"]),
            "height": shown(noisy["image_height"]),
        },
        "intensity": {
            "range": [0, 255],
            "bins": settings.histogram_bins,
            "histogram": [round(v, 3) for v in noisy["intensity"]],
        },
        "privacy": {
            "noise": settings.noise,
            "epsilon": None if exact else settings.epsilon,
            "delta": settings.delta if settings.noise == "gaussian" else None,
            "histograms": len(released),
            "epsilon_per_histogram": None if exact else settings.epsilon * share,
        },
    }


def write_stats(site_dir: str | Path, stats: Mapping[str, Any]) -> Path:
    path = Path(site_dir) / STATS_FILE
    path.write_text(json.dumps(stats, indent=1))
    path.chmod(0o600)
    return path


def read_stats(site_dir: str | Path) -> dict[str, Any] | None:
    path = Path(site_dir) / STATS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


__all__ = ["SIZE_EDGES", "STATS_FILE", "read_stats", "site_statistics", "write_stats"]
